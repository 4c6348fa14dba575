"""HSAKD's auxiliary classifiers: one per tapped backbone stage, each predicting the 4N joint
(class, rotation) labels (winycg/HSAKD @ 28c8dc2, the `Auxiliary_Classifier` of each
`models/*.py`; docs/zoo.md).

The backbone is cut at its L taps into L segments (segment l ends at tap l). Classifier l reads
tap l and runs

  fresh copies of the segments l+1..L (same blocks, depths, widths, strides and pools)
  -- the last classifier, which has none left, runs a copy of segment L at stride 1 --
  -> the family's own pre-pool head, if any -> spatial mean -> Linear(C_L -> 4N)

so every branch ends at the backbone's last width and resolution. One module,
`AuxiliaryClassifiers`, runs this loop for every family; what differs between families -- the
taps, the blocks that replay a segment, the layers after them, the fc's init -- is a `Family`
description (`CifarResNetBlocks`, `VGGBlocks`, ...), built from the backbone module by
`for_backbone`. The copies reuse the families' block modules; initialisers follow the reference
classifiers (not always their backbones').

A classifier set is a heads module for `jaxkd.networks.Network`:

  heads(outputs, train=...) -> {'aux_logits': [L, R, 4N]}

reading the L taps named by its `taps` from `outputs['feats']`. Submodule names follow the
reference state_dict under `auxiliary_classifier.` (`block_extractor{l}.{i}...`, `bn{l}`,
`conv2_{l}`, `fc{l}`), so `jaxkd.interop.torch_layout.torch_to_flax` loads a reference
checkpoint's classifiers directly.

family (zoo names)          taps                  pre-pool head               classifiers' init
CIFAR ResNet (resnet*)      stage1..3             -                           kaiming, fc bias 0
WRN (wrn_*)                 stage1..3 (raw sums)  own BN + ReLU `bn{l}`       kaiming, fc bias 0
VGG (vgg*)                  stage0, 1, 2, 4       -                           PyTorch default
MobileNetV2(_stride1)       stage1..4             1x1 conv 1280 `conv2_{l}`   kaiming, fc N(0,.01)
ShuffleV1                   stage1..3             -                           kaiming, fc bias 0
ShuffleV2                   stage1..3             1x1 conv 1024 + BN + ReLU   PyTorch default
ResNet50, resnet*_imagenet  stage1..4             -                           kaiming, fc default
"""

import dataclasses
from typing import Any, Callable, ClassVar, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd import errors
from jaxkd.models import MODEL_NAMES, get_model
from jaxkd.models import imagenet
from jaxkd.models import layers
from jaxkd.models import mobilenetv2
from jaxkd.models import resnet_cifar
from jaxkd.models import resnet_v2
from jaxkd.models import shufflenetv1
from jaxkd.models import shufflenetv2
from jaxkd.models import vgg
from jaxkd.models import wrn

Dtype = Any
NUM_ROTATIONS = 4
Logits = dict[str, jax.Array]


def branch_segments(num_taps: int, tap: int) -> tuple[tuple[int, ...], bool]:
  """(0-based segments that classifier `tap` (1-based) replays, whether they run at stride 1).

  Classifier l replays segments l+1..L; the last one replays segment L at stride 1.
  """
  if tap < num_taps:
    return tuple(range(tap, num_taps)), False
  return (num_taps - 1,), True


def _taps(outputs: Mapping[str, Any], names: Sequence[str], detach: bool) -> list[jax.Array]:
  feats = outputs["feats"]
  missing = [n for n in names if n not in feats]
  if missing:
    raise errors.UserError(
        f"the backbone's feats have no tap {missing[0]!r} (it has {', '.join(feats)}); the HSAKD "
        "classifiers were built for another architecture")
  # detach: the reference's grad=False (frozen teacher backbone): no gradient reaches the taps.
  return [jax.lax.stop_gradient(feats[n]) if detach else feats[n] for n in names]


# --- the families' block descriptions -------------------------------------------------------
#
# A branch is the reference's `block_extractor{l}` Sequential: a list of entries, entry i named
# `block_extractor{l}_{i}` (an entry that holds several blocks names block b `..._{i}_{b}`). A
# family says which entries replay one segment, which entries follow the last segment inside the
# Sequential (`tail`), and what runs between the Sequential and the pool (`head`, own names).

