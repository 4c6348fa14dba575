"""The result record of a stage, `<stage>/result.json`: written last, so that its presence means
the stage is complete, and read back by reruns and by the stages that use its exported files.

Its paths inside the workdir are written relative to it, so a workdir that is moved or copied
reads its own files; a teacher file from outside the workdir is recorded absolute.
"""

import json
import os
from typing import Any, Optional

import jax

from jaxkd import paths
from jaxkd.errors import UserError

RESULT_FILE = "result.json"
# The stage's wall time in seconds, from its start to its last step (compilation, training,
# evaluations, checkpoints), summed over the runs that resumed it (each up to its last
# checkpoint); absent in records written before it was kept.
WALL_SECONDS = "wall_seconds"

# The paths of a record, written relative to the workdir when inside it.
PATH_FIELDS = ("checkpoints", "logdir", "export", "teacher_path")
# The fields every record holds.
REQUIRED = ("stage", "logdir", "top1_last")


def workdir_of(stage_dir: str) -> str:
  """The workdir of a stage directory (`<workdir>/<stage name>`)."""
  return os.path.dirname(stage_dir.rstrip("/"))


def recorded_path(path: str, workdir: str) -> str:
  """`path` as a file of the workdir records it: relative to `workdir` when inside it, else
  absolute (a teacher file given with --config.teacher.checkpoint)."""
  inside = paths.inside(path, workdir)
  return inside if inside is not None else paths.absolute(path)


def resolve_paths(result: dict[str, Any], workdir: str) -> dict[str, Any]:
  """A result record with its paths as this run reaches them, in `workdir`.

  A path relative to the workdir is joined to `workdir`; an absolute one outside it stays.
  A record written before paths were relative holds those of the workdir it was written in
  (its `logdir`'s parent): a path under that folder is taken relative to it as well, so a copy
  of that workdir never reads the original's files, even while they still exist.
  """
  if "logdir" not in result:
    return dict(result)
  origin = workdir_of(result["logdir"])  # '' for a record of relative paths
  resolved = dict(result, logdir=os.path.join(workdir, result["stage"]))
  resolved["checkpoints"] = os.path.join(resolved["logdir"], "checkpoints")
  for key in ("export", "teacher_path"):
    path = result.get(key)
    inside = _in_origin(path, origin) if path else None
    if inside is not None:
      resolved[key] = os.path.join(workdir, inside)
  return resolved


def _in_origin(path: str, origin: str) -> Optional[str]:
  """`path` relative to the workdir `origin` a record was written in, None when outside it;
  `origin` '' (a record of relative paths): the relative ones are inside."""
  if not origin:
    return None if paths.is_absolute(path) else path
  prefix = origin.rstrip("/") + "/"
  return path[len(prefix):] if path.startswith(prefix) else None


def _rerun(stage_name: str) -> str:
  return f"rerun (stage {stage_name} is finished again from its last checkpoint)"


def read_result(workdir: str, stage_name: str) -> dict[str, Any]:
  """The result record of a finished stage, its paths resolved in `workdir`; a file that is
  not one (damaged, truncated, a folder, a FIFO, JSON of another shape) is one UserError
  naming it and the fix."""
  path = os.path.join(workdir, stage_name, RESULT_FILE)
  result, why = paths.read_json(path, "result record")
  if why is None and not (isinstance(result, dict) and all(k in result for k in REQUIRED)):
    why = f"not a JSON object with {' and '.join(REQUIRED)}"
  if why is not None:
    raise UserError(f"{path} is not a result record ({why}); remove it and "
                    f"{_rerun(stage_name)}")
  return resolve_paths(result, workdir)


def export_remedy(result: dict[str, Any]) -> str:
  """What rewrites the export of finished stage `result` (paths resolved): the stage
  finished again from its last checkpoint, or (a `best_` file, which no checkpoint keeps)
  trained again."""
  stage_dir = result["logdir"]
  if os.path.basename(result["export"]).startswith("best_"):
    return f"remove {stage_dir} and rerun (stage {result['stage']} is trained again)"
  return f"remove {os.path.join(stage_dir, RESULT_FILE)} and {_rerun(result['stage'])}"


def check_same_stage(result: dict[str, Any], description: dict[str, Any], stage_dir: str):
  """Refuses a finished stage whose identity (model, method, dataset, teacher, ...) differs."""
  for key, value in description.items():
    if result.get(key) != value:
      raise UserError(
          f"{stage_dir} already holds a finished stage with {key}={result.get(key)!r}, but this "
          f"run asks for {key}={value!r}; use a new --workdir (nothing there was changed)")


def write_result(stage_dir: str, result: dict[str, Any]) -> dict[str, Any]:
  """Writes `result` to `<stage_dir>/result.json` (process 0, atomically), its paths inside the
  workdir relative to it; returns the record with its paths as this run reaches them."""
  workdir = workdir_of(stage_dir)
  recorded = {k: recorded_path(v, workdir) if k in PATH_FIELDS and v else v
              for k, v in result.items()}
  if jax.process_index() == 0:
    paths.write_atomically(os.path.join(stage_dir, RESULT_FILE),
                           json.dumps(recorded, indent=2).encode())
  return resolve_paths(recorded, workdir)
