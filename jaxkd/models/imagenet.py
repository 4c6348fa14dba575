"""ImageNet networks (224x224 input): `resnet18_imagenet`, `resnet34_imagenet`,
`resnet50_imagenet` and `mobilenetv1_imagenet` (docs/zoo.md).

The ResNets are torchvision's definition (HSAKD's `resnet_imagenet.py` is the same): 7x7/2 stem
conv -> BN -> ReLU -> 3x3/2 max-pool, stages `layer1..4` (BasicBlocks 2/2/2/2 for ResNet18,
3/4/6/3 for ResNet34; Bottlenecks 3/4/6/3 with the stride on the 3x3 conv for ResNet50), a
spatial mean and the Linear `fc`; projection shortcuts are `downsample_0` (conv) /
`downsample_1` (BN). torchvision's `resnet34-333f7ec4.pth` state_dict therefore converts 1:1.
MobileNetV1 (1.0, 224) is the definition of the KD code bases that pair it with ResNet50
(mdistiller, ReviewKD): one `model` Sequential of a 3x3/2 conv-BN-ReLU (`model_0_0`, `model_0_1`)
and 13 depthwise-separable blocks (`model_K_0` 3x3 depthwise, `model_K_1` BN, `model_K_3` 1x1,
`model_K_4` BN) up to 1024 channels, a spatial mean and the Linear `fc`.

Taps, in order, for a 224x224 input (all four nets):
  stem   ResNet (N, 112, 112, 64) after the stem ReLU, before the max-pool;
         MobileNetV1 (N, 112, 112, 32) output of model[0]
  stage1 (N, 56, 56, C1)   ResNet layer1;  MobileNetV1 model[3]  (C1 = 64 / 256 / 128)
  stage2 (N, 28, 28, C2)   ResNet layer2;  MobileNetV1 model[5]  (C2 = 128 / 512 / 256)
  stage3 (N, 14, 14, C3)   ResNet layer3;  MobileNetV1 model[11] (C3 = 256 / 1024 / 512)
  stage4 (N, 7, 7, C4)     ResNet layer4;  MobileNetV1 model[13] (C4 = 512 / 2048 / 1024)
  pooled (N, C4)           spatial mean of stage4, the input of `fc`
`preact=True`: stage1..4 before their final ReLU (a ResNet's last residual sum; MobileNetV1's
last BN output), as in mdistiller.
Init: convs kaiming-normal (fan_out) and PyTorch's default Linear for the ResNets (torchvision);
PyTorch's defaults everywhere for MobileNetV1.
"""

import collections
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd.models import layers
from jaxkd.models.resnet_cifar import BasicBlock
from jaxkd.models.resnet_v2 import Bottleneck

Dtype = Any
Feats = collections.OrderedDict[str, jax.Array]


class ImageNetResNet(nn.Module):
  """torchvision ResNet; `bottleneck` picks Bottleneck (x4 widths) over BasicBlock blocks."""
  blocks_per_stage: Sequence[int]
  bottleneck: bool
  num_classes: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               preact: bool = False) -> tuple[jax.Array, Feats]:
    ura = not train
    x = jnp.asarray(x, self.dtype)
    x = layers.conv(64, 7, 2, 3, dtype=self.dtype, name="conv1")(x)
    x = nn.relu(layers.BatchNorm(dtype=self.dtype, name="bn1")(x, ura))
    feats = collections.OrderedDict(stem=x)
    # PyTorch's MaxPool2d pads with -inf, as nn.max_pool does.
    x = nn.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
    for stage, (planes, blocks, stride) in enumerate(
        zip((64, 128, 256, 512), self.blocks_per_stage, (1, 2, 2, 2)), start=1):
      for b in range(blocks):
        s = stride if b == 0 else 1
        name = f"layer{stage}_{b}"
        if self.bottleneck:
          block = Bottleneck(planes, s, shortcut="downsample", dtype=self.dtype, name=name)
        else:
          block = BasicBlock(planes, s, dtype=self.dtype, name=name)
        x, pre = block(x, train)
      feats[f"stage{stage}"] = pre if preact else x
    x = layers.global_avg_pool(x)
    feats["pooled"] = x
    logits = layers.Linear(self.num_classes, dtype=self.dtype, name="fc")(x)
    return logits, feats