# One entry of a branch: `entry(x, name, train) -> x`, creating its modules under `name`.
Entry = Callable[[jax.Array, str, bool], jax.Array]

_FC_ZERO_BIAS = {"bias_init": layers.zeros}


@dataclasses.dataclass(frozen=True)
class Family:
  """The block description of one backbone family; `AuxiliaryClassifiers` replays it.

  Subclasses set `taps` (the feats the classifiers read, in backbone order: tap l ends
  segment l), `fc_init` (keyword initialisers of the 4N-way `fc{l}`; empty: PyTorch's default)
  and `segment`; `tail` and `head` default to nothing.
  """
  taps: ClassVar[tuple[str, ...]] = ("stage1", "stage2", "stage3")
  fc_init: ClassVar[Mapping[str, layers.Initializer]] = {}

  def segment(self, seg: int, stride_one: bool, dtype: Dtype) -> Sequence[Entry]:
    """The entries that replay 0-based segment `seg`; `stride_one`: the last branch's copy."""
    raise NotImplementedError

  def tail(self, dtype: Dtype) -> Sequence[Entry]:
    """Entries after the replayed segments, inside the same Sequential."""
    del dtype
    return ()

  def head(self, x: jax.Array, tap: int, dtype: Dtype, train: bool) -> jax.Array:
    """The branch's own layers between the Sequential and the spatial mean."""
    del tap, dtype, train
    return x


def _blocks(make: Callable[[int, str], nn.Module], count: int) -> Entry:
  """An entry of `count` blocks in a row, block b = `make(b, f"{name}_{b}")`; a block that
  returns (x, pre-activation) passes x on."""
  def entry(x: jax.Array, name: str, train: bool) -> jax.Array:
    for b in range(count):
      x = make(b, f"{name}_{b}")(x, train)
      if isinstance(x, tuple):
        x = x[0]
    return x
  return entry


def _identity(x: jax.Array, name: str, train: bool) -> jax.Array:
  del name, train
  return x


def _max_pool(x: jax.Array, name: str, train: bool) -> jax.Array:
  del name, train
  return nn.max_pool(x, (2, 2), (2, 2))


def _relu(x: jax.Array, name: str, train: bool) -> jax.Array:
  del name, train
  return nn.relu(x)


_CIFAR_STRIDES = (1, 2, 2)


@dataclasses.dataclass(frozen=True)
class CifarResNetBlocks(Family):
  """CIFAR ResNet: BasicBlock copies (`block_extractor{l}_{s}_{b}`); fc bias 0.

  `stage_widths` = (C1, C2, C3); every copied stage has `blocks_per_stage` blocks.
  """
  blocks_per_stage: int
  stage_widths: tuple[int, ...]
  fc_init: ClassVar[Mapping[str, layers.Initializer]] = _FC_ZERO_BIAS

  def segment(self, seg: int, stride_one: bool, dtype: Dtype) -> Sequence[Entry]:
    def block(b: int, name: str) -> nn.Module:
      stride = 1 if b or stride_one else _CIFAR_STRIDES[seg]
      return resnet_cifar.BasicBlock(self.stage_widths[seg], stride, dtype=dtype, name=name)
    return (_blocks(block, self.blocks_per_stage),)


@dataclasses.dataclass(frozen=True)
class WideResNetBlocks(Family):
  """WRN (raw residual-sum taps): NetworkBlock copies (`block_extractor{l}_{s}/layer_{b}`),
  then each branch's own BN `bn{l}` + ReLU; fc bias 0.

  `stage_widths` = (16k, 32k, 64k); every copied stage has `blocks_per_stage` blocks.
  """
  blocks_per_stage: int
  stage_widths: tuple[int, ...]
  fc_init: ClassVar[Mapping[str, layers.Initializer]] = _FC_ZERO_BIAS

  def segment(self, seg: int, stride_one: bool, dtype: Dtype) -> Sequence[Entry]:
    def entry(x: jax.Array, name: str, train: bool) -> jax.Array:
      return wrn.NetworkBlock(self.blocks_per_stage, x.shape[-1], self.stage_widths[seg],
                              1 if stride_one else _CIFAR_STRIDES[seg], dtype=dtype,
                              name=name)(x, train)
    return (entry,)

  def head(self, x: jax.Array, tap: int, dtype: Dtype, train: bool) -> jax.Array:
    return nn.relu(layers.BatchNorm(dtype=dtype, name=f"bn{tap}")(x, not train))


