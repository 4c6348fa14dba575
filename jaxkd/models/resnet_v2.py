"""The CIFAR ResNet50 of the RepDistiller zoo (`models/resnetv2.py`): `ResNet50`.

Stem 3x3 conv stride 1 (3 -> 64) -> BN -> ReLU, no max-pool; bottleneck stages `layer1..4` of
3/4/6/3 blocks, widths 256/512/1024/2048, strides 1/2/2/2; spatial mean; Linear `linear`
(HobbitLong/RepDistiller @ b84f547; docs/zoo.md). Names follow the reference state_dict
(`layer1_0/conv1`, `layer1_0/shortcut_0` (conv) / `shortcut_1` (BN), ...).

Taps, in `is_feat` order:
  stem   (N, H, W, 64)             stem output after ReLU
  stage1 (N, H, W, 256)            layer1 output (after the last block's ReLU)
  stage2 (N, H/2, W/2, 512)        layer2 output
  stage3 (N, H/4, W/4, 1024)       layer3 output
  stage4 (N, H/8, W/8, 2048)       layer4 output
  pooled (N, 2048)                 spatial mean of stage4
`preact=True`: stage1..4 are the last block's residual sum before its ReLU.
Init: convs kaiming-normal (fan_out), BN 1/0, Linear PyTorch default.
"""

import collections
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd.models import layers

Dtype = Any
Feats = collections.OrderedDict[str, jax.Array]


class Bottleneck(nn.Module):
  """1x1 (C -> p) -> BN -> ReLU -> 3x3 (p, stride) -> BN -> ReLU -> 1x1 (p -> 4p) -> BN,
  + shortcut, -> ReLU. The stride sits on the 3x3 conv ("ResNet v1.5").

  The shortcut is the identity, or 1x1 conv (stride) -> BN named `{shortcut}_0` / `{shortcut}_1`
  when the stride or the width changes (`shortcut` = 'shortcut' in the CIFAR ResNet50,
  'downsample' in torchvision's). Returns (out, preact = the sum before the ReLU).
  """
  planes: int
  stride: int = 1
  shortcut: str = "shortcut"
  dtype: Dtype = jnp.float32
  expansion: int = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    ura = not train
    out_features = self.planes * self.expansion
    y = layers.conv1x1(self.planes, dtype=self.dtype, name="conv1")(x)
    y = nn.relu(layers.BatchNorm(dtype=self.dtype, name="bn1")(y, ura))
    y = layers.conv3x3(self.planes, self.stride, dtype=self.dtype, name="conv2")(y)
    y = nn.relu(layers.BatchNorm(dtype=self.dtype, name="bn2")(y, ura))
    y = layers.conv1x1(out_features, dtype=self.dtype, name="conv3")(y)
    y = layers.BatchNorm(dtype=self.dtype, name="bn3")(y, ura)
    shortcut = x
    if self.stride != 1 or x.shape[-1] != out_features:
      shortcut = layers.conv1x1(out_features, self.stride, dtype=self.dtype,
                                name=f"{self.shortcut}_0")(x)
      shortcut = layers.BatchNorm(dtype=self.dtype, name=f"{self.shortcut}_1")(shortcut, ura)
    preact = y + shortcut
    return nn.relu(preact), preact


class CifarResNetBottleneck(nn.Module):
  """Bottleneck ResNet for 32x32 inputs (3x3 stride-1 stem, no max-pool); see the module."""
  blocks_per_stage: Sequence[int]
  num_classes: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               preact: bool = False) -> tuple[jax.Array, Feats]:
    ura = not train
    x = jnp.asarray(x, self.dtype)
    x = layers.conv3x3(64, 1, dtype=self.dtype, name="conv1")(x)
    x = nn.relu(layers.BatchNorm(dtype=self.dtype, name="bn1")(x, ura))
    feats = collections.OrderedDict(stem=x)
    for stage, (planes, blocks, stride) in enumerate(
        zip((64, 128, 256, 512), self.blocks_per_stage, (1, 2, 2, 2)), start=1):
      for b in range(blocks):
        x, pre = Bottleneck(planes, stride if b == 0 else 1, dtype=self.dtype,
                            name=f"layer{stage}_{b}")(x, train)
      feats[f"stage{stage}"] = pre if preact else x
    x = layers.global_avg_pool(x)
    feats["pooled"] = x
    logits = layers.Linear(self.num_classes, dtype=self.dtype, name="linear")(x)
    return logits, feats


def _resnet50(num_classes: int, dtype: Dtype = jnp.float32) -> nn.Module:
  return CifarResNetBottleneck((3, 4, 6, 3), num_classes, dtype=dtype)


# Registry entries: name -> build(num_classes, dtype).
MODELS: dict[str, Callable[..., nn.Module]] = {"ResNet50": _resnet50}

# name -> the BatchNorm before the last ReLU of each stage, one per stage tap (module paths in
# the params): `bn3` of the stage's last bottleneck (mdistiller's `get_bn_before_relu`,
# models/cifar/resnetv2.py).
BN_BEFORE_RELU: dict[str, tuple[tuple[str, ...], ...]] = {
    "ResNet50": tuple((f"layer{s}_{n - 1}", "bn3") for s, n in enumerate((3, 4, 6, 3), start=1))}
