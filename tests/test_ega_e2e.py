"""EGA through the trainer: pretrain → student (EGA) → linear_probe on the digits, the online
teacher head (its own loss and optimiser, checkpointed and resumed exactly), a CLIP teacher with
its own view of each image, the recipes, and the clear errors."""

import glob
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import helpers

from configs import demo
from jaxkd import checkpoint
from jaxkd import data
from jaxkd import networks
from jaxkd import models
from jaxkd import parallel
from jaxkd import plan
from jaxkd import results
from jaxkd import stage_config
from jaxkd import stage as stage_lib
from jaxkd import teachers
from jaxkd import steps
from jaxkd import train
from jaxkd.data import teacher_views
from jaxkd.errors import UserError
from jaxkd.interop import clip_weights
from jaxkd.methods import ega
from jaxkd.methods import get_method
from jaxkd.methods import simclr
from jaxkd.methods.losses import cross_entropy
from jaxkd.models import clip

DATA = os.path.join(os.path.dirname(__file__), "data")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CLIP = os.path.join(DATA, "clip_vit_tiny")


# ------------------------------------------------------------------ the online teacher head


def test_teacher_head_step_uses_pre_update_params_and_learns_from_ce_only():
  """out = head_θ(teacher_out) at the current θ, without gradient; θ takes one SGD step of
  torch's rule on CE(logit_t, y) alone."""
  hparams = ega.METHOD.hparams(ml_collections.ConfigDict(dict(embed_dim=6)))
  head = steps.TeacherHeadStep(module=ega.teacher_heads(5, hparams), loss=ega.teacher_head_loss,
                               tx=ega.teacher_head_optimizer(hparams))
  rng = np.random.default_rng(0)
  teacher_out = {"logits": jnp.zeros((4, 7)),
                 "feats": {"pooled": jnp.asarray(rng.normal(size=(4, 7)), jnp.float32)}}
  labels = jnp.array([0, 1, 2, 4])
  params = head.module.init(jax.random.key(0), teacher_out)["params"]
  state = {"params": params, "opt_state": head.tx.init(params)}

  step = jax.jit(lambda st: steps.teacher_head_step(head, st, teacher_out, labels, hparams))
  out, new_state, metrics = step(state)
  before = jax.jit(head.module.apply)({"params": params}, teacher_out)
  np.testing.assert_allclose(out["embedding"], before["embedding"], rtol=1e-6)
  np.testing.assert_allclose(out["logits"], before["logits"], rtol=1e-6)
  np.testing.assert_array_equal(out["feats"]["pooled"], teacher_out["feats"]["pooled"])
  ce = lambda p: cross_entropy(head.module.apply({"params": p}, teacher_out)["logits"], labels)
  value, grads = jax.jit(jax.value_and_grad(ce))(params)
  np.testing.assert_allclose(metrics["loss_teacher_head"], value, rtol=1e-6)
  # torch.optim.SGD(lr 0.01, momentum 0.9, wd 5e-4), first step: θ − lr (g + wd θ).
  want = jax.tree.map(lambda p, g: p - 0.01 * (g + 5e-4 * p), params, grads)
  for a, b in zip(jax.tree.leaves(new_state["params"]), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  # Nothing of what the student reads flows back into θ.
  student_side = lambda p: jnp.sum(steps.teacher_head_step(
      head, {"params": p, "opt_state": state["opt_state"]}, teacher_out, labels,
      hparams)[0]["embedding"] ** 2)
  assert all(np.all(g == 0) for g in jax.tree.leaves(jax.jit(jax.grad(student_side))(params)))


# ---------------------------------------------------- pretrain → student (EGA) → linear_probe


def ega_config(data_dir, **overrides):
  """The EGA demo (`configs/demo.py:ega,runlocal`: SimCLR-pretrained teacher, EGA student,
  linear probe on the digits) shrunk to one epoch of four steps per stage, with a resnet8
  teacher and without the CE baseline."""
  config = demo.get_config("ega,runlocal")
  assert config.teacher.pretrain == "simclr" and config.method.name == "ega"
  assert config.linear_probe.dataset == "digits"
  config.teacher.update(name="resnet8", num_epochs=1)
  config.baselines = ""
  config.num_epochs = 1
  config.dataset.update(data_dir=data_dir, num_train_examples=32, num_eval_examples=16)
  config.update(batch_size=8, eval_batch_size=16, checkpoint_every_steps=2, keep_checkpoints=2)
  return helpers.set_fields(config, overrides)


@pytest.fixture(scope="module")
def ega_run(tmp_path_factory):
  data_dir = str(tmp_path_factory.getbasetemp() / "tfds")
  config = ega_config(data_dir)
  workdir = str(tmp_path_factory.mktemp("ega"))
  results = train.train_and_evaluate(config, workdir)
  return config, workdir, results


def _checkpoint_states(workdir, stage):
  mngr = checkpoint.manager(os.path.join(workdir, stage, "checkpoints"), 1, 2)
  return {step: mngr.restore(step)["state"] for step in mngr.all_steps()}


def test_pretrain_student_and_linear_probe_stages(ega_run):
  config, workdir, results = ega_run
  assert [r["stage"] for r in results] == ["pretrain", "student_ega", "linear_probe"]
  pretrain, student, probe = results
  # Pretraining trains no classifier: no top-1, and the result says why.
  assert pretrain["method"] == "simclr" and pretrain["top1_last"] is None
  assert "no classifier" in pretrain["note"]
  table = train.results_table(results, workdir)
  assert table.splitlines()[2].split()[3:] == ["-", "-", "-"]
  # The teacher EGA reads is the pretrained backbone, without the projection head.
  backbone_file = os.path.join(workdir, "pretrain", stage_lib.BACKBONE_FILE)
  assert student["teacher_sha256"] == checkpoint.file_sha256(backbone_file)
  pretrained = networks.build_network("resnet8", 10, simclr.projection_heads,
                                   simclr.METHOD.hparams())
  exported = checkpoint.import_variables(pretrain["export"], jax.eval_shape(
      pretrained.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1))))
  assert "heads" in exported["params"]
  backbone = checkpoint.import_variables(backbone_file, {
      col: {"backbone": tree["backbone"]} for col, tree in exported.items()})
  assert set(backbone["params"]) == {"backbone"}
  for a, b in zip(jax.tree.leaves(backbone), jax.tree.leaves(
      {c: {"backbone": t["backbone"]} for c, t in exported.items()})):
    np.testing.assert_array_equal(a, b)
  # The student is evaluated through its EGA head.
  assert 0.0 <= student["top1_last"] <= 100.0 and student["steps"] == 4
  # The probe trains a linear classifier on the exported student's frozen backbone.
  assert (probe["model"], probe["method"], probe["dataset"]) == ("resnet8", "linear_probe",
                                                                "digits")
  assert probe["backbone_sha256"] == student["export_sha256"]
  assert 0.0 <= probe["top1_last"] <= 100.0
  final = _checkpoint_states(workdir, "linear_probe")
  final = final[max(final)]
  assert jax.tree.map(jnp.shape, final["params"]["heads"]) == {
      "probe": {"kernel": (64, 10), "bias": (10,)}}
  student_states = _checkpoint_states(workdir, "student_ega")
  trained = student_states[max(student_states)]
  for a, b in zip(jax.tree.leaves((final["params"]["backbone"], final["batch_stats"])),
                  jax.tree.leaves((trained["params"]["backbone"], trained["batch_stats"]))):
    np.testing.assert_array_equal(a, b)