@dataclasses.dataclass(frozen=True)
class ResNetBlocks(Family):
  """The CIFAR ResNet50 or a torchvision ImageNet ResNet: BasicBlock or Bottleneck copies
  (`block_extractor{l}_{s}_{b}`); PyTorch-default fc.

  `stages` = (planes, blocks, stride) of layer1..4; `shortcut` names the bottleneck projection
  ('shortcut' in the CIFAR ResNet50, 'downsample' in torchvision's).
  """
  stages: tuple[tuple[int, int, int], ...]
  bottleneck: bool
  shortcut: str

  @property
  def taps(self) -> tuple[str, ...]:  # type: ignore[override]
    return tuple(f"stage{i + 1}" for i in range(len(self.stages)))

  def segment(self, seg: int, stride_one: bool, dtype: Dtype) -> Sequence[Entry]:
    planes, blocks, first_stride = self.stages[seg]

    def block(b: int, name: str) -> nn.Module:
      stride = 1 if b or stride_one else first_stride
      if self.bottleneck:
        return resnet_v2.Bottleneck(planes, stride, shortcut=self.shortcut, dtype=dtype,
                                    name=name)
      return resnet_cifar.BasicBlock(planes, stride, dtype=dtype, name=name)
    return (_blocks(block, blocks),)


@dataclasses.dataclass(frozen=True)
class VGGBlocks(Family):
  """VGG-BN, taps ReLU(block0), ReLU(block1), ReLU(block2), ReLU(block4).

  Segments: block0 | block1 | block2 | block3 + block4; a 2x2 max-pool entry precedes a copied
  block wherever the backbone pools before it (blocks 1..3), except in the stride-1 last branch.
  Each copied block is one entry, [conv3x3 (bias) -> BN -> ReLU] * n with conv j at
  `block_extractor{l}_{i}_{3j}` and its BN at `_{i}_{3j+1}`, followed by the reference's ReLU
  entry (a no-op on the block's ReLU output). PyTorch-default init throughout (the reference's
  custom init of these classifiers is never called).
  """
  config: tuple[tuple[int, ...], ...]
  taps: ClassVar[tuple[str, ...]] = ("stage0", "stage1", "stage2", "stage4")
  segment_blocks: ClassVar[tuple[tuple[int, ...], ...]] = ((0,), (1,), (2,), (3, 4))

  def segment(self, seg: int, stride_one: bool, dtype: Dtype) -> Sequence[Entry]:
    entries = []
    for block in self.segment_blocks[seg]:
      if block <= 3 and not stride_one:
        entries.append(_max_pool)
      entries += [self._conv_bn_relu(self.config[block], dtype), _identity]
    return entries

  @staticmethod
  def _conv_bn_relu(widths: tuple[int, ...], dtype: Dtype) -> Entry:
    def entry(x: jax.Array, name: str, train: bool) -> jax.Array:
      for j, features in enumerate(widths):
        fan_in = 9 * x.shape[-1]
        x = layers.conv(features, 3, 1, 1, use_bias=True, dtype=dtype,
                        kernel_init=layers.torch_default_kernel,
                        bias_init=layers.torch_default_bias(fan_in), name=f"{name}_{3 * j}")(x)
        x = nn.relu(layers.BatchNorm(dtype=dtype, name=f"{name}_{3 * j + 1}")(x, not train))
      return x
    return entry


