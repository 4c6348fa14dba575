"""Checkpoints: orbax for resumable train states, one msgpack file for a finished teacher.

A train-state checkpoint holds the state and a small JSON record (best accuracy so far, the
teacher's path and checksum, the sha256 of the state's arrays). The data position is the step
itself: the input pipeline is a pure function of (seed, step), so restoring the step restores
where the data stream was. Every path may be local or a bucket URL (gs://bucket/run/t.msgpack).

What is read back is verified: a checkpoint whose arrays do not hash to the digest saved with
them, or that orbax cannot read, is damaged; the newest intact one is used instead, and the
damaged newer ones are moved to `<checkpoints>.damaged/<step>` (so their steps can be written
again). An exported variables file is checked against the sha256 its stage recorded
(`read_verified`).
"""

import contextlib
import hashlib
import logging
import sys
from typing import Any, Iterator, Optional

import flax.serialization
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jaxkd import distributed
from jaxkd import paths
from jaxkd.errors import UserError
from jaxkd.tree_check import first_mismatch

# The record's key holding the digest of the state saved with it (absent in older checkpoints).
DIGEST_KEY = "state_sha256"


class Misfit(UserError):
  """A variables file that does not fit the architecture; `variables`: the tree it holds (for
  a caller that names the architectures it does fit)."""

  def __init__(self, message: str, variables: Any):
    super().__init__(message)
    self.variables = variables


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
  """Silences the libraries' log lines while checkpoints are read: a damaged one is reported in
  one line of ours, not in orbax's."""
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    logger.setLevel(level)


def manager(directory: str, every_steps: int, keep: int) -> ocp.CheckpointManager:
  """An orbax CheckpointManager saving every `every_steps` steps and keeping the last `keep`."""
  options = ocp.CheckpointManagerOptions(save_interval_steps=max(every_steps, 1),
                                         max_to_keep=keep, create=True)
  with _quiet():  # It reads every step's metadata: a damaged step is reported on restore.
    return ocp.CheckpointManager(epath.Path(directory).absolute(), options=options)


def saved_steps(directory: str) -> list[int]:
  """The steps orbax has saved in `directory` (a stage's `checkpoints/`), oldest first; none
  where it is no folder. Read without orbax: the plan lists them before anything runs."""
  path = epath.Path(directory)
  if not path.is_dir():
    return []
  return sorted(int(child.name) for child in path.iterdir() if child.name.isdigit())


def _host_copy(x: Any) -> Any:
  """What this process holds of a leaf: the whole array for a replicated jax.Array (one of its
  copies, so no process has to talk to another), key data for a PRNG key."""
  if not isinstance(x, jax.Array):
    return x
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.is_fully_addressable:
    return x
  if not x.is_fully_replicated:
    raise ValueError(f"a checkpointed state must be replicated; got sharding {x.sharding}")
  return x.addressable_data(0)


def host_values(leaves: list[Any]) -> list[Any]:
  """The leaves of a replicated state as numpy arrays, read from this process's own copy."""
  return jax.device_get([_host_copy(x) for x in leaves])


def state_digest(state: Any) -> str:
  """sha256 over every leaf of `state` in tree order: its path, dtype, shape, then its bytes.

  The train state is replicated, so every process computes the same digest from its own copy.
  """
  leaves = jax.tree_util.tree_leaves_with_path(state)
  values = host_values([x for _, x in leaves])
  digest = hashlib.sha256()
  for (path, _), value in zip(leaves, values):
    value = np.ascontiguousarray(value)
    digest.update(f"{jax.tree_util.keystr(path)} {value.dtype.name} {value.shape}\n".encode())
    digest.update(value.reshape(-1).view(np.uint8).data)
  return digest.hexdigest()


def save(mngr: ocp.CheckpointManager, step: int, state: Any, record: dict[str, Any],
         force: bool = False) -> None:
  """Saves (state, record + the state's digest) at `step` when the interval says so, or always
  when `force`."""
  if not force and not mngr.should_save(step):
    return  # The digest reads the state back to the host: only for a step that is saved.
  record = dict(record, **{DIGEST_KEY: state_digest(state)})
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          record=ocp.args.JsonSave(record)), force=force)


def finish_writes(mngr: ocp.CheckpointManager) -> Optional[tuple[int, str]]:
  """Waits for the checkpoint being written in the background, if any. None when it was
  written (or there was none); (its step, why in one line) when it failed (a full disk)."""
  step = mngr.latest_step()
  try:
    with _quiet():
      mngr.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except  # orbax/tensorstore raise many types
    return step, _reason(e)
  return None


def committed_steps(mngr: ocp.CheckpointManager) -> list[int]:
  """The steps whose checkpoints are complete on disk, oldest first, once the one being written
  finished or failed: what a stop may say stays (orbax's own list also holds the one in
  flight)."""
  finish_writes(mngr)
  mngr.reload()
  return sorted(mngr.all_steps())


def stays(steps: list[int], directory: Any) -> str:
  """What a stop says is kept, from the complete checkpoints' `steps`."""
  if not steps:
    return f"no checkpoint of it is complete in {directory}"
  return f"the newest complete checkpoint (step {steps[-1]}) stays in {directory}"


def close(mngr: ocp.CheckpointManager) -> None:
  """Stops the manager's background threads (after finish_writes), so that none is left
  writing while the interpreter shuts down; best effort."""
  try:
    with _quiet():
      mngr.close()
  except Exception:  # pylint: disable=broad-except  (a failed write was reported already)
    pass