def test_a_zoo_teacher_of_an_online_head_sees_its_own_view(ega_run):
  """As the reference's teacher does: its crop and flip are drawn apart from the student's."""
  config, workdir, _ = ega_run
  mesh = parallel.create_mesh()
  info = data.get_dataset_info(config.dataset)
  run_plan = plan.make_plan(config, workdir, mesh)
  source = run_plan.stage("student_ega").teacher
  teacher = teachers.Teachers(config, info, mesh).get(
      source, {"pretrain": results.read_result(workdir, "pretrain")})
  assert teacher.input == teacher_views.DATASET_INPUT
  batch = next(data.train_batches(config.dataset, "none", 8, seed=0,
                                  teacher_input=teacher.input))
  assert batch["teacher_image"].shape == batch["image"].shape
  assert not np.array_equal(batch["teacher_image"], batch["image"])


def test_online_teacher_head_is_trained_and_checkpointed(ega_run):
  _, workdir, _ = ega_run
  states = _checkpoint_states(workdir, "student_ega")
  assert sorted(states) == [2, 4]
  heads = [states[s]["teacher_head"]["params"] for s in (2, 4)]
  assert jax.tree.map(jnp.shape, heads[1]) == {
      "fit_dim_Net": {"kernel": (64, 256), "bias": (256,)},
      "cl_Net": {"kernel": (256, 10), "bias": (10,)}}
  assert not any(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(heads[0]),
                                                      jax.tree.leaves(heads[1])))
  assert jax.tree.leaves(states[4]["teacher_head"]["opt_state"])  # The momentum buffers.