# pylint: disable=protected-access
@dataclasses.dataclass(frozen=True)
class MobileNetV2Blocks(Family):
  """MobileNetV2 (T=6, width 0.5), taps the outputs of stages 2, 3, 5 and 7.

  Segments: stages 1-2 | 3 | 4-5 | 6-7, one entry per stage (inverted residual copies
  `block_extractor{l}_{s}_{b}`); the last branch runs stage 6 at stride 1. Each branch's own
  1x1 conv 160 -> 1280 + BN + ReLU (`conv2_{l}_0`, `conv2_{l}_1`); fc N(0, 0.01), bias 0.
  """
  taps: ClassVar[tuple[str, ...]] = tuple(f"stage{i + 1}" for i in range(len(mobilenetv2._TAPPED)))
  fc_init: ClassVar[Mapping[str, layers.Initializer]] = {"kernel_init": layers.normal_001,
                                                         "bias_init": layers.zeros}

  def segment(self, seg: int, stride_one: bool, dtype: Dtype) -> Sequence[Entry]:
    bounds = (-1,) + tuple(mobilenetv2._TAPPED)
    stages = range(bounds[seg] + 1, bounds[seg + 1] + 1)
    return [self._stage(*mobilenetv2._STAGES[stage], stride_one and i == 0, dtype)
            for i, stage in enumerate(stages)]

  @staticmethod
  def _stage(t: int, c: int, n: int, first_stride: int, stride_one: bool, dtype: Dtype) -> Entry:
    def block(b: int, name: str) -> nn.Module:
      stride = 1 if b or stride_one else first_stride
      return mobilenetv2.InvertedResidual(c, stride, t, dtype=dtype, name=name)
    return _blocks(block, n)

  def head(self, x: jax.Array, tap: int, dtype: Dtype, train: bool) -> jax.Array:
    x = layers.conv1x1(mobilenetv2._LAST, dtype=dtype, name=f"conv2_{tap}_0")(x)
    return nn.relu(layers.BatchNorm(dtype=dtype, name=f"conv2_{tap}_1")(x, not train))


@dataclasses.dataclass(frozen=True)
class ShuffleNetV1Blocks(Family):
  """ShuffleV1 (g = 3): Bottleneck copies (`block_extractor{l}_{s}_{b}`; stride 2 + concat on
  each copied stage's first block, all stride 1 and additive in the last branch); fc bias 0.
  Convs N(0, 2 / (k*k*C_out)) as the reference classifiers (its backbone keeps PyTorch's).
  """
  stage_widths: tuple[int, ...] = shufflenetv1._WIDTHS
  stage_blocks: tuple[int, ...] = shufflenetv1._BLOCKS
  fc_init: ClassVar[Mapping[str, layers.Initializer]] = _FC_ZERO_BIAS

  def segment(self, seg: int, stride_one: bool, dtype: Dtype) -> Sequence[Entry]:
    width = self.stage_widths[seg]

    def entry(x: jax.Array, name: str, train: bool) -> jax.Array:
      for b in range(self.stage_blocks[seg]):
        down = b == 0 and not stride_one
        x, _ = shufflenetv1.Bottleneck(
            width - x.shape[-1] if down else width, 2 if down else 1,
            kernel_init=layers.kaiming_normal_fan_out, dtype=dtype, name=f"{name}_{b}")(x, train)
      return x
    return (entry,)


@dataclasses.dataclass(frozen=True)
class ShuffleNetV2Blocks(Family):
  """ShuffleV2: stage copies (`block_extractor{l}_{s}_0` the DownBlock -- stride 1 in the last
  branch --, `_{s}_{b}` the BasicBlocks), then the 1x1 conv C3 -> 1024, BN and ReLU as the next
  entries of the Sequential. PyTorch-default init, as the reference.
  """
  stage_widths: tuple[int, ...] = shufflenetv2._WIDTHS
  stage_blocks: tuple[int, ...] = shufflenetv2._BASIC_BLOCKS
  head_features: int = shufflenetv2._HEAD

  def segment(self, seg: int, stride_one: bool, dtype: Dtype) -> Sequence[Entry]:
    def block(b: int, name: str) -> nn.Module:
      if b == 0:
        return shufflenetv2.DownBlock(self.stage_widths[seg], stride=1 if stride_one else 2,
                                      dtype=dtype, name=name)
      return shufflenetv2.BasicBlock(dtype=dtype, name=name)
    return (_blocks(block, self.stage_blocks[seg] + 1),)

  def tail(self, dtype: Dtype) -> Sequence[Entry]:
    def conv(x: jax.Array, name: str, train: bool) -> jax.Array:
      del train
      return layers.conv(self.head_features, 1, dtype=dtype,
                         kernel_init=layers.torch_default_kernel, name=name)(x)

    def bn(x: jax.Array, name: str, train: bool) -> jax.Array:
      return layers.BatchNorm(dtype=dtype, name=name)(x, not train)
    return (conv, bn, _relu)
# pylint: enable=protected-access


