"""One run per workdir: two runs on one workdir would train the same stage at once and delete
each other's checkpoints.

Process 0 holds an exclusive `flock` on `<workdir>/.lock` while the run lasts (the other
processes of the same run share its workdir and take none). The kernel drops the lock when the
process ends, however it ends (kill -9 included), so no lock is ever left stuck. What it
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

from jaxkd import paths
from jaxkd.errors import UserError

LOCK_FILE = ".lock"


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
  """Holds the workdir's lock for the duration; a UserError naming the holder if it is taken."""
  if paths.is_url(workdir) or jax.process_index() != 0:
    yield
    return
  fd = os.open(os.path.join(workdir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
      raise UserError(f"workdir {workdir!r} is in use by another run ({holder}); wait for it "
                      "to end, or pass another --workdir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, (f"pid {os.getpid()} on {socket.gethostname()} since "
                   f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n").encode(), 0)
    yield
  finally:
    os.close(fd)  # Closing drops the lock.
