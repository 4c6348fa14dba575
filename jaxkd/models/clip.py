"""CLIP image towers (Radford et al., 2021) as Flax modules: frozen teachers for EGA.

Two families, as OpenAI's `clip` package defines them:
  VisionTransformer  ViT-B/32, ViT-B/16 (and any width / depth / patch, e.g. a tiny test tower)
  ModifiedResNet     RN50, RN101: a 3-conv stem with average pooling, Bottleneck stages whose
                     stride is an average pool, and an attention pool instead of a global mean

Both are called like the zoo, `module.apply(variables, x, train=False)` on NHWC images that are
already CLIP-normalised at the tower's resolution, and return `(embedding, feats)`:
`embedding` [N, output_dim] is what CLIP's `encode_image` (Hugging Face: `image_embeds`) returns,
and `feats` is an OrderedDict of taps whose 'pooled' entry is that same embedding, so heads that
read `feats['pooled']` work on a zoo network and on a CLIP tower alike.
  ViT taps:    tokens [N, 1 + g², width] (the last block's output, HF `last_hidden_state`),
               pre_projection [N, width] (ln_post of the class token, HF `pooler_output`), pooled
  ResNet taps: stem, stage1..stage4 (feature maps), pooled (the attention pool's output)
CLIP has no classifier: these are frozen teachers, not zoo classifiers, so they are not in
`jaxkd.models.get_model`; build one by name with `get_clip_model(name)` (the `CLIP_MODELS`
registry) and load its weights with `jaxkd.interop.clip_weights.load_clip`.

Parameter names follow OpenAI's state dict under `jaxkd.interop.torch_layout`'s naming rule
(`transformer.resblocks.0.ln_1` -> `transformer/resblocks_0/ln_1`), with the fused attention
input projection split into `q_proj`, `k_proj`, `v_proj`. Parameters are float32; `dtype` sets
the compute dtype (bfloat16 halves the cost of the 224-px teacher forward); softmax and
normalisation statistics stay float32.
"""

import collections
import dataclasses
from typing import Any, Callable, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd import errors
from jaxkd.models import layers

Dtype = Any
Feats = collections.OrderedDict[str, jax.Array]

# Image statistics CLIP was trained with (the `clip` package's preprocessing), on [0, 1] pixels.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class VisionTransformerConfig:
  """A CLIP ViT: `image_size` / `patch_size` = grid g, g² + 1 tokens of `width`."""
  image_size: int
  patch_size: int
  width: int
  layers: int
  heads: int
  output_dim: int
  mlp_dim: int = 0  # 0: 4 · width, as in every OpenAI tower.
  layer_norm_eps: float = 1e-5
  activation: str = "quick_gelu"  # or 'gelu' (exact)

  def __post_init__(self):
    if not self.mlp_dim:  # Resolved here so that equal towers compare equal.
      object.__setattr__(self, "mlp_dim", 4 * self.width)

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class ModifiedResNetConfig:
  """A CLIP ResNet: Bottleneck `layers` per stage at base `width`; the attention pool works on
  the (image_size / 32)² map of width · 32 channels with `heads` heads."""
  image_size: int
  layers: tuple[int, int, int, int]
  width: int
  heads: int
  output_dim: int


CLIPConfig = Union[VisionTransformerConfig, ModifiedResNetConfig]


def quick_gelu(x: jax.Array) -> jax.Array:
  """x · σ(1.702 x), the activation OpenAI's CLIP towers were trained with."""
  return x * jax.nn.sigmoid(1.702 * x)


_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: nn.gelu(x, approximate=False),
}


def _layer_norm(eps: float, dtype: Dtype, name: str) -> nn.LayerNorm:
  # Two-pass variance: the fast E[x²] − E[x]² loses digits on the residual stream.
  return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=jnp.float32,
                      use_fast_variance=False, name=name)


def _attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int) -> jax.Array:
  """softmax(q kᵀ / sqrt(d_head)) v per head; q [N, Lq, C], k, v [N, Lk, C] -> [N, Lq, C]."""
  n, lq, c = q.shape
  d = c // heads
  q = q.reshape(n, lq, heads, d) * (d ** -0.5)
  k = k.reshape(n, k.shape[1], heads, d)
  v = v.reshape(n, v.shape[1], heads, d)
  logits = jnp.einsum("nqhd,nkhd->nhqk", q, k)
  weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
  return jnp.einsum("nhqk,nkhd->nqhd", weights, v).reshape(n, lq, c)


class MultiHeadAttention(nn.Module):
  """torch.nn.MultiheadAttention (batch first, no mask, no dropout) with split q/k/v weights."""
  heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, query: jax.Array, inputs: jax.Array) -> jax.Array:
    width = inputs.shape[-1]
    dense = lambda name: layers.Linear(width, dtype=self.dtype, name=name)  # noqa: E731
    out = _attention(dense("q_proj")(query), dense("k_proj")(inputs), dense("v_proj")(inputs),
                     self.heads)
    return dense("out_proj")(out)


