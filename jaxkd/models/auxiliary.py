"""HSAKD's auxiliary classifiers: one per tapped backbone stage, each predicting the 4N joint
(class, rotation) labels (reference/HSAKD.md section (b)).

The backbone is cut at its L taps into L segments (segment l ends at tap l). Classifier l reads
tap l and runs

  fresh copies of the segments l+1..L (same blocks, depths, widths, strides and pools)
  -- the last classifier, which has none left, runs a copy of segment L at stride 1 --
  -> the family's own pre-pool head, if any -> spatial mean -> Linear(C_L -> 4N)

so every branch ends at the backbone's last width and resolution. The copies reuse the families'
block modules; initialisers follow the reference classifiers (not always their backbones').

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

from typing import Any, Callable, Mapping, Sequence

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


def _stacked(logits: list[jax.Array]) -> Logits:
  return {"aux_logits": jnp.stack(logits)}


class CifarResNetAuxiliary(nn.Module):
  """Classifiers on stage1..3 of a CIFAR ResNet: BasicBlock copies (`block_extractor{l}_{s}_{b}`),
  spatial mean, `fc{l}` (PyTorch-default weight, zero bias).

  `stage_widths` = (C1, C2, C3); every copied stage has `blocks_per_stage` blocks.
  """
  blocks_per_stage: int
  stage_widths: tuple[int, ...]
  num_outputs: int
  detach: bool = False
  dtype: Dtype = jnp.float32

  @property
  def taps(self) -> tuple[str, ...]:
    return ("stage1", "stage2", "stage3")

  @nn.compact
  def __call__(self, outputs: Mapping[str, Any], train: bool = False) -> Logits:
    strides = (1, 2, 2)
    logits = []
    for l, x in enumerate(_taps(outputs, self.taps, self.detach), start=1):
      segments, stride_one = branch_segments(len(self.taps), l)
      for s, seg in enumerate(segments):
        for b in range(self.blocks_per_stage):
          stride = 1 if b or stride_one else strides[seg]
          x, _ = resnet_cifar.BasicBlock(self.stage_widths[seg], stride, dtype=self.dtype,
                                         name=f"block_extractor{l}_{s}_{b}")(x, train)
      x = layers.global_avg_pool(x)
      logits.append(layers.Linear(self.num_outputs, dtype=self.dtype, bias_init=layers.zeros,
                                  name=f"fc{l}")(x))
    return _stacked(logits)


class WideResNetAuxiliary(nn.Module):
  """Classifiers on block1..3 of a WRN (raw residual-sum taps): NetworkBlock copies
  (`block_extractor{l}_{s}/layer_{b}`), each branch's own BN `bn{l}` + ReLU, spatial mean,
  `fc{l}` (PyTorch-default weight, zero bias).

  `stage_widths` = (16k, 32k, 64k); every copied stage has `blocks_per_stage` blocks.
  """
  blocks_per_stage: int
  stage_widths: tuple[int, ...]
  num_outputs: int
  detach: bool = False
  dtype: Dtype = jnp.float32

  @property
  def taps(self) -> tuple[str, ...]:
    return ("stage1", "stage2", "stage3")

  @nn.compact
  def __call__(self, outputs: Mapping[str, Any], train: bool = False) -> Logits:
    strides = (1, 2, 2)
    logits = []
    for l, x in enumerate(_taps(outputs, self.taps, self.detach), start=1):
      segments, stride_one = branch_segments(len(self.taps), l)
      for s, seg in enumerate(segments):
        x = wrn.NetworkBlock(self.blocks_per_stage, x.shape[-1], self.stage_widths[seg],
                             1 if stride_one else strides[seg], dtype=self.dtype,
                             name=f"block_extractor{l}_{s}")(x, train)
      x = nn.relu(layers.BatchNorm(dtype=self.dtype, name=f"bn{l}")(x, not train))
      x = layers.global_avg_pool(x)
      logits.append(layers.Linear(self.num_outputs, dtype=self.dtype, bias_init=layers.zeros,
                                  name=f"fc{l}")(x))
    return _stacked(logits)


class ResNetAuxiliary(nn.Module):
  """Classifiers on stage1..4 of the CIFAR ResNet50 or a torchvision ImageNet ResNet: BasicBlock
  or Bottleneck copies (`block_extractor{l}_{s}_{b}`), spatial mean, `fc{l}` (PyTorch default).

  `stages` = (planes, blocks, stride) of layer1..4; `shortcut` names the bottleneck projection
  ('shortcut' in the CIFAR ResNet50, 'downsample' in torchvision's).
  """
  stages: tuple[tuple[int, int, int], ...]
  bottleneck: bool
  shortcut: str
  num_outputs: int
  detach: bool = False
  dtype: Dtype = jnp.float32

  @property
  def taps(self) -> tuple[str, ...]:
    return tuple(f"stage{i + 1}" for i in range(len(self.stages)))

  @nn.compact
  def __call__(self, outputs: Mapping[str, Any], train: bool = False) -> Logits:
    logits = []
    for l, x in enumerate(_taps(outputs, self.taps, self.detach), start=1):
      segments, stride_one = branch_segments(len(self.taps), l)
      for s, seg in enumerate(segments):
        planes, blocks, first_stride = self.stages[seg]
        for b in range(blocks):
          stride = 1 if b or stride_one else first_stride
          name = f"block_extractor{l}_{s}_{b}"
          if self.bottleneck:
            block = resnet_v2.Bottleneck(planes, stride, shortcut=self.shortcut, dtype=self.dtype,
                                         name=name)
          else:
            block = resnet_cifar.BasicBlock(planes, stride, dtype=self.dtype, name=name)
          x, _ = block(x, train)
      x = layers.global_avg_pool(x)
      logits.append(layers.Linear(self.num_outputs, dtype=self.dtype, name=f"fc{l}")(x))
    return _stacked(logits)


class VGGAuxiliary(nn.Module):
  """Classifiers on ReLU(block0), ReLU(block1), ReLU(block2) and ReLU(block4) of a VGG-BN.

  Segments: block0 | block1 | block2 | block3 + block4; a 2x2 max-pool precedes a copied block
  wherever the backbone pools before it (blocks 1..3), except in the stride-1 last branch. Every
  copied block is [conv3x3 (bias) -> BN -> ReLU] * n. Layers keep the indices of the reference
  `block_extractor{l}` Sequential (pool, block, ReLU, ...), a block's conv j at 3j and BN at
  3j+1: `block_extractor{l}_{i}_{3j}`. PyTorch-default init throughout (the reference's custom
  init of these classifiers is never called).
  """
  config: tuple[tuple[int, ...], ...]
  num_outputs: int
  detach: bool = False
  dtype: Dtype = jnp.float32

  @property
  def taps(self) -> tuple[str, ...]:
    return ("stage0", "stage1", "stage2", "stage4")

  @nn.compact
  def __call__(self, outputs: Mapping[str, Any], train: bool = False) -> Logits:
    # The backbone blocks of each segment (segment l ends at tap l).
    segment_blocks = ((0,), (1,), (2,), (3, 4))
    logits = []
    for l, x in enumerate(_taps(outputs, self.taps, self.detach), start=1):
      segments, stride_one = branch_segments(len(self.taps), l)
      index = 0
      for block in (b for seg in segments for b in segment_blocks[seg]):
        if block <= 3 and not stride_one:
          x = nn.max_pool(x, (2, 2), (2, 2))
          index += 1
        for j, features in enumerate(self.config[block]):
          fan_in = 9 * x.shape[-1]
          x = layers.conv(features, 3, 1, 1, use_bias=True, dtype=self.dtype,
                          kernel_init=layers.torch_default_kernel,
                          bias_init=layers.torch_default_bias(fan_in),
                          name=f"block_extractor{l}_{index}_{3 * j}")(x)
          x = layers.BatchNorm(dtype=self.dtype,
                               name=f"block_extractor{l}_{index}_{3 * j + 1}")(x, not train)
          x = nn.relu(x)
        index += 2  # the block and the ReLU after it
      x = layers.global_avg_pool(x)
      logits.append(layers.Linear(self.num_outputs, dtype=self.dtype, name=f"fc{l}")(x))
    return _stacked(logits)


class MobileNetV2Auxiliary(nn.Module):
  """Classifiers on the outputs of stages 2, 3, 5 and 7 of MobileNetV2 (T=6, width 0.5).

  Segments: stages 1-2 | 3 | 4-5 | 6-7; the last branch runs stage 6 at stride 1. Inverted
  residual copies `block_extractor{l}_{s}_{b}`, then each branch's own 1x1 conv 160 -> 1280 +
  BN + ReLU (`conv2_{l}_0`, `conv2_{l}_1`), spatial mean, `fc{l}` N(0, 0.01) with zero bias.
  """
  num_outputs: int
  detach: bool = False
  dtype: Dtype = jnp.float32

  @property
  def taps(self) -> tuple[str, ...]:
    tapped = mobilenetv2._TAPPED  # pylint: disable=protected-access
    return tuple(f"stage{i + 1}" for i in range(len(tapped)))

  @nn.compact
  def __call__(self, outputs: Mapping[str, Any], train: bool = False) -> Logits:
    stages = mobilenetv2._STAGES  # pylint: disable=protected-access
    tapped = mobilenetv2._TAPPED  # pylint: disable=protected-access
    last = mobilenetv2._LAST  # pylint: disable=protected-access
    bounds = (-1,) + tuple(tapped)
    logits = []
    for l, x in enumerate(_taps(outputs, self.taps, self.detach), start=1):
      segments, stride_one = branch_segments(len(self.taps), l)
      plan = [i for seg in segments for i in range(bounds[seg] + 1, bounds[seg + 1] + 1)]
      for s, stage in enumerate(plan):
        t, c, n, first_stride = stages[stage]
        for b in range(n):
          stride = 1 if b or (stride_one and s == 0) else first_stride
          x = mobilenetv2.InvertedResidual(c, stride, t, dtype=self.dtype,
                                           name=f"block_extractor{l}_{s}_{b}")(x, train)
      x = layers.conv1x1(last, dtype=self.dtype, name=f"conv2_{l}_0")(x)
      x = nn.relu(layers.BatchNorm(dtype=self.dtype, name=f"conv2_{l}_1")(x, not train))
      x = layers.global_avg_pool(x)
      logits.append(layers.Linear(self.num_outputs, dtype=self.dtype,
                                  kernel_init=layers.normal_001, bias_init=layers.zeros,
                                  name=f"fc{l}")(x))
    return _stacked(logits)


class ShuffleNetV1Auxiliary(nn.Module):
  """Classifiers on layer1..3 of ShuffleV1 (g = 3): Bottleneck copies
  (`block_extractor{l}_{s}_{b}`; stride 2 + concat on each copied stage's first block, all
  stride 1 and additive in the last branch), spatial mean, `fc{l}` (zero bias).
  Convs N(0, 2 / (k*k*C_out)) as the reference classifiers (its backbone keeps PyTorch's).
  """
  stage_widths: tuple[int, ...]
  stage_blocks: tuple[int, ...]
  num_outputs: int
  detach: bool = False
  dtype: Dtype = jnp.float32

  @property
  def taps(self) -> tuple[str, ...]:
    return ("stage1", "stage2", "stage3")

  @nn.compact
  def __call__(self, outputs: Mapping[str, Any], train: bool = False) -> Logits:
    logits = []
    for l, x in enumerate(_taps(outputs, self.taps, self.detach), start=1):
      segments, stride_one = branch_segments(len(self.taps), l)
      for s, seg in enumerate(segments):
        width = self.stage_widths[seg]
        for b in range(self.stage_blocks[seg]):
          down = b == 0 and not stride_one
          x, _ = shufflenetv1.Bottleneck(
              width - x.shape[-1] if down else width, 2 if down else 1,
              kernel_init=layers.kaiming_normal_fan_out, dtype=self.dtype,
              name=f"block_extractor{l}_{s}_{b}")(x, train)
      x = layers.global_avg_pool(x)
      logits.append(layers.Linear(self.num_outputs, dtype=self.dtype, bias_init=layers.zeros,
                                  name=f"fc{l}")(x))
    return _stacked(logits)


class ShuffleNetV2Auxiliary(nn.Module):
  """Classifiers on layer1..3 of ShuffleV2: stage copies (`block_extractor{l}_{s}_0` the
  DownBlock -- stride 1 in the last branch --, `_{s}_{b}` the BasicBlocks), then the 1x1 conv
  C3 -> 1024 + BN + ReLU as the next two entries of the reference Sequential, spatial mean,
  `fc{l}`. PyTorch-default init, as the reference.
  """
  stage_widths: tuple[int, ...]
  stage_blocks: tuple[int, ...]
  head_features: int
  num_outputs: int
  detach: bool = False
  dtype: Dtype = jnp.float32

  @property
  def taps(self) -> tuple[str, ...]:
    return ("stage1", "stage2", "stage3")

  @nn.compact
  def __call__(self, outputs: Mapping[str, Any], train: bool = False) -> Logits:
    logits = []
    for l, x in enumerate(_taps(outputs, self.taps, self.detach), start=1):
      segments, stride_one = branch_segments(len(self.taps), l)
      for s, seg in enumerate(segments):
        x = shufflenetv2.DownBlock(self.stage_widths[seg], stride=1 if stride_one else 2,
                                   dtype=self.dtype, name=f"block_extractor{l}_{s}_0")(x, train)
        for b in range(1, self.stage_blocks[seg] + 1):
          x, _ = shufflenetv2.BasicBlock(dtype=self.dtype,
                                         name=f"block_extractor{l}_{s}_{b}")(x, train)
      head = len(segments)
      x = layers.conv(self.head_features, 1, dtype=self.dtype,
                      kernel_init=layers.torch_default_kernel,
                      name=f"block_extractor{l}_{head}")(x)
      x = layers.BatchNorm(dtype=self.dtype, name=f"block_extractor{l}_{head + 1}")(x, not train)
      x = layers.global_avg_pool(nn.relu(x))
      logits.append(layers.Linear(self.num_outputs, dtype=self.dtype, name=f"fc{l}")(x))
    return _stacked(logits)


# --- one builder per backbone class ----------------------------------------------------------

AuxBuilder = Callable[[Any, int, bool], nn.Module]


def _cifar_resnet(backbone: resnet_cifar.CifarResNet, n: int, detach: bool) -> nn.Module:
  return CifarResNetAuxiliary(backbone.blocks_per_stage, tuple(backbone.widths[1:]), n,
                              detach=detach, dtype=backbone.dtype)


def _wide_resnet(backbone: wrn.WideResNet, n: int, detach: bool) -> nn.Module:
  k = backbone.widen_factor
  return WideResNetAuxiliary((backbone.depth - 4) // 6, (16 * k, 32 * k, 64 * k), n,
                             detach=detach, dtype=backbone.dtype)


def _resnet_stages(blocks: Sequence[int]) -> tuple[tuple[int, int, int], ...]:
  return tuple(zip((64, 128, 256, 512), tuple(blocks), (1, 2, 2, 2)))


def _cifar_resnet50(backbone: resnet_v2.CifarResNetBottleneck, n: int,
                    detach: bool) -> nn.Module:
  return ResNetAuxiliary(_resnet_stages(backbone.blocks_per_stage), True, "shortcut", n,
                         detach=detach, dtype=backbone.dtype)


def _imagenet_resnet(backbone: imagenet.ImageNetResNet, n: int, detach: bool) -> nn.Module:
  return ResNetAuxiliary(_resnet_stages(backbone.blocks_per_stage), backbone.bottleneck,
                         "downsample", n, detach=detach, dtype=backbone.dtype)


def _vgg(backbone: vgg.VGG, n: int, detach: bool) -> nn.Module:
  return VGGAuxiliary(tuple(tuple(b) for b in backbone.config), n, detach=detach,
                      dtype=backbone.dtype)


def _mobilenetv2(backbone: mobilenetv2.MobileNetV2, n: int, detach: bool) -> nn.Module:
  return MobileNetV2Auxiliary(n, detach=detach, dtype=backbone.dtype)


# pylint: disable=protected-access
def _shufflenetv1(backbone: shufflenetv1.ShuffleNetV1, n: int, detach: bool) -> nn.Module:
  return ShuffleNetV1Auxiliary(shufflenetv1._WIDTHS, shufflenetv1._BLOCKS, n, detach=detach,
                               dtype=backbone.dtype)


def _shufflenetv2(backbone: shufflenetv2.ShuffleNetV2, n: int, detach: bool) -> nn.Module:
  return ShuffleNetV2Auxiliary(shufflenetv2._WIDTHS, shufflenetv2._BASIC_BLOCKS,
                               shufflenetv2._HEAD, n, detach=detach, dtype=backbone.dtype)
# pylint: enable=protected-access


_BUILDERS: dict[type, AuxBuilder] = {
    resnet_cifar.CifarResNet: _cifar_resnet,
    wrn.WideResNet: _wide_resnet,
    resnet_v2.CifarResNetBottleneck: _cifar_resnet50,
    imagenet.ImageNetResNet: _imagenet_resnet,
    vgg.VGG: _vgg,
    mobilenetv2.MobileNetV2: _mobilenetv2,
    shufflenetv1.ShuffleNetV1: _shufflenetv1,
    shufflenetv2.ShuffleNetV2: _shufflenetv2,
}


def has_auxiliary(backbone: nn.Module) -> bool:
  """Whether HSAKD classifiers are defined for this backbone's family."""
  return type(backbone) in _BUILDERS


def for_backbone(backbone: nn.Module, num_classes: int, *, detach: bool = False) -> nn.Module:
  """The HSAKD classifier set of `backbone` (a zoo module), with 4·num_classes outputs each.

  `detach=True` stops gradients at the taps (the frozen-backbone "Teacher"). Computes in the
  backbone's dtype.
  """
  build = _BUILDERS.get(type(backbone))
  if build is None:
    raise errors.UserError(
        f"HSAKD auxiliary classifiers are not defined for {type(backbone).__name__} backbones; "
        f"models with them: {', '.join(model_names())}")
  return build(backbone, NUM_ROTATIONS * num_classes, detach)


def for_model(name: str, num_classes: int, dtype: Any = jnp.float32, *,
              detach: bool = False) -> nn.Module:
  """The HSAKD classifier set of the zoo model `name` (see `for_backbone`).

  Raises `jaxkd.errors.UserError` for an unknown model or a family without classifiers.
  """
  return for_backbone(get_model(name, num_classes, dtype=dtype), num_classes, detach=detach)


def model_names() -> tuple[str, ...]:
  """The zoo models that have HSAKD classifiers."""
  return tuple(n for n in MODEL_NAMES if has_auxiliary(get_model(n, 1)))
