"""ReviewKD (jaxkd.methods.reviewkd) against mdistiller's numbers (tests/data/golden_modern.npz,
prefix reviewkd: its `ReviewKD` distiller on a synthetic pyramid): the fused features, the
hierarchical context loss and its warm-up, the gradients w.r.t. the student's taps and the ABF
parameters, the BN running statistics; the ABF widths read from the taps; and one training
step on zoo networks, whose teacher taps are taken before their ReLU."""

import collections
import functools
import os

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import helpers
from modern_golden import GOLDEN, assert_grad_close, assert_trees_match, nhwc

from jaxkd import networks, parallel, steps
from jaxkd.errors import UserError
from jaxkd.methods import get_method, reviewkd
from jaxkd.state import TrainState

P = "reviewkd"
LOSS_TOL = dict(rtol=1e-5)
FEATURE_TOL = dict(rtol=1e-5, atol=1e-5)
STATE_TOL = dict(rtol=1e-5, atol=1e-6)


def _outputs(side, maps=None):
  """A network's outputs as the bridge sees them: stem (never read), three stage maps, pooled."""
  g = GOLDEN
  maps = maps if maps is not None else [nhwc(g[f"{P}_feat_{side}.{i}"]) for i in range(3)]
  pooled = maps[3] if len(maps) == 4 else nhwc(g[f"{P}_pooled_feat_{side}"])
  feats = collections.OrderedDict(stem=jnp.zeros((pooled.shape[0], 1, 1, 1)))
  for i in range(3):
    feats[f"stage{i + 1}"] = maps[i]
  feats["pooled"] = pooled
  return {"feats": feats}


def _flax_key(torch_key):
  """'abfs.1.conv1.0.weight' -> ('params', ('abfs_1', 'conv1_0', 'kernel')), transform."""
  abfs, k, seq, index, leaf = torch_key.split(".")
  module = (f"{abfs}_{k}", f"{seq}_{index}")
  if leaf == "weight":
    return "params", module + ("kernel",), "weight"
  return {"bias": ("params", module + ("bias",), None),
          "running_mean": ("batch_stats", module + ("mean",), None),
          "running_var": ("batch_stats", module + ("var",), None)}.get(leaf, (None, None, None))


def _golden_tree(section):
  """{'params': ..., 'batch_stats': ...} of `reviewkd_<section>.abfs.*`, Flax layouts (a 1-D
  weight is a BN scale)."""
  head = f"{P}_{section}."
  flat = {}
  for key in GOLDEN.files:
    if not key.startswith(head) or key.endswith("_f64"):
      continue
    collection, path, kind = _flax_key(key[len(head):])
    if collection is None:
      continue
    value = np.asarray(GOLDEN[key], np.float32)
    if kind == "weight":
      if value.ndim == 4:
        value = value.transpose(2, 3, 1, 0)
      else:
        path = path[:-1] + ("scale",)
    flat[(collection,) + path] = jnp.asarray(value)
  tree = flax.traverse_util.unflatten_dict(flat)
  tree.setdefault("batch_stats", {})
  return tree


def _student_maps():
  g = GOLDEN
  return [nhwc(g[f"{P}_feat_s.{i}"]) for i in range(3)] + [nhwc(g[f"{P}_pooled_feat_s"])]


def _hparams():
  g = GOLDEN
  assert int(g[f"{P}_hp_stu_preact"]) == 0  # the student's taps after their ReLU
  return get_method("reviewkd").hparams(ml_collections.ConfigDict(dict(
      ce_weight=float(g[f"{P}_hp_ce_weight"]), reviewkd_weight=float(g[f"{P}_hp_reviewkd_weight"]),
      warmup_epochs=int(g[f"{P}_hp_warmup_epochs"]))))


