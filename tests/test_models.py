"""Model zoo tests: registry, parameter counts (docs/zoo.md), golden parity with PyTorch.

The golden files in tests/data (golden_resnet8x4.npz, golden_wrn_16_2.npz) hold a state_dict,
inputs and outputs of RepDistiller's PyTorch networks (HobbitLong/RepDistiller @ b84f547,
`models/`). They are compared under
`jax.default_matmul_precision('highest')` because the default float32 conv/matmul precision on
GPU/TPU (TF32/bf16 passes) would exceed the 1e-4 tolerance; on CPU it changes nothing.
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers

from jaxkd.errors import UserError
from jaxkd.interop.torch_layout import flax_module_path, strip_prefix, torch_to_flax
from jaxkd.models import MODEL_NAMES, get_model, layers
from jaxkd.tree_check import first_mismatch

DATA = pathlib.Path(__file__).parent / "data"
FEAT_KEYS = ("stem", "stage1", "stage2", "stage3", "pooled")

# The PyTorch networks' params, BN running-stat elements, is_feat shapes (C, H, W) at 32x32.
_PLAIN = ((16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8), (64,))
_X4 = ((32, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8), (256,))
_WRN2 = ((16, 32, 32), (32, 32, 32), (64, 16, 16), (128, 8, 8), (128,))
ZOO_TABLE = {
    "resnet8": (83_892, 672, _PLAIN),
    "resnet14": (181_108, 1_120, _PLAIN),
    "resnet20": (278_324, 1_568, _PLAIN),
    "resnet32": (472_756, 2_464, _PLAIN),
    "resnet44": (667_188, 3_360, _PLAIN),
    "resnet56": (861_620, 4_256, _PLAIN),
    "resnet110": (1_736_564, 8_288, _PLAIN),
    "resnet8x4": (1_233_540, 2_752, _X4),
    "resnet32x4": (7_433_860, 9_920, _X4),
    "wrn_16_1": (180_916, 928, _PLAIN),
    "wrn_16_2": (703_284, 1_824, _WRN2),
    "wrn_40_1": (569_780, 2_720, _PLAIN),
    "wrn_40_2": (2_255_156, 5_408, _WRN2),
}


def _count(tree) -> int:
  return int(sum(np.prod(leaf.shape, dtype=np.int64) for leaf in jax.tree_util.tree_leaves(tree)))


def _nhwc(a: np.ndarray) -> np.ndarray:
  return np.transpose(a, (0, 2, 3, 1)) if a.ndim == 4 else a


def _leaf(tree, path: str):
  for part in path.split("/"):
    tree = tree[part]
  return np.asarray(tree)


def _numpy_variables(model, x, seed=0):
  """Variables of the right tree and shapes without compiling the random initialisers (slow)."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  rng = np.random.RandomState(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name in ("var", "scale"):
      return np.ones(leaf.shape, np.float32)
    if name == "mean":
      return np.zeros(leaf.shape, np.float32)
    return (0.1 * rng.randn(*leaf.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


# --- registry and sizes --------------------------------------------------------------------------


def test_registry_lists_the_zoo():
  assert set(ZOO_TABLE) <= set(MODEL_NAMES)
  assert len(set(MODEL_NAMES)) == len(MODEL_NAMES)


@pytest.mark.parametrize("name", sorted(ZOO_TABLE))
def test_param_and_bn_counts_and_feature_shapes(name):
  n_params, n_stats, feat_shapes = ZOO_TABLE[name]
  model = get_model(name, 100)
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  assert set(variables) == {"params", "batch_stats"}
  assert _count(variables["params"]) == n_params
  assert _count(variables["batch_stats"]) == n_stats
  assert all(l.dtype == jnp.float32 for l in jax.tree_util.tree_leaves(variables))

  logits, feats = jax.eval_shape(lambda v, x: model.apply(v, x), variables, x)
  assert logits.shape == (2, 100)
  assert tuple(feats) == FEAT_KEYS
  for key, chw in zip(FEAT_KEYS, feat_shapes):
    want = (2,) + (chw[1:] + chw[:1] if len(chw) == 3 else chw)
    assert feats[key].shape == want, key


def test_unknown_model_name_lists_valid_names():
  with pytest.raises(UserError) as err:
    get_model("resnet9000", 100)
  msg = str(err.value)
  assert "resnet9000" in msg
  for name in MODEL_NAMES:
    assert name in msg


# --- golden parity with the PyTorch reference ----------------------------------------------------


@pytest.fixture(scope="module", params=["resnet8x4", "wrn_16_2"])
def golden(request):
  name = request.param
  with np.load(DATA / f"golden_{name}.npz") as npz:
    data = {k: npz[k] for k in npz.files}
  meta = json.loads(str(data["meta"]))
  assert meta["model"] == name
  state_dict = {k: data[k] for k in meta["state_keys"]}
  return name, data, state_dict


def _close(got, want, what, atol=1e-4, rtol=1e-4):
  np.testing.assert_allclose(np.asarray(got), want, atol=atol, rtol=rtol, err_msg=what)


def test_golden_tree_matches_init(golden):
  name, data, state_dict = golden
  model = get_model(name, 100)
  x = _nhwc(data["input"])
  expected = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  variables = torch_to_flax(state_dict)
  assert first_mismatch(expected, variables) is None
  assert _count(variables["params"]) == ZOO_TABLE[name][0]


def test_golden_eval_logits_and_feats(golden):
  name, data, state_dict = golden
  model = get_model(name, 100)
  variables = torch_to_flax(state_dict)
  x = _nhwc(data["input"])
  with jax.default_matmul_precision("highest"):
    apply = jax.jit(model.apply, static_argnames=("train", "preact"))
    logits, feats = apply(variables, x)
    _, pre_feats = apply(variables, x, preact=True)
  _close(logits, data["logits"], "logits")
  assert np.array_equal(np.argmax(logits, -1), np.argmax(data["logits"], -1))
  for i, key in enumerate(FEAT_KEYS):
    _close(feats[key], _nhwc(data[f"feat.{i}"]), f"feat {key}")
    _close(pre_feats[key], _nhwc(data[f"feat_preact.{i}"]), f"preact feat {key}")


def test_golden_train_mode_and_running_stats(golden):
  name, data, state_dict = golden
  model = get_model(name, 100)
  variables = torch_to_flax(state_dict)
  x = _nhwc(data["input"])
  with jax.default_matmul_precision("highest"):
    (logits, feats), updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  _close(logits, data["train.logits"], "train logits")
  for i, key in enumerate(FEAT_KEYS):
    _close(feats[key], _nhwc(data[f"train.feat.{i}"]), f"train feat {key}")

  prefix = "train.updated."
  want = torch_to_flax({k[len(prefix):]: v for k, v in data.items() if k.startswith(prefix)})
  got = updates["batch_stats"]
  assert first_mismatch(want["batch_stats"], got) is None
  flat_want = jax.tree_util.tree_flatten_with_path(want["batch_stats"])[0]
  for path, ref in flat_want:
    path_str = "/".join(p.key for p in path)
    val = _leaf(got, path_str)
    # The running var only matches with PyTorch's unbiased n/(n-1) update (stock Flax: ~2e-3 off).
    _close(val, ref, path_str, atol=1e-5, rtol=1e-5)
  # Eval-mode variables were not touched (apply is functional).
  assert np.array_equal(_leaf(variables["batch_stats"], "bn1/var"), state_dict["bn1.running_var"])


def test_wrn_preact_in_train_mode_updates_the_reused_bns_twice():
  with np.load(DATA / "golden_wrn_16_2.npz") as npz:
    data = {k: npz[k] for k in npz.files}
  state_dict = {k: data[k] for k in json.loads(str(data["meta"]))["state_keys"]}
  model = get_model("wrn_16_2", 100)
  variables = torch_to_flax(state_dict)
  with jax.default_matmul_precision("highest"):
    (_, feats), updates = model.apply(variables, _nhwc(data["input"]), train=True, preact=True,
                                      mutable=["batch_stats"])
  reused = {"block2.layer.0.bn1", "block3.layer.0.bn1", "bn1"}
  for torch_path in ["block1.layer.0.bn1", "block2.layer.0.bn2", *reused]:
    flax_path = "/".join(flax_module_path(torch_path))
    for stat, torch_stat in (("mean", "running_mean"), ("var", "running_var")):
      old = state_dict[f"{torch_path}.{torch_stat}"]
      once = data[f"train.updated.{torch_path}.{torch_stat}"]
      # The preact pass feeds each reused BN the very batch it saw in the forward pass, so the
      # second update uses the same batch statistic b = (once - 0.9 old) / 0.1.
      want = 0.9 * once + (once - 0.9 * old) if torch_path in reused else once
      _close(_leaf(updates["batch_stats"], f"{flax_path}/{stat}"), want, f"{torch_path} {stat}",
             atol=2e-5, rtol=1e-5)
  # Train-mode preact taps = the reused BN applied with batch statistics to the train-mode taps.
  reapplied = (("stage1", "block2.layer.0.bn1", 1), ("stage2", "block3.layer.0.bn1", 2),
               ("stage3", "bn1", 3))
  for key, bn_path, tap in reapplied:
    f = data[f"train.feat.{tap}"].astype(np.float64)
    mu, var = f.mean(axis=(0, 2, 3), keepdims=True), f.var(axis=(0, 2, 3), keepdims=True)
    gamma = state_dict[f"{bn_path}.weight"].reshape(1, -1, 1, 1)
    beta = state_dict[f"{bn_path}.bias"].reshape(1, -1, 1, 1)
    _close(feats[key], _nhwc((f - mu) / np.sqrt(var + 1e-5) * gamma + beta), f"train preact {key}")


# --- beyond the reference: small inputs, init, dtype, sharding ------------------------------------


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1"])
def test_any_input_size_and_channels(name):
  model = get_model(name, 10)
  x = jnp.asarray(np.random.RandomState(0).randn(4, 8, 8, 1), jnp.float32)
  variables = _numpy_variables(model, x)
  (logits, feats), updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  assert logits.shape == (4, 10)
  assert [feats[k].shape[1:3] for k in FEAT_KEYS[:4]] == [(8, 8), (8, 8), (4, 4), (2, 2)]
  assert feats["pooled"].shape == (4, 64)
  assert jax.tree_util.tree_structure(updates["batch_stats"]) == \
      jax.tree_util.tree_structure(variables["batch_stats"])
  assert np.all(np.isfinite(np.asarray(logits)))


def test_initialisers_follow_pytorch():
  res = jax.jit(get_model("resnet8", 100).init)(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
  wrn = jax.jit(get_model("wrn_16_1", 100).init)(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
  # kaiming_normal_(fan_out, relu): std sqrt(2 / (3*3*64)), untruncated (tails beyond 2 sigma).
  w = np.asarray(res["params"]["layer3_0"]["conv2"]["kernel"])
  std = np.sqrt(2.0 / (9 * 64))
  assert abs(w.std() / std - 1) < 0.05
  assert np.abs(w).max() > 3 * std
  w = np.asarray(wrn["params"]["block3"]["layer_0"]["conv2"]["kernel"])
  assert abs(w.std() / std - 1) < 0.05
  # Linear: PyTorch default U(+-1/sqrt(fan_in)) for the weight and (ResNet) the bias; WRN bias 0.
  bound = 1 / np.sqrt(64)
  for tree in (res, wrn):
    k = np.asarray(tree["params"]["fc"]["kernel"])
    assert k.shape == (64, 100) and np.abs(k).max() <= bound and np.abs(k).max() > 0.9 * bound
  b = np.asarray(res["params"]["fc"]["bias"])
  assert np.abs(b).max() <= bound and np.abs(b).max() > 0.5 * bound
  assert not np.any(np.asarray(wrn["params"]["fc"]["bias"]))
  # BN: gamma 1, beta 0, running mean 0, running var 1 (and init did not update them).
  bn, stats = res["params"]["bn1"], res["batch_stats"]["bn1"]
  assert np.all(np.asarray(bn["scale"]) == 1) and not np.any(np.asarray(bn["bias"]))
  assert not np.any(np.asarray(stats["mean"])) and np.all(np.asarray(stats["var"]) == 1)


def test_bfloat16_compute_keeps_float32_variables():
  model = get_model("resnet8", 10, dtype=jnp.bfloat16)
  x = jnp.ones((2, 8, 8, 3), jnp.float32)
  variables = _numpy_variables(model, x)
  assert all(l.dtype == jnp.float32 for l in jax.tree_util.tree_leaves(variables))
  (logits, feats), updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  assert logits.dtype == jnp.bfloat16 and feats["stage3"].dtype == jnp.bfloat16
  assert all(l.dtype == jnp.float32 for l in jax.tree_util.tree_leaves(updates))


def _plain_batch_norm(x, scale, bias, epsilon=1e-5):
  """The textbook training-mode BatchNorm over rows, differentiated by autodiff."""
  mean = jnp.mean(x, axis=0)
  var = jnp.mean(jnp.square(x - mean), axis=0)
  return (x - mean) * jax.lax.rsqrt(var + epsilon) * scale + bias, mean, var


def test_batch_norm_rows_values_and_gradients_match_autodiff():
  rng = np.random.RandomState(0)
  # A large mean checks the two-pass variance; weights make every cotangent non-trivial.
  x = jnp.asarray(rng.randn(200, 6) * 3 + 20, jnp.float32)
  scale, bias = jnp.asarray(rng.rand(6) + 0.5, jnp.float32), jnp.asarray(rng.randn(6), jnp.float32)
  w_y, w_m, w_v = (jnp.asarray(rng.randn(*s), jnp.float32) for s in [(200, 6), (6,), (6,)])

  def loss(fn):
    def f(x, scale, bias):
      y, mean, var = fn(x, scale, bias, 1e-5)
      return jnp.sum(jnp.sin(y) * w_y) + jnp.sum(mean * w_m) + jnp.sum(var * w_v)
    return f

  for a, b in zip(layers.batch_norm_rows(x, scale, bias, 1e-5), _plain_batch_norm(x, scale, bias)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  got = jax.jit(jax.grad(loss(layers.batch_norm_rows), argnums=(0, 1, 2)))(x, scale, bias)
  want = jax.grad(loss(_plain_batch_norm), argnums=(0, 1, 2))(x, scale, bias)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("stride,padding,groups", [(1, ((1, 1), (1, 1)), 1), (2, "SAME", 1),
                                                   (2, ((1, 1), (1, 1)), 2)])
def test_conv_with_stored_input_matches_lax(stride, padding, groups):
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(4, 9, 9, 4), jnp.float32)
  kernel = jnp.asarray(rng.randn(3, 3, 4 // groups, 6), jnp.float32)
  dims = jax.lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))

  def loss(conv_fn):
    def f(x, kernel):
      # BatchNorm-like producer and a ReLU in front of the conv, as in the models.
      y = conv_fn(jax.nn.relu(x * 1.5 - 0.2), kernel, (stride, stride), padding,
                  dimension_numbers=dims, feature_group_count=groups)
      return jnp.sum(jnp.cos(y))
    return f

  got = jax.jit(jax.value_and_grad(loss(layers.conv_general_dilated), argnums=(0, 1)))(x, kernel)
  want = jax.value_and_grad(loss(jax.lax.conv_general_dilated), argnums=(0, 1))(x, kernel)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for a, b in zip(got[1], want[1]):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


_SHARDED_SCRIPT = textwrap.dedent("""
  import jax, jax.numpy as jnp, numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from jaxkd.models import get_model
  assert jax.device_count() == 2
  model = get_model("resnet8", 10)
  x = jnp.asarray(np.random.RandomState(0).randn(8, 8, 8, 3), jnp.float32)
  rng = np.random.RandomState(1)
  v = jax.tree_util.tree_map(lambda s: (0.1 * rng.randn(*s.shape)).astype(np.float32),
                             jax.eval_shape(model.init, jax.random.PRNGKey(0), x))
  step = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
  (ref, _), ref_upd = step(v, x)
  xs = jax.device_put(x, NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data")))
  (out, _), upd = step(v, xs)
  np.testing.assert_allclose(out, ref, atol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(upd), jax.tree_util.tree_leaves(ref_upd)):
    np.testing.assert_allclose(a, b, atol=1e-6)
  print("ok")
""")


def test_batchnorm_statistics_are_global_under_sharded_jit():
  env = helpers.device_env(2, JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = os.pathsep.join(
      [str(pathlib.Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
  proc = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], env=env, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


# --- torch_to_flax / strip_prefix ----------------------------------------------------------------


def test_torch_to_flax_naming_and_layouts():
  rng = np.random.RandomState(0)
  sd = {
      "blocks.1.0.conv.3.weight": rng.randn(16, 1, 3, 3).astype(np.float32),  # depthwise
      "blocks.1.0.conv.4.weight": rng.randn(16).astype(np.float32),
      "blocks.1.0.conv.4.running_var": rng.rand(16).astype(np.float32),
      "blocks.1.0.conv.4.num_batches_tracked": np.array(0, np.int64),
      "classifier.0.weight": rng.randn(10, 7).astype(np.float32),
      "classifier.0.bias": rng.randn(10).astype(np.float32),
      "proj.weight": rng.randn(5, 4, 3).astype(np.float32),  # Conv1d (O, I, W)
  }
  out = torch_to_flax(sd)
  assert set(out) == {"params", "batch_stats"}
  dw = out["params"]["blocks_1_0"]["conv_3"]["kernel"]
  assert dw.shape == (3, 3, 1, 16)
  assert np.array_equal(dw, np.transpose(sd["blocks.1.0.conv.3.weight"], (2, 3, 1, 0)))
  bn = out["params"]["blocks_1_0"]["conv_4"]
  assert np.array_equal(bn["scale"], sd["blocks.1.0.conv.4.weight"])
  assert set(out["batch_stats"]["blocks_1_0"]["conv_4"]) == {"var"}
  assert np.array_equal(out["params"]["classifier_0"]["kernel"], sd["classifier.0.weight"].T)
  assert out["params"]["proj"]["kernel"].shape == (3, 4, 5)
  assert flax_module_path("block1.layer.0.bn1") == ("block1", "layer_0", "bn1")
  assert flax_module_path("layer1.0.downsample.1") == ("layer1_0", "downsample_1")


def test_torch_to_flax_rejects_unknown_tensor_names():
  with pytest.raises(UserError, match="pos_embed"):
    torch_to_flax({"vit.pos_embed": np.zeros((1, 4, 8), np.float32)})


def test_strip_prefix():
  sd = {"backbone.conv1.weight": 1, "backbone.fc.bias": 2, "proj_head.0.weight": 3}
  assert strip_prefix(sd, "backbone") == {"conv1.weight": 1, "fc.bias": 2}
  assert strip_prefix(sd, "backbone.") == {"conv1.weight": 1, "fc.bias": 2}
  assert strip_prefix(sd, "") == sd
  with pytest.raises(UserError, match="module."):
    strip_prefix(sd, "module")
