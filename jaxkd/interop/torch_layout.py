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
"""

from typing import Any, Mapping

import numpy as np

from jaxkd.errors import UserError

_STAT_NAMES = {"running_mean": "mean", "running_var": "var"}
_DROPPED = {"num_batches_tracked"}


def flax_module_path(torch_module_path: str) -> tuple[str, ...]:
  """`'block1.layer.0.bn1'` -> `('block1', 'layer_0', 'bn1')` (numeric tokens glued with '_')."""
  out: list[str] = []
  for token in torch_module_path.split(".") if torch_module_path else ():
    if token.isdigit() and out:
      out[-1] = f"{out[-1]}_{token}"
    else:
      out.append(token)
  return tuple(out)


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
