"""SimKD (jaxkd.methods.simkd) against the reference's numbers (tests/data/golden_modern.npz,
prefix simkd: `SimKD` of DefangChen/SimKD with nn.MSELoss, as the `simkd` branch of
helper/loops.py calls it): the pooled maps, the projector's output, the loss, the prediction of
the reused teacher classifier in training and, after the step's BatchNorm update, in evaluation;
the gradients w.r.t. the student's map and the projector; the running statistics. Then what
SimKD deploys: the teacher's classifier read from a zoo teacher, and an exported deployed
network that `python -m jaxkd.evaluate` scores as the trainer's evaluation does."""

import collections
import functools
import json
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import helpers
from modern_golden import GOLDEN, assert_grad_close, nhwc

from jaxkd import checkpoint, evaluate, evaluation, models, networks, parallel, steps
from jaxkd.errors import UserError
from jaxkd.methods import get_method, simkd
from jaxkd.methods.losses import cross_entropy

P = "simkd"
LOSS_TOL = dict(rtol=1e-5)
FEATURE_TOL = dict(rtol=1e-5, atol=1e-5)
STATE_TOL = dict(rtol=1e-5, atol=1e-6)
CONVS = (0, 3, 6)


def _hparams():
  g = GOLDEN
  return simkd.METHOD.hparams(ml_collections.ConfigDict(dict(
      factor=int(g[f"{P}_hp_factor"]), ce_weight=float(g[f"{P}_hp_w_cls"]),
      kd_weight=float(g[f"{P}_hp_w_div"]), feat_weight=float(g[f"{P}_hp_w_beta"]))))


def _outputs(f, constants=None):
  """A network's outputs as the bridge reads them: stem, the last stage map, pooled."""
  feats = collections.OrderedDict(stem=jnp.zeros((f.shape[0], 1, 1, 1)), stage3=f,
                                  pooled=jnp.mean(f, (1, 2)))
  out = {"feats": feats, "logits": jnp.zeros((f.shape[0], 10))}
  if constants is not None:
    out["constants"] = constants
  return out


def _golden_projector(section):
  """{'params', 'batch_stats'} of `simkd_<section>.simkd.transfer.*` in Flax layouts (each
  collection empty where the section has none of it)."""
  g, head = GOLDEN, f"{P}_{section}.simkd.transfer."
  params, stats = {}, {}
  if f"{head}0.weight" in g:
    params = {f"transfer_{i}": {"kernel": np.transpose(g[f"{head}{i}.weight"], (2, 3, 1, 0))}
              for i in CONVS}
    params.update({f"transfer_{i + 1}": {"scale": g[f"{head}{i + 1}.weight"],
                                         "bias": g[f"{head}{i + 1}.bias"]} for i in CONVS})
  if f"{head}1.running_mean" in g:
    stats = {f"transfer_{i + 1}": {"mean": g[f"{head}{i + 1}.running_mean"],
                                   "var": g[f"{head}{i + 1}.running_var"]} for i in CONVS}
  return jax.tree.map(jnp.asarray, {"params": params, "batch_stats": stats})


def _classifier():
  g = GOLDEN
  return {"classifier": {"kernel": jnp.asarray(g[f"{P}_param.cls_t.weight"].T),
                         "bias": jnp.asarray(g[f"{P}_param.cls_t.bias"])}}


@pytest.fixture(scope="module")
def forward():
  """One training-mode step of the bridge on the golden maps with the golden projector."""
  g = GOLDEN
  hparams = _hparams()
  bridge = simkd.simkd_bridge(8, hparams)
  golden = _golden_projector("param")
  variables = {"params": {"projector": golden["params"]},
               "batch_stats": {"projector": golden["batch_stats"]}}
  f_s, f_t = nhwc(g[f"{P}_feat_s"]), nhwc(g[f"{P}_feat_t"])
  labels = jnp.asarray(g[f"{P}_target"].astype(np.int32))
  teacher = _outputs(f_t, _classifier())

  @jax.jit
  def run(params, f_s):
    def loss_fn(params, f_s):
      student = _outputs(f_s)
      out, updates = bridge.apply({"params": params,
                                   "batch_stats": variables["batch_stats"]}, student, teacher,
                                  None, train=True, mutable=["batch_stats"])
      total, metrics = simkd.simkd_objective(dict(student, **out), teacher, labels, hparams)
      return total, (out, metrics, updates["batch_stats"])
    return jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(params, f_s)

  (total, (out, metrics, stats)), grads = run(variables["params"], f_s)
  return dict(total=total, out=out, metrics=metrics, stats=stats, grads=grads,
              trained={"params": {"backbone": {}, "bridge": variables["params"]},
                       "batch_stats": {"backbone": {}, "bridge": stats}})


