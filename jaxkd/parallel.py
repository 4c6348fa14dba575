"""Data parallelism with `jax.jit` over a device `Mesh`.

The batch is sharded over the mesh axis 'data' and everything else is replicated. Under this
global view every in-batch reduction (BatchNorm statistics, ranking and graph terms) sees the
whole global batch, so results do not depend on how many devices share it.
"""

import collections
import functools
import os
from typing import Any, Iterator, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxkd.errors import UserError

DATA_AXIS = "data"


def create_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A 1-D mesh over `devices` (default: every device of every process)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over 'data'."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_divides(global_batch_size: int, mesh: Mesh, field: str = "batch_size") -> None:
  """Raises a UserError unless the global batch splits evenly over the mesh; `field`: the
  config field it comes from (named in the fix)."""
  n = mesh.devices.size
  if global_batch_size % n:
    lower = (global_batch_size // n) * n
    raise UserError(
        f"global batch size {global_batch_size} does not divide over {n} devices; "
        f"set --config.{field} to a multiple of {n} (e.g. {max(lower, n)} or {lower + n})")


def to_global(local_batch: Any, mesh: Mesh) -> Any:
  """Host-local numpy batch (this process's rows) -> global jax.Arrays sharded on 'data'."""
  sharding = data_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def prefetch_to_mesh(local_batches: Iterator[Any], mesh: Mesh, size: int = 2) -> Iterator[Any]:
  """`to_global` of each batch, `size` batches ahead of the one yielded.

  Transfers are asynchronous: the next batches are on their way to the devices while the step
  that reads the current one runs (flax's prefetch_to_device, for global arrays). Closing it
  (or an error) drops the batches sent ahead and closes `local_batches`.
  """
  queue = collections.deque()
  try:
    for local in local_batches:
      queue.append(to_global(local, mesh))
      if len(queue) > size:
        yield queue.popleft()
    while queue:
      yield queue.popleft()
  finally:
    queue.clear()
    close = getattr(local_batches, "close", None)
    if close is not None:
      close()


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Puts every leaf of `tree` on every device of the mesh."""
  return jax.device_put(tree, replicated(mesh))


# Recent XLA:CPU runs convolutions through YNNPACK fusions by default. For the CIFAR networks
# their weight-gradient convolutions are 1.4-3.7x slower than XLA's Eigen ones, and the SSKD step
# took twice as long on 2 cores (experiments/README.md). Train steps are compiled without them.
_CPU_STEP_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.cache
def step_compiler_options() -> Optional[dict[str, Any]]:
  """XLA compiler options for the jitted train step on this backend; None = XLA's defaults.

  On CPU: YNNPACK fusions off, unless XLA_FLAGS already chooses them, or this jaxlib does not
  know the option. Other backends ignore CPU options, and get None.
  """
  if jax.default_backend() != "cpu" or any(
      name in os.environ.get("XLA_FLAGS", "") for name in _CPU_STEP_OPTIONS):
    return None
  try:
    jax.jit(lambda x: x + 1, compiler_options=_CPU_STEP_OPTIONS).lower(np.float32(0)).compile()
  except Exception:  # pylint: disable=broad-except  (an unknown option on another jaxlib)
    return None
  return dict(_CPU_STEP_OPTIONS)
