"""ShuffleNetV2 of the RepDistiller zoo (net_size 1): `ShuffleV2` (HobbitLong/RepDistiller @
b84f547, `models/ShuffleNetv2.py`; docs/zoo.md).

A 1x1 stem conv (3 -> 24) -> BN -> ReLU at full resolution; stages `layer1..3`, each a stride-2
DownBlock (`layerK_0`) followed by 3/7/3 BasicBlocks (`layerK_1`, ...), widths 116/232/464; a
1x1 head conv `conv2` (464 -> 1024) -> BN `bn2` -> ReLU; a spatial mean; the Linear `linear`.
Names follow the reference state_dict.

Taps, in `is_feat` order:
  stem   (N, H, W, 24)          stem output after ReLU
  stage1 (N, H/2, W/2, 116)     layer1 output (channel-shuffled)
  stage2 (N, H/4, W/4, 232)     layer2 output
  stage3 (N, H/8, W/8, 464)     layer3 output
  pooled (N, 1024)              spatial mean after the head conv (so 1024-d while stage3 has 464)
`preact=True`: stage1..3 are concat(x1, last BN output) of the stage's last block *before* its
ReLU and *without* the channel shuffle, so their channel order differs from the plain taps (as in
the reference).
Init: PyTorch's defaults (the reference sets none): conv and linear weights U(+-1/sqrt(fan_in)).
"""

import collections
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd.models import layers
from jaxkd.models.shufflenetv1 import channel_shuffle

Dtype = Any
Feats = collections.OrderedDict[str, jax.Array]

_STEM = 24
_WIDTHS = (116, 232, 464)
_BASIC_BLOCKS = (3, 7, 3)
_HEAD = 1024


def _conv(module: nn.Module, features: int, kernel: int, stride: int = 1, groups: int = 1,
          name: str = "") -> nn.Conv:
  padding = kernel // 2
  return layers.conv(features, kernel, stride, padding, groups=groups, dtype=module.dtype,
                     kernel_init=layers.torch_default_kernel, name=name)


class BasicBlock(nn.Module):
  """Split channels in halves (x1, x2); x2 -> 1x1 -> BN -> ReLU -> 3x3 depthwise -> BN -> 1x1 ->
  BN -> ReLU; concat(x1, branch); shuffle (2 groups).

  Returns (out, preact): preact = concat(x1, last BN output), no ReLU, no shuffle.
  """
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    ura = not train
    c = x.shape[-1] // 2
    x1, x2 = x[..., :c], x[..., c:]
    y = _conv(self, c, 1, name="conv1")(x2)
    y = nn.relu(layers.BatchNorm(dtype=self.dtype, name="bn1")(y, ura))
    y = _conv(self, c, 3, groups=c, name="conv2")(y)
    y = layers.BatchNorm(dtype=self.dtype, name="bn2")(y, ura)
    y = _conv(self, c, 1, name="conv3")(y)
    y = layers.BatchNorm(dtype=self.dtype, name="bn3")(y, ura)
    preact = jnp.concatenate([x1, y], axis=-1)
    out = jnp.concatenate([x1, nn.relu(y)], axis=-1)
    return channel_shuffle(out, 2), preact


class DownBlock(nn.Module):
  """Stride-2 unit, mid = features // 2:
  left  = 3x3 depthwise /2 -> BN -> 1x1 (C -> mid) -> BN -> ReLU              (conv1, conv2)
  right = 1x1 (C -> mid) -> BN -> ReLU -> 3x3 depthwise /2 -> BN -> 1x1 -> BN -> ReLU (conv3..5)
  out   = shuffle(concat(left, right), 2).
  """
  features: int
  dtype: Dtype = jnp.float32
  stride: int = 2  # HSAKD's last auxiliary branch uses a stride-1 copy

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    ura = not train
    c, mid = x.shape[-1], self.features // 2
    left = _conv(self, c, 3, self.stride, groups=c, name="conv1")(x)
    left = layers.BatchNorm(dtype=self.dtype, name="bn1")(left, ura)
    left = _conv(self, mid, 1, name="conv2")(left)
    left = nn.relu(layers.BatchNorm(dtype=self.dtype, name="bn2")(left, ura))
    right = _conv(self, mid, 1, name="conv3")(x)
    right = nn.relu(layers.BatchNorm(dtype=self.dtype, name="bn3")(right, ura))
    right = _conv(self, mid, 3, self.stride, groups=mid, name="conv4")(right)
    right = layers.BatchNorm(dtype=self.dtype, name="bn4")(right, ura)
    right = _conv(self, mid, 1, name="conv5")(right)
    right = nn.relu(layers.BatchNorm(dtype=self.dtype, name="bn5")(right, ura))
    return channel_shuffle(jnp.concatenate([left, right], axis=-1), 2)


class ShuffleNetV2(nn.Module):
  """ShuffleNetV2 (net_size 1) for CIFAR; see the module docstring for layout and taps."""
  num_classes: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               preact: bool = False) -> tuple[jax.Array, Feats]:
    ura = not train
    x = jnp.asarray(x, self.dtype)
    x = _conv(self, _STEM, 1, name="conv1")(x)
    x = nn.relu(layers.BatchNorm(dtype=self.dtype, name="bn1")(x, ura))
    feats = collections.OrderedDict(stem=x)
    for stage, (width, blocks) in enumerate(zip(_WIDTHS, _BASIC_BLOCKS), start=1):
      x = DownBlock(width, dtype=self.dtype, name=f"layer{stage}_0")(x, train)
      for b in range(1, blocks + 1):
        x, pre = BasicBlock(dtype=self.dtype, name=f"layer{stage}_{b}")(x, train)
      feats[f"stage{stage}"] = pre if preact else x
    x = _conv(self, _HEAD, 1, name="conv2")(x)
    x = nn.relu(layers.BatchNorm(dtype=self.dtype, name="bn2")(x, ura))
    x = layers.global_avg_pool(x)
    feats["pooled"] = x
    logits = layers.Linear(self.num_classes, dtype=self.dtype, name="linear")(x)
    return logits, feats


def _shufflev2(num_classes: int, dtype: Dtype = jnp.float32) -> nn.Module:
  return ShuffleNetV2(num_classes, dtype=dtype)


# Registry entries: name -> build(num_classes, dtype).
MODELS: dict[str, Callable[..., nn.Module]] = {"ShuffleV2": _shufflev2}