def test_maps_loss_and_prediction_match_the_reference(forward):
  """The student's 4×4 map is pooled to the teacher's 2×2; the MSE is the whole objective under
  the script's weights (-c 0 -d 0 -b 1); the reused classifier predicts from the projection."""
  g, out, metrics = GOLDEN, forward["out"], forward["metrics"]
  np.testing.assert_allclose(out["simkd_projected"], nhwc(g[f"{P}_trans_feat_s"]), **FEATURE_TOL)
  np.testing.assert_allclose(out["simkd_target"], nhwc(g[f"{P}_trans_feat_t"]), **FEATURE_TOL)
  np.testing.assert_allclose(metrics["loss_simkd"], g[f"{P}_loss"], **LOSS_TOL)
  np.testing.assert_allclose(metrics["loss_simkd"], g[f"{P}_loss_f64"], **LOSS_TOL)
  np.testing.assert_allclose(forward["total"], g[f"{P}_loss"], **LOSS_TOL)
  np.testing.assert_allclose(out["simkd_logits"], g[f"{P}_pred_feat_s"], **FEATURE_TOL)
  expected_top1 = np.mean(np.argmax(g[f"{P}_pred_feat_s"], 1) == g[f"{P}_target"])
  np.testing.assert_allclose(metrics["top1"], expected_top1)


def test_gradients_and_running_statistics_match_the_reference(forward):
  g = GOLDEN
  grad_params, grad_f_s = forward["grads"]
  assert_grad_close(grad_f_s, nhwc(g[f"{P}_grad_feat_s"]), what="feat_s")
  golden = _golden_projector("grad_param")["params"]
  for name, leaves in golden.items():
    for key, ref in leaves.items():
      assert_grad_close(grad_params["projector"][name][key], ref, what=(name, key))
  updated = _golden_projector("updated")["batch_stats"]
  for name, leaves in updated.items():
    for key, ref in leaves.items():
      np.testing.assert_allclose(forward["stats"]["projector"][name][key], ref, **STATE_TOL)
    assert int(g[f"{P}_updated.simkd.transfer.{name[-1]}.num_batches_tracked"]) == 1


class _Fixed(nn.Module):
  """A student backbone that returns the golden student map as its last stage tap."""
  feat: jax.Array

  def __call__(self, x, train=False):
    return jnp.zeros((x.shape[0], 10)), _outputs(self.feat)["feats"]


def test_the_deployed_network_predicts_as_the_references_validation(forward):
  """Student backbone → pooled map → projector on the running statistics after the step → the
  teacher's classifier: the reference's `validate_distill` output and its CE."""
  g = GOLDEN
  f_s, f_t = nhwc(g[f"{P}_feat_s"]), nhwc(g[f"{P}_feat_t"])
  teacher_out = jax.eval_shape(lambda: _outputs(f_t))
  module = simkd.deployed_module(_Fixed(f_s), teacher_out, 10, _hparams())
  assert (module.target_hw, module.channels) == ((2, 2), 16)
  variables = simkd.deployed_variables(forward["trained"], _classifier(), _hparams())
  assert set(variables["params"]) == {"backbone", "projector", "classifier"}
  logits = module.apply(variables, jnp.zeros((8, 32, 32, 3)), train=False)["logits"]
  np.testing.assert_allclose(logits, g[f"{P}_pred_feat_s_eval"], **FEATURE_TOL)
  loss = cross_entropy(logits, jnp.asarray(g[f"{P}_target"].astype(np.int32)))
  np.testing.assert_allclose(loss, g[f"{P}_loss_eval_ce"], **LOSS_TOL)
  np.testing.assert_allclose(loss, g[f"{P}_loss_eval_ce_f64"], **LOSS_TOL)


def test_the_teachers_classifier_is_read_from_a_zoo_teacher():
  """Method.teacher_constants: the kernel and bias of the teacher's `fc`, from the variables as
  the trainer holds them; the projector's output width is the teacher's last map's."""
  held = helpers.random_variables("resnet14", 10)  # {'params': {'backbone': ...}, ...}
  fc = held["params"]["backbone"]["fc"]
  constants = simkd.teacher_classifier("resnet14", held, _hparams())
  np.testing.assert_array_equal(constants["classifier"]["kernel"], fc["kernel"])
  np.testing.assert_array_equal(constants["classifier"]["bias"], fc["bias"])
  bare = {col: tree["backbone"] for col, tree in held.items()}
  np.testing.assert_array_equal(models.classifier_params("resnet14", bare)["kernel"],
                                fc["kernel"])
  for name, layer in (("vgg8", "classifier"), ("ShuffleV1", "linear"), ("wrn_16_2", "fc")):
    params = helpers.random_variables(name, 10)["params"]["backbone"]
    head = models.classifier_params(name, {"params": params})
    np.testing.assert_array_equal(head["kernel"], params[layer]["kernel"])


