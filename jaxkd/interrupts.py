"""Preemption: SIGTERM (what a cloud TPU/GPU preemption sends) and SIGINT (Ctrl-C) during a run.

While `catch_signals()` is active a signal only raises a flag. The training loop looks at it
after every step (`stop_requested`): the step in flight finishes, a checkpoint is written, and
the loop raises `Interrupted`, which `jaxkd.main` turns into one line and exit status 128 + the
signal's number (143 for SIGTERM, 130 for SIGINT), the shell's convention for "killed by it".
A second signal of the same kind while that checkpoint is written ends the process at once.

Several processes must stop at the same step, or the collective checkpoint write would hang: they
agree (a tiny all-gather of the flags) every `every` steps, and stop at the first agreement
after any of them was signalled. One process stops at the very next step.
"""

import contextlib
import signal
import threading
from typing import Iterator, Optional

import jax
import numpy as np

from jaxkd.errors import UserError

SIGNALS = (signal.SIGTERM, signal.SIGINT)

_received: list[int] = []
# Whether catch_signals() was entered in this process: a signal that ends it at once then says
# that a stage may have started.
_started: list[bool] = []


class StoppedAtOnce(KeyboardInterrupt):
  """A signal that ends the process at once (SIGTERM outside catch_signals(), as Ctrl-C's
  KeyboardInterrupt does for SIGINT): nothing is saved."""

  def __init__(self, signum: int):
    super().__init__(signal_name(signum))
    self.signum = signum


def _raise_at_once(signum, frame):
  del frame
  raise StoppedAtOnce(signum)


@contextlib.contextmanager
def stop_at_once() -> Iterator[None]:
  """SIGTERM raises StoppedAtOnce for the duration (the main thread only), so that a run
  stopped before its stages start (loading TensorFlow, checking the dataset) ends with one
  line too; catch_signals() takes over while the stages run."""
  _started.clear()
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  previous = signal.signal(signal.SIGTERM, _raise_at_once)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)


def stopped_at_once_message(error: KeyboardInterrupt) -> tuple[str, int]:
  """The line and exit status of a run ended at once by a signal (`error`)."""
  signum = getattr(error, "signum", signal.SIGINT)
  if not _started:
    return (f"interrupted ({signal_name(signum)}) before training started; nothing was "
            "written", 128 + signum)
  return (f"interrupted at once ({signal_name(signum)}); every finished checkpoint stays: run "
          "the same command again to resume from the last one", 128 + signum)


class Interrupted(UserError):
  """The run stopped on a signal after saving its state; rerunning resumes it."""

  def __init__(self, signum: int, message: str):
    super().__init__(message)
    self.signum = signum
    self.exit_status = 128 + signum


def _handler(signum, frame):
  del frame
  _received.append(signum)
  # Back to the default, so that a second signal while the checkpoint is written ends it.
  signal.signal(signum, signal.SIG_DFL if signum != signal.SIGINT else signal.default_int_handler)


@contextlib.contextmanager
def catch_signals() -> Iterator[None]:
  """Turns SIGTERM and SIGINT into a flag for the duration (where the caller may: the main
  thread); the previous handlers come back afterwards."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  previous = {s: signal.getsignal(s) for s in SIGNALS}
  _received.clear()
  _started.append(True)
  for s in SIGNALS:
    signal.signal(s, _handler)
  try:
    yield
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
    _received.clear()


def pending_signal() -> Optional[int]:
  """The first signal received by this process, or None."""
  return _received[0] if _received else None


def stop_requested(step: int, every: int) -> Optional[int]:
  """The signal on which every process stops after `step`, or None to go on.

  One process: its own flag, at every step. Several: all flags, gathered every `every` steps.
  """
  if jax.process_count() == 1:
    return pending_signal()
  if step % every:
    return None
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  flags = multihost_utils.process_allgather(np.int32(pending_signal() or 0))
  received = [int(s) for s in np.ravel(flags) if s]
  return received[0] if received else None


def signal_name(signum: int) -> str:
  return signal.Signals(signum).name


def stop_if_requested(stage_name: str, where: str) -> None:
  """Raises Interrupted when a signal came while no stage was training (every process)."""
  signum = stop_requested(0, 1)
  if signum:
    raise Interrupted(signum, f"[{stage_name}] {signal_name(signum)} {where}; run the same "
                      "command again to go on")
