"""VGG with BatchNorm of the RepDistiller zoo: vgg8, vgg11, vgg13, vgg16, vgg19.

Five blocks `block0..block4` of 3x3 conv (with bias) -> BN -> ReLU, the last ReLU of each block
applied outside it, 2x2 max-pools after block0..2 (after block3 too, only for 64-pixel inputs),
a spatial mean and a Linear `classifier` (HobbitLong/RepDistiller @ b84f547, `models/vgg.py`;
docs/zoo.md). A block's layers keep
the indices of the reference `nn.Sequential` (conv at 3j, BN at 3j+1), so the state_dict key
`block1.3.weight` is the Flax path `block1_3/kernel`.

Taps, in `is_feat` order. The reference has no stem: its first tap is the first block's output,
so the keys are the block numbers:
  stage0 (N, H, W, 64)             ReLU(block0)
  stage1 (N, H/2, W/2, 128)        ReLU(block1)
  stage2 (N, H/4, W/4, 256)        ReLU(block2)
  stage3 (N, H/8, W/8, 512)        ReLU(block3)
  stage4 (N, H/8, W/8, 512)        ReLU(block4) (same size as stage3 below 64-pixel inputs)
  pooled (N, 512)                  spatial mean of stage4, the input of `classifier`
`preact=True` gives the BN outputs before the ReLU for stage1..4; stage0 stays post-ReLU, as in
the reference. HSAKD taps stage0, stage1, stage2 and stage4.
"""

import collections
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd.models import layers

Dtype = Any
Feats = collections.OrderedDict[str, jax.Array]

# Channels of the convs of block0..block4 (RepDistiller's cfg 'S', 'A', 'B', 'D', 'E').
_CONFIGS = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256,) * 3, (512,) * 3, (512,) * 3),
    "vgg19": ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}


def _block(x: jax.Array, index: int, widths: Sequence[int], train: bool,
           dtype: Dtype) -> jax.Array:
  """Block `index`: [conv3x3 (bias) -> BN -> ReLU] * n without the last ReLU; returns the BN output.

  Called inside `VGG.__call__`, so the layers are VGG's own submodules, named like the reference
  Sequential entries: conv `block{index}_{3j}`, BN `block{index}_{3j+1}`.
  """
  for j, features in enumerate(widths):
    if j:
      x = nn.relu(x)
    x = layers.conv(features, 3, 1, 1, use_bias=True, dtype=dtype, name=f"block{index}_{3 * j}")(x)
    x = layers.BatchNorm(dtype=dtype, name=f"block{index}_{3 * j + 1}")(x, not train)
  return x


class VGG(nn.Module):
  """VGG-BN for CIFAR: blocks 0..4, max-pools, spatial mean, Linear `classifier` (see module)."""
  config: Sequence[Sequence[int]]
  num_classes: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               preact: bool = False) -> tuple[jax.Array, Feats]:
    x = jnp.asarray(x, self.dtype)
    height = x.shape[1]
    feats = collections.OrderedDict()
    for b, widths in enumerate(self.config):
      pre = _block(x, b, widths, train, self.dtype)
      x = nn.relu(pre)
      feats[f"stage{b}"] = pre if (preact and b > 0) else x
      # The reference pools after block3 only for 64-pixel inputs (TinyImageNet / STL sizes).
      if b < 3 or (b == 3 and height == 64):
        x = nn.max_pool(x, (2, 2), (2, 2))
    x = layers.global_avg_pool(x)
    feats["pooled"] = x
    logits = layers.Linear(self.num_classes, dtype=self.dtype, kernel_init=layers.normal_001,
                           bias_init=layers.zeros, name="classifier")(x)
    return logits, feats


def _builder(config) -> Callable[..., nn.Module]:
  def build(num_classes: int, dtype: Dtype = jnp.float32) -> nn.Module:
    return VGG(config, num_classes, dtype=dtype)
  return build


# Registry entries: name -> build(num_classes, dtype). RepDistiller's model_dict names; HSAKD
# calls the same constructors vgg8_bn / vgg13_bn.
MODELS: dict[str, Callable[..., nn.Module]] = {
    name: _builder(config) for name, config in _CONFIGS.items()}

# name -> the BatchNorm before the last ReLU of each stage tap stage1..4 (module paths in the
# params): the last BN of block1..4, `block{b}_{3j+1}` for its last conv j (mdistiller's
# `get_bn_before_relu`, models/cifar/vgg.py: `block{b}[-1]`).
BN_BEFORE_RELU: dict[str, tuple[tuple[str, ...], ...]] = {
    name: tuple((f"block{b}_{3 * (len(config[b]) - 1) + 1}",) for b in (1, 2, 3, 4))
    for name, config in _CONFIGS.items()}
