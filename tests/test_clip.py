"""CLIP image towers: the tiny HF golden, OpenAI TorchScript archives read safely, the ResNet tower
against a TensorFlow re-implementation, the released configurations and the clear errors."""

import json
import os
import shutil
import struct
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from safetensors.numpy import load_file

from jaxkd.errors import UserError
from jaxkd.interop import clip_weights
from jaxkd.models import clip

DATA = os.path.join(os.path.dirname(__file__), "data")
TINY = os.path.join(DATA, "clip_vit_tiny")


@pytest.fixture(scope="module")
def expected():
  return np.load(os.path.join(TINY, "expected.npz"))


@pytest.fixture(scope="module")
def tiny_inputs(expected):
  return np.transpose(expected["pixel_values_nchw"], (0, 2, 3, 1))


def _check_tiny_outputs(module, variables, tiny_inputs, expected):
  embedding, feats = jax.jit(module.apply)(variables, tiny_inputs)
  np.testing.assert_allclose(embedding, expected["image_embeds"], atol=1e-4)
  np.testing.assert_allclose(feats["tokens"], expected["last_hidden_state"], atol=1e-4)
  np.testing.assert_allclose(feats["pre_projection"], expected["pooled_before_projection"],
                             atol=1e-4)
  np.testing.assert_array_equal(feats["pooled"], embedding)


# ---------------------------------------------------------------------------- Hugging Face


def test_tiny_hf_tower_reproduces_pytorch_outputs(expected, tiny_inputs):
  module, variables = clip_weights.load_clip(TINY)
  assert module.config == clip.VisionTransformerConfig(
      image_size=32, patch_size=8, width=64, layers=2, heads=4, output_dim=48, mlp_dim=128)
  assert variables["batch_stats"] == {}
  _check_tiny_outputs(module, variables, tiny_inputs, expected)


def test_hf_config_of_a_whole_clip_model_reads_its_vision_config():
  with open(os.path.join(TINY, "config.json")) as f:
    vision = json.load(f)
  whole = {"model_type": "clip", "projection_dim": vision.pop("projection_dim"),
           "vision_config": vision, "text_config": {"hidden_size": 16}}
  assert clip_weights.config_from_hf(whole) == clip_weights.config_from_hf(
      dict(vision, projection_dim=whole["projection_dim"]))
  # Missing fields are HF's CLIPVisionConfig defaults, i.e. ViT-B/32.
  assert clip_weights.config_from_hf({"model_type": "clip"}) == clip.CONFIGS["clip_vit_b32"]


# ---------------------------------------------------------------------------- OpenAI .pt


