"""Files of a run in a local folder or on a bucket (`gs://bucket/run`) alike.

Reads and writes go through `etils.epath`, which sends local paths to the os module and URLs to
tf.io.gfile. Paths stay strings: joining them with `os.path.join` is pure string work that keeps a
URL intact, while `os.path.abspath` and the os module's file calls do not.
"""

import contextlib
import json
import os
import shutil
import stat
import sys
import tempfile
import threading
from typing import Any, Callable, Iterator, Optional

from etils import epath

from jaxkd.errors import UserError


def is_url(path: str) -> bool:
  """True for `scheme://...` (gs://bucket/run), False for a local path."""
  return "://" in path


def absolute(path: str) -> str:
  """A local path made absolute; a URL as it is (abspath would make gs://b/x <cwd>/gs:/b/x)."""
  return path if is_url(path) else os.path.abspath(path)


def is_absolute(path: str) -> bool:
  """True for a URL or an absolute local path."""
  return is_url(path) or os.path.isabs(path)


def exists(path: str) -> bool:
  """Whether anything is at `path`: a local name (a dangling symbolic link counts, so that the
  damage is reported rather than the file written over) or an object of a bucket."""
  return epath.Path(path).exists() if is_url(path) else os.path.lexists(path)


def inside(path: str, folder: str) -> Optional[str]:
  """`path` relative to `folder` when it lies inside it (compared as absolute paths), else None."""
  path, folder = absolute(path), absolute(folder).rstrip("/")
  return path[len(folder) + 1:] if path.startswith(folder + "/") else None


def write_atomically(path: str, data: bytes) -> None:
  """Writes `data` to `<path>.tmp`, then renames that over `path`: a reader finds the old file or
  the new one whole, and a crash leaves no half-written file under `path`."""
  target = epath.Path(path)
  tmp = target.with_name(target.name + ".tmp")
  tmp.write_bytes(data)
  tmp.replace(target)


def io_errors() -> tuple[type[Exception], ...]:
  """What a failed read or write raises: OSError from the os module, tf.errors.OpError from
  tf.io.gfile (a URL)."""
  # Imported on call: jaxkd.checkpoint uses this module and is loaded without TensorFlow by the
  # teacher importer.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return (OSError, tf.errors.OpError)


def reason(error: Exception) -> str:
  """The cause of an I/O error in a few words: the os module's strerror, or TensorFlow's message."""
  return getattr(error, "strerror", None) or getattr(error, "message", None) or str(error)


def check_writable(directory: str, what: str, fix: str) -> None:
  """Creates `directory` and writes a probe file in it; one UserError (naming it as `what`,
  ending with `fix`) when that fails, before any work that would be lost (orbax would retry
  for minutes)."""
  try:
    epath.Path(directory).mkdir(parents=True, exist_ok=True)
    probe = epath.Path(directory) / f".write_probe_{os.getpid()}"
    probe.write_text("ok")
    probe.unlink()
  except io_errors() as e:
    raise UserError(f"{what} {directory!r} is not writable ({reason(e)}); {fix}") from None


def check_writable_ahead(directory: str, what: str, fix: str) -> None:
  """One UserError (naming `directory` as `what`, ending with `fix`) when a local `directory`
  could not be written: a probe file is made and removed in it, or, where it does not exist
  yet, in the nearest folder above it that does (which must be a folder). Nothing stays
  behind: the plan checks every folder a stage writes before the workdir exists. A URL is
  not probed here (a bucket has no folders; the workdir's own check writes to it)."""
  if is_url(directory):
    return
  target = os.path.abspath(directory)
  existing = target
  while not os.path.lexists(existing) and os.path.dirname(existing) != existing:
    existing = os.path.dirname(existing)
  try:
    if not os.path.isdir(existing):
      kind = file_kind(existing) or "a file"
      raise NotADirectoryError(0, f"{existing} is {kind}, not a folder")
    handle, probe_path = tempfile.mkstemp(prefix=".write_probe_", dir=existing)
    os.close(handle)
    os.unlink(probe_path)
  except OSError as e:
    raise UserError(f"{what} {directory!r} is not writable ({reason(e)}); {fix}") from None


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


def file_kind(path: str) -> Optional[str]:
  """What a local `path` is when it is not a regular file ('a FIFO', 'a character device',
  'a directory', ...; symbolic links followed), else None; None for a missing path or a URL.
  Stat only: opening a FIFO or a device blocks or never ends."""
  if is_url(path):
    return None
  try:
    mode = os.stat(path).st_mode
  except OSError:
    return None
  if stat.S_ISREG(mode):
    return None
  return next((kind for test, kind in _KINDS if test(mode)), "not a regular file")