# MobileNetV1 (1.0): (output channels, stride) of the 13 depthwise-separable blocks model[1..13].
_MOBILENET_BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1),
                     (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))
# model[k] whose outputs are stage1..4.
_MOBILENET_TAPS = (3, 5, 11, 13)


class MobileNetV1(nn.Module):
  """MobileNetV1 (width 1.0) with BN after every conv and no conv bias; see the module."""
  num_classes: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               preact: bool = False) -> tuple[jax.Array, Feats]:
    ura = not train
    conv = lambda *a, **k: layers.conv(*a, dtype=self.dtype,
                                       kernel_init=layers.torch_default_kernel, **k)
    bn = lambda name: layers.BatchNorm(dtype=self.dtype, name=name)
    x = jnp.asarray(x, self.dtype)
    x = conv(32, 3, 2, 1, name="model_0_0")(x)
    x = nn.relu(bn("model_0_1")(x, ura))
    feats = collections.OrderedDict(stem=x)
    for k, (features, stride) in enumerate(_MOBILENET_BLOCKS, start=1):
      c = x.shape[-1]
      x = conv(c, 3, stride, 1, groups=c, name=f"model_{k}_0")(x)
      x = nn.relu(bn(f"model_{k}_1")(x, ura))
      x = conv(features, 1, name=f"model_{k}_3")(x)
      pre = bn(f"model_{k}_4")(x, ura)
      x = nn.relu(pre)
      if k in _MOBILENET_TAPS:
        feats[f"stage{_MOBILENET_TAPS.index(k) + 1}"] = pre if preact else x
    x = layers.global_avg_pool(x)
    feats["pooled"] = x
    logits = layers.Linear(self.num_classes, dtype=self.dtype, name="fc")(x)
    return logits, feats


def _resnet(blocks: Sequence[int], bottleneck: bool) -> Callable[..., nn.Module]:
  def build(num_classes: int, dtype: Dtype = jnp.float32) -> nn.Module:
    return ImageNetResNet(tuple(blocks), bottleneck, num_classes, dtype=dtype)
  return build


def _mobilenetv1(num_classes: int, dtype: Dtype = jnp.float32) -> nn.Module:
  return MobileNetV1(num_classes, dtype=dtype)


# Registry entries: name -> build(num_classes, dtype). The `_imagenet` suffix keeps them apart
# from the CIFAR zoo (RepDistiller's `ResNet50` is the CIFAR bottleneck net).
MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet18_imagenet": _resnet((2, 2, 2, 2), bottleneck=False),
    "resnet34_imagenet": _resnet((3, 4, 6, 3), bottleneck=False),
    "resnet50_imagenet": _resnet((3, 4, 6, 3), bottleneck=True),
    "mobilenetv1_imagenet": _mobilenetv1,
}

_RESNET_BLOCKS = {"resnet18_imagenet": ((2, 2, 2, 2), "bn2"),
                  "resnet34_imagenet": ((3, 4, 6, 3), "bn2"),
                  "resnet50_imagenet": ((3, 4, 6, 3), "bn3")}

# name -> the BatchNorm before the last ReLU of each stage tap stage1..4 (module paths in the
# params): the last BN of the stage's last block for the ResNets, `model_K_4` for MobileNetV1
# (mdistiller's `get_bn_before_relu`, models/imagenet/resnet.py and mobilenetv1.py; its ResNets
# list stages 2..4 only, which its OFD pairs with the last three taps).
BN_BEFORE_RELU: dict[str, tuple[tuple[str, ...], ...]] = {
    **{name: tuple((f"layer{s}_{n - 1}", bn) for s, n in enumerate(blocks, start=1))
       for name, (blocks, bn) in _RESNET_BLOCKS.items()},
    "mobilenetv1_imagenet": tuple((f"model_{k}_4",) for k in _MOBILENET_TAPS)}
