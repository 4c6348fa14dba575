"""One run per workdir: two runs on one workdir would train the same stage at once and delete
each other's checkpoints.

Process 0 holds an exclusive `flock` on `<workdir>/.lock` while the run lasts (the other
processes of the same run share its workdir and take none); whether it got it is sent to every
process, so that a refused run is refused by all of them, each in one line. The kernel drops
the lock when the process ends, however it ends (kill -9 included), so no lock is ever left
stuck. What it
guarantees: on a local disk, and on network filesystems whose `flock` is honoured across
machines (NFSv4, Lustre and GPFS in their usual set-ups), a second run is refused. On a bucket
(`gs://...`) there is no lock: runs there are not guarded, and one workdir per run is the user's
to keep.
"""

import contextlib
import fcntl
import os
import socket
import time
from typing import Iterator

import jax

from jaxkd import distributed
from jaxkd import paths
from jaxkd.errors import UserError

LOCK_FILE = ".lock"


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
  """Holds the workdir's lock for the duration; a UserError naming the holder if it is taken
  (on every process of the run)."""
  if paths.is_url(workdir):
    yield
    return
  path = os.path.join(workdir, LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644) if jax.process_index() == 0 else None
  try:
    taken = fd is not None and not _try_lock(fd)
    if distributed.from_process_0(int(taken)):
      raise UserError(f"workdir {workdir!r} is in use by another run ({_holder(path)}); wait for "
                      "it to end, or pass another --workdir")
    if fd is not None:
      os.ftruncate(fd, 0)
      os.pwrite(fd, (f"pid {os.getpid()} on {socket.gethostname()} since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n").encode(), 0)
    yield
  finally:
    if fd is not None:
      os.close(fd)  # Closing drops the lock.


def _try_lock(fd: int) -> bool:
  """Takes the exclusive lock of `fd` if it is free; whether it did."""
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    return False
  return True


def _holder(path: str) -> str:
  """Who holds the lock at `path`, as its holder wrote it ("pid N on host since ...")."""
  try:
    with open(path, encoding="utf-8", errors="replace") as f:
      return f.read(200).strip() or "another process"
  except OSError:
    return "another process"