def test_pairs_and_hyper_parameters_that_cannot_run_are_refused():
  method = get_method("simkd")
  method.check_pair("resnet32x4", "resnet8x4", 100)
  with pytest.raises(UserError, match="classifier reads 1280 features"):
    method.check_pair("MobileNetV2", "resnet8", 100)
  with pytest.raises(UserError, match="factor"):
    method.check_hparams(method.hparams(ml_collections.ConfigDict(dict(factor=0))))
  with pytest.raises(UserError, match="exports the student network itself"):
    evaluate.deployed_network("resnet8", "kd", "resnet14", "x.msgpack", None, jnp.float32)
  with pytest.raises(UserError, match="--teacher"):
    evaluate.deployed_network("resnet8", "simkd", "", "x.msgpack", None, jnp.float32)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """A deployed SimKD resnet8 (teacher resnet14) for the digits, from freshly initialised
  student, projector and teacher, written as a stage's export beside the stage's config.json
  (factor 4), and what `jaxkd.evaluation.evaluate` gives for it in this process."""
  data_dir = str(tmp_path_factory.getbasetemp() / "tfds")
  stage_dir = tmp_path_factory.mktemp("student_simkd")
  path = str(stage_dir / "student.msgpack")
  hparams = get_method("simkd").hparams(ml_collections.ConfigDict(dict(factor=4)))
  (stage_dir / "config.json").write_text(json.dumps(  # As jaxkd.stage_config saves it.
      {"effective": {"model": "resnet8", "method": "simkd", "method.factor": 4},
       "run": {"dataset": {"name": "digits", "data_dir": data_dir},
               "teacher": {"name": "resnet14"}}}))
  mesh = parallel.create_mesh()
  image = (8, 8, 1)
  teacher = networks.build_network("resnet14", 10)
  teacher_vars = networks.init_variables(teacher, image, 1, mesh)
  trained_net = networks.build_network("resnet8", 10).clone(
      bridge=simkd.simkd_bridge(16, hparams))
  teacher_out = networks.teacher_output_shapes(teacher, teacher_vars, image)
  trained = networks.init_variables(trained_net, image, 0, mesh, teacher_out)
  module = simkd.deployed_module(trained_net.backbone, teacher_out, 10, hparams)
  constants = simkd.teacher_classifier("resnet14", teacher_vars, hparams)
  variables = simkd.deployed_variables(trained, constants, hparams)
  checkpoint.export_variables(path, variables)
  config = evaluate.default_config()
  config.dataset.update(name="digits", data_dir=data_dir)
  config.eval_batch_size = 120
  scores = evaluation.evaluate(module, parallel.replicate(variables, mesh), config, mesh,
                               jax.jit(functools.partial(steps.eval_step, network=module)))
  return data_dir, path, scores, config


def test_evaluate_reads_the_deployed_export_in_process(exported):
  """jaxkd.evaluate rebuilds the deployed network (the factor from the config.json beside the
  file) and scores it as the stage's evaluation did."""
  _, path, scores, config = exported
  again = evaluate.evaluate_file("resnet8", path, config, method="simkd", teacher="resnet14")
  assert (again["top1"], again["top5"]) == (scores["top1"], scores["top5"])
  with pytest.raises(UserError, match="resnet8 checkpoint"):
    evaluate.evaluate_file("resnet8", path, config)


def test_evaluate_command_prints_the_deployed_networks_top1(exported):
  """The stage's file alone: the model, the method, its teacher, its factor and the dataset
  come from the stage's config.json."""
  _, path, scores, _ = exported
  assert evaluate.deployment("", "", path) == ("simkd", "resnet14")
  env = helpers.device_env(2)
  done = subprocess.run(
      [sys.executable, "-m", "jaxkd.evaluate", f"--checkpoint={path}",
       "--config.eval_batch_size=120"],
      cwd=helpers.REPO, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  found = re.search(r"\(360 images\): top-1 (\d+\.\d\d)  top-5 (\d+\.\d\d)", done.stdout)
  assert found, done.stdout
  assert found.groups() == (f"{scores['top1']:.2f}", f"{scores['top5']:.2f}")