class MLP(nn.Module):
  """c_proj(act(c_fc(x))), hidden width `mlp_dim`."""
  mlp_dim: int
  activation: str = "quick_gelu"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = layers.Linear(self.mlp_dim, dtype=self.dtype, name="c_fc")(x)
    return layers.Linear(x.shape[-1], dtype=self.dtype, name="c_proj")(
        _ACTIVATIONS[self.activation](y))


class ResidualAttentionBlock(nn.Module):
  """x + attn(ln_1(x)), then + mlp(ln_2(x)): a pre-LN transformer block."""
  heads: int
  mlp_dim: int
  layer_norm_eps: float = 1e-5
  activation: str = "quick_gelu"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = _layer_norm(self.layer_norm_eps, self.dtype, "ln_1")(x)
    x = x + MultiHeadAttention(self.heads, dtype=self.dtype, name="attn")(y, y)
    y = _layer_norm(self.layer_norm_eps, self.dtype, "ln_2")(x)
    return x + MLP(self.mlp_dim, self.activation, dtype=self.dtype, name="mlp")(y)


class Transformer(nn.Module):
  """`layers` ResidualAttentionBlocks, named resblocks_0 ... (OpenAI's `transformer.resblocks`)."""
  layers: int
  heads: int
  mlp_dim: int
  layer_norm_eps: float = 1e-5
  activation: str = "quick_gelu"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.layers):
      x = ResidualAttentionBlock(self.heads, self.mlp_dim, self.layer_norm_eps, self.activation,
                                 dtype=self.dtype, name=f"resblocks_{i}")(x)
    return x


def _check_resolution(x: jax.Array, image_size: int, name: str) -> None:
  if x.shape[1:3] != (image_size, image_size):
    raise errors.UserError(
        f"{name} takes {image_size}x{image_size} images (its positional embedding is fixed), "
        f"got {x.shape[1]}x{x.shape[2]}; resize the teacher's view to {image_size} px "
        "(jaxkd.data.teacher_views)")


class VisionTransformer(nn.Module):
  """CLIP's ViT image tower.

  conv1 (patch_size², stride patch_size, no bias) -> tokens [class; patches] + positional
  embedding -> ln_pre -> transformer -> ln_post(class token) -> @ proj.
  """
  config: VisionTransformerConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, Feats]:
    del train  # No batch statistics and no dropout.
    c = self.config
    _check_resolution(x, c.image_size, "this CLIP ViT")
    scale = c.width ** -0.5
    x = jnp.asarray(x, self.dtype)
    x = nn.Conv(c.width, (c.patch_size, c.patch_size), strides=(c.patch_size, c.patch_size),
                padding="VALID", use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                name="conv1")(x)
    n = x.shape[0]
    x = x.reshape(n, -1, c.width)
    class_embedding = self.param("class_embedding", nn.initializers.normal(scale), (c.width,),
                                 jnp.float32)
    positional = self.param("positional_embedding", nn.initializers.normal(scale),
                            (c.grid ** 2 + 1, c.width), jnp.float32)
    cls = jnp.broadcast_to(jnp.asarray(class_embedding, self.dtype), (n, 1, c.width))
    x = jnp.concatenate([cls, x], axis=1) + jnp.asarray(positional, self.dtype)
    x = _layer_norm(c.layer_norm_eps, self.dtype, "ln_pre")(x)
    tokens = Transformer(c.layers, c.heads, c.mlp_dim, c.layer_norm_eps,
                         c.activation, dtype=self.dtype, name="transformer")(x)
    pre_projection = _layer_norm(c.layer_norm_eps, self.dtype, "ln_post")(tokens[:, 0])
    proj = self.param("proj", nn.initializers.normal(scale), (c.width, c.output_dim),
                      jnp.float32)
    embedding = pre_projection @ jnp.asarray(proj, self.dtype)
    feats = collections.OrderedDict(tokens=tokens, pre_projection=pre_projection,
                                    pooled=embedding)
    return embedding, feats


def _avg_pool(x: jax.Array, size: int) -> jax.Array:
  """torch AvgPool2d(size): non-overlapping size × size means, floor of the output size."""
  return x if size == 1 else nn.avg_pool(x, (size, size), strides=(size, size))


class Bottleneck(nn.Module):
  """CLIP's anti-aliased Bottleneck (expansion 4): 1x1 -> 3x3 -> avgpool(stride) -> 1x1, + skip.

  Every conv has stride 1; downsampling is the average pool, in the branch and in the shortcut
  (`downsample`: avgpool(stride) -> 1x1 conv `downsample_0` -> BN `downsample_1`), which exists
  when the stride or the channel count changes.
  """
  planes: int
  stride: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    ura = not train
    out_ch = self.planes * 4
    bn = lambda name: layers.BatchNorm(dtype=self.dtype, name=name)  # noqa: E731
    y = nn.relu(bn("bn1")(layers.conv1x1(self.planes, dtype=self.dtype, name="conv1")(x), ura))
    y = nn.relu(bn("bn2")(layers.conv3x3(self.planes, dtype=self.dtype, name="conv2")(y), ura))
    y = _avg_pool(y, self.stride)
    y = bn("bn3")(layers.conv1x1(out_ch, dtype=self.dtype, name="conv3")(y), ura)
    shortcut = x
    if self.stride > 1 or x.shape[-1] != out_ch:
      shortcut = _avg_pool(x, self.stride)
      shortcut = layers.conv1x1(out_ch, dtype=self.dtype, name="downsample_0")(shortcut)
      shortcut = bn("downsample_1")(shortcut, ura)
    return nn.relu(y + shortcut)


