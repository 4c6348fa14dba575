"""Wide ResNets of the RepDistiller zoo: wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2.

Pre-activation WRN (Zagoruyko & Komodakis), depth 6n+4, widths (16, 16k, 32k, 64k), dropout 0
(HobbitLong/RepDistiller @ b84f547, `models/wrn.py`; docs/zoo.md). Modules are declared in
`setup()` so that (a) the list `layer` of each `NetworkBlock` gets the state_dict names
`block1/layer_0`, ... and (b) the `preact=True` path can reach `block2.layer[0].bn1` the way the
reference does.
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


class WideBasic(nn.Module):
  """Pre-activation block: BN -> ReLU -> conv3x3(stride) -> BN -> ReLU -> conv3x3, + shortcut.

  in == out channels: identity shortcut on the *raw* input x.
  in != out: the BN-ReLU'ed input feeds both the residual branch and the 1x1 projection
  `convShortcut` (stride s, no BN). Returns the bare residual sum (no final activation).
  """
  in_features: int
  features: int
  stride: int = 1
  dtype: Dtype = jnp.float32

  def setup(self):
    self.bn1 = layers.BatchNorm(dtype=self.dtype)
    self.conv1 = layers.conv3x3(self.features, self.stride, dtype=self.dtype)
    self.bn2 = layers.BatchNorm(dtype=self.dtype)
    self.conv2 = layers.conv3x3(self.features, 1, dtype=self.dtype)
    if self.in_features != self.features:
      self.convShortcut = layers.conv1x1(self.features, self.stride, dtype=self.dtype)

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    ura = not train
    act = nn.relu(self.bn1(x, ura))
    y = self.conv1(act)
    y = nn.relu(self.bn2(y, ura))
    y = self.conv2(y)
    if self.in_features != self.features:
      return self.convShortcut(act) + y
    return x + y


class NetworkBlock(nn.Module):
  """`num_layers` WideBasic blocks (`layer_0`, `layer_1`, ...); only the first strides / widens."""
  num_layers: int
  in_features: int
  features: int
  stride: int
  dtype: Dtype = jnp.float32

  def setup(self):
    self.layer = [
        WideBasic(self.in_features if i == 0 else self.features, self.features,
                  self.stride if i == 0 else 1, dtype=self.dtype)
        for i in range(self.num_layers)]

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    for block in self.layer:
      x = block(x, train)
    return x


class WideResNet(nn.Module):
  """conv3x3(16) -> block1 (s1) -> block2 (s2) -> block3 (s2) -> BN `bn1` -> ReLU -> mean -> `fc`.

  Input (N, H, W, C) NHWC; returns (logits (N, num_classes), feats), feats in `is_feat` order:
    stem   (N, H, W, 16)        raw stem conv output
    stage1 (N, H, W, 16k)       block1 output (residual sum, already pre-activation)
    stage2 (N, H/2, W/2, 32k)   block2 output
    stage3 (N, H/4, W/4, 64k)   block3 output
    pooled (N, 64k)             spatial mean after the final BN-ReLU
  `preact=True` applies the *next* BN module, without ReLU, to stage1..3:
  `block2.layer_0.bn1`, `block3.layer_0.bn1` and the head `bn1` — the same modules and variables,
  as the reference does. Caveat (kept for parity with PyTorch): with `train=True` those three BNs
  then run a second time on the batch, so their running stats get a second momentum update
  (mean <- 0.81*old + 0.19*batch in total). Outputs are in `dtype`.
  """
  depth: int
  widen_factor: int
  num_classes: int
  dtype: Dtype = jnp.float32

  def setup(self):
    if (self.depth - 4) % 6:
      raise ValueError(f"WRN depth must be 6n+4, got {self.depth}")
    n = (self.depth - 4) // 6
    k = self.widen_factor
    widths = (16, 16 * k, 32 * k, 64 * k)
    self.conv1 = layers.conv3x3(widths[0], 1, dtype=self.dtype)
    self.block1 = NetworkBlock(n, widths[0], widths[1], 1, dtype=self.dtype)
    self.block2 = NetworkBlock(n, widths[1], widths[2], 2, dtype=self.dtype)
    self.block3 = NetworkBlock(n, widths[2], widths[3], 2, dtype=self.dtype)
    self.bn1 = layers.BatchNorm(dtype=self.dtype)
    self.fc = layers.Linear(self.num_classes, dtype=self.dtype, bias_init=layers.zeros)

  def __call__(self, x: jax.Array, train: bool = False,
               preact: bool = False) -> tuple[jax.Array, Feats]:
    ura = not train
    x = jnp.asarray(x, self.dtype)
    f0 = self.conv1(x)
    f1 = self.block1(f0, train)
    f2 = self.block2(f1, train)
    f3 = self.block3(f2, train)
    pooled = layers.global_avg_pool(nn.relu(self.bn1(f3, ura)))
    logits = self.fc(pooled)
    if preact:
      f1 = self.block2.layer[0].bn1(f1, ura)
      f2 = self.block3.layer[0].bn1(f2, ura)
      f3 = self.bn1(f3, ura)
    # OrderedDict: a plain dict comes back from jit/eval_shape with its keys sorted.
    feats = collections.OrderedDict(stem=f0, stage1=f1, stage2=f2, stage3=f3, pooled=pooled)
    return logits, feats


# name -> (depth, widen factor)
_CONFIGS = {
    "wrn_16_1": (16, 1),
    "wrn_16_2": (16, 2),
    "wrn_40_1": (40, 1),
    "wrn_40_2": (40, 2),
}


def _builder(depth: int, widen: int) -> Callable[..., nn.Module]:
  def build(num_classes: int, dtype: Dtype = jnp.float32) -> nn.Module:
    return WideResNet(depth, widen, num_classes, dtype=dtype)
  return build


# Registry entries: name -> build(num_classes, dtype).
MODELS: dict[str, Callable[..., nn.Module]] = {
    name: _builder(depth, widen) for name, (depth, widen) in _CONFIGS.items()}

# name -> the BatchNorm before the ReLU that follows each stage, one per stage tap (module paths
# in the params): the pre-activation BN of the next stage's first block, and the head's `bn1`
# after stage 3 — the modules `preact=True` applies (mdistiller's `get_bn_before_relu`,
# models/cifar/wrn.py).
BN_BEFORE_RELU: dict[str, tuple[tuple[str, ...], ...]] = {
    name: (("block2", "layer_0", "bn1"), ("block3", "layer_0", "bn1"), ("bn1",))
    for name in _CONFIGS}
