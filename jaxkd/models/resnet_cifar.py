"""CIFAR ResNets of the RepDistiller zoo: resnet8/14/20/32/44/56/110, resnet8x4, resnet32x4.

Post-activation ResNet (He et al.) with BasicBlocks, depth 6n+2 (HobbitLong/RepDistiller @ b84f547,
`models/resnet.py`; docs/zoo.md).
Submodule names follow the PyTorch state_dict (`conv1`, `bn1`, `layer1_0/conv1`,
`layer1_0/downsample_0`, `fc`, ...) so `jaxkd.interop.torch_layout.torch_to_flax` loads
reference checkpoints directly.
"""

import collections
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd.models import layers

Dtype = Any
# Named taps in `is_feat` order; see `__call__`.
Feats = collections.OrderedDict[str, jax.Array]


class BasicBlock(nn.Module):
  """conv3x3(stride) -> BN -> ReLU -> conv3x3 -> BN, + shortcut, -> ReLU.

  The shortcut is the identity, or conv1x1(stride) -> BN (`downsample_0`/`downsample_1`) when
  the stride or the channel count changes. Returns (out, preact): preact is the residual sum
  before the final ReLU.
  """
  features: int
  stride: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    ura = not train
    y = layers.conv3x3(self.features, self.stride, dtype=self.dtype, name="conv1")(x)
    y = nn.relu(layers.BatchNorm(dtype=self.dtype, name="bn1")(y, ura))
    y = layers.conv3x3(self.features, 1, dtype=self.dtype, name="conv2")(y)
    y = layers.BatchNorm(dtype=self.dtype, name="bn2")(y, ura)
    shortcut = x
    if self.stride != 1 or x.shape[-1] != self.features:
      shortcut = layers.conv1x1(self.features, self.stride, dtype=self.dtype,
                                name="downsample_0")(x)
      shortcut = layers.BatchNorm(dtype=self.dtype, name="downsample_1")(shortcut, ura)
    preact = y + shortcut
    return nn.relu(preact), preact


class CifarResNet(nn.Module):
  """Stem conv3x3 -> BN -> ReLU, three stages of `blocks_per_stage` BasicBlocks (strides 1, 2, 2),
  spatial mean, Linear `fc`.

  `widths` = (stem, stage1, stage2, stage3) channels. Input (N, H, W, C) NHWC; returns
  (logits (N, num_classes), feats) with feats in the reference `is_feat` order:
    stem   (N, H, W, w0)        stem output after ReLU
    stage1 (N, H, W, w1)        layer1 output (after the last block's ReLU)
    stage2 (N, H/2, W/2, w2)    layer2 output
    stage3 (N, H/4, W/4, w3)    layer3 output
    pooled (N, w3)              spatial mean of stage3, the input of `fc`
  With `preact=True` stage1..3 are the last block's residual sums before its ReLU (values only
  differ). Outputs are in `dtype`.
  """
  blocks_per_stage: int
  widths: tuple[int, int, int, int]
  num_classes: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               preact: bool = False) -> tuple[jax.Array, Feats]:
    ura = not train
    x = jnp.asarray(x, self.dtype)
    x = layers.conv3x3(self.widths[0], 1, dtype=self.dtype, name="conv1")(x)
    x = nn.relu(layers.BatchNorm(dtype=self.dtype, name="bn1")(x, ura))
    # OrderedDict: a plain dict comes back from jit/eval_shape with its keys sorted.
    feats = collections.OrderedDict(stem=x)
    for stage, (features, stride) in enumerate(zip(self.widths[1:], (1, 2, 2)), start=1):
      for b in range(self.blocks_per_stage):
        x, pre = BasicBlock(features, stride if b == 0 else 1, dtype=self.dtype,
                            name=f"layer{stage}_{b}")(x, train)
      feats[f"stage{stage}"] = pre if preact else x
    x = layers.global_avg_pool(x)
    feats["pooled"] = x
    logits = layers.Linear(self.num_classes, dtype=self.dtype, name="fc")(x)
    return logits, feats


_PLAIN = (16, 16, 32, 64)
_X4 = (32, 64, 128, 256)

# name -> (blocks per stage, widths)
_CONFIGS = {
    "resnet8": (1, _PLAIN),
    "resnet14": (2, _PLAIN),
    "resnet20": (3, _PLAIN),
    "resnet32": (5, _PLAIN),
    "resnet44": (7, _PLAIN),
    "resnet56": (9, _PLAIN),
    "resnet110": (18, _PLAIN),
    "resnet8x4": (1, _X4),
    "resnet32x4": (5, _X4),
}


def _builder(blocks: int, widths: tuple[int, int, int, int]) -> Callable[..., nn.Module]:
  def build(num_classes: int, dtype: Dtype = jnp.float32) -> nn.Module:
    return CifarResNet(blocks, widths, num_classes, dtype=dtype)
  return build


# Registry entries: name -> build(num_classes, dtype).
MODELS: dict[str, Callable[..., nn.Module]] = {
    name: _builder(blocks, widths) for name, (blocks, widths) in _CONFIGS.items()}

# name -> the BatchNorm before the last ReLU of each stage, one per stage tap (the module path in
# the params): `bn2` of the stage's last block, whose output the residual sum adds to the
# shortcut before the ReLU (mdistiller's `get_bn_before_relu`, models/cifar/resnet.py).
BN_BEFORE_RELU: dict[str, tuple[tuple[str, ...], ...]] = {
    name: tuple((f"layer{stage}_{blocks - 1}", "bn2") for stage in (1, 2, 3))
    for name, (blocks, _) in _CONFIGS.items()}
