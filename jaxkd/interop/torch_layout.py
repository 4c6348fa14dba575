"""PyTorch state_dict -> Flax Linen variables, by one generic naming rule (docs/weights.md).

Module path: split the key on '.', the last token is the tensor name; every purely numeric
token is glued onto the previous one with '_' (`layer1.0.conv1` -> `layer1_0/conv1`,
`block1.layer.0.bn1` -> `block1/layer_0/bn1`, `blocks.1.0.conv.3` -> `blocks_1_0/conv_3`), which is
how Linen names list attributes declared in `setup()`.

Tensor name / layout:
  weight, rank >= 3 (ConvNd, (O, I/groups, *k))  -> params .../kernel, as (*k, I/groups, O)
  weight, rank 2 (Linear, (out, in))              -> params .../kernel, transposed to (in, out)
  weight, rank 1 (BatchNorm/LayerNorm gamma)       -> params .../scale
  bias                                             -> params .../bias
  running_mean / running_var                       -> batch_stats .../mean / var
  num_batches_tracked                              -> dropped (only used with momentum=None)

`flax_to_torch` is the inverse (a trained network back to a PyTorch state_dict): the same rules
read backwards, every BatchNorm given `num_batches_tracked` = 0 (int64), which PyTorch reads only
with momentum=None (the reference zoo's BatchNorms use 0.1).
"""

import re
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from jaxkd.errors import UserError

_STAT_NAMES = {"running_mean": "mean", "running_var": "var"}
_DROPPED = {"num_batches_tracked"}
# The inverse of _STAT_NAMES: Flax's statistics -> PyTorch's buffers.
_STAT_BUFFERS = {flax: torch for torch, flax in _STAT_NAMES.items()}
NUM_BATCHES_TRACKED = "num_batches_tracked"


def flax_module_path(torch_module_path: str) -> tuple[str, ...]:
  """`'block1.layer.0.bn1'` -> `('block1', 'layer_0', 'bn1')` (numeric tokens glued with '_')."""
  out: list[str] = []
  for token in torch_module_path.split(".") if torch_module_path else ():
    if token.isdigit() and out:
      out[-1] = f"{out[-1]}_{token}"
    else:
      out.append(token)
  return tuple(out)


def torch_module_path(flax_path: Sequence[str]) -> str:
  """Inverse of `flax_module_path`: `('block1', 'layer_0', 'bn1')` -> `'block1.layer.0.bn1'` (a
  '_<digits>' that ends a name, or precedes another '_<digits>', was a numeric token)."""
  return ".".join(re.sub(r"_(\d+)(?=_\d|$)", r".\1", name) for name in flax_path)


def _kernel_to_torch(ndim: int) -> tuple[int, ...]:
  """The axes permutation from a Flax kernel to PyTorch's weight: (*k, I, O) -> (O, I, *k), the
  inverse of `_convert_leaf`'s; (in, out) -> (out, in) for a Linear."""
  return (ndim - 1, ndim - 2) + tuple(range(ndim - 2))


def torch_leaf(collection: str, leaf: str, shape: Sequence[int]) -> tuple[str, tuple[int, ...]]:
  """(PyTorch tensor name, axes permutation into PyTorch's layout) of one Flax leaf, the inverse
  of `_convert_leaf`: kernel -> weight (transposed), scale -> weight, bias -> bias, batch
  statistics mean / var -> running_mean / running_var."""
  ndim = len(shape)
  if collection == "batch_stats" and leaf in _STAT_BUFFERS:
    return _STAT_BUFFERS[leaf], tuple(range(ndim))
  if collection == "params" and leaf == "kernel" and ndim >= 2:
    return "weight", _kernel_to_torch(ndim)
  if collection == "params" and (leaf, ndim) == ("scale", 1):
    return "weight", (0,)
  if collection == "params" and leaf == "bias":
    return "bias", tuple(range(ndim))
  raise UserError(f"cannot convert {collection} leaf {leaf!r} of shape {tuple(shape)} to a "
                  "PyTorch tensor: only kernel, scale, bias, mean and var are understood")


