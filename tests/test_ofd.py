"""OFD (jaxkd.methods.ofd) against mdistiller's numbers (tests/data/golden_modern.npz, prefix ofd:
its `OFD` distiller on synthetic pre-activation taps): the margins from the teacher's BatchNorms,
the connector outputs, the partial L2 per stage and the loss, the gradients w.r.t. the student's
taps and the connectors, the connectors' BN statistics. Then the margins on zoo networks: one
per stage map, read from the BatchNorm before each stage's last ReLU; and one training step with
the teacher's constants and its BatchNorms on the batch's statistics."""

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

from jaxkd import models, networks, parallel, steps
from jaxkd.errors import UserError
from jaxkd.methods import get_method, ofd
from jaxkd.methods.objective import tap_shapes
from jaxkd.state import TrainState

P = "ofd"
N_TAPS = 3
LOSS_TOL = dict(rtol=1e-5)
FEATURE_TOL = dict(rtol=1e-5, atol=1e-5)
STATE_TOL = dict(rtol=1e-5, atol=1e-6)


def _outputs(maps, constants=None):
  """Outputs as the bridge sees them: stem, the stage maps, pooled (stem and pooled unread)."""
  batch = maps[0].shape[0]
  feats = collections.OrderedDict(stem=jnp.zeros((batch, 1, 1, 1)))
  for i, m in enumerate(maps, start=1):
    feats[f"stage{i}"] = m
  feats["pooled"] = jnp.zeros((batch, 1))
  out = {"feats": feats}
  if constants is not None:
    out["constants"] = constants
  return out


def _golden_maps(side):
  return [nhwc(GOLDEN[f"{P}_preact_feat_{side}.{i}"]) for i in range(N_TAPS)]


def _golden_margins():
  return [np.asarray(GOLDEN[f"{P}_margin.{i}"]).reshape(-1) for i in range(N_TAPS)]


def _golden_tree(section):
  """{'params': ..., 'batch_stats': ...} of `ofd_<section>.connectors.connectors.*`, Flax
  layouts: connectors_<i>/conv (kernel HWIO) and connectors_<i>/bn (scale, bias; mean, var)."""
  head = f"{P}_{section}.connectors.connectors."
  leaves = {"weight": "kernel", "bias": "bias", "running_mean": "mean", "running_var": "var"}
  flat = {}
  for key in GOLDEN.files:
    if not key.startswith(head) or key.endswith("_f64"):
      continue
    i, layer, leaf = key[len(head):].split(".")
    if leaf not in leaves:
      continue
    value = np.asarray(GOLDEN[key], np.float32)
    module = "conv" if layer == "0" else "bn"
    name = leaves[leaf]
    if value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)
    elif name == "kernel":
      name = "scale"
    collection = "batch_stats" if name in ("mean", "var") else "params"
    flat[(collection, f"connectors_{i}", module, name)] = jnp.asarray(value)
  tree = flax.traverse_util.unflatten_dict(flat)
  tree.setdefault("batch_stats", {})
  return tree


def _hparams():
  g = GOLDEN
  return get_method("ofd").hparams(ml_collections.ConfigDict(dict(
      ce_weight=float(g[f"{P}_hp_ce_weight"]), feat_weight=float(g[f"{P}_hp_feat_weight"]),
      kernel_size=int(g[f"{P}_hp_kernel_size"]))))


def test_margins_match_the_reference():
  """−s·φ(m/s)/Φ(−m/s) + m above the 0.001 cut, −3s below, s = |γ|: both branches and negative
  weights occur in this file."""
  g = GOLDEN
  cut = float(g[f"{P}_hp_margin_cdf_cut"])
  assert cut == ofd.MARGIN_CDF_CUT
  for i in range(N_TAPS):
    weight, bias = g[f"{P}_teacher_bn.{i}.weight"], g[f"{P}_teacher_bn.{i}.bias"]
    margin = ofd.ofd_margin(weight, bias, cut)
    assert margin.dtype == np.float32
    np.testing.assert_allclose(margin, g[f"{P}_margin.{i}"].reshape(-1), rtol=1e-6)
    assert np.any(weight < 0)
    below = np.isclose(margin, -3 * np.abs(weight), rtol=1e-6)
    assert below.sum() >= 1 and (~below).sum() >= 1
  # A zero scale is a point mass at β: its negative part's mean, or 0.
  np.testing.assert_array_equal(ofd.ofd_margin([0.0, 0.0], [-0.5, 0.5]), [-0.5, 0.0])


