"""The classic baselines end to end: every method in one run against one teacher on mock
CIFAR-100, preparation stages included; what each stage hands the next; RepDistiller's names;
in-batch terms on 1 and 4 devices."""

import functools
import glob
import os

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import helpers

from configs import default
from jaxkd import checkpoint
from jaxkd import networks
from jaxkd import parallel
from jaxkd import recipe
from jaxkd import steps
from jaxkd import train
from jaxkd.data import sources
from jaxkd.errors import UserError
from jaxkd.methods import get_method
from jaxkd.optim import learning_rate_schedule, make_optimizer
from jaxkd.state import TrainState

# RepDistiller's names where it has one: the run must accept them.
# (KDSVD runs on one device: see test_kdsvd_runs_on_one_cpu_device.)
BASELINES = ("hint", "attention", "similarity", "correlation", "vid", "rkd", "pkt", "abound",
             "factor", "fsp", "nst", "crd", "crd_kd", "dkd")
STAGES = ["teacher", "student_fitnet", "student_at", "student_sp", "student_cc", "student_vid",
          "student_rkd", "student_pkt", "student_ab_init", "student_ab", "teacher_ft",
          "student_ft", "student_fsp_init", "student_fsp", "student_nst", "student_crd",
          "student_crd_kd", "student_dkd"]
# Per method: the unweighted term its student stage logs.
TERMS = {"fitnet": "loss_fitnet", "at": "loss_at", "sp": "loss_sp", "cc": "loss_cc",
         "vid": "loss_vid", "rkd": "loss_rkd", "pkt": "loss_pkt", "ft": "loss_ft",
         "nst": "loss_nst", "crd": "loss_crd", "crd_kd": "loss_crd",
         "dkd": "loss_dkd"}


def _config(workdir_root):
  """configs/default.py:runlocal for resnet14 → resnet8 (equal widths, so FSP and KDSVD
  apply), shrunk to one epoch of two steps, the preparation stages to one epoch, CRD to four
  negatives; a teacher file of random weights stands in for stage `teacher`."""
  config = helpers.mock_cifar_config(workdir_root, "resnet14", "resnet8", BASELINES[0],
                                     ",".join(BASELINES[1:]))
  config.method_overrides = ml_collections.ConfigDict(dict(
      abound=dict(init_epochs=1), factor=dict(init_epochs=1), fsp=dict(init_epochs=1),
      crd=dict(nce_k=4), crd_kd=dict(nce_k=4)))
  return config


@pytest.fixture(scope="module")
def baselines_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("baselines")
  config = _config(root)
  workdir = str(root / "run")
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(sources, "data_source", helpers.mock_cifar100)
    results = train.train_and_evaluate(config, workdir)
  return config, workdir, {r["stage"]: r for r in results}, [r["stage"] for r in results]


def test_every_baseline_runs_its_stages_in_one_run(baselines_run):
  _, workdir, results, order = baselines_run
  assert order == STAGES
  for name, term in TERMS.items():
    result = results[f"student_{name}"]
    assert result["model"] == "resnet8" and result["method"] == name
    assert 0.0 <= result["top1_last"] <= 100.0
    # The teacher every student read is the imported one, or FT's with its paraphraser.
    expected = results["teacher_ft" if name == "ft" else "teacher"]
    assert result["teacher_sha256"] == (expected.get("export_sha256")
                                        or checkpoint.file_sha256(expected["checkpoint"]))
    logged = _logged_metrics(os.path.join(workdir, f"student_{name}"))
    assert term in logged and np.isfinite(logged[term]), (name, sorted(logged))