@pytest.fixture(scope="module")
def forward():
  """One train-mode forward of the bridge on the golden inputs with the golden parameters, and
  the gradients of mdistiller's `loss_kd` at epoch 5 w.r.t. the student maps and parameters."""
  g = GOLDEN
  hparams = _hparams()
  variables = _golden_tree("param")
  bridge = reviewkd.ReviewKDBridge()
  teacher_out = _outputs("t")
  labels = jnp.asarray(g[f"{P}_target"].astype(np.int32))
  epoch = int(g[f"{P}_hp_epoch"])

  def objective(params, maps):
    out, updated = bridge.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                _outputs("s", maps), teacher_out, None, train=True,
                                mutable=["batch_stats"])
    student_out = dict(out, logits=jnp.asarray(g[f"{P}_logit_s"]), epoch=epoch)
    total, metrics = reviewkd.reviewkd_objective(student_out, teacher_out, labels, hparams)
    return metrics["loss_reviewkd"], (out, metrics, total, updated["batch_stats"])

  (_, (out, metrics, total, stats)), (g_params, g_maps) = jax.jit(
      jax.value_and_grad(objective, argnums=(0, 1), has_aux=True))(variables["params"],
                                                                   _student_maps())
  return out, metrics, total, stats, g_params, g_maps


def test_the_abf_widths_come_from_the_taps():
  """Initialised on one image of each side, the bridge has exactly the reference's modules for
  this pyramid (IN_CHANNELS, OUT_CHANNELS, mid width), read from the taps; the pooled level's
  module has no attention conv; inits are kaiming_uniform(a=1) / torch's default / BN 1, 0."""
  g = GOLDEN
  one = lambda out: {"feats": collections.OrderedDict(
      (k, v[:1]) for k, v in out["feats"].items())}
  created = jax.jit(reviewkd.ReviewKDBridge().init)(jax.random.key(0), one(_outputs("s")),
                                                    one(_outputs("t")), None)
  expected = _golden_tree("param")
  shapes = lambda tree: {k: np.shape(v) for k, v in flax.traverse_util.flatten_dict(tree).items()}
  for collection in ("params", "batch_stats"):
    assert shapes(created[collection]) == shapes(expected[collection]), collection
  params = created["params"]
  mid = int(g[f"{P}_hp_mid_channel"])
  in_channels = [int(c) for c in g[f"{P}_hp_in_channels"]]     # fine -> coarse
  out_channels = [int(c) for c in g[f"{P}_hp_out_channels"]]
  n = len(in_channels)
  for k in range(n):
    abf = params[f"abfs_{k}"]
    assert abf["conv1_0"]["kernel"].shape == (1, 1, in_channels[n - 1 - k], mid)
    assert abf["conv2_0"]["kernel"].shape == (3, 3, mid, out_channels[n - 1 - k])
    assert ("att_conv_0" in abf) == (k > 0)
    assert np.all(np.abs(abf["conv1_0"]["kernel"]) <= np.sqrt(3 / in_channels[n - 1 - k]))
    assert np.all(np.abs(abf["conv2_0"]["kernel"]) <= np.sqrt(3 / (9 * mid)))
    if k:
      assert np.all(np.abs(abf["att_conv_0"]["kernel"]) <= 1 / np.sqrt(2 * mid))
      assert np.all(np.abs(abf["att_conv_0"]["bias"]) <= 1 / np.sqrt(2 * mid))
    np.testing.assert_array_equal(abf["conv2_1"]["scale"], 1.0)
    np.testing.assert_array_equal(abf["conv2_1"]["bias"], 0.0)
  assert mid == min(512, in_channels[-1])


