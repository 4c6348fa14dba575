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

A lost process (killed, its machine gone) must not leave the others hanging. Where a peer's
collective fails at once (gloo's connection to it drops), `lost_process` recognises the error;
where it hangs instead, `watch` notices that the lost process stopped answering: every process
writes a beat to JAX's coordination service every second and reads the others', and one silent
for `LOST_SECONDS` is lost. Either way the others stop in one line (LostProcess, exit status 4)
at once, without waiting for the checkpoint in flight or for JAX's shutdown barrier (neither can
complete without the lost process); `jaxkd.main` does that. JAX's own heartbeat timeout
(`HEARTBEAT_SECONDS`, longer) is the bound where that fails: JAX then ends the process with its
own lines. When process 0 is lost, the coordination service it hosts goes with it, and JAX ends
every other process at once with its own lines and an abort (its client's
`missed_heartbeat_callback`, the one hook, aborts with std::bad_cast when given a Python
function, in jax 0.10.2 and 0.12.1).
"""

import itertools
import os
import threading
import time
from typing import Callable, Optional

from jaxkd.errors import LostProcess, UserError

# How long a process may fall silent before the others count it as lost and stop.
LOST_SECONDS = 15
# How long a process may miss its heartbeats before JAX's coordination service declares it lost
# and JAX ends the others (JAX's default: 100 s); longer than LOST_SECONDS, so jaxkd's line
# comes first.
HEARTBEAT_SECONDS = 30
# The coordination service's keys of the beats (`watch`): <prefix><process> -> a count, or
# DONE once the process ends of its own accord.
_BEATS = "jaxkd/beat/"
_DONE = "done"
# What JAX's errors say when a process of the run is gone: gloo's collectives when the
# connection to a peer drops or a peer never comes, the coordination service when one stopped
# sending heartbeats.
_LOST_SIGNS = ("Connection reset by peer", "Connection closed by peer", "Connection refused",
               "Socket closed", "stopped sending heartbeats", "heartbeat timeout",
               "GetKeyValue() timed out")


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
               timeout_seconds: int = 300, heartbeat_seconds: int = HEARTBEAT_SECONDS) -> bool:
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
      jax.distributed.initialize(initialization_timeout=timeout_seconds,
                                 heartbeat_timeout_seconds=heartbeat_seconds)
    else:
      jax.distributed.initialize(coordinator_address=coordinator_address,
                                 num_processes=num_processes, process_id=process_id,
                                 local_device_ids=local_device_ids,
                                 initialization_timeout=timeout_seconds,
                                 heartbeat_timeout_seconds=heartbeat_seconds)
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


def from_process_0(value: int) -> int:
  """Process 0's `value` on every process (a small integer): a decision process 0 takes alone,
  e.g. whether the workdir's lock was free."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return value
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def lost_process(error: BaseException) -> Optional[str]:
  """What `error` means in a few words when it says another process of a multi-process run is
  gone (see the module docstring), else None."""
  if not isinstance(error, (RuntimeError, ValueError)):
    return None
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return None
  text = str(error)
  sign = next((s for s in _LOST_SIGNS if s in text), None)
  if sign is None:
    return None
  return (f"process {jax.process_index()} of {jax.process_count()} stopped: another process of "
          f"the run was lost ({sign})")


def lost_process_error(error: BaseException, what_stays: Callable[[], str]
                       ) -> Optional[LostProcess]:
  """The one-line error to raise instead of `error` where it says a process was lost;
  `what_stays()` says what is kept on disk."""
  lost = lost_process(error)
  if lost is None:
    return None
  return LostProcess(lost_message(lost, what_stays()))


def lost_message(what: str, what_stays: str) -> str:
  """The line of a process stopped by a lost one: `what` happened, `what_stays` on disk."""
  return f"{what}; {what_stays}; start every process again with the same command to resume"


class _Watch(threading.Thread):
  """The beats of this process and the watch over the others' (see the module docstring)."""

  def __init__(self, client: object, lost_seconds: float, on_lost: Callable[[str], None]):
    super().__init__(name="jaxkd-watch", daemon=True)
    import jax  # pylint: disable=g-import-not-at-top
    self.client, self.lost_seconds, self.on_lost = client, lost_seconds, on_lost
    self.me, self.count = jax.process_index(), jax.process_count()
    self.done = threading.Event()

  def _beat(self, value: str) -> dict[str, str]:
    self.client.key_value_set(f"{_BEATS}{self.me}", value, allow_overwrite=True)
    return {key.rsplit("/", 1)[-1]: v for key, v in self.client.key_value_dir_get(_BEATS)}

  def run(self) -> None:
    now = time.monotonic()
    heard = {other: (None, now) for other in range(self.count) if other != self.me}
    for beat in itertools.count(1):  # heard: process -> (its last beat, when it changed)
      try:
        beats = self._beat(str(beat))
      except Exception:  # pylint: disable=broad-except  (the service is gone: JAX ends us)
        return
      now = time.monotonic()
      for other, (last, since) in list(heard.items()):
        value = beats.get(str(other))
        if value != last:
          heard[other] = (value, now)
        elif value != _DONE and now - since > self.lost_seconds and not self.done.is_set():
          self.on_lost(f"process {self.me} of {self.count} stopped: process {other} of the run "
                       f"was lost (silent for {self.lost_seconds:.0f} s)")
          return
      if self.done.wait(1.0):
        return

  def stop(self) -> None:
    """This process ends of its own accord: the others are told, and stop watching it."""
    self.done.set()
    self.join(timeout=10)  # Its last beat is written before DONE.
    try:
      self.client.key_value_set(f"{_BEATS}{self.me}", _DONE, allow_overwrite=True)
    except Exception:  # pylint: disable=broad-except
      pass


_watches: list[_Watch] = []


def watch(on_lost: Callable[[str], None], lost_seconds: float = LOST_SECONDS) -> None:
  """In a multi-process run, starts watching the other processes: `on_lost(what)` is called
  (from another thread) when one falls silent for `lost_seconds`; it must end the process."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  _watches.append(_Watch(jax_distributed.global_state.client, lost_seconds, on_lost))
  _watches[-1].start()


def end_watch() -> None:
  """This process ends of its own accord (see `watch`): the others are not to count it lost."""
  while _watches:
    _watches.pop().stop()