class _TorchScriptWriter:
  """Writes a `data.pkl` the way TorchScript's pickler does (protocol 2): each module as
  GLOBAL `__torch__.<module> <Class>`, EMPTY_TUPLE, NEWOBJ, a dict of its attributes, BUILD; each
  tensor as `torch._utils._rebuild_tensor_v2` over a persistent ('storage', ...) id."""

  def __init__(self):
    self.out = bytearray(b"\x80\x02")
    self.storages: list[bytes] = []

  def _global(self, module, name):
    self.out += b"c" + f"{module}\n{name}\n".encode()

  def _str(self, s):
    b = s.encode()
    self.out += b"X" + struct.pack("<I", len(b)) + b

  def _int(self, n):
    self.out += b"J" + struct.pack("<i", n)

  def _ints(self, values):
    self.out += b"("
    for v in values:
      self._int(v)
    self.out += b"t"

  def tensor(self, array, storage_name="FloatStorage", transposed=False):
    array = np.asarray(array)
    stored = np.array(array.T if transposed else array, order="C")  # Keeps 0-d tensors 0-d.
    key = str(len(self.storages))
    self.storages.append(stored.tobytes())
    itemsize = stored.dtype.itemsize
    strides = [s // itemsize for s in (stored.T.strides if transposed else stored.strides)]
    self._global("torch._utils", "_rebuild_tensor_v2")
    self.out += b"(("
    self._str("storage")
    self._global("torch", storage_name)
    self._str(key)
    self._str("cuda:0")
    self._int(stored.size)
    self.out += b"tQ"  # TUPLE, BINPERSID
    self._int(0)
    self._ints(array.shape)
    self._ints(strides)
    self.out += b"\x89"  # requires_grad False
    self._global("collections", "OrderedDict")
    self.out += b")RtR"

  def module(self, class_name, attributes):
    self._global("__torch__.model", class_name)
    self.out += b")\x81}("  # EMPTY_TUPLE, NEWOBJ, EMPTY_DICT, MARK
    for name, value in attributes.items():
      self._str(name)
      if isinstance(value, dict):
        self.module(name.capitalize() or "Module", value)
      elif isinstance(value, bool):
        self.out += b"\x88" if value else b"\x89"
      elif value is None:
        self.out += b"N"
      elif isinstance(value, tuple):
        self.tensor(*value)
      else:
        self.tensor(value)
    self.out += b"ub"  # SETITEMS, BUILD

  def write(self, path, tree, archive="ViT-B-32"):
    self.module("CLIP", tree)
    self.out += b"."
    with zipfile.ZipFile(path, "w") as z:
      z.writestr(f"{archive}/data.pkl", bytes(self.out))
      z.writestr(f"{archive}/constants.pkl", b"\x80\x02).")
      z.writestr(f"{archive}/code/__torch__/model.py", "raise SystemExit('never run')\n")
      z.writestr(f"{archive}/version", "3\n")
      for i, raw in enumerate(self.storages):
        z.writestr(f"{archive}/data/{i}", raw)


def _nest(flat):
  """{'a.b.c': x} -> {'a': {'b': {'c': x}, 'training': False}, 'training': False}."""
  tree = {"training": False}
  for key, value in flat.items():
    node = tree
    *path, leaf = key.split(".")
    for part in path:
      node = node.setdefault(part, {"training": False})
    node[leaf] = value
  return tree


def _tiny_openai_state():
  """The tiny HF tower in OpenAI's layout, renamed by hand: fused in_proj, (in, out) proj."""
  hf = load_file(os.path.join(TINY, "model.safetensors"))
  sd = {"conv1.weight": hf["vision_model.embeddings.patch_embedding.weight"],
        "class_embedding": hf["vision_model.embeddings.class_embedding"],
        "positional_embedding": hf["vision_model.embeddings.position_embedding.weight"],
        "proj": hf["visual_projection.weight"].T}
  for ours, theirs in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
    for leaf in ("weight", "bias"):
      sd[f"{ours}.{leaf}"] = hf[f"vision_model.{theirs}.{leaf}"]
  for i in range(2):
    src, dst = f"vision_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
    for leaf in ("weight", "bias"):
      sd[dst + f"attn.in_proj_{leaf}"] = np.concatenate(
          [hf[src + f"self_attn.{p}_proj.{leaf}"] for p in "qkv"], axis=0)
      for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                   ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
        sd[dst + f"{a}.{leaf}"] = hf[src + f"{b}.{leaf}"]
  return sd


def test_openai_torchscript_archive_loads_without_running_it(tmp_path, expected, tiny_inputs):
  visual = {k: v for k, v in _tiny_openai_state().items()}
  visual["proj"] = (visual["proj"], "FloatStorage", True)  # A strided (transposed) view.
  half = np.arange(6, dtype=np.float16).reshape(2, 3) / 7
  tree = _nest({**{f"visual.{k}": v for k, v in visual.items()},
                "token_embedding.weight": (half, "HalfStorage"),
                "logit_scale": np.float32(4.6), "attn_mask": None})
  path = str(tmp_path / "ViT-B-32.pt")
  _TorchScriptWriter().write(path, tree)

  state = clip_weights.read_torchscript_state_dict(path)
  np.testing.assert_array_equal(state["token_embedding.weight"], half)
  assert state["token_embedding.weight"].dtype == np.float16
  np.testing.assert_array_equal(state["visual.proj"], visual["proj"][0])
  # OpenAI's head-count rule (width / 64) gives 1 for this width-64 tower; it has 4.
  module, variables = clip_weights.load_clip(path, heads=4)
  _check_tiny_outputs(module, variables, tiny_inputs, expected)
  with pytest.raises(UserError, match="clip_vit_b32"):
    clip_weights.load_clip(path, name="clip_vit_b32")


def test_archive_naming_a_callable_is_refused_before_anything_runs(tmp_path):
  marker = tmp_path / "ran"
  payload = bytearray(b"\x80\x02cposix\nsystem\n(X")
  command = f"touch {marker}".encode()
  payload += struct.pack("<I", len(command)) + command + b"tR."
  path = str(tmp_path / "RN50.pt")
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("RN50/data.pkl", bytes(payload))
    z.writestr("RN50/constants.pkl", b"\x80\x02).")
  with pytest.raises(UserError, match="posix.system"):
    clip_weights.load_clip(path)
  assert not marker.exists()


# ---------------------------------------------------------------------------- ResNet tower

RN_TINY = clip.ModifiedResNetConfig(image_size=64, layers=(1, 2, 1, 1), width=8, heads=4,
                                    output_dim=16)


def _random_resnet_state(config, seed=0):
  """An OpenAI-layout `visual.*` state dict of random tensors for a ModifiedResNet config."""
  rng = np.random.default_rng(seed)
  sd = {}

  def conv(name, c_out, c_in, k):
    sd[f"{name}.weight"] = rng.normal(0, (c_in * k * k) ** -0.5, (c_out, c_in, k, k))

  def bn(name, c):
    sd[f"{name}.weight"] = rng.uniform(0.5, 1.5, c)
    sd[f"{name}.bias"] = rng.normal(0, 0.2, c)
    sd[f"{name}.running_mean"] = rng.normal(0, 0.2, c)
    sd[f"{name}.running_var"] = rng.uniform(0.5, 2.0, c)
    sd[f"{name}.num_batches_tracked"] = np.array(7, np.int64)

  w = config.width
  for i, (c_out, c_in) in enumerate(((w // 2, 3), (w // 2, w // 2), (w, w // 2)), start=1):
    conv(f"conv{i}", c_out, c_in, 3)
    bn(f"bn{i}", c_out)
  inplanes = w
  for s, blocks in enumerate(config.layers, start=1):
    planes = w * 2 ** (s - 1)
    for b in range(blocks):
      p = f"layer{s}.{b}"
      conv(f"{p}.conv1", planes, inplanes, 1)
      bn(f"{p}.bn1", planes)
      conv(f"{p}.conv2", planes, planes, 3)
      bn(f"{p}.bn2", planes)
      conv(f"{p}.conv3", planes * 4, planes, 1)
      bn(f"{p}.bn3", planes * 4)
      if (s > 1 and b == 0) or inplanes != planes * 4:
        conv(f"{p}.downsample.0", planes * 4, inplanes, 1)
        bn(f"{p}.downsample.1", planes * 4)
      inplanes = planes * 4
  grid = config.image_size // 32
  sd["attnpool.positional_embedding"] = rng.normal(0, inplanes ** -0.5,
                                                   (grid * grid + 1, inplanes))
  for name, out in (("q_proj", inplanes), ("k_proj", inplanes), ("v_proj", inplanes),
                    ("c_proj", config.output_dim)):
    sd[f"attnpool.{name}.weight"] = rng.normal(0, inplanes ** -0.5, (out, inplanes))
    sd[f"attnpool.{name}.bias"] = rng.normal(0, 0.1, out)
  return {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in sd.items()}


def _tf_resnet_tower(sd, config, x):
  """OpenAI's ModifiedResNet.forward written with TensorFlow ops on the PyTorch-layout weights."""
  def conv(name, x, stride=1):
    w = sd[f"{name}.weight"]
    pad = w.shape[-1] // 2
    x = tf.pad(x, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
    return tf.nn.conv2d(x, np.transpose(w, (2, 3, 1, 0)), stride, "VALID")

  def bn(name, x):
    return ((x - sd[f"{name}.running_mean"]) / np.sqrt(sd[f"{name}.running_var"] + 1e-5)
            * sd[f"{name}.weight"] + sd[f"{name}.bias"])

  def pool(x, k):
    return x if k == 1 else tf.nn.avg_pool2d(x, k, k, "VALID")

  x = tf.nn.relu(bn("bn1", conv("conv1", x, 2)))
  x = tf.nn.relu(bn("bn2", conv("conv2", x)))
  x = pool(tf.nn.relu(bn("bn3", conv("conv3", x))), 2)
  for s, blocks in enumerate(config.layers, start=1):
    for b in range(blocks):
      p, stride = f"layer{s}.{b}", 2 if s > 1 and b == 0 else 1
      y = tf.nn.relu(bn(f"{p}.bn1", conv(f"{p}.conv1", x)))
      y = pool(tf.nn.relu(bn(f"{p}.bn2", conv(f"{p}.conv2", y))), stride)
      y = bn(f"{p}.bn3", conv(f"{p}.conv3", y))
      if f"{p}.downsample.0.weight" in sd:
        x = bn(f"{p}.downsample.1", conv(f"{p}.downsample.0", pool(x, stride)))
      x = tf.nn.relu(y + x)
  x = x.numpy().astype(np.float64)
  n, h, w, c = x.shape
  tokens = x.reshape(n, h * w, c)
  tokens = np.concatenate([tokens.mean(1, keepdims=True), tokens], 1)
  tokens = tokens + sd["attnpool.positional_embedding"]
  lin = lambda name, t: t @ sd[f"attnpool.{name}.weight"].T + sd[f"attnpool.{name}.bias"]
  heads, d = config.heads, c // config.heads
  q = lin("q_proj", tokens[:, :1]).reshape(n, 1, heads, d) / np.sqrt(d)
  k = lin("k_proj", tokens).reshape(n, -1, heads, d)
  v = lin("v_proj", tokens).reshape(n, -1, heads, d)
  logits = np.einsum("nqhd,nkhd->nhqk", q, k)
  attn = np.exp(logits - logits.max(-1, keepdims=True))
  attn /= attn.sum(-1, keepdims=True)
  out = np.einsum("nhqk,nkhd->nqhd", attn, v).reshape(n, c)
  return lin("c_proj", out)


def test_resnet_tower_from_torchscript_matches_a_tensorflow_reimplementation(tmp_path):
  sd = _random_resnet_state(RN_TINY)
  path = str(tmp_path / "RN_tiny.pt")
  _TorchScriptWriter().write(path, _nest({f"visual.{k}": (v, "LongStorage")
                                          if v.dtype == np.int64 else v
                                          for k, v in sd.items()}), archive="RN_tiny")
  module, variables = clip_weights.load_clip(path)
  assert module.config == RN_TINY
  x = np.random.default_rng(1).normal(size=(2, 64, 64, 3)).astype(np.float32)
  embedding, feats = jax.jit(module.apply)(variables, x)
  assert feats["stage4"].shape == (2, 2, 2, 8 * 32) and embedding.shape == (2, 16)
  np.testing.assert_allclose(embedding, _tf_resnet_tower(sd, RN_TINY, x), atol=1e-4)


# ---------------------------------------------------------------------------- registry, errors


def test_released_towers_have_the_published_sizes():
  """Parameter counts of OpenAI's image towers (the `clip` package's models, `visual.*`)."""
  published = {"clip_vit_b32": (87_849_216, 512), "clip_vit_b16": (86_192_640, 512),
               "clip_rn50": (38_316_896, 1024), "clip_rn101": (56_259_936, 512)}
  assert set(clip.CLIP_MODELS) == set(published)
  for name, (count, dim) in published.items():
    module = clip.get_clip_model(name)
    x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
    variables = jax.eval_shape(module.init, jax.random.key(0), x)
    assert sum(p.size for p in jax.tree.leaves(variables["params"])) == count, name
    assert clip.CONFIGS[name].output_dim == dim


def test_missing_weights_say_where_to_put_them(tmp_path):
  with pytest.raises(UserError, match=r"--config.teacher.checkpoint=/path/to/"
                                      r"clip-vit-base-patch32/.*ViT-B-32.pt"):
    clip_weights.load_clip("", name="clip_vit_b32")
  with pytest.raises(UserError, match=r"nothing at .*nowhere.*RN50.pt"):
    clip_weights.load_clip(str(tmp_path / "nowhere"), name="clip_rn50")
  folder = tmp_path / "half_copied"
  folder.mkdir()
  shutil.copy(os.path.join(TINY, "config.json"), folder)
  with pytest.raises(UserError, match="no model.safetensors"):
    clip_weights.load_clip(str(folder))
  with pytest.raises(UserError, match="unknown CLIP model 'clip_vit_l14'.*clip_rn50"):
    clip_weights.load_clip(TINY, name="clip_vit_l14")
  with pytest.raises(UserError, match="holds the CLIP tower.*not 'clip_vit_b16'"):
    clip_weights.load_clip(TINY, name="clip_vit_b16")


def test_wrong_resolution_is_a_clear_error():
  module, variables = clip_weights.load_clip(TINY)
  with pytest.raises(UserError, match="takes 32x32 images.*got 64x64"):
    module.apply(variables, jnp.zeros((1, 64, 64, 3)))


# ---------------------------------------------------------------------------- ResNet golden

RN_GOLDEN = os.path.join(DATA, "clip_rn_tiny")  # Written by data/make_clip_rn_tiny.py.


def test_tiny_resnet_torchscript_archive_reproduces_pytorch_outputs():
  """A tiny ModifiedResNet traced and saved by PyTorch from OpenAI's own model code, in half
  precision where the release is, with random BatchNorm statistics."""
  golden = np.load(os.path.join(RN_GOLDEN, "expected.npz"))
  module, variables = clip_weights.load_clip(os.path.join(RN_GOLDEN, "RN_tiny.pt"))
  # OpenAI's head rule (width · 32 / 64) is what the PyTorch tower was built with.
  assert module.config == clip.ModifiedResNetConfig(image_size=64, layers=(1, 2, 1, 1), width=4,
                                                    heads=2, output_dim=16)
  assert variables["batch_stats"]
  x = np.transpose(golden["pixel_values_nchw"], (0, 2, 3, 1))
  embedding, feats = jax.jit(module.apply)(variables, x)
  np.testing.assert_allclose(embedding, golden["image_embeds"], rtol=1e-4, atol=1e-4)
  for tap in ("stem", "stage1", "stage2", "stage3", "stage4"):
    np.testing.assert_allclose(feats[tap], np.transpose(golden[f"{tap}_nchw"], (0, 2, 3, 1)),
                               rtol=1e-4, atol=1e-4, err_msg=tap)
  np.testing.assert_array_equal(feats["pooled"], embedding)
