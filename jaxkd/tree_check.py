"""Compare a loaded variable tree against the tree an architecture expects."""

from typing import Any, Optional

import jax
import numpy as np


def _flat(tree: Any) -> dict[str, Any]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {"/".join(_key_name(k) for k in path): leaf for path, leaf in flat}


def flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """{'params/backbone/fc/kernel': shape, ...}: every leaf's path and shape."""
  return {path: tuple(np.shape(leaf)) for path, leaf in _flat(tree).items()}


def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def first_mismatch(expected: Any, got: Any) -> Optional[str]:
  """Names the first leaf where `got` does not fit `expected`, or returns None when it fits.

  Leaves are compared by path and shape (not values): a missing path, an extra path or a
  different shape is reported, in sorted path order, missing before extra before misshapen.
  """
  want, have = _flat(expected), _flat(got)
  missing = sorted(set(want) - set(have))
  if missing:
    return f"missing leaf {missing[0]!r} (expected shape {tuple(np.shape(want[missing[0]]))})"
  extra = sorted(set(have) - set(want))
  if extra:
    return f"unexpected leaf {extra[0]!r} (shape {tuple(np.shape(have[extra[0]]))})"
  for path in sorted(want):
    if tuple(np.shape(want[path])) != tuple(np.shape(have[path])):
      return (f"leaf {path!r} has shape {tuple(np.shape(have[path]))}, "
              f"the architecture expects {tuple(np.shape(want[path]))}")
  return None