def test_fused_features_and_loss_match_the_reference(forward):
  g = GOLDEN
  out, metrics, total, _, _, _ = forward
  for i, result in enumerate(out["reviewkd_results"]):
    np.testing.assert_allclose(result, nhwc(g[f"{P}_results.{i}"]), **FEATURE_TOL)
  for k in range(4):
    np.testing.assert_allclose(out["reviewkd_abf_out"][k], nhwc(g[f"{P}_abf_out.{k}"]),
                               **FEATURE_TOL)
    np.testing.assert_allclose(out["reviewkd_abf_res"][k], nhwc(g[f"{P}_abf_res.{k}"]),
                               **FEATURE_TOL)
  np.testing.assert_allclose(metrics["loss_hcl"], g[f"{P}_loss_hcl"], **LOSS_TOL)
  np.testing.assert_allclose(metrics["loss_hcl"], g[f"{P}_loss_hcl_f64"], **LOSS_TOL)
  np.testing.assert_allclose(metrics["loss_reviewkd"], g[f"{P}_loss"], **LOSS_TOL)
  np.testing.assert_allclose(metrics["loss_reviewkd"], g[f"{P}_loss_f64"], **LOSS_TOL)
  np.testing.assert_allclose(metrics["reviewkd_warmup"], g[f"{P}_hp_warmup_factor"], **LOSS_TOL)
  np.testing.assert_allclose(metrics["loss_ce"], g[f"{P}_loss_ce"], **LOSS_TOL)
  np.testing.assert_allclose(total, g[f"{P}_loss_total"], **LOSS_TOL)
  # The pure loss on the reference's own fused features and teacher levels.
  results = [nhwc(g[f"{P}_results.{i}"]) for i in range(4)]
  teachers = reviewkd.levels(_outputs("t"))
  np.testing.assert_allclose(reviewkd.hcl_loss(results, teachers), g[f"{P}_loss_hcl"], **LOSS_TOL)


def test_gradients_and_running_statistics_match_the_reference(forward):
  g = GOLDEN
  _, _, _, stats, g_params, g_maps = forward
  names = [f"{P}_grad_feat_s.{i}" for i in range(3)] + [f"{P}_grad_pooled_feat_s"]
  for grad, name in zip(g_maps, names):
    assert_grad_close(grad, nhwc(g[name]), what=name)
  assert_trees_match(g_params, _golden_tree("grad_param")["params"], stats,
                     _golden_tree("updated")["batch_stats"], STATE_TOL)


def test_the_weight_warms_up_over_the_epochs():
  """loss_kd = weight · min(epoch / 20, 1) · hcl at the probe epochs (1-based: never 0)."""
  g = GOLDEN
  hparams = _hparams()
  hcl = jnp.asarray(g[f"{P}_loss_hcl"])
  logits = jnp.asarray(g[f"{P}_logit_s"])
  labels = jnp.asarray(g[f"{P}_target"].astype(np.int32))
  for epoch, ref in zip(g[f"{P}_hp_probe_epochs"], g[f"{P}_warmup_probe_loss_kd"]):
    _, metrics = reviewkd.reviewkd_objective(
        {"logits": logits, "loss_hcl": hcl, "epoch": int(epoch)}, None, labels, hparams)
    np.testing.assert_allclose(metrics["loss_reviewkd"], ref, **LOSS_TOL)


def test_nearest_and_pooling_follow_torch():
  """torch's legacy nearest: floor(i · in / out), also when shrinking; hcl's 6 -> 4 pool uses
  the overlapping windows [0,2), [1,3), [3,5), [4,6)."""
  np.testing.assert_array_equal(reviewkd.nearest_index(3, 6), [0, 0, 1, 1, 2, 2])
  np.testing.assert_array_equal(reviewkd.nearest_index(1, 3), [0, 0, 0])
  np.testing.assert_array_equal(reviewkd.nearest_index(6, 4), [0, 1, 3, 4])
  np.testing.assert_array_equal(reviewkd.nearest_index(5, 3), [0, 1, 3])
  x = jnp.arange(6.0).reshape(1, 6, 1, 1) * jnp.ones((1, 1, 6, 1))
  t = jnp.zeros_like(x)
  pooled_rows = np.array([0.5, 1.5, 3.5, 4.5])
  level = reviewkd.hcl_level(x, t)
  full = np.mean(np.arange(6.0) ** 2)
  four = np.mean(pooled_rows ** 2)
  two = np.mean(np.array([1.0, 4.0]) ** 2)
  one = 2.5 ** 2
  np.testing.assert_allclose(level, (full + four / 2 + two / 4 + one / 8) / (1 + 7 / 8),
                             rtol=1e-6)