def _logged_metrics(stage_dir):
  """The last value of every train/ scalar in the stage's TensorBoard events."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  values = {}
  for event_file in glob.glob(os.path.join(stage_dir, "events.out*")):
    for event in tf.compat.v1.train.summary_iterator(event_file):
      for value in event.summary.value:
        if value.tag.startswith("train/"):
          values[value.tag[len("train/"):]] = float(tf.make_ndarray(value.tensor))
  return values


@pytest.mark.parametrize("name", ["ab", "fsp"])
def test_student_preparation_trains_the_features_and_hands_them_on(baselines_run, name):
  config, workdir, results, _ = baselines_run
  prep, student = results[f"student_{name}_init"], results[f"student_{name}"]
  assert prep["top1_last"] is None and "no classifier" in prep["note"]
  assert prep["steps"] == 2 and prep["teacher_sha256"] == student["teacher_sha256"]
  # The student stage starts from the prepared student, recorded by its checksum.
  assert student["backbone_sha256"] == prep["export_sha256"]
  network = networks.build_network("resnet8", 100)
  initial = jax.device_get(networks.init_variables(network, (32, 32, 3), config.seed,
                                               parallel.create_mesh()))
  prepared = checkpoint.import_variables(prep["export"], initial)
  # AB's connector is dropped from the export; the classifier keeps its initial values
  # (RepDistiller trains `get_feat_modules()` only); the feature layers learned.
  assert set(prepared["params"]) == {"backbone"}
  for key in ("kernel", "bias"):
    np.testing.assert_array_equal(prepared["params"]["backbone"]["fc"][key],
                                  initial["params"]["backbone"]["fc"][key])
  assert not np.allclose(prepared["params"]["backbone"]["conv1"]["kernel"],
                         initial["params"]["backbone"]["conv1"]["kernel"])


def test_ft_trains_the_paraphraser_on_the_frozen_teacher(baselines_run):
  _, _, results, _ = baselines_run
  prep = results["teacher_ft"]
  assert prep["model"] == "resnet14" and prep["method"] == "ft" and prep["steps"] == 2
  with open(prep["export"], "rb") as f:
    exported = flax.serialization.msgpack_restore(f.read())
  # The teacher with its paraphraser head, which the student stage reads (and never trains).
  assert set(exported["params"]) == {"backbone", "heads"}
  assert results["student_ft"]["teacher_sha256"] == prep["export_sha256"]


def test_rerun_skips_every_finished_stage(baselines_run, capsys):
  config, workdir, _, _ = baselines_run
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(sources, "data_source", helpers.mock_cifar100)
    train.train_and_evaluate(config, workdir)
  out = capsys.readouterr().out
  assert out.count("already done") == len(STAGES) - 1  # the imported teacher is not a stage


def test_repdistiller_names_are_aliases():
  assert [get_method(n).name for n in ("hint", "attention", "similarity", "correlation",
                                        "abound", "factor")] == ["fitnet", "at", "sp", "cc",
                                                                 "ab", "ft"]
  config = default.get_config()
  config.method.name = "hint"
  config.baselines = "fitnet,attention,at"
  config.method_overrides = ml_collections.ConfigDict(dict(attention=dict(feat_weight=5.0)))
  assert recipe.student_methods(config) == ["fitnet", "at"]
  assert recipe.method_hparams(config, get_method("at")).feat_weight == 5.0


def test_default_weights_are_the_reference_scripts():
  expected = {"fitnet": 100, "at": 1000, "sp": 3000, "cc": 0.02, "vid": 1, "rkd": 1,
              "pkt": 30000, "ft": 200, "nst": 50, "crd": 0.8, "crd_kd": 0.8, "kdsvd": 1}
  for name, beta in expected.items():
    hparams = get_method(name).hparams()
    assert (hparams.ce_weight, hparams.feat_weight) == (1.0, beta), name
    assert hparams.kd_weight == (1.0 if name == "crd_kd" else 0.0), name
  # AB and FSP distil with CE alone after their preparation (RepDistiller's -a 0).
  for name in ("ab", "fsp"):
    hparams = get_method(name).hparams()
    assert (hparams.ce_weight, hparams.kd_weight, hparams.init_epochs) == (1.0, 0.0, 30)
  # DKD's β follows mdistiller's per-pair configs.
  assert get_method("dkd").hparams(pair=("resnet56", "resnet20")).beta == 2.0
  assert get_method("dkd").hparams(pair=("vgg13", "vgg8")).beta == 6.0
  assert get_method("dkd").hparams(pair=("resnet32x4", "resnet8x4")).beta == 8.0
  # FT's paraphraser: lr 0.01 with a ResNet or WRN student, else the student's.
  assert get_method("ft").hparams(pair=("resnet32x4", "resnet8x4")).init_lr == 0.01
  assert get_method("ft").hparams(pair=("vgg13", "vgg8")).init_lr == -1


@pytest.mark.parametrize("name", ["fsp", "kdsvd"])
def test_pairs_with_unequal_widths_are_refused_before_any_work(tmp_path, monkeypatch, name):
  monkeypatch.setattr(sources, "data_source", helpers.mock_cifar100)
  config = default.get_config("runlocal")
  config.teacher.name, config.student.name = "wrn_40_2", "wrn_40_1"
  config.method = ml_collections.ConfigDict(dict(name=name))
  with pytest.raises(UserError, match="wrn_40_2.*wrn_40_1"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()  # Refused by the plan, before the workdir is made.


def test_kdsvd_runs_on_one_cpu_device_and_is_refused_on_four(tmp_path):
  config = _config(tmp_path)
  config.method = ml_collections.ConfigDict(dict(name="kdsvd"))
  config.baselines = ""
  with pytest.raises(UserError, match="kdsvd cannot run on 4 CPU devices"):
    with pytest.MonkeyPatch.context() as patch:
      patch.setattr(sources, "data_source", helpers.mock_cifar100)
      train.train_and_evaluate(config, str(tmp_path / "four"))
  assert not (tmp_path / "four").exists()  # Refused by the plan, before the workdir is made.
  create_mesh = parallel.create_mesh
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(sources, "data_source", helpers.mock_cifar100)
    patch.setattr(parallel, "create_mesh", lambda: create_mesh(jax.devices()[:1]))
    results = train.train_and_evaluate(config, str(tmp_path / "one"))
  assert [r["stage"] for r in results] == ["teacher", "student_kdsvd"]
  logged = _logged_metrics(str(tmp_path / "one" / "student_kdsvd"))
  assert np.isfinite(logged["loss_kdsvd"]) and logged["loss_kdsvd"] > 0


# ------------------------------------------------------------------- devices 1 vs 4


def _two_steps(mesh, name, batches):
  """Two training steps of `name` (its bridge included) of resnet8 from a resnet8 teacher."""
  method = get_method(name)
  hparams = method.hparams(ml_collections.ConfigDict(dict(nce_k=4)) if name == "crd" else None)
  teacher_net = networks.build_network("resnet8", 10)
  teacher_vars = networks.init_variables(teacher_net, (8, 8, 3), 1, mesh)
  bridge = method.bridge(16, hparams) if method.bridge else None
  network = networks.build_network("resnet8", 10).clone(bridge=bridge)
  variables = networks.init_variables(network, (8, 8, 3), 0, mesh, networks.teacher_output_shapes(
      teacher_net, teacher_vars, (8, 8, 3)))
  config = default.get_config()
  schedule = learning_rate_schedule(config, 0.05, 1, 2)
  tx = make_optimizer(config, schedule)
  state = parallel.replicate(TrainState(
      step=jnp.zeros((), jnp.int32), params=variables["params"],
      batch_stats=variables["batch_stats"], opt_state=tx.init(variables["params"])), mesh)
  step = jax.jit(functools.partial(
      steps.train_step, network=network, teacher_network=teacher_net, loss=method.loss,
      hparams=hparams, tx=tx, schedule=schedule, steps_per_epoch=2))
  metrics = []
  for b in batches:
    state, m = step(state, teacher_vars, parallel.to_global(b, mesh))
    metrics.append(m)
  return jax.device_get((state, metrics))


@pytest.mark.parametrize("name", ["cc", "crd"])
def test_in_batch_terms_do_not_depend_on_the_device_count(name):
  """CC pairs consecutive rows of the global batch; CRD's scores, banks and Z read it whole."""
  rng = np.random.default_rng(0)
  batches = []
  for s in range(2):
    index = np.arange(8 * s, 8 * s + 8)
    batches.append({"image": rng.normal(size=(8, 8, 8, 3)).astype(np.float32),
                    "label": rng.integers(0, 10, size=8).astype(np.int32),
                    "index": index.astype(np.int32),
                    "contrast_index": np.concatenate(
                        [index[:, None], rng.integers(0, 16, size=(8, 4))], 1).astype(np.int32)})
  one_state, one_metrics = _two_steps(parallel.create_mesh(jax.devices()[:1]), name, batches)
  four_state, four_metrics = _two_steps(parallel.create_mesh(jax.devices()[:4]), name, batches)
  for a, b in zip(one_metrics, four_metrics):
    np.testing.assert_allclose(a[f"loss_{name}"], b[f"loss_{name}"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves((one_state.params, one_state.batch_stats)),
                  jax.tree.leaves((four_state.params, four_state.batch_stats))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_the_trainer_names_no_method():
  """The plan, the executor, the loop and the steps read what a method needs from its Method record: they
  never compare with, look up or key on a registered method name (or a RepDistiller alias);
  only 'ce', the cross-entropy that trains a teacher, is fetched by name."""
  import re  # pylint: disable=g-import-not-at-top
  from jaxkd.methods import ALIASES, METHOD_NAMES  # pylint: disable=g-import-not-at-top
  names = "|".join(sorted((set(METHOD_NAMES) | set(ALIASES)) - {"ce"}))
  branch = re.compile(rf"""(==|!=|\bin|get_method\(|\[)\s*\(?\s*["']({names})["']""")
  for module in ("train", "plan", "recipe", "stage", "executor", "teachers", "loop", "steps"):
    source = (helpers.REPO / "jaxkd" / f"{module}.py").read_text()
    assert not branch.findall(source), (module, branch.findall(source))
  assert branch.findall('if method.name == "sskd":') and branch.findall('get_method("fitnet")')


def test_method_name_on_the_default_config_starts_from_that_methods_defaults():
  """configs/default.py leaves the objective's weights to the method: naming another method
  on the command line does not carry KD's 0.1/0.9 into it."""
  config = default.get_config()
  config.lock()
  config.method.name = "fitnet"
  assert dict(recipe.method_hparams(config, get_method("fitnet"))) == dict(
      get_method("fitnet").defaults)
  config.method.name, config.method.T = "kd", 2.0
  hparams = recipe.method_hparams(config, get_method("kd"))
  assert (hparams.T, hparams.ce_weight, hparams.kd_weight) == (2.0, 0.1, 0.9)
  # configs/default.py:<method> lists the method's fields; per-pair ones stay the pair's.
  config = default.get_config("dkd")
  assert set(config.method) == (set(get_method("dkd").defaults) | {"name"}
                                | set(get_method("dkd").switches()))
  config.teacher.name, config.student.name = "resnet56", "resnet20"
  assert recipe.method_hparams(config, get_method("dkd")).beta == 2.0
  config.method.beta = 3.0
  assert recipe.method_hparams(config, get_method("dkd")).beta == 3.0