def test_resumed_student_ends_with_the_same_teacher_head(ega_run, tmp_path, capsys):
  """A run stopped after its step-2 checkpoint (here: a workdir holding only the reference
  run's step-2 checkpoint) resumes there and ends exactly where the uninterrupted run did,
  student and online teacher head alike. The pretrained teacher is imported from its file."""
  config, ref_workdir, _ = ega_run
  resumed = ega_config(config.dataset.data_dir, **{
      "teacher.checkpoint": os.path.join(ref_workdir, "pretrain", stage_lib.BACKBONE_FILE),
      "linear_probe.dataset": ""})
  workdir = str(tmp_path / "resumed")
  shutil.copytree(os.path.join(ref_workdir, "student_ega", "checkpoints", "2"),
                  os.path.join(workdir, "student_ega", "checkpoints", "2"))
  # A stopped run's stage also holds the config its checkpoint was trained under.
  shutil.copy(os.path.join(ref_workdir, "student_ega", stage_config.CONFIG_FILE),
              os.path.join(workdir, "student_ega"))
  capsys.readouterr()
  results = train.train_and_evaluate(resumed, workdir)
  assert "[student_ega] resuming from step 2" in capsys.readouterr().out
  assert results[0]["method"] == "imported" and results[0]["top1_last"] is None
  got = _checkpoint_states(workdir, "student_ega")[4]
  want = _checkpoint_states(ref_workdir, "student_ega")[4]
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_crd_comparison_trains_its_memory_and_exports_the_student_alone(ega_run, tmp_path):
  """Method ega_crd on the pretrained teacher: the batches bring indices and negatives, the
  memory banks and normalisation constants live in the student's state and move, the exported
  student leaves them out, and the linear probe reads it."""
  config, ref_workdir, _ = ega_run
  crd_config = ega_config(config.dataset.data_dir, **{
      "teacher.checkpoint": os.path.join(ref_workdir, "pretrain", stage_lib.BACKBONE_FILE),
      "method.name": "ega_crd", "method.distill": "crd", "method.nce_k": 8,
      "method.crd_feat_dim": 16, "linear_probe.num_epochs": 1})
  workdir = str(tmp_path / "crd")
  results = train.train_and_evaluate(crd_config, workdir)
  assert [r["stage"] for r in results] == ["teacher", "student_ega_crd", "linear_probe"]
  student = results[1]
  assert 0.0 <= student["top1_last"] <= 100.0
  states = _checkpoint_states(workdir, "student_ega_crd")
  bridge = states[max(states)]["batch_stats"]["bridge"]
  assert bridge["memory_s"].shape == bridge["memory_t"].shape == (32, 16)
  assert float(bridge["z_s"]) > 0 and float(bridge["z_t"]) > 0
  # One epoch visits every example once: every row of both banks is a moved unit vector.
  for bank in (bridge["memory_s"], bridge["memory_t"]):
    np.testing.assert_allclose(np.linalg.norm(bank, axis=1), 1.0, rtol=1e-5)
  assert set(states[max(states)]["params"]["bridge"]) == {"embed_s", "embed_t"}
  exported = checkpoint.import_variables(student["export"], jax.eval_shape(
      lambda: networks.build_network("resnet8", 10, ega.student_heads, ega.METHOD.hparams()).init(
          jax.random.key(0), jnp.zeros((1, 8, 8, 1)))))
  assert "bridge" not in exported["params"] and "bridge" not in exported["batch_stats"]