@pytest.fixture(scope="module")
def forward():
  """A train-mode forward of the bridge on the golden taps, margins and connectors, and the
  gradients of mdistiller's `loss_kd` w.r.t. the student's taps and the connectors."""
  g = GOLDEN
  hparams = _hparams()
  variables = _golden_tree("param")
  bridge = get_method("ofd").bridge(0, hparams)
  teacher_out = _outputs(_golden_maps("t"), {"margins": _golden_margins()})
  labels = jnp.asarray(g[f"{P}_target"].astype(np.int32))

  def objective(params, maps):
    out, updated = bridge.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                _outputs(maps), teacher_out, None, train=True,
                                mutable=["batch_stats"])
    student_out = dict(out, logits=jnp.asarray(g[f"{P}_logit_s"]))
    total, metrics = ofd.ofd_objective(student_out, teacher_out, labels, hparams)
    loss_kd = hparams.feat_weight * metrics["loss_ofd"]
    return loss_kd, (out, metrics, total, updated["batch_stats"])

  (loss_kd, (out, metrics, total, stats)), (g_params, g_maps) = jax.jit(
      jax.value_and_grad(objective, argnums=(0, 1), has_aux=True))(variables["params"],
                                                                   _golden_maps("s"))
  return loss_kd, out, metrics, total, stats, g_params, g_maps


def test_connectors_and_loss_match_the_reference(forward):
  g = GOLDEN
  loss_kd, out, metrics, total, _, _, _ = forward
  for i in range(N_TAPS):
    np.testing.assert_allclose(out["ofd_connector_out"][i], nhwc(g[f"{P}_connector_out.{i}"]),
                               **FEATURE_TOL)
    np.testing.assert_allclose(out["ofd_feat_loss"][i], g[f"{P}_feat_loss.{i}"], **LOSS_TOL)
    np.testing.assert_allclose(out["ofd_feat_loss"][i], g[f"{P}_feat_loss.{i}_f64"], **LOSS_TOL)
  np.testing.assert_allclose(loss_kd, g[f"{P}_loss"], **LOSS_TOL)
  np.testing.assert_allclose(loss_kd, g[f"{P}_loss_f64"], **LOSS_TOL)
  np.testing.assert_allclose(metrics["loss_ce"], g[f"{P}_loss_ce"], **LOSS_TOL)
  np.testing.assert_allclose(total, g[f"{P}_loss_total"], **LOSS_TOL)
  # The pure loss on the reference's own connector outputs.
  connected = [nhwc(g[f"{P}_connector_out.{i}"]) for i in range(N_TAPS)]
  value, parts = ofd.ofd_loss(connected, _golden_maps("t"), _golden_margins())
  np.testing.assert_allclose(value * g[f"{P}_hp_feat_weight"], g[f"{P}_loss"], **LOSS_TOL)
  np.testing.assert_allclose(parts[1], g[f"{P}_feat_loss.1"], **LOSS_TOL)


def test_gradients_and_running_statistics_match_the_reference(forward):
  g = GOLDEN
  _, _, _, _, stats, g_params, g_maps = forward
  for i, grad in enumerate(g_maps):
    assert_grad_close(grad, nhwc(g[f"{P}_grad_preact_feat_s.{i}"]), what=i)
  assert_trees_match(g_params, _golden_tree("grad_param")["params"], stats,
                     _golden_tree("updated")["batch_stats"], STATE_TOL)


def test_connectors_take_their_widths_from_the_taps():
  """Initialised without margins (as the trainer does, on one image of each side) the bridge
  creates the reference's connectors and nothing else: conv N(0, 2 / (k²·C_t)), BN 1, 0."""
  one = lambda maps: [m[:1] for m in maps]
  bridge = ofd.OFDBridge()
  out, created = jax.jit(bridge.init_with_output)(
      jax.random.key(0), _outputs(one(_golden_maps("s"))), _outputs(one(_golden_maps("t"))),
      None)
  assert out == {}
  expected = _golden_tree("param")
  shapes = lambda tree: {k: np.shape(v) for k, v in flax.traverse_util.flatten_dict(tree).items()}
  for collection in ("params", "batch_stats"):
    assert shapes(created[collection]) == shapes(expected[collection]), collection
  big = ofd.OFDBridge().init(jax.random.key(1), _outputs([jnp.zeros((1, 4, 4, 64))]),
                             _outputs([jnp.zeros((1, 4, 4, 256))]), None)
  kernel = np.asarray(big["params"]["connectors_0"]["conv"]["kernel"])
  assert abs(kernel.std() - np.sqrt(2 / 256)) < 0.1 * np.sqrt(2 / 256)
  np.testing.assert_array_equal(big["params"]["connectors_0"]["bn"]["scale"], 1.0)
  # In training, the margins are required.
  with pytest.raises(ValueError, match="margins"):
    bridge.apply(created, _outputs(_golden_maps("s")), _outputs(_golden_maps("t")), None,
                 train=True, mutable=["batch_stats"])


