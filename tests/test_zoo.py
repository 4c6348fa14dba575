"""The rest of the zoo: VGG, MobileNetV2, ShuffleNetV1/V2, the CIFAR ResNet50 and the ImageNet nets.

Parameter / BN-statistic counts and tap shapes are those of the PyTorch networks (docs/zoo.md;
RepDistiller @ b84f547 `models/`, HSAKD @ 28c8dc2 `models/`, torchvision); the grouped,
depthwise, shuffle and avg-pool-shortcut blocks are compared with outputs of RepDistiller's
PyTorch blocks in `golden_zoo_blocks.npz`; the PyTorch key of every variable is checked
against the reference state_dict entry counts and key patterns, so reference checkpoints load 1:1.
"""

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers

from jaxkd.import_teacher import _torch_view, template
from jaxkd.interop.torch_layout import torch_to_flax
from jaxkd.models import MODEL_NAMES, get_model
from jaxkd.models import mobilenetv2, shufflenetv1, shufflenetv2, vgg
from jaxkd.tree_check import first_mismatch

DATA = pathlib.Path(__file__).parent / "data"

_STAGES3 = ("stem", "stage1", "stage2", "stage3", "pooled")
_STAGES4 = ("stem", "stage1", "stage2", "stage3", "stage4", "pooled")
_VGG_TAPS = ("stage0", "stage1", "stage2", "stage3", "stage4", "pooled")
_VGG_SHAPES = ((64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 4, 4), (512,))

# name -> (params, BN running-stat elements, state_dict entries incl. num_batches_tracked,
#          tap keys, tap shapes (C, H, W) at the net's input size), as docs/zoo.md lists them.
ZOO = {
    "vgg8": (3_965_028, 2_944, 37, _VGG_TAPS, _VGG_SHAPES),
    "vgg11": (9_277_284, 5_504, 58, _VGG_TAPS, _VGG_SHAPES),
    "vgg13": (9_462_180, 5_888, 72, _VGG_TAPS, _VGG_SHAPES),
    "vgg16": (14_774_436, 8_448, 93, _VGG_TAPS, _VGG_SHAPES),
    "vgg19": (20_086_692, 11_008, 114, _VGG_TAPS, _VGG_SHAPES),
    "MobileNetV2": (812_836, 18_368, 320, _STAGES4, (
        (16, 16, 16), (12, 16, 16), (16, 8, 8), (48, 4, 4), (160, 2, 2), (1280,))),
    "MobileNetV2_stride1": (812_836, 18_368, 320, _STAGES4, (
        (16, 32, 32), (12, 32, 32), (16, 16, 16), (48, 8, 8), (160, 4, 4), (1280,))),
    "ShuffleV1": (949_258, 23_736, 296, _STAGES3, (
        (24, 32, 32), (240, 16, 16), (480, 8, 8), (960, 4, 4), (960,))),
    "ShuffleV2": (1_355_528, 16_180, 338, _STAGES3, (
        (24, 32, 32), (116, 16, 16), (232, 8, 8), (464, 4, 4), (1024,))),
    "ResNet50": (23_705_252, 53_120, 320, _STAGES4, (
        (64, 32, 32), (256, 32, 32), (512, 16, 16), (1024, 8, 8), (2048, 4, 4), (2048,))),
    "resnet18_imagenet": (11_689_512, 9_600, 122, _STAGES4, (
        (64, 112, 112), (64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7), (512,))),
    "resnet34_imagenet": (21_797_672, 17_024, 218, _STAGES4, (
        (64, 112, 112), (64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7), (512,))),
    "resnet50_imagenet": (25_557_032, 53_120, 320, _STAGES4, (
        (64, 112, 112), (256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7), (2048,))),
    "mobilenetv1_imagenet": (4_231_976, 21_888, 164, _STAGES4, (
        (32, 112, 112), (128, 56, 56), (256, 28, 28), (512, 14, 14), (1024, 7, 7), (1024,))),
}


def _side(name):
  return 224 if name.endswith("_imagenet") else 32


def _classes(name):
  return 1000 if name.endswith("_imagenet") else 100


@functools.lru_cache(maxsize=None)
def _abstract_variables(name):
  """`init`'s variables (shapes only) at the net's input size, batch 2; computed once per net."""
  x = jax.ShapeDtypeStruct((2, _side(name), _side(name), 3), jnp.float32)
  return jax.eval_shape(get_model(name, _classes(name)).init, jax.random.PRNGKey(0), x)


@functools.lru_cache(maxsize=None)
def _template(name):
  return template(name, _classes(name))


def _count(tree) -> int:
  return int(sum(np.prod(leaf.shape, dtype=np.int64) for leaf in jax.tree_util.tree_leaves(tree)))