class AuxiliaryClassifiers(nn.Module):
  """HSAKD's classifier set on one backbone, replaying `family`'s blocks (module docstring).

  For each tap l: the tap -> the entries of segments l+1..L (segment L at stride 1 for the last
  classifier) and the family's tail, entry i named `block_extractor{l}_{i}` -> the family's
  head -> spatial mean -> `fc{l}` with `num_outputs` outputs.
  """
  family: Family
  num_outputs: int
  detach: bool = False
  dtype: Dtype = jnp.float32

  @property
  def taps(self) -> tuple[str, ...]:
    return self.family.taps

  @nn.compact
  def __call__(self, outputs: Mapping[str, Any], train: bool = False) -> Logits:
    logits = []
    for l, x in enumerate(_taps(outputs, self.taps, self.detach), start=1):
      segments, stride_one = branch_segments(len(self.taps), l)
      entries = [e for seg in segments for e in self.family.segment(seg, stride_one, self.dtype)]
      for i, entry in enumerate([*entries, *self.family.tail(self.dtype)]):
        x = entry(x, f"block_extractor{l}_{i}", train)
      x = layers.global_avg_pool(self.family.head(x, l, self.dtype, train))
      logits.append(layers.Linear(self.num_outputs, dtype=self.dtype, name=f"fc{l}",
                                  **self.family.fc_init)(x))
    return {"aux_logits": jnp.stack(logits)}


# --- a family's description from its backbone module -----------------------------------------


def _resnet_stages(blocks: Sequence[int]) -> tuple[tuple[int, int, int], ...]:
  return tuple(zip((64, 128, 256, 512), tuple(blocks), (1, 2, 2, 2)))


def _wide_resnet(backbone: wrn.WideResNet) -> Family:
  k = backbone.widen_factor
  return WideResNetBlocks((backbone.depth - 4) // 6, (16 * k, 32 * k, 64 * k))


_FAMILIES: dict[type, Callable[[Any], Family]] = {
    resnet_cifar.CifarResNet:
        lambda m: CifarResNetBlocks(m.blocks_per_stage, tuple(m.widths[1:])),
    wrn.WideResNet: _wide_resnet,
    resnet_v2.CifarResNetBottleneck:
        lambda m: ResNetBlocks(_resnet_stages(m.blocks_per_stage), True, "shortcut"),
    imagenet.ImageNetResNet:
        lambda m: ResNetBlocks(_resnet_stages(m.blocks_per_stage), m.bottleneck, "downsample"),
    vgg.VGG: lambda m: VGGBlocks(tuple(tuple(b) for b in m.config)),
    mobilenetv2.MobileNetV2: lambda m: MobileNetV2Blocks(),
    shufflenetv1.ShuffleNetV1: lambda m: ShuffleNetV1Blocks(),
    shufflenetv2.ShuffleNetV2: lambda m: ShuffleNetV2Blocks(),
}


def has_auxiliary(backbone: nn.Module) -> bool:
  """Whether HSAKD classifiers are defined for this backbone's family."""
  return type(backbone) in _FAMILIES


def for_backbone(backbone: nn.Module, num_classes: int, *, detach: bool = False) -> nn.Module:
  """The HSAKD classifier set of `backbone` (a zoo module), with 4·num_classes outputs each.

  `detach=True` stops gradients at the taps (the frozen-backbone "Teacher"). Computes in the
  backbone's dtype.
  """
  family = _FAMILIES.get(type(backbone))
  if family is None:
    raise errors.UserError(
        f"HSAKD auxiliary classifiers are not defined for {type(backbone).__name__} backbones; "
        f"models with them: {', '.join(model_names())}")
  return AuxiliaryClassifiers(family(backbone), NUM_ROTATIONS * num_classes, detach=detach,
                              dtype=backbone.dtype)


def for_model(name: str, num_classes: int, dtype: Any = jnp.float32, *,
              detach: bool = False) -> nn.Module:
  """The HSAKD classifier set of the zoo model `name` (see `for_backbone`).

  Raises `jaxkd.errors.UserError` for an unknown model or a family without classifiers.
  """
  return for_backbone(get_model(name, num_classes, dtype=dtype), num_classes, detach=detach)


def model_names() -> tuple[str, ...]:
  """The zoo models that have HSAKD classifiers."""
  return tuple(n for n in MODEL_NAMES if has_auxiliary(get_model(n, 1)))