def check_regular_file(path: str, what: str, fix: str) -> None:
  """One UserError naming `path` (as `what`) by its kind when it exists but is not a regular
  file (a FIFO would block the read forever, /dev/zero never end it); `fix` ('' for none)
  ends the line."""
  kind = file_kind(path)
  if kind is not None:
    raise UserError(f"{what} {path!r} is {kind}; give a regular file"
                    + (f" ({fix})" if fix else ""))


def memory_bytes() -> int:
  """This machine's physical memory: no file larger than it can be read whole."""
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def read_whole(path: str, what: str, fix: str) -> bytes:
  """The bytes of file `path`, refused in one UserError (naming it as `what`, ending with
  `fix`) when it is not a regular file or holds more than the machine's memory: its size is
  checked before it is read, and no more than that is read whatever its size said."""
  check_regular_file(path, what, fix)
  limit = memory_bytes()
  size = None if is_url(path) else os.stat(path).st_size
  chunks, total = [], 0
  if size is None or size <= limit:
    step = 1 << 24 if size is None else size + 1  # One read for a file whose size is known.
    with epath.Path(path).open("rb") as f:
      while total <= limit:
        chunk = f.read(min(step, limit + 1 - total))
        if not chunk:
          break
        chunks.append(chunk)
        total += len(chunk)
  if (size or 0) > limit or total > limit:
    raise UserError(f"{what} {path!r} is larger than this machine's memory "
                    f"({limit / 2**30:.1f} GiB), and it is read whole"
                    + (f"; {fix}" if fix else ""))
  return b"".join(chunks)


def read_json(path: str, what: str) -> tuple[Any, Optional[str]]:
  """(the JSON value held by file `path`, None), or (None, why it holds none, in a few words:
  its kind where it is no regular file, the read error, or the parse error). A file larger than
  the memory is one UserError naming it as `what` (read_whole)."""
  kind = file_kind(path)
  if kind is not None:
    return None, f"it is {kind}"
  try:
    return json.loads(read_whole(path, what, "")), None
  except (*io_errors(), ValueError) as e:
    text = str(e) if isinstance(e, ValueError) else reason(e)
    return None, " ".join(text.split())[:120]


def check_free_space(directory: str, needed: int, fix: str) -> None:
  """One UserError when a local `directory` has less than `needed` bytes free, before a write
  that would fail half-way (a bucket is not checked: it does not fill up)."""
  if is_url(directory):
    return
  free = shutil.disk_usage(directory).free
  if free < needed:
    raise UserError(f"not enough free space in {directory!r}: {free / 2**20:.1f} MiB free, "
                    f"{needed / 2**20:.1f} MiB needed; {fix}")


# How long a check of a bucket path may take before it is reported as not answering.
PROBE_SECONDS = 30.0


@contextlib.contextmanager
def stderr_silenced() -> Iterator[None]:
  """File descriptor 2 on /dev/null for the duration: what C++ libraries print there (TensorFlow's
  notices when it loads, its cloud file system's retries) does not reach the terminal."""
  sys.stderr.flush()
  saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 2)
  try:
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


def probe(what: str, path: str, check: Callable[[epath.Path], Any],
          seconds: Optional[float] = None) -> Any:
  """`check(epath.Path(path))`, given at most `seconds` (default PROBE_SECONDS): a bucket that
  does not answer (no network, retries for minutes) or refuses (no credentials) is one
  UserError naming `what`."""
  seconds = PROBE_SECONDS if seconds is None else seconds
  result: list[Any] = []

  def run() -> None:
    try:
      result.append(("value", check(epath.Path(path))))
    except Exception as e:  # pylint: disable=broad-except  (reported below, in one line)
      result.append(("error", e))

  with stderr_silenced():
    worker = threading.Thread(target=run, daemon=True, name=f"probe {path}")
    worker.start()
    worker.join(seconds)
  if not result:
    raise UserError(f"{what} {path!r} did not answer within {seconds:g} s (the bucket is "
                    "unreachable or slow); check the path, the network and your credentials")
  kind, value = result[0]
  if kind == "error":
    raise UserError(f"{what} {path!r} cannot be read ({' '.join(reason(value).split())[:200]});"
                    " check the path, the network and your credentials") from None
  return value