def _nhwc(a: np.ndarray) -> np.ndarray:
  return np.transpose(a, (0, 2, 3, 1)) if a.ndim == 4 else a


def _numpy_variables(shapes, seed=0):
  """Random variables of the right tree without compiling the initialisers."""
  rng = np.random.RandomState(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == "var":
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    return (0.1 * rng.randn(*leaf.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


# --- sizes and taps ------------------------------------------------------------------------------


def test_registry_holds_the_whole_zoo():
  assert set(ZOO) <= set(MODEL_NAMES)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_param_counts_and_tap_shapes(name):
  n_params, n_stats, _, keys, shapes = ZOO[name]
  model = get_model(name, _classes(name))
  x = jax.ShapeDtypeStruct((2, _side(name), _side(name), 3), jnp.float32)
  variables = _abstract_variables(name)
  assert set(variables) == {"params", "batch_stats"}
  assert _count(variables["params"]) == n_params
  assert _count(variables["batch_stats"]) == n_stats
  for preact in (False, True):
    logits, feats = jax.eval_shape(lambda v, x: model.apply(v, x, preact=preact), variables, x)
    assert logits.shape == (2, _classes(name))
    assert tuple(feats) == keys
    for key, chw in zip(keys, shapes):
      want = (2,) + (chw[1:] + chw[:1] if len(chw) == 3 else chw)
      assert feats[key].shape == want, (key, preact)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_pytorch_keys_match_the_reference_state_dict(name):
  """Every Flax leaf has a PyTorch key; with one num_batches_tracked per BN the entry count is
  the reference state_dict's, and a state_dict with those keys converts onto `init`'s tree."""
  _, _, n_entries, _, _ = ZOO[name]
  expected = _template(name)
  torch_shapes = _torch_view(expected)
  n_bn = len(jax.tree_util.tree_leaves(expected["batch_stats"])) // 2
  assert len(torch_shapes) + n_bn == n_entries
  fake_state_dict = {k: np.zeros(s, np.float32) for k, s in torch_shapes.items()}
  assert first_mismatch(expected["params"]["backbone"],
                        torch_to_flax(fake_state_dict)["params"]) is None


# Entries of the reference PyTorch state_dicts (key naming: docs/weights.md).
_KNOWN_KEYS = {
    "vgg13": {"block1.0.weight": (128, 64, 3, 3), "block1.0.bias": (128,),
              "block1.4.running_var": (128,), "block4.3.weight": (512, 512, 3, 3),
              "classifier.weight": (100, 512)},
    "vgg8": {"block0.0.weight": (64, 3, 3, 3), "block4.1.weight": (512,)},
    "MobileNetV2": {"conv1.0.weight": (16, 3, 3, 3), "conv1.1.running_mean": (16,),
                    "blocks.0.0.conv.0.weight": (16, 16, 1, 1),
                    "blocks.0.0.conv.3.weight": (16, 1, 3, 3),
                    "blocks.1.0.conv.7.bias": (12,), "blocks.6.0.conv.6.weight": (160, 480, 1, 1),
                    "conv2.0.weight": (1280, 160, 1, 1), "classifier.0.weight": (100, 1280)},
    "MobileNetV2_stride1": {"classifier.weight": (100, 1280), "conv1.0.weight": (16, 3, 3, 3)},
    "ShuffleV1": {"conv1.weight": (24, 3, 1, 1), "layer1.0.conv1.weight": (54, 24, 1, 1),
                  "layer1.0.conv3.weight": (216, 18, 1, 1),
                  "layer2.0.conv3.weight": (240, 20, 1, 1), "layer3.3.bn3.bias": (960,),
                  "linear.weight": (100, 960)},
    "ShuffleV2": {"layer1.0.conv1.weight": (24, 1, 3, 3), "layer1.0.conv5.weight": (58, 58, 1, 1),
                  "layer2.7.conv2.weight": (116, 1, 3, 3), "conv2.weight": (1024, 464, 1, 1),
                  "bn2.running_var": (1024,), "linear.weight": (100, 1024)},
    "ResNet50": {"layer1.0.shortcut.0.weight": (256, 64, 1, 1), "layer4.2.conv3.weight":
                 (2048, 512, 1, 1), "linear.bias": (100,)},
    "resnet18_imagenet": {"conv1.weight": (64, 3, 7, 7), "layer2.0.downsample.0.weight":
                          (128, 64, 1, 1), "fc.weight": (1000, 512)},
    "resnet50_imagenet": {"layer1.0.downsample.1.running_mean": (256,),
                          "layer3.5.conv2.weight": (256, 256, 3, 3)},
    "mobilenetv1_imagenet": {"model.0.0.weight": (32, 3, 3, 3), "model.1.0.weight": (32, 1, 3, 3),
                             "model.13.3.weight": (1024, 1024, 1, 1),
                             "model.13.4.running_var": (1024,), "fc.weight": (1000, 1024)},
}


@pytest.mark.parametrize("name", sorted(_KNOWN_KEYS))
def test_known_reference_keys(name):
  torch_shapes = _torch_view(_template(name))
  for key, shape in _KNOWN_KEYS[name].items():
    assert torch_shapes.get(key) == shape, key


def test_vgg_pools_after_block3_only_for_64_pixel_inputs():
  model = get_model("vgg8", 10)
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  _, feats = jax.eval_shape(model.apply, variables, x)
  assert feats["stage3"].shape == (1, 8, 8, 512) and feats["stage4"].shape == (1, 4, 4, 512)


# --- the PyTorch blocks of golden_zoo_blocks.npz -------------------------------------------------

_BLOCKS = {
    "sv1_first": lambda: shufflenetv1.Bottleneck(216, 2),  # 24 -> 216 (+24), conv1 ungrouped
    "sv1_s2": lambda: shufflenetv1.Bottleneck(240, 2),     # 240 -> 240 (+240)
    "sv1_s1": lambda: shufflenetv1.Bottleneck(480, 1),
    "sv2_down": lambda: shufflenetv2.DownBlock(116),
    "sv2_basic": lambda: shufflenetv2.BasicBlock(),
    "mv2_ir_s2": lambda: mobilenetv2.InvertedResidual(16, 2, 6),
    "mv2_ir_res": lambda: mobilenetv2.InvertedResidual(16, 1, 6),
}


@pytest.fixture(scope="module")
def blocks_golden():
  with np.load(DATA / "golden_zoo_blocks.npz") as npz:
    return {k: npz[k] for k in npz.files}


@pytest.mark.parametrize("case", sorted(_BLOCKS))
def test_blocks_reproduce_pytorch(blocks_golden, case):
  prefix = f"{case}/sd/"
  state_dict = {k[len(prefix):]: v for k, v in blocks_golden.items() if k.startswith(prefix)}
  block = _BLOCKS[case]()
  x = _nhwc(blocks_golden[f"{case}/input"])
  variables = torch_to_flax(state_dict)
  expected = jax.eval_shape(lambda: block.init(jax.random.PRNGKey(0), x, False))
  assert first_mismatch(expected, variables) is None
  with jax.default_matmul_precision("highest"):
    out = block.apply(variables, x, False)
  out, preact = out if isinstance(out, tuple) else (out, None)
  np.testing.assert_allclose(out, _nhwc(blocks_golden[f"{case}/out"]), atol=1e-5, rtol=1e-5)
  if f"{case}/preact" in blocks_golden:
    np.testing.assert_allclose(preact, _nhwc(blocks_golden[f"{case}/preact"]), atol=1e-5,
                               rtol=1e-5)


def test_channel_shuffle_is_pytorchs():
  n, c, h, w, g = 2, 12, 1, 2, 3
  x = np.arange(n * c * h * w, dtype=np.float32).reshape(n, c, h, w)  # NCHW
  torch_style = x.reshape(n, g, c // g, h, w).transpose(0, 2, 1, 3, 4).reshape(n, c, h, w)
  got = shufflenetv1.channel_shuffle(jnp.asarray(_nhwc(x)), g)
  np.testing.assert_array_equal(got, _nhwc(torch_style))


# --- forward smoke at 32x32 ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["vgg8", "MobileNetV2_stride1", "ShuffleV1", "ShuffleV2",
                                  "ResNet50"])
def test_forward_in_train_mode_and_preact_taps(name):
  """One jitted train-mode forward with and without preact: finite outputs, BN statistics updated
  for every BN, and the preact taps related to the plain ones as the reference defines them."""
  model = get_model(name, 100)
  x = np.random.RandomState(1).randn(2, 32, 32, 3).astype(np.float32)
  variables = _numpy_variables(jax.eval_shape(model.init, jax.random.PRNGKey(0), x))

  @jax.jit
  def both(v, x):
    plain = model.apply(v, x, train=True, mutable=["batch_stats"])
    pre = model.apply(v, x, train=True, preact=True, mutable=["batch_stats"])
    return plain, pre

  with jax.default_matmul_precision("highest"):
    ((logits, feats), updates), ((_, pre), _) = both(variables, x)
  assert logits.shape == (2, 100) and np.all(np.isfinite(logits))
  assert first_mismatch(variables["batch_stats"], updates["batch_stats"]) is None
  changed = jax.tree.map(lambda a, b: not np.allclose(a, b), variables["batch_stats"],
                         updates["batch_stats"])
  assert all(jax.tree_util.tree_leaves(changed))
  maps = [k for k in feats if k not in ("pooled",)]
  first, rest = maps[0], maps[1:]
  np.testing.assert_array_equal(pre[first], feats[first])
  np.testing.assert_array_equal(pre["pooled"], feats["pooled"])
  for key in rest:
    if name.startswith("MobileNetV2"):
      np.testing.assert_array_equal(pre[key], feats[key])  # preact is ignored
    elif name == "ShuffleV2":
      # preact = concat(x1, BN output) before ReLU and before the shuffle.
      shuffled = shufflenetv1.channel_shuffle(jax.nn.relu(pre[key]), 2)
      np.testing.assert_allclose(shuffled, feats[key], atol=1e-6)
    else:
      assert np.min(pre[key]) < 0
      np.testing.assert_allclose(jax.nn.relu(pre[key]), feats[key], atol=1e-6)


def test_initialisers_follow_the_reference():
  """Checked on small pieces (initialising whole nets under jit compiles for tens of seconds)."""
  key = jax.random.PRNGKey(0)
  tiny_vgg = vgg.VGG(((8,), (8,), (8,), (64,), (64,)), num_classes=100)
  p = jax.jit(tiny_vgg.init)(key, jnp.zeros((1, 16, 16, 3)))["params"]
  assert not np.any(np.asarray(p["block0_0"]["bias"]))  # conv bias 0
  w = np.asarray(p["block4_0"]["kernel"])
  assert abs(w.std() / np.sqrt(2.0 / (9 * 64)) - 1) < 0.05  # N(0, 2 / (k*k*C_out)), untruncated
  assert np.abs(w).max() > 3 * np.sqrt(2.0 / (9 * 64))
  k = np.asarray(p["classifier"]["kernel"])
  assert abs(k.std() / 0.01 - 1) < 0.1 and not np.any(np.asarray(p["classifier"]["bias"]))
  p = jax.jit(lambda k, x: shufflenetv1.Bottleneck(480, 1).init(k, x, False))(
      key, jnp.zeros((1, 4, 4, 480)))["params"]
  w = np.asarray(p["conv3"]["kernel"])  # (1, 1, 40, 480), groups 3
  bound = 1 / np.sqrt(40)  # PyTorch default: U(+-1/sqrt(fan_in)), fan_in = C_in/groups*k*k
  assert w.shape == (1, 1, 40, 480)
  assert np.abs(w).max() <= bound and np.abs(w).max() > 0.95 * bound
  p = jax.jit(lambda k, x: mobilenetv2.InvertedResidual(16, 1, 6).init(k, x, False))(
      key, jnp.zeros((1, 4, 4, 16)))["params"]
  w = np.asarray(p["conv_3"]["kernel"])  # depthwise (3, 3, 1, 96): C_out = 96
  assert w.shape == (3, 3, 1, 96) and abs(w.std() / np.sqrt(2.0 / (9 * 96)) - 1) < 0.1


# --- MACs (experiments/zoo_table.py) -------------------------------------------------------------


@pytest.fixture(scope="module")
def zoo_table():
  return helpers.load_module(helpers.REPO / "experiments" / "zoo_table.py", "zoo_table")


@pytest.mark.parametrize("name,macs,depthwise", [
    ("resnet8x4", 177.07, 0.0), ("wrn_16_2", 101.12, 0.0), ("vgg8", 96.19, 0.0),
    ("MobileNetV2", 6.52, 0.73), ("MobileNetV2_stride1", 25.71, None),
    ("ShuffleV1", 38.69, 1.18), ("ShuffleV2", 44.50, 1.36), ("ResNet50", 1298.01, 0.0),
    ("resnet34_imagenet", 3663.76, 0.0), ("mobilenetv1_imagenet", 568.74, None)])
def test_macs_are_the_zoo_figures(zoo_table, name, macs, depthwise):
  """The PyTorch networks' conv + linear MACs per image (ImageNet figures rounded to 1e-3 G)."""
  model = get_model(name, _classes(name))
  got, got_depthwise = zoo_table.count_macs(model, (2, _side(name), _side(name), 3))
  assert round(got / 1e6, 2) == macs
  if depthwise is not None:
    assert round(got_depthwise / 1e6, 2) == depthwise
  assert abs(zoo_table.REFERENCE[name][1] - got / 1e6) <= 0.5


def test_readme_table_is_replaced_between_its_markers(zoo_table):
  text = f"intro\n{zoo_table.START}\nold table\n{zoo_table.END}\noutro\n"
  assert zoo_table.replace_between_markers(text, "| new |") == (
      f"intro\n{zoo_table.START}\n| new |\n{zoo_table.END}\noutro\n")