def _reason(error: Exception) -> str:
  """An exception in one short line: its type and the end of its message's first line, where
  tensorstore's chain of 'context: cause' ends in the cause (its spec dumps dropped)."""
  lines = str(error).strip().splitlines()
  text = lines[0] if lines else ""
  for dump in (" [tensorstore_spec", " See full TensorStore details"):
    text = text.split(dump)[0]
  if len(text) > 150:
    text = "..." + text[-147:]
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _read(mngr: ocp.CheckpointManager, step: int, abstract_state: Any
          ) -> tuple[Optional[tuple[Any, dict[str, Any]]], Optional[str]]:
  """((state, record), None) for an intact checkpoint `step`, else (None, why it is damaged)."""
  try:
    with _quiet():
      restored = mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), record=ocp.args.JsonRestore()))
  except Exception as e:  # pylint: disable=broad-except  # orbax/tensorstore raise many types
    return None, _reason(e)
  if not isinstance(restored.record, dict):
    return None, "its record is not a JSON object"
  record = dict(restored.record)
  saved = record.pop(DIGEST_KEY, None)  # None: written before digests were saved; not checked.
  if saved is not None and state_digest(restored.state) != saved:
    return None, "its arrays do not match the sha256 saved with them"
  return (restored.state, record), None


def _set_aside(mngr: ocp.CheckpointManager, steps: list[int]) -> epath.Path:
  """Moves the step directories `steps` to `<checkpoints>.damaged/` (process 0), so the run can
  write those steps again and the damaged files stay for inspection; returns that folder."""
  aside = mngr.directory.parent / (mngr.directory.name + ".damaged")
  if jax.process_index() == 0:
    aside.mkdir(parents=True, exist_ok=True)
    for step in steps:
      target = aside / str(step)
      if target.exists():  # Damaged at this step before: the newer copy replaces it.
        target.rmtree()
      (mngr.directory / str(step)).rename(target)
  distributed.barrier(f"set aside damaged checkpoints in {mngr.directory}")
  mngr.reload()
  return aside


def restore_latest(mngr: ocp.CheckpointManager, abstract_state: Any
                   ) -> Optional[tuple[Any, dict[str, Any]]]:
  """(state, record) of the newest intact checkpoint, placed like `abstract_state`; None if the
  directory holds none.

  Each damaged newer one is reported in one line on stderr and moved aside. When every
  checkpoint is damaged, a UserError refuses to go on and nothing is moved: that is more likely
  a changed config or library than damage, and starting over would hide it.
  """
  damaged = []
  for step in sorted(mngr.all_steps(), reverse=True):
    restored, why = _read(mngr, step, abstract_state)
    if restored is None:
      damaged.append((step, why))
      continue
    if damaged:
      aside = _set_aside(mngr, [s for s, _ in damaged])
      if jax.process_index() == 0:
        for bad, why in damaged:
          print(f"warning: checkpoint {mngr.directory}/{bad} is damaged ({why}); resuming from "
                f"step {step} (the damaged one is kept in {aside}/{bad})", file=sys.stderr,
                flush=True)
    return restored
  if damaged:
    reasons = "; ".join(f"step {s}: {why}" for s, why in damaged)
    raise UserError(f"no checkpoint in {mngr.directory} can be restored ({reasons}); remove "
                    f"{mngr.directory} to train the stage from step 0")
  return None


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


def _exists(path: str, what: str, remedy: str) -> None:
  """A regular file at `path` (a FIFO or a device is refused by its kind, never opened)."""
  paths.check_regular_file(path, what, remedy)
  if not epath.Path(path).is_file():
    raise UserError(f"{what} {path!r} does not exist" + (f"; {remedy}" if remedy else ""))


def _damaged(path: str, what: str, sha256: str, remedy: str) -> UserError:
  return UserError(f"{what} {path!r} is damaged: its sha256 differs from the one recorded when "
                   f"it was written ({sha256[:12]}...)" + (f"; {remedy}" if remedy else ""))


def verify_file(path: str, what: str, sha256: str, remedy: str = "") -> None:
  """Refuses (UserError ending in `remedy`) a file `path` that is missing, not a regular file,
  or does not hash to `sha256` (the checksum recorded when it was written); read in chunks."""
  _exists(path, what, remedy)
  if file_sha256(path) != sha256:
    raise _damaged(path, what, sha256, remedy)


def read_verified(path: str, what: str, sha256: Optional[str] = None, remedy: str = "") -> bytes:
  """The bytes of file `path`. With `sha256` (the checksum recorded when it was written) they
  must hash to it; a missing or different file, or one that is no regular file (a FIFO, a
  device) or larger than the memory (jaxkd.paths.read_whole), is refused with a UserError
  ending in `remedy`."""
  _exists(path, what, remedy)
  data = paths.read_whole(path, what, remedy)
  if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
    raise _damaged(path, what, sha256, remedy)
  return data


def restore_variables(path: str, what: str, sha256: Optional[str] = None,
                      remedy: str = "") -> Any:
  """The tree of a msgpack variables file, as stored (see `read_verified`); a UserError when
  it is missing, damaged or not such a file."""
  data = read_verified(path, what, sha256, remedy)
  try:
    return flax.serialization.msgpack_restore(data)
  except Exception as e:  # msgpack raises several unrelated types on garbage
    raise UserError(f"{what} {path!r} is not a jaxkd variables file ({e})") from None


def import_variables(path: str, template: Any, what: str = "teacher checkpoint",
                     sha256: Optional[str] = None, remedy: str = "") -> Any:
  """Reads a msgpack variables file and checks it fits the tree of `template`.

  With `sha256`, the file is first verified against it (see `read_verified`). Raises a UserError
  naming the first missing, extra or misshapen leaf when it does not fit.
  """
  loaded = restore_variables(path, what, sha256, remedy)
  template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), template)
  problem = first_mismatch(template, loaded)
  if problem is not None:
    raise Misfit(f"{what} {path!r} does not fit the architecture: {problem}", loaded)
  return loaded