class AttentionPool2d(nn.Module):
  """Multi-head attention of the mean token over [mean; positions] of the final feature map.

  tokens = [mean over HW; the HW positions] + positional_embedding; the output is the mean
  token's attention result through `c_proj` (width · 32 -> output_dim).
  """
  heads: int
  output_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n, h, w, c = x.shape
    x = x.reshape(n, h * w, c)
    x = jnp.concatenate([jnp.mean(x, axis=1, keepdims=True), x], axis=1)
    positional = self.param("positional_embedding", nn.initializers.normal(c ** -0.5),
                            (h * w + 1, c), jnp.float32)
    x = x + jnp.asarray(positional, self.dtype)
    dense = lambda f, name: layers.Linear(f, dtype=self.dtype, name=name)  # noqa: E731
    out = _attention(dense(c, "q_proj")(x[:, :1]), dense(c, "k_proj")(x),
                     dense(c, "v_proj")(x), self.heads)
    return dense(self.output_dim, "c_proj")(out[:, 0])


class ModifiedResNet(nn.Module):
  """CLIP's ResNet image tower (RN50, RN101, ...).

  Stem: conv1 3x3/2 (width/2) -> conv2 3x3 (width/2) -> conv3 3x3 (width), each BN + ReLU, then
  avgpool 2; stages of Bottlenecks at width, 2·, 4·, 8· (strides 1, 2, 2, 2); attention pool.
  BatchNorm uses its running statistics unless `train` (the teacher is frozen: train=False).
  """
  config: ModifiedResNetConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, Feats]:
    c = self.config
    _check_resolution(x, c.image_size, "this CLIP ResNet")
    ura = not train
    x = jnp.asarray(x, self.dtype)
    half = c.width // 2
    for i, (features, stride) in enumerate(((half, 2), (half, 1), (c.width, 1)), start=1):
      x = layers.conv3x3(features, stride, dtype=self.dtype, name=f"conv{i}")(x)
      x = nn.relu(layers.BatchNorm(dtype=self.dtype, name=f"bn{i}")(x, ura))
    x = _avg_pool(x, 2)
    feats = collections.OrderedDict(stem=x)
    for stage, blocks in enumerate(c.layers, start=1):
      planes = c.width * 2 ** (stage - 1)
      for b in range(blocks):
        stride = 2 if stage > 1 and b == 0 else 1
        x = Bottleneck(planes, stride, dtype=self.dtype, name=f"layer{stage}_{b}")(x, train)
      feats[f"stage{stage}"] = x
    embedding = AttentionPool2d(c.heads, c.output_dim, dtype=self.dtype, name="attnpool")(x)
    feats["pooled"] = embedding
    return embedding, feats


def build_clip(config: CLIPConfig, dtype: Dtype = jnp.float32) -> nn.Module:
  """The tower for a config (ViT or ResNet)."""
  if isinstance(config, VisionTransformerConfig):
    return VisionTransformer(config, dtype=dtype)
  return ModifiedResNet(config, dtype=dtype)


# OpenAI's released towers (the `clip` package's model table).
CONFIGS: dict[str, CLIPConfig] = {
    "clip_vit_b32": VisionTransformerConfig(image_size=224, patch_size=32, width=768, layers=12,
                                            heads=12, output_dim=512),
    "clip_vit_b16": VisionTransformerConfig(image_size=224, patch_size=16, width=768, layers=12,
                                            heads=12, output_dim=512),
    "clip_rn50": ModifiedResNetConfig(image_size=224, layers=(3, 4, 6, 3), width=64, heads=32,
                                      output_dim=1024),
    "clip_rn101": ModifiedResNetConfig(image_size=224, layers=(3, 4, 23, 3), width=64,
                                       heads=32, output_dim=512),
}


def _builder(config: CLIPConfig) -> Callable[..., nn.Module]:
  def build(dtype: Dtype = jnp.float32) -> nn.Module:
    return build_clip(config, dtype)
  return build


# Registry: name -> build(dtype). The embedding width of each is CONFIGS[name].output_dim.
CLIP_MODELS: dict[str, Callable[..., nn.Module]] = {
    name: _builder(config) for name, config in CONFIGS.items()}


def get_clip_model(name: str, dtype: Dtype = jnp.float32) -> nn.Module:
  """The CLIP tower `name` (randomly initialised until weights are loaded into it)."""
  if name not in CLIP_MODELS:
    raise errors.unknown_name("CLIP model", name, CLIP_MODELS)
  return CLIP_MODELS[name](dtype=dtype)