def test_ega_variant_with_another_distill_is_refused(tmp_path):
  with pytest.raises(UserError, match="method 'ega_rkd' distils with 'rkd' but method.distill "
                                      "is 'ega'"):
    train.train_and_evaluate(ega_config(str(tmp_path / "tfds"), **{"method.name": "ega_rkd"}),
                             str(tmp_path / "w"))


# ---------------------------------------------------------------------- a CLIP teacher


@pytest.fixture
def tiny_clip(monkeypatch):
  """The tiny CLIP tower of tests/data registered under a test-only name."""
  with open(os.path.join(TINY_CLIP, "config.json")) as f:
    tower = clip_weights.config_from_hf(json.load(f))
  monkeypatch.setitem(clip.CONFIGS, "clip_test_tiny", tower)
  monkeypatch.setitem(clip.CLIP_MODELS, "clip_test_tiny", lambda dtype=jnp.float32:
                      clip.build_clip(tower, dtype))
  return "clip_test_tiny"


def test_clip_teacher_drives_an_ega_student_on_its_own_view(ega_run, tiny_clip, tmp_path,
                                                            monkeypatch):
  config, _, _ = ega_run
  cfg = ega_config(config.dataset.data_dir, **{
      "teacher.name": tiny_clip, "teacher.checkpoint": TINY_CLIP, "teacher.pretrain": "",
      "linear_probe.dataset": "", "dataset.num_train_examples": 16})
  seen = []
  batches = data.train_batches

  def recording(*args, **kwargs):
    for batch in batches(*args, **kwargs):
      seen.append({k: v.shape for k, v in batch.items()})
      if "teacher_image" in batch:
        seen[-1]["teacher_mean"] = float(batch["teacher_image"].mean())
      yield batch

  monkeypatch.setattr(data, "train_batches", recording)
  results = train.train_and_evaluate(cfg, str(tmp_path))
  assert [r["stage"] for r in results] == ["teacher", "student_ega"]
  teacher, student = results
  assert teacher["method"] == "imported" and teacher["top1_last"] is None
  assert teacher["teacher_sha256"] == student["teacher_sha256"] == checkpoint.file_sha256(
      os.path.join(TINY_CLIP, "model.safetensors"))
  # The teacher reads its own 32-px RGB, CLIP-normalised view of the 8-px grey digits.
  assert len(seen) == student["steps"] == 2
  assert seen[0]["image"] == (8, 8, 8, 1) and seen[0]["teacher_image"] == (8, 32, 32, 3)
  state = _checkpoint_states(str(tmp_path), "student_ega")[2]
  assert jax.tree.map(jnp.shape, state["teacher_head"]["params"])["fit_dim_Net"] == {
      "kernel": (48, 256), "bias": (256,)}
  assert 0.0 <= student["top1_last"] <= 100.0


# -------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("overrides,message", [
    ({"teacher.name": "clip_vit_b32", "teacher.pretrain": ""},
     "CLIP teacher 'clip_vit_b32' needs its pre-trained weights on disk.*ViT-B-32.pt"),
    ({"method.name": "kd"}, "method 'kd' reads the teacher's classifier.*pretrained by "
                            "'simclr'"),
    ({"teacher.pretrain": "kd"}, "teacher.pretrain='kd' distils from a teacher"),
    ({"teacher.pretrain": "nope"}, "unknown method 'nope'"),
    ({"dataset.normalization": "clip"}, "normalization 'clip' has 3-channel statistics"),
    ({"linear_probe.num_epochs": 0}, "linear_probe.num_epochs is 0"),
])
def test_bad_ega_config_gives_one_clear_error(tmp_path, overrides, message):
  with pytest.raises(UserError, match=message):
    train.train_and_evaluate(ega_config(str(tmp_path / "tfds"), **overrides),
                             str(tmp_path / "w"))


