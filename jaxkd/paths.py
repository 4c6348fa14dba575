"""Files of a run in a local folder or on a bucket (`gs://bucket/run`) alike.

Reads and writes go through `etils.epath`, which sends local paths to the os module and URLs to
tf.io.gfile. Paths stay strings: joining them with `os.path.join` is pure string work that keeps a
URL intact, while `os.path.abspath` and the os module's file calls do not.
"""

import os
import shutil
from typing import Optional

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


def check_free_space(directory: str, needed: int, fix: str) -> None:
  """One UserError when a local `directory` has less than `needed` bytes free, before a write
  that would fail half-way (a bucket is not checked: it does not fill up)."""
  if is_url(directory):
    return
  free = shutil.disk_usage(directory).free
  if free < needed:
    raise UserError(f"not enough free space in {directory!r}: {free / 2**20:.1f} MiB free, "
                    f"{needed / 2**20:.1f} MiB needed; {fix}")
