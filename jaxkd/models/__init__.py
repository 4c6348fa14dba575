"""Model registry: `get_model(name, num_classes)` builds any network of the zoo.

Every model is a Flax Linen module called as
`module.apply(variables, x, train=False, preact=False, mutable=[...])` with NHWC input, returning
`(logits, feats)`; `feats` is a `collections.OrderedDict` of named taps in the reference
`is_feat` order (stem, stage1, stage2, stage3, pooled for the CIFAR ResNets and WRNs; each
family's docstring lists its keys and shapes: VGG has stage0..stage4, the 4-stage nets stage1..4);
an OrderedDict because jit returns a plain dict with its keys sorted. The first key is the
reference's f0, the last the pooled vector, the ones between the spatial maps.
Variables are `{'params', 'batch_stats'}`; pass `mutable=['batch_stats']` when `train=True`.
With `class_maps=True` the feats also hold 'class_maps' [N, h, w, num_classes], the class
activation maps: the classifier's kernel applied, without its bias, at every position of the map
whose spatial mean is 'pooled' (`layers.classify`; CAT-KD reads them). The classifier is the
network's one top-level Linear (`classifier_params` reads it).

Adding a family: write `jaxkd/models/<family>.py` exposing `MODELS = {name: build}` where
`build(num_classes, dtype)` returns the module, then add the module to `_FAMILIES` below. A
family may also expose `BN_BEFORE_RELU = {name: paths}`: for each stage tap (taps[1:-1], in
order), the path in the network's params of the BatchNorm whose output feeds that stage's last
ReLU (what `bn_before_relu` reads; OFD's margins come from it).
"""

from typing import Any, Callable, Mapping, Optional, Sequence

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

# name -> BN_BEFORE_RELU paths (module paths in the params, one per stage tap).
BnPaths = tuple[tuple[str, ...], ...]
_BN_BEFORE_RELU: dict[str, BnPaths] = {
    name: tuple(tuple(path) for path in paths)
    for family in _FAMILIES for name, paths in getattr(family, "BN_BEFORE_RELU", {}).items()}

# The zoo's own names (registered networks come after them in the registry).
MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def register(name: str, build: Callable[..., nn.Module],
             bn_before_relu: Optional[Sequence[Sequence[str]]] = None) -> None:
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
  work, naming what is missing. Methods that read class activation maps (CAT-KD) call it with
  `class_maps=True` as well: the feats then also hold 'class_maps' [N, h, w, num_classes], the
  classifier's kernel applied without its bias at every position of the map whose spatial mean
  is 'pooled' (`jaxkd.models.layers.classify` does both); a network without it is refused for
  them. Methods that reuse a teacher's classifier (SimKD) read it as the network's one top-level
  Linear (see `classifier_params`).

  `bn_before_relu` (optional): for each stage map, in order, the path in the module's params of
  the BatchNorm whose output feeds that stage's last ReLU (e.g. `(('layer1_2', 'bn2'), ...)`);
  OFD needs it of a network it takes as a teacher (see `bn_before_relu`).
  """
  if name in _REGISTRY:
    raise errors.UserError(f"model name {name!r} is taken; register yours under another name")
  _REGISTRY[name] = build
  if bn_before_relu is not None:
    _BN_BEFORE_RELU[name] = tuple(tuple(path) for path in bn_before_relu)


def bn_before_relu_paths(name: str) -> Optional[BnPaths]:
  """For each stage tap of network `name` (taps[1:-1], in order), the path in its params of the
  BatchNorm before that stage's last ReLU; None when none is known (ShuffleV2, whose
  pre-activation taps join an untouched half to the last BN's output, and networks registered
  without it)."""
  return _BN_BEFORE_RELU.get(name)


def bn_before_relu(name: str, variables: Mapping[str, Any]) -> list[dict[str, Any]]:
  """`{'scale', 'bias'}` of the BatchNorm before each stage's last ReLU of network `name`
  (`bn_before_relu_paths`), read from its variables — a bare network's
  (`{'params': {...}}`) or the trainer's (`{'params': {'backbone': {...}}}`).

  Raises `jaxkd.errors.UserError` when no paths are known for `name`.
  """
  paths = bn_before_relu_paths(name)
  if paths is None:
    raise errors.UserError(
        f"model {name!r} has no BatchNorm-before-ReLU list (jaxkd.models.bn_before_relu_paths); "
        "register the network with `bn_before_relu=` to use it as this method's teacher")
  params = variables["params"]
  if "backbone" in params:
    params = params["backbone"]
  found = []
  for path in paths:
    node = params
    for key in path:
      node = node[key]
    found.append({"scale": node["scale"], "bias": node["bias"]})
  return found


def classifier_params(name: str, variables: Mapping[str, Any]) -> dict[str, Any]:
  """{'kernel' [C, num_classes], 'bias' [num_classes]} of network `name`'s classifier, the Linear
  that maps 'pooled' to the logits, read from its variables (a bare network's `{'params':
  {...}}` or the trainer's `{'params': {'backbone': {...}}}`).

  The classifier is the one top-level entry of the network's params with a 2-D `kernel` (the
  zoo's `fc`, `linear` or `classifier`; every other layer of the zoo is nested or a conv).
  Raises `jaxkd.errors.UserError` when there is not exactly one, or it has no bias.
  """
  params = variables["params"]
  if "backbone" in params:
    params = params["backbone"]
  found = [key for key, node in params.items()
           if isinstance(node, Mapping) and getattr(node.get("kernel"), "ndim", 0) == 2]
  if len(found) != 1 or "bias" not in params[found[0]]:
    raise errors.UserError(
        f"model {name!r} has {len(found)} top-level Linear layers ({', '.join(found) or 'none'})"
        "; a method that reuses its classifier needs exactly one, with a bias, mapping 'pooled' "
        "to the logits (as every zoo network has)")
  head = params[found[0]]
  return {"kernel": head["kernel"], "bias": head["bias"]}


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
