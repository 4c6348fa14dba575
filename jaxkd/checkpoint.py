"""Checkpoints: orbax for resumable train states, one msgpack file for a finished teacher.

A train-state checkpoint holds the state and a small JSON record (best accuracy so far, the
teacher's path and checksum). The data position is the step itself: the input pipeline is a pure
function of (seed, step), so restoring the step restores where the data stream was. Every path may
be local or a bucket URL (gs://bucket/run/teacher.msgpack).
"""

import hashlib
from typing import Any, Optional

import flax.serialization
import jax
import orbax.checkpoint as ocp
from etils import epath

from jaxkd import distributed
from jaxkd import paths
from jaxkd.errors import UserError
from jaxkd.tree_check import first_mismatch


def manager(directory: str, every_steps: int, keep: int) -> ocp.CheckpointManager:
  """An orbax CheckpointManager saving every `every_steps` steps and keeping the last `keep`."""
  options = ocp.CheckpointManagerOptions(save_interval_steps=max(every_steps, 1),
                                         max_to_keep=keep, create=True)
  return ocp.CheckpointManager(epath.Path(directory).absolute(), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, record: dict[str, Any],
         force: bool = False) -> None:
  """Saves (state, record) at `step` when the interval says so, or always when `force`."""
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          record=ocp.args.JsonSave(record)), force=force)


def restore_latest(mngr: ocp.CheckpointManager, abstract_state: Any
                   ) -> Optional[tuple[Any, dict[str, Any]]]:
  """(state, record) of the newest checkpoint, placed like `abstract_state`; None if none."""
  step = mngr.latest_step()
  if step is None:
    return None
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), record=ocp.args.JsonRestore()))
  return restored.state, dict(restored.record)


def file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with epath.Path(path).open("rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def export_variables(path: str, variables: Any) -> str:
  """Writes Flax variables to one msgpack file (atomically) and returns its sha256."""
  if jax.process_index() == 0:
    paths.write_atomically(path, flax.serialization.msgpack_serialize(jax.device_get(variables)))
  distributed.barrier(f"export {path}")  # The other processes read what process 0 wrote.
  return file_sha256(path)


def import_variables(path: str, template: Any, what: str = "teacher checkpoint") -> Any:
  """Reads a msgpack variables file and checks it fits the tree of `template`.

  Raises a UserError naming the first missing, extra or misshapen leaf when it does not.
  """
  if not epath.Path(path).is_file():
    raise UserError(f"{what} {path!r} does not exist")
  data = epath.Path(path).read_bytes()
  try:
    loaded = flax.serialization.msgpack_restore(data)
  except Exception as e:  # msgpack raises several unrelated types on garbage
    raise UserError(f"{what} {path!r} is not a jaxkd variables file ({e})") from None
  template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), template)
  problem = first_mismatch(template, loaded)
  if problem is not None:
    raise UserError(f"{what} {path!r} does not fit the architecture: {problem}")
  return loaded
