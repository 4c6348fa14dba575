"""ShuffleNetV1 of the RepDistiller zoo (groups g = 3): `ShuffleV1` (HobbitLong/RepDistiller @
b84f547, `models/ShuffleNetv1.py`; docs/zoo.md).

A 1x1 stem conv (3 -> 24) -> BN -> ReLU at full resolution, stages `layer1..3` of 4/8/4 bottlenecks
with widths 240/480/960 (the first block of each stage has stride 2: 32 -> 16 -> 8 -> 4), a
spatial mean and the Linear `linear`. Names follow the reference state_dict (`conv1`, `bn1`,
`layer1_0/conv1` ... `conv3`/`bn3`, `linear`); shortcuts and shuffles have no parameters.

Taps, in `is_feat` order:
  stem   (N, H, W, 24)          stem output after ReLU
  stage1 (N, H/2, W/2, 240)     layer1 output (after the last block's ReLU)
  stage2 (N, H/4, W/4, 480)     layer2 output
  stage3 (N, H/8, W/8, 960)     layer3 output
  pooled (N, 960)               spatial mean of stage3
`preact=True`: stage1..3 are the last block's residual sum before its ReLU.
Init: PyTorch's defaults (the reference sets none): conv and linear weights U(+-1/sqrt(fan_in)).
"""

import collections
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd.models import layers

Dtype = Any
Feats = collections.OrderedDict[str, jax.Array]

_STEM = 24
_WIDTHS = (240, 480, 960)
_BLOCKS = (4, 8, 4)
_GROUPS = 3


def channel_shuffle(x: jax.Array, groups: int) -> jax.Array:
  """NHWC channel shuffle: channel g * (C/groups) + i moves to i * groups + g.

  Equals PyTorch's view (N, g, C/g, H, W) -> permute(0, 2, 1, 3, 4) on NCHW.
  """
  if groups == 1:
    return x
  n, h, w, c = x.shape
  x = x.reshape(n, h, w, groups, c // groups)
  return jnp.swapaxes(x, 3, 4).reshape(n, h, w, c)


def avg_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """PyTorch `AvgPool2d(3, stride=2, padding=1)`: zero padding counted in the divisor (/9)."""
  return nn.avg_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)), count_include_pad=True)


class Bottleneck(nn.Module):
  """1x1 group conv -> BN -> ReLU -> shuffle -> 3x3 depthwise (stride) -> BN -> ReLU -> 1x1 group
  conv -> BN, then + x (stride 1) or concat with AvgPool3x3/2(x) (stride 2), then ReLU.

  `features` is the branch output; for stride 2 the stage width is features + C_in. mid =
  features // 4. The first conv is ungrouped when C_in is the stem's 24 (the very first block).
  Returns (out, preact) with preact the sum / concat before the final ReLU.
  """
  features: int
  stride: int
  groups: int = _GROUPS
  dtype: Dtype = jnp.float32
  # HSAKD's auxiliary copies of these blocks use kaiming init, the backbone PyTorch's default.
  kernel_init: layers.Initializer = layers.torch_default_kernel

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    ura = not train
    mid = self.features // 4
    g = 1 if x.shape[-1] == _STEM else self.groups
    conv = lambda *a, **k: layers.conv(*a, dtype=self.dtype,
                                       kernel_init=self.kernel_init, **k)
    y = conv(mid, 1, groups=g, name="conv1")(x)
    y = nn.relu(layers.BatchNorm(dtype=self.dtype, name="bn1")(y, ura))
    y = channel_shuffle(y, g)
    y = conv(mid, 3, self.stride, 1, groups=mid, name="conv2")(y)
    y = nn.relu(layers.BatchNorm(dtype=self.dtype, name="bn2")(y, ura))
    y = conv(self.features, 1, groups=self.groups, name="conv3")(y)
    y = layers.BatchNorm(dtype=self.dtype, name="bn3")(y, ura)
    if self.stride == 2:
      preact = jnp.concatenate([y, avg_pool_3x3_s2(x)], axis=-1)
    else:
      preact = y + x
    return nn.relu(preact), preact


class ShuffleNetV1(nn.Module):
  """ShuffleNetV1 (g = 3) for CIFAR; see the module docstring for layout and taps."""
  num_classes: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               preact: bool = False) -> tuple[jax.Array, Feats]:
    ura = not train
    x = jnp.asarray(x, self.dtype)
    x = layers.conv(_STEM, 1, dtype=self.dtype, kernel_init=layers.torch_default_kernel,
                    name="conv1")(x)
    x = nn.relu(layers.BatchNorm(dtype=self.dtype, name="bn1")(x, ura))
    feats = collections.OrderedDict(stem=x)
    for stage, (width, blocks) in enumerate(zip(_WIDTHS, _BLOCKS), start=1):
      for b in range(blocks):
        branch = width - x.shape[-1] if b == 0 else width
        x, pre = Bottleneck(branch, 2 if b == 0 else 1, dtype=self.dtype,
                            name=f"layer{stage}_{b}")(x, train)
      feats[f"stage{stage}"] = pre if preact else x
    x = layers.global_avg_pool(x)
    feats["pooled"] = x
    logits = layers.Linear(self.num_classes, dtype=self.dtype, name="linear")(x)
    return logits, feats


def _shufflev1(num_classes: int, dtype: Dtype = jnp.float32) -> nn.Module:
  return ShuffleNetV1(num_classes, dtype=dtype)


# Registry entries: name -> build(num_classes, dtype).
MODELS: dict[str, Callable[..., nn.Module]] = {"ShuffleV1": _shufflev1}

# name -> the BatchNorm before the last ReLU of each stage, one per stage tap (module paths in
# the params): `bn3` of the stage's last (stride-1) unit, added to the identity before the
# ReLU, the rule of the ResNets. mdistiller has none for ShuffleNets (its `get_bn_before_relu`
# raises: not supported as an OFD teacher); this is jaxkd's.
BN_BEFORE_RELU: dict[str, tuple[tuple[str, ...], ...]] = {
    "ShuffleV1": tuple((f"layer{s}_{n - 1}", "bn3") for s, n in enumerate(_BLOCKS, start=1))}