def torch_entries(params: Mapping[str, Any], stats: Mapping[str, Any],
                  convert: Callable[[Any, tuple[int, ...]], Any], path: tuple[str, ...] = ()
                  ) -> Iterator[tuple[str, Any]]:
  """(PyTorch key, `convert(value, axes permutation into PyTorch's layout)`) for every leaf (an
  array or a `jax.ShapeDtypeStruct`) of a module's `params` and `stats` (batch statistics)
  trees, in PyTorch's state_dict order: the trees' order, each module's parameters before its
  buffers."""
  def entry(collection: str, leaf: str, value: Any) -> tuple[str, Any]:
    name, perm = torch_leaf(collection, leaf, np.shape(value))
    module = torch_module_path(path)
    return f"{module}.{name}" if module else name, convert(value, perm)

  for name, value in params.items():
    if isinstance(value, Mapping):
      yield from torch_entries(value, stats.get(name, {}), convert, path + (name,))
    else:
      yield entry("params", name, value)
  for name, value in stats.items():
    if isinstance(value, Mapping):
      if name not in params:
        yield from torch_entries({}, value, convert, path + (name,))
    else:
      yield entry("batch_stats", name, value)


def flax_to_torch(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Flax variables `{'params': {...}, 'batch_stats': {...}}` (one network, nothing above its
  modules) -> a PyTorch state_dict of numpy arrays in PyTorch's layouts and order: the inverse
  of `torch_to_flax`, each BatchNorm's `num_batches_tracked` written as int64 0 after its
  running statistics."""
  def convert(value: Any, perm: tuple[int, ...]) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(np.asarray(value), perm))

  state_dict: dict[str, np.ndarray] = {}
  for key, array in torch_entries(variables.get("params", {}), variables.get("batch_stats", {}),
                                  convert):
    state_dict[key] = array
    if key.endswith(f".{_STAT_BUFFERS['var']}"):
      state_dict[f"{key.rpartition('.')[0]}.{NUM_BATCHES_TRACKED}"] = np.array(0, np.int64)
  return state_dict


def _convert_leaf(key: str, name: str, value: np.ndarray) -> tuple[str, str, np.ndarray]:
  """(collection, flax leaf name, array in Flax layout) for one state_dict tensor."""
  if name in _STAT_NAMES:
    return "batch_stats", _STAT_NAMES[name], value
  if name == "bias":
    return "params", "bias", value
  if name == "weight":
    if value.ndim >= 3:
      # (O, I, *k) -> (*k, I, O): OIHW -> HWIO for Conv2d, and the same for Conv1d/3d.
      perm = tuple(range(2, value.ndim)) + (1, 0)
      return "params", "kernel", np.ascontiguousarray(np.transpose(value, perm))
    if value.ndim == 2:
      return "params", "kernel", np.ascontiguousarray(value.T)
    if value.ndim == 1:
      return "params", "scale", value
  raise UserError(f"cannot convert state_dict entry {key!r} (tensor name {name!r}, shape "
                  f"{value.shape}): only weight, bias, running_mean, running_var and "
                  f"num_batches_tracked are understood")


def torch_to_flax(state_dict: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
  """Convert a PyTorch state_dict (numpy arrays, prefix already stripped) to Flax variables.

  Returns `{'params': {...}, 'batch_stats': {...}}` nested dicts of numpy arrays (either may be
  empty). Raises `UserError` for a tensor name it does not know or two keys mapping to one leaf.
  """
  variables: dict[str, dict[str, Any]] = {"params": {}, "batch_stats": {}}
  for key, value in state_dict.items():
    module_path, _, name = key.rpartition(".")
    if name in _DROPPED:
      continue
    collection, leaf, array = _convert_leaf(key, name, np.asarray(value))
    node = variables[collection]
    for part in flax_module_path(module_path):
      child = node.setdefault(part, {})
      if not isinstance(child, dict):
        raise UserError(f"state_dict entry {key!r} collides with another entry at {part!r}")
      node = child
    if leaf in node:
      raise UserError(f"state_dict entry {key!r} maps to {collection}/"
                      f"{'/'.join(flax_module_path(module_path) + (leaf,))}, already taken")
    node[leaf] = array
  return variables


def strip_prefix(state_dict: Mapping[str, Any], prefix: str) -> dict[str, Any]:
  """The entries whose key starts with `prefix` (a trailing '.' is implied), prefix removed.

  Entries without the prefix are left out, e.g. `strip_prefix(sd, 'backbone')` on an SSKD
  checkpoint keeps the backbone and drops `proj_head.*`; `'module'` undoes `nn.DataParallel`.
  An empty prefix returns a copy. Raises `UserError` when no key has the prefix.
  """
  if not prefix:
    return dict(state_dict)
  if not prefix.endswith("."):
    prefix += "."
  out = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
  if not out:
    sample = ", ".join(list(state_dict)[:5])
    raise UserError(f"no state_dict key starts with {prefix!r} (keys start like: {sample})")
  return out
