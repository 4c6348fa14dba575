"""Files of a run in a local folder or on a bucket (`gs://bucket/run`) alike.

Reads and writes go through `etils.epath`, which sends local paths to the os module and URLs to
tf.io.gfile. Paths stay strings: joining them with `os.path.join` is pure string work that keeps a
URL intact, while `os.path.abspath` and the os module's file calls do not.
"""

import os

from etils import epath


def is_url(path: str) -> bool:
  """True for `scheme://...` (gs://bucket/run), False for a local path."""
  return "://" in path


def absolute(path: str) -> str:
  """A local path made absolute; a URL as it is (abspath would make gs://b/x <cwd>/gs:/b/x)."""
  return path if is_url(path) else os.path.abspath(path)


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