def test_hyper_parameters_are_checked():
  method = get_method("reviewkd")
  assert dict(method.defaults) == dict(ce_weight=1.0, reviewkd_weight=5.0, warmup_epochs=20,
                                       max_mid_channel=512)
  for bad in (dict(warmup_epochs=0), dict(max_mid_channel=0)):
    with pytest.raises(UserError):
      method.check_hparams(method.hparams(ml_collections.ConfigDict(bad)))
  assert method.preact is False and method.teacher_preact is True


def test_a_training_step_reads_the_teachers_taps_before_their_relu():
  """resnet8 from a wrn_16_2 teacher (other widths; random variables) on 8×8 images, one step of
  steps.train_step with Method.teacher_preact: the logged hcl is the bridge's on the student's
  post-ReLU taps and the teacher's pre-activation ones, the ABFs take the teacher's widths and
  learn, and the BN statistics move."""
  method = get_method("reviewkd")
  hparams = method.hparams()
  mesh = parallel.create_mesh(jax.devices()[:1])
  image_shape = (8, 8, 3)
  teacher = networks.build_network("wrn_16_2", 10)
  teacher_vars = jax.tree.map(jnp.asarray, helpers.random_variables("wrn_16_2", 10))
  network = networks.build_network("resnet8", 10).clone(bridge=method.bridge(16, hparams))
  variables = networks.init_variables(network, image_shape, 0, mesh,
                                      networks.teacher_output_shapes(teacher, teacher_vars,
                                                                     image_shape))
  abfs = variables["params"]["bridge"]
  assert [abfs[f"abfs_{k}"]["conv2_0"]["kernel"].shape[-1] for k in range(4)] == [128, 128, 64, 32]
  assert abfs["abfs_3"]["conv1_0"]["kernel"].shape == (1, 1, 16, 64)
  tx = optax.sgd(0.1)
  state = TrainState(step=jnp.asarray(40, jnp.int32), params=variables["params"],
                     batch_stats=variables["batch_stats"], opt_state=tx.init(variables["params"]))
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.normal(size=(8,) + image_shape), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 10, size=8), jnp.int32)}
  step = jax.jit(functools.partial(
      steps.train_step, network=network,
      teacher_network=teacher.clone(preact=method.teacher_preact), loss=method.loss,
      hparams=hparams, tx=tx, schedule=optax.constant_schedule(0.1), steps_per_epoch=4))
  new_state, metrics = step(state, teacher_vars, batch)

  teacher_out = teacher.clone(preact=True).apply(teacher_vars, batch["image"], train=False)
  plain = teacher.apply(teacher_vars, batch["image"], train=False)
  assert not np.allclose(teacher_out["feats"]["stage1"], plain["feats"]["stage1"])
  student_out, _ = network.clone(bridge=None).apply(
      {"params": state.params, "batch_stats": state.batch_stats}, batch["image"], train=True,
      mutable=["batch_stats"])
  out, _ = network.bridge.apply({"params": state.params["bridge"],
                                 "batch_stats": state.batch_stats["bridge"]},
                                student_out, teacher_out, None, train=True,
                                mutable=["batch_stats"])
  np.testing.assert_allclose(metrics["loss_hcl"], out["loss_hcl"], rtol=1e-5)
  # Epoch 11 of 4 steps each: the weight is 5 · 11/20.
  np.testing.assert_allclose(metrics["reviewkd_warmup"], 11 / 20, rtol=1e-6)
  np.testing.assert_allclose(metrics["loss"], metrics["loss_ce"] + 5 * 11 / 20 * out["loss_hcl"],
                             rtol=1e-5)
  assert not np.allclose(new_state.params["bridge"]["abfs_2"]["att_conv_0"]["kernel"],
                         state.params["bridge"]["abfs_2"]["att_conv_0"]["kernel"])
  assert not np.allclose(new_state.batch_stats["bridge"]["abfs_0"]["conv1_1"]["mean"],
                         state.batch_stats["bridge"]["abfs_0"]["conv1_1"]["mean"])
