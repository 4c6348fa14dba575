"""Signals: SIGTERM (what a cloud TPU/GPU preemption sends) and SIGINT (Ctrl-C), from the moment
`python -m jaxkd.main` starts to its exit.

`install()` is the first thing the command does, before its heavy imports, and it takes SIGINT
even where the shell started the process with it ignored (a background job). From then on a
signal never raises an exception inside whatever code happens to run (a KeyboardInterrupt
raised in a library's callback is swallowed, "Exception ignored in ..."); what it does depends
on the phase of the run:

  starting  flags, imports, the plan: nothing is written yet. The process ends at once with
            `error: interrupted (SIGINT) before training started; nothing was written`.
  training  while `catch_signals()` is active (the workdir, its lock and the stages): the
            signal raises a flag. The run looks at it at safe points: before each stage,
            before a stage's first step and after every step (`stop_requested`). At a step, the
            step in flight finishes, its checkpoint is written and waited for, and the loop
            raises `Interrupted`, which `jaxkd.main` turns into one line. A second signal while
            that happens ends the process at once; its line names the newest complete
            checkpoint of the stage on disk (`what_stays`).
  ending    after the stages: the flag is looked at once more before the exit (`exit_status`),
            and a signal after that ends the process at once.

Every stop on a signal exits with status 128 + its number (143 for SIGTERM, 130 for SIGINT), the
shell's convention for "killed by it", never 0; a run that ends with another error keeps that
error's line and status.

Several processes must stop at the same step, or the collective checkpoint write would hang: they
agree (a tiny all-gather of the flags) every `every` steps, and stop at the first agreement
after any of them was signalled. One process stops at the very next step.

Nothing here imports JAX at load time: `install()` runs before it is imported.
"""

import contextlib
import dataclasses
import os
import signal
import sys
import threading
from typing import Callable, Iterator, Optional

from jaxkd.errors import UserError

SIGNALS = (signal.SIGTERM, signal.SIGINT)
STARTING, TRAINING, ENDING, EXITING = "starting", "training", "ending", "exiting"
# What the line of a signal after the stages says.
_AFTER_THE_STAGES = "as the run ended: every stage had finished and written its result"


@dataclasses.dataclass
class _Run:
  """What a signal handler needs to know about the run of this process."""
  phase: str = STARTING
  installed: bool = False  # By install(): the handlers stay to the exit.
  received: list[int] = dataclasses.field(default_factory=list)
  # The stage being trained: its name and what of it stays on disk, for a line written at once.
  stage: Optional[tuple[str, Callable[[], str]]] = None
  exit_status: int = 0  # Decided by exit_status(), for a signal after it.


_run = _Run()


class Interrupted(UserError):
  """The run stopped on a signal after saving its state; rerunning resumes it."""

  def __init__(self, signum: int, message: str):
    super().__init__(message)
    self.signum = signum
    self.exit_status = 128 + signum


def signal_name(signum: int) -> str:
  return signal.Signals(signum).name


def end_process(line: str, status: int) -> None:
  """Writes `error: <line>` and ends the process with `status`, at once: no cleanup runs, so
  nothing can print a traceback after the line (from a signal handler or another thread)."""
  try:
    sys.stdout.flush()
  except Exception:  # pylint: disable=broad-except  (the handler may interrupt a write of it)
    pass
  os.write(2, f"error: {line}\n".encode())
  os._exit(status)  # pylint: disable=protected-access


def end_now(signum: int, what: str) -> None:
  """Ends the process at once with `error: interrupted (<signal>) <what>` and 128 + signum."""
  end_process(f"interrupted ({signal_name(signum)}) {what}", 128 + signum)


def what_stays() -> str:
  """What a stop at once leaves on disk: the newest complete checkpoint of the stage being
  trained, or every finished stage between stages."""
  if _run.stage is None:
    return "every finished stage stays"
  name, kept = _run.stage
  return f"in stage {name}: {kept()}"


def _handler(signum, frame):
  del frame
  _run.received.append(signum)
  if _run.phase == STARTING:
    end_now(signum, "before training started; nothing was written")
  elif _run.phase == TRAINING and len(_run.received) > 1:
    end_now(signum, f"again while stopping: ended at once; {what_stays()}; run the same "
            "command again to go on")
  elif _run.phase == EXITING and _run.exit_status == 0:
    end_now(signum, _AFTER_THE_STAGES)
  # Otherwise a flag, looked at at the next safe point (or by exit_status).


def install() -> None:
  """Takes SIGTERM and SIGINT for the whole life of the process (the command's first step):
  before the stages a signal ends it at once, while they run it raises a flag. Only the main
  thread may set handlers; elsewhere this does nothing."""
  if threading.current_thread() is not threading.main_thread():
    return
  for s in SIGNALS:
    signal.signal(s, _handler)
  _run.installed = True


@contextlib.contextmanager
def catch_signals() -> Iterator[None]:
  """The training phase: SIGTERM and SIGINT raise a flag for the duration (in the main thread;
  outside the command, where install() did not run, the previous handlers come back
  afterwards)."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  previous = None if _run.installed else {s: signal.getsignal(s) for s in SIGNALS}
  _run.received.clear()
  _run.phase = TRAINING
  if previous is not None:
    for s in SIGNALS:
      signal.signal(s, _handler)
  try:
    yield
  finally:
    _run.phase = ENDING
    _run.stage = None
    if previous is not None:
      for s, handler in previous.items():
        signal.signal(s, handler)


@contextlib.contextmanager
def training_stage(name: str, kept: Callable[[], str]) -> Iterator[None]:
  """Stage `name` trains for the duration; `kept()` says what of it is on disk (for a line
  written at once, on a second signal or a lost process)."""
  _run.stage = (name, kept)
  try:
    yield
  finally:
    _run.stage = None


def exit_status(status: int) -> int:
  """The process's exit status after the run returned `status`: 128 + the signal where one came
  after the stages of a run that ended well (one line says so). A signal after this ends the
  process at once (with that line where `status` is 0; else the run's own line stands)."""
  _run.exit_status = status
  _run.phase = EXITING
  signum = pending_signal()
  if status == 0 and signum:
    print(f"error: interrupted ({signal_name(signum)}) {_AFTER_THE_STAGES}", file=sys.stderr)
    _run.exit_status = status = 128 + signum
  return status


def pending_signal() -> Optional[int]:
  """The first signal received by this process, or None."""
  return _run.received[0] if _run.received else None


def stop_requested(step: int, every: int) -> Optional[int]:
  """The signal on which every process stops after `step`, or None to go on.

  One process: its own flag, at every step. Several: all flags, gathered every `every` steps.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return pending_signal()
  if step % every:
    return None
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  flags = multihost_utils.process_allgather(np.int32(pending_signal() or 0))
  received = [int(s) for s in np.ravel(flags) if s]
  return received[0] if received else None


def stop_if_requested(stage_name: str, where: str) -> None:
  """Raises Interrupted when a signal came while no step was running (every process)."""
  signum = stop_requested(0, 1)
  if signum:
    raise Interrupted(signum, f"[{stage_name}] {signal_name(signum)} {where}; run the same "
                      "command again to go on")