def test_unequal_numbers_of_stage_maps_pair_the_last_ones():
  """mdistiller's `_align_list`: a student with one stage map less is paired with the teacher's
  last maps, and the margins follow the kept teacher maps."""
  s_maps, t_maps, margins = _golden_maps("s"), _golden_maps("t"), _golden_margins()
  bridge = ofd.OFDBridge()
  variables = _golden_tree("param")
  # The golden connectors 1 and 2 become connectors 0 and 1 of the shorter student.
  shifted = {col: {f"connectors_{i - 1}": tree[f"connectors_{i}"] for i in (1, 2)}
             for col, tree in variables.items()}
  out, _ = bridge.apply(shifted, _outputs(s_maps[1:]), _outputs(t_maps, {"margins": margins}),
                        None, train=True, mutable=["batch_stats"])
  expected, _ = ofd.ofd_loss([nhwc(GOLDEN[f"{P}_connector_out.{i}"]) for i in (1, 2)],
                             t_maps[1:], margins[1:])
  np.testing.assert_allclose(out["loss_ofd"], expected, rtol=1e-5)


def test_hyper_parameters_pairs_and_registration():
  method = get_method("ofd")
  assert dict(method.defaults) == dict(ce_weight=1.0, feat_weight=0.001, kernel_size=1)
  assert method.preact and method.teacher_train_mode and method.teacher_constants is not None
  for bad in (0, 2, -1):
    with pytest.raises(UserError, match="kernel_size"):
      method.check_hparams(method.hparams(ml_collections.ConfigDict(dict(kernel_size=bad))))
  method.check_hparams(method.hparams(ml_collections.ConfigDict(dict(kernel_size=3))))
  with pytest.raises(UserError, match="ShuffleV2"):
    method.check_pair("ShuffleV2", "resnet8", 100)
  method.check_pair("ShuffleV1", "resnet8", 100)
  method.check_pair("resnet32x4", "resnet8x4", 100)


def test_every_listed_batchnorm_has_its_stage_maps_width():
  """For every zoo network with a list, one BatchNorm per stage map, of that map's width; only
  ShuffleV2 has none."""
  missing = [name for name in models.MODEL_NAMES if models.bn_before_relu_paths(name) is None]
  assert missing == ["ShuffleV2"]
  for name in models.MODEL_NAMES:
    if name == "ShuffleV2":
      continue
    image = (224, 224, 3) if name.endswith("_imagenet") else (32, 32, 3)
    network = networks.build_network(name, 10)
    variables = jax.eval_shape(functools.partial(network.init, train=False), jax.random.key(0),
                               jnp.zeros((1,) + image))
    bns = models.bn_before_relu(name, variables)
    widths = [shape[-1] for _, shape in tap_shapes(name, 10, image)[1:-1]]
    assert [bn["scale"].shape[0] for bn in bns] == widths, name
    assert [bn["bias"].shape[0] for bn in bns] == widths, name


EXPECTED_PATHS = {
    "resnet8x4": (("layer1_0", "bn2"), ("layer2_0", "bn2"), ("layer3_0", "bn2")),
    "resnet32x4": (("layer1_4", "bn2"), ("layer2_4", "bn2"), ("layer3_4", "bn2")),
    "wrn_16_2": (("block2", "layer_0", "bn1"), ("block3", "layer_0", "bn1"), ("bn1",)),
    "vgg8": (("block1_1",), ("block2_1",), ("block3_1",), ("block4_1",)),
    "MobileNetV2": (("blocks_1_1", "conv_7"), ("blocks_2_2", "conv_7"), ("blocks_4_2", "conv_7"),
                    ("blocks_6_0", "conv_7")),
    # jaxkd's rule (mdistiller lists none for ShuffleNets): the last unit's bn3.
    "ShuffleV1": (("layer1_3", "bn3"), ("layer2_7", "bn3"), ("layer3_3", "bn3")),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_PATHS))
