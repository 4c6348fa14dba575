"""Multi-process runs: several processes (hosts of a TPU pod slice, GPU nodes, or local CPU
processes) joined into one JAX runtime with `jax.distributed.initialize`.

After `initialize`, `jax.devices()` lists the devices of every process and the trainer's mesh
spans them all: each process feeds its own rows of the global batch (its shard of the data),
the jitted step sees one global batch, orbax writes one checkpoint collectively, and only
process 0 prints, writes result files and TensorBoard events.

How a process learns its place, in order:

  explicit   coordinator_address='host:port', num_processes=N, process_id=i (flags of
             `jaxkd.main`; the address may also come from the JAX_COORDINATOR_ADDRESS variable).
  auto       `--distributed`: `jax.distributed.initialize()` with no arguments, which reads the
             cluster itself on Cloud TPU pod slices (TPU VM metadata), SLURM (`srun`), Open MPI
             (`mpirun`) and Kubernetes (with the `kubernetes` package); elsewhere it fails.
  single     neither: one process, nothing to initialise.

On CPU, cross-process collectives go through gloo (set here, before the backend starts).
"""

import os
from typing import Optional

from jaxkd.errors import UserError


def wants_distributed(coordinator_address: Optional[str], num_processes: Optional[int],
                      process_id: Optional[int], auto: bool) -> bool:
  """Whether any of the arguments (or JAX_COORDINATOR_ADDRESS) asks for several processes."""
  address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  return auto or bool(address) or (num_processes or 1) > 1 or process_id is not None


def check_arguments(coordinator_address: Optional[str], num_processes: Optional[int],
                    process_id: Optional[int], auto: bool) -> None:
  """Raises one UserError for an incomplete or inconsistent explicit set-up."""
  if auto:
    return
  address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  given = {"--coordinator_address": address, "--num_processes": num_processes,
           "--process_id": process_id}
  missing = [name for name, value in given.items() if value in (None, "")]
  if missing:
    raise UserError(
        f"a multi-process run needs {', '.join(missing)} as well (got "
        f"coordinator_address={address!r}, num_processes={num_processes!r}, "
        f"process_id={process_id!r}); give all three, or --distributed to detect them on a "
        "TPU pod slice / SLURM / Open MPI")
  if ":" not in address:
    raise UserError(f"--coordinator_address={address!r} needs a port: host:port, "
                    "e.g. 10.0.0.2:1234 (process 0's address)")
  if num_processes < 1:
    raise UserError(f"--num_processes={num_processes} must be at least 1")
  if not 0 <= process_id < num_processes:
    raise UserError(f"--process_id={process_id} must be in [0, {num_processes - 1}] for "
                    f"--num_processes={num_processes}")


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, auto: bool = False,
               local_device_ids: Optional[list[int]] = None,
               timeout_seconds: int = 300) -> bool:
  """Joins this process to a multi-process run when asked to; returns whether it did.

  Must run before any JAX computation (before the first `jax.devices()`). With no arguments
  and no JAX_COORDINATOR_ADDRESS it does nothing (a single-process run).
  """
  if not wants_distributed(coordinator_address, num_processes, process_id, auto):
    return False
  check_arguments(coordinator_address, num_processes, process_id, auto)
  import jax  # pylint: disable=g-import-not-at-top
  # Cross-process collectives of the CPU backend (the default on recent JAX, explicit here for
  # the versions where it is not); GPU and TPU backends ignore it.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    if auto:
      jax.distributed.initialize(initialization_timeout=timeout_seconds)
    else:
      jax.distributed.initialize(coordinator_address=coordinator_address,
                                 num_processes=num_processes, process_id=process_id,
                                 local_device_ids=local_device_ids,
                                 initialization_timeout=timeout_seconds)
  except (ValueError, RuntimeError) as e:
    raise UserError(f"could not join the multi-process run ({e}); check the coordinator "
                    "address and that every process was started with the same "
                    "--num_processes") from None
  return True


def is_main_process() -> bool:
  """True on the process that prints, writes result files and logs (process 0)."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name` (no-op with one process).

  E.g. after process 0 writes a file the others read from a shared path.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)
