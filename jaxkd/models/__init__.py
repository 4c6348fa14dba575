"""Model registry: `get_model(name, num_classes)` builds any network of the zoo.

Every model is a Flax Linen module called as
`module.apply(variables, x, train=False, preact=False, mutable=[...])` with NHWC input, returning
`(logits, feats)`; `feats` is a `collections.OrderedDict` of named taps in the reference
`is_feat` order (stem, stage1, stage2, stage3, pooled for the CIFAR ResNets and WRNs); an
OrderedDict because jit returns a plain dict with its keys sorted.
Variables are `{'params', 'batch_stats'}`; pass `mutable=['batch_stats']` when `train=True`.

Adding a family: write `jaxkd/models/<family>.py` exposing `MODELS = {name: build}` where
`build(num_classes, dtype)` returns the module, then add the module to `_FAMILIES` below.
"""

from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from jaxkd import errors
from jaxkd.models import resnet_cifar, wrn

# One entry per model family, in the order their names are listed.
_FAMILIES = (
    resnet_cifar,
    wrn,
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