def test_margins_read_the_batchnorm_before_each_stages_relu(name):
  """On the zoo network's variables (random values): the teacher's constants are one margin
  per stage map, of its width, computed from the BatchNorm mdistiller's `get_bn_before_relu`
  names; and that BatchNorm is the one whose output the pre-activation tap is: shifting its
  bias by δ shifts that tap by exactly δ (inference mode) and leaves the earlier taps alone."""
  assert models.bn_before_relu_paths(name) == EXPECTED_PATHS[name]
  variables = jax.tree.map(jnp.asarray, helpers.random_variables(name, 10))
  constants = get_method("ofd").teacher_constants(name, variables, get_method("ofd").hparams())
  bns = models.bn_before_relu(name, variables)
  widths = [shape[-1] for _, shape in tap_shapes(name, 10)[1:-1]]
  assert [m.shape for m in constants["margins"]] == [(w,) for w in widths]
  for margin, bn in zip(constants["margins"], bns):
    np.testing.assert_array_equal(margin, ofd.ofd_margin(bn["scale"], bn["bias"]))

  network = networks.build_network(name, 10).clone(preact=True)
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)), jnp.float32)
  taps = jax.jit(lambda v: list(network.apply(v, images, train=False)["feats"].values())[1:-1])
  base = taps(variables)
  rng = np.random.default_rng(1)
  for i, path in enumerate(EXPECTED_PATHS[name]):
    delta = rng.normal(size=widths[i]).astype(np.float32)
    flat = flax.traverse_util.flatten_dict(variables)
    key = ("params", "backbone") + path + ("bias",)
    flat[key] = flat[key] + delta
    moved = taps(flax.traverse_util.unflatten_dict(flat))
    np.testing.assert_allclose(moved[i] - base[i], np.broadcast_to(delta, base[i].shape),
                               atol=1e-5, err_msg=f"{name} {path}")
    for j in range(i):
      np.testing.assert_array_equal(moved[j], base[j])


def test_a_training_step_gives_the_teachers_constants_and_batch_statistics():
  """resnet8 from a wrn_16_2 teacher (random variables) on 8×8 images, one step of
  steps.train_step with Method.teacher_train_mode and teacher_constants: the logged OFD term is
  the bridge's on both networks' pre-activation taps, the teacher's BatchNorms on the batch's
  statistics, with the margins of its variables; the connectors learn."""
  method = get_method("ofd")
  hparams = method.hparams()
  mesh = parallel.create_mesh(jax.devices()[:1])
  image_shape = (8, 8, 3)
  # As the trainer builds them for a method with `preact`.
  teacher = networks.build_network("wrn_16_2", 10).clone(preact=True)
  teacher_vars = jax.tree.map(jnp.asarray, helpers.random_variables("wrn_16_2", 10))
  network = networks.build_network("resnet8", 10).clone(bridge=method.bridge(16, hparams),
                                                        preact=True)
  variables = networks.init_variables(network, image_shape, 0, mesh,
                                      networks.teacher_output_shapes(teacher, teacher_vars,
                                                                     image_shape))
  assert [variables["params"]["bridge"][f"connectors_{i}"]["conv"]["kernel"].shape
          for i in range(3)] == [(1, 1, 16, 32), (1, 1, 32, 64), (1, 1, 64, 128)]
  constants = method.teacher_constants("wrn_16_2", teacher_vars, hparams)
  tx = optax.sgd(0.1)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                     batch_stats=variables["batch_stats"], opt_state=tx.init(variables["params"]))
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.normal(size=(8,) + image_shape), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 10, size=8), jnp.int32)}
  step = jax.jit(functools.partial(
      steps.train_step, network=network, teacher_network=teacher, loss=method.loss,
      hparams=hparams, tx=tx, schedule=optax.constant_schedule(0.1), steps_per_epoch=4,
      teacher_train_mode=method.teacher_train_mode, teacher_constants=constants))
  new_state, metrics = step(state, teacher_vars, batch)

  teacher_out, _ = teacher.apply(teacher_vars, batch["image"], train=True,
                                 mutable=["batch_stats"])
  inference = teacher.apply(teacher_vars, batch["image"], train=False)
  assert not np.allclose(teacher_out["feats"]["stage3"], inference["feats"]["stage3"])
  student_out, _ = network.clone(bridge=None).apply(
      {"params": state.params, "batch_stats": state.batch_stats}, batch["image"], train=True,
      mutable=["batch_stats"])
  out, _ = network.bridge.apply(
      {"params": state.params["bridge"], "batch_stats": state.batch_stats["bridge"]},
      student_out, dict(teacher_out, constants=constants), None, train=True,
      mutable=["batch_stats"])
  np.testing.assert_allclose(metrics["loss_ofd"], out["loss_ofd"], rtol=1e-5)
  np.testing.assert_allclose(metrics["loss"],
                             metrics["loss_ce"] + hparams.feat_weight * out["loss_ofd"], rtol=1e-5)
  assert not np.allclose(new_state.params["bridge"]["connectors_2"]["conv"]["kernel"],
                         state.params["bridge"]["connectors_2"]["conv"]["kernel"])
