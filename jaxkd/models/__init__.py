"""Model registry: `get_model(name, num_classes)` builds any network of the zoo.

Every model is a Flax Linen module called as
`module.apply(variables, x, train=False, preact=False, mutable=[...])` with NHWC input, returning
`(logits, feats)`; `feats` is a `collections.OrderedDict` of named taps in the reference
`is_feat` order (stem, stage1, stage2, stage3, pooled for the CIFAR ResNets and WRNs; each
family's docstring lists its keys and shapes: VGG has stage0..stage4, the 4-stage nets stage1..4);
an OrderedDict because jit returns a plain dict with its keys sorted. The first key is the
reference's f0, the last the pooled vector, the ones between the spatial maps.
Variables are `{'params', 'batch_stats'}`; pass `mutable=['batch_stats']` when `train=True`.

Adding a family: write `jaxkd/models/<family>.py` exposing `MODELS = {name: build}` where
`build(num_classes, dtype)` returns the module, then add the module to `_FAMILIES` below.
"""

from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from jaxkd import errors
from jaxkd.models import imagenet
from jaxkd.models import mobilenetv2
from jaxkd.models import resnet_cifar
from jaxkd.models import resnet_v2
from jaxkd.models import shufflenetv1
from jaxkd.models import shufflenetv2
from jaxkd.models import vgg
from jaxkd.models import wrn

# One entry per model family, in the order their names are listed.
_FAMILIES = (
    resnet_cifar,
    wrn,
    vgg,
    mobilenetv2,
    shufflenetv1,
    shufflenetv2,
    resnet_v2,
    imagenet,
)


def _collect(families) -> dict[str, Callable[..., nn.Module]]:
  registry: dict[str, Callable[..., nn.Module]] = {}
  for family in families:
    for name, build in family.MODELS.items():
      if name in registry:
        raise RuntimeError(f"model name {name!r} registered twice (again by {family.__name__})")
      registry[name] = build
  return registry


_REGISTRY = _collect(_FAMILIES)

# The zoo's own names (registered networks come after them in the registry).
MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def register(name: str, build: Callable[..., nn.Module]) -> None:
  """Adds a network of your own under `name`, for every config and method (teacher or student).

  `build(num_classes, dtype=jnp.float32)` returns a Flax Linen module called as
  `module(x, train=False, preact=False)` on NHWC images x [N, H, W, C] that returns
  `(logits [N, num_classes], feats)`: `feats` a `collections.OrderedDict` of named taps in forward
  order, as the zoo gives them — first the stem's output, then the stage maps [N, h, w, c], last
  'pooled' [N, c], the classifier's input (an OrderedDict: jit sorts a plain dict's keys).
  `train` switches BatchNorm to batch statistics (kept in the 'batch_stats' collection); with
  `preact` the stage maps are taken before their last ReLU (only AB asks for it; a network
  without ReLUs may ignore it). Methods read 'pooled' (CRD, CC, RKD, PKT, SSKD, EGA, …) or the
  stage maps (AT, NST, VID, AB, KDSVD, FitNet's `hint_layer`, SP's and FT's last map, FSP from
  the stem on); a run whose method needs a tap the network does not give is refused before any
  work, naming what is missing.
  """
  if name in _REGISTRY:
    raise errors.UserError(f"model name {name!r} is taken; register yours under another name")
  _REGISTRY[name] = build


def get_model(name: str, num_classes: int, dtype: Any = jnp.float32) -> nn.Module:
  """The network `name` (the zoo's or a registered one) with a `num_classes`-way head,
  computing in `dtype` (params float32).

  Raises `jaxkd.errors.UserError` listing the valid names when `name` is unknown.
  """
  try:
    build = _REGISTRY[name]
  except KeyError:
    raise errors.unknown_name("model", name, tuple(_REGISTRY)) from None
  return build(num_classes, dtype=dtype)