# ---------------------------------------------------------------------------- recipes

TEACHERS = ("clip_vit_b32", "clip_vit_b16", "clip_rn50", "clip_rn101")
STUDENTS = ("resnet8x4", "resnet32x4", "vgg13", "ResNet50", "ShuffleV1")


def _recipe(teacher, arg=""):
  module = helpers.load_module(os.path.join(REPO, "configs", "ega", f"{teacher}.py"),
                               f"ega_recipe_{teacher}")
  return module, module.get_config(arg)


def test_one_recipe_per_clip_teacher_with_the_reference_schedule():
  files = {os.path.basename(f)[:-3] for f in glob.glob(os.path.join(REPO, "configs/ega/*.py"))}
  assert files - {"__init__", "common"} == set(TEACHERS)
  for teacher in TEACHERS:
    module, default = _recipe(teacher)
    assert default.student.name == "resnet8x4"
    assert f"python -m jaxkd.main --config configs/ega/{teacher}.py" in module.__doc__
    assert clip_weights.SOURCES[teacher][1] in module.__doc__
    for student in STUDENTS:
      _, config = _recipe(teacher, student)
      assert (config.teacher.name, config.student.name) == (teacher, student)
      assert config.dataset.name == "cifar100" and config.dataset.normalization == "clip"
      assert (config.num_epochs, config.batch_size) == (240, 64)
      assert config.optimizer.lr == (0.01 if student == "ShuffleV1" else 0.05)
      assert (config.optimizer.momentum, config.optimizer.weight_decay) == (0.9, 5e-4)
      assert tuple(config.schedule.milestones) == (150, 180, 210)
      assert config.schedule.decay == 0.1
      assert config.method.name == "ega" and config.baselines == ""
      method_fields = {k: v for k, v in config.method.items() if k != "name"}
      assert set(method_fields) == set(ega.DEFAULTS)
      assert (config.method.node_weight, config.method.edge_weight) == (
          (0.8, 0.3) if teacher == "clip_rn101" else (0.8, 0.24))
      models.get_model(student, 100)
  _, small = _recipe("clip_vit_b32", "vgg13,runlocal")
  assert small.student.name == "vgg13" and small.num_epochs == 2
  # The comparison methods of the reference, on the same joint embeddings.
  _, rkd = _recipe("clip_vit_b32", "rkd")
  assert (rkd.method.name, rkd.method.distill) == ("ega_rkd", "rkd")
  _, compare = _recipe("clip_rn101", "vgg13,compare")
  assert compare.method.name == "ega" and compare.method.edge_weight == 0.3
  assert compare.baselines == "ega_kd,ega_hint,ega_rkd,ega_pkt,ega_crd"
  for name in compare.baselines.split(","):
    assert get_method(name).hparams().distill == name[len("ega_"):]
  with pytest.raises(ValueError, match="one distillation term per run"):
    _recipe("clip_vit_b32", "rkd,pkt")
  with pytest.raises(ValueError, match="unknown config argument 'nope'"):
    _recipe("clip_vit_b32", "nope")


def test_ega_demo_compare_lists_the_comparison_rows():
  config = demo.get_config("ega,compare")
  assert config.baselines == "ega_kd,ega_hint,ega_rkd,ega_pkt,ega_crd,ce"
  assert config.method_overrides.ega_crd.nce_k == 1024
  assert demo.get_config("ega").baselines == "ce"
  with pytest.raises(ValueError, match="'compare' belongs to the EGA demo"):
    demo.get_config("compare")
