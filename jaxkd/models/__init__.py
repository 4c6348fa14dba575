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

MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def get_model(name: str, num_classes: int, dtype: Any = jnp.float32) -> nn.Module:
  """The zoo network `name` with a `num_classes`-way head, computing in `dtype` (params float32).

  Raises `jaxkd.errors.UserError` listing the valid names when `name` is unknown.
  """
  try:
    build = _REGISTRY[name]
  except KeyError:
    raise errors.unknown_name("model", name, MODEL_NAMES) from None
  return build(num_classes, dtype=dtype)
