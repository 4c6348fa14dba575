"""MobileNetV2 of the zoo (expansion T = 6, width 0.5): `MobileNetV2` and `MobileNetV2_stride1`.

`MobileNetV2` is RepDistiller's `mobile_half` (HobbitLong/RepDistiller @ b84f547,
`models/mobilenetv2.py`; docs/zoo.md): a 3x3 stride-2 stem conv (3 -> 16), seven stages of
inverted residuals, a 1x1 conv to 1280, a spatial mean and the classifier `classifier.0`. At
32x32 it runs at 16x16 and below (6.5 M MACs). `MobileNetV2_stride1` is HSAKD's variant
(winycg/HSAKD @ 28c8dc2, `models/mobilenetv2.py`): the same layers with a stride-1 stem, so it
runs at 32x32 (25.7 M MACs) and is the network behind HSAKD's MobileNetV2 numbers (baseline
73.51 vs 64.60); its classifier is a bare Linear `classifier`, as in HSAKD's checkpoints. Both
have 812,836 parameters at 100 classes.

Names follow the reference state_dict: stem `conv1_0` (conv) / `conv1_1` (BN); stage s, block b
is `blocks_{s}_{b}` holding `conv_0` (1x1 expand), `conv_1` (BN), `conv_3` (3x3 depthwise),
`conv_4` (BN), `conv_6` (1x1 project), `conv_7` (BN); head `conv2_0` / `conv2_1`.

Taps, in `is_feat` order. The reference taps four of the seven stages; `stageK` is the K-th tap:
  stem   (N, H/2, W/2, 16)    stem output after ReLU  (H, W for MobileNetV2_stride1)
  stage1 (N, H/2, W/2, 12)    output of blocks[1]
  stage2 (N, H/4, W/4, 16)    output of blocks[2]
  stage3 (N, H/8, W/8, 48)    output of blocks[4]
  stage4 (N, H/16, W/16, 160) output of blocks[6]
  pooled (N, 1280)            spatial mean after the 1x1 head conv, BN and ReLU
Stage outputs are linear-bottleneck BN outputs (no ReLU), so `preact` changes nothing (as in the
reference, which ignores it). HSAKD taps stage1..4.
"""

import collections
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd.models import layers

Dtype = Any
Feats = collections.OrderedDict[str, jax.Array]

# (expansion t, output channels c (already x0.5), blocks n, first stride s) per stage.
_STAGES = ((1, 8, 1, 1), (6, 12, 2, 1), (6, 16, 3, 2), (6, 32, 4, 2), (6, 48, 3, 1),
           (6, 80, 3, 2), (6, 160, 1, 1))
_STEM = 16
_LAST = 1280
# After which stages (0-based) the reference takes a feature.
_TAPPED = (1, 2, 4, 6)


class InvertedResidual(nn.Module):
  """1x1 expand (C -> tC) -> BN -> ReLU -> 3x3 depthwise (stride) -> BN -> ReLU -> 1x1 project
  -> BN, plus the input when stride is 1 and channels match.

  Unlike torchvision, the t = 1 block keeps its 1x1 expand conv. Layers are named by their index
  in the reference `conv` Sequential.
  """
  features: int
  stride: int
  expansion: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    ura = not train
    hidden = x.shape[-1] * self.expansion
    y = layers.conv1x1(hidden, dtype=self.dtype, name="conv_0")(x)
    y = nn.relu(layers.BatchNorm(dtype=self.dtype, name="conv_1")(y, ura))
    y = layers.conv3x3(hidden, self.stride, groups=hidden, dtype=self.dtype, name="conv_3")(y)
    y = nn.relu(layers.BatchNorm(dtype=self.dtype, name="conv_4")(y, ura))
    y = layers.conv1x1(self.features, dtype=self.dtype, name="conv_6")(y)
    y = layers.BatchNorm(dtype=self.dtype, name="conv_7")(y, ura)
    if self.stride == 1 and x.shape[-1] == self.features:
      return x + y
    return y


class MobileNetV2(nn.Module):
  """MobileNetV2 (T=6, width 0.5) for CIFAR; `stem_stride` 2 (RepDistiller) or 1 (HSAKD).

  `classifier_name` is `classifier_0` (RepDistiller's Sequential) or `classifier` (HSAKD).
  Init as the reference: convs N(0, 2 / (k*k*C_out)), classifier N(0, 0.01) with zero bias.
  """
  num_classes: int
  stem_stride: int = 2
  classifier_name: str = "classifier_0"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               preact: bool = False) -> tuple[jax.Array, Feats]:
    del preact  # Stage outputs are BN outputs already (see the module docstring).
    ura = not train
    x = jnp.asarray(x, self.dtype)
    x = layers.conv3x3(_STEM, self.stem_stride, dtype=self.dtype, name="conv1_0")(x)
    x = nn.relu(layers.BatchNorm(dtype=self.dtype, name="conv1_1")(x, ura))
    feats = collections.OrderedDict(stem=x)
    for s, (t, c, n, stride) in enumerate(_STAGES):
      for b in range(n):
        x = InvertedResidual(c, stride if b == 0 else 1, t, dtype=self.dtype,
                             name=f"blocks_{s}_{b}")(x, train)
      if s in _TAPPED:
        feats[f"stage{_TAPPED.index(s) + 1}"] = x
    x = layers.conv1x1(_LAST, dtype=self.dtype, name="conv2_0")(x)
    x = nn.relu(layers.BatchNorm(dtype=self.dtype, name="conv2_1")(x, ura))
    x = layers.global_avg_pool(x)
    feats["pooled"] = x
    logits = layers.Linear(self.num_classes, dtype=self.dtype, kernel_init=layers.normal_001,
                           bias_init=layers.zeros, name=self.classifier_name)(x)
    return logits, feats


def _mobilenetv2(num_classes: int, dtype: Dtype = jnp.float32) -> nn.Module:
  return MobileNetV2(num_classes, stem_stride=2, classifier_name="classifier_0", dtype=dtype)


def _mobilenetv2_stride1(num_classes: int, dtype: Dtype = jnp.float32) -> nn.Module:
  return MobileNetV2(num_classes, stem_stride=1, classifier_name="classifier", dtype=dtype)


# Registry entries: name -> build(num_classes, dtype).
MODELS: dict[str, Callable[..., nn.Module]] = {
    "MobileNetV2": _mobilenetv2,
    "MobileNetV2_stride1": _mobilenetv2_stride1,
}

# name -> the BatchNorm whose output each stage tap is (module paths in the params): the
# projection BN `conv_7` of the tapped stage's last block (mdistiller's `get_bn_before_relu`,
# models/cifar/mobilenetv2.py: `blocks[s][-1].conv[-1]`; a linear bottleneck, no ReLU follows).
BN_BEFORE_RELU: dict[str, tuple[tuple[str, ...], ...]] = {
    name: tuple((f"blocks_{s}_{_STAGES[s][2] - 1}", "conv_7") for s in _TAPPED)
    for name in MODELS}
