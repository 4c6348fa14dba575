"""The config a stage was trained with, saved in its directory and checked when it is reused.

`<stage>/config.json` holds the stage's effective config (every value its result depends on, as
flat dotted fields) and the whole run config for reference. Resuming an interrupted stage, or
reusing a finished one, under a config whose effective values differ would silently mix two
schedules or report another run's numbers: it is refused, naming the fields, unless the run
sets `allow_changed_config` (then the new values are saved, the old ones kept in `history`).
Work (a checkpoint, a result) beside a missing or damaged config.json is refused the same way,
and the file is rewritten only once the stage has work under the new values: a resume that
fails before its first checkpoint leaves the file of the checkpoints that are there.
"""

import json
import os
from typing import Any, Optional

import jax
import ml_collections
from etils import epath

from jaxkd import paths
from jaxkd.errors import UserError

CONFIG_FILE = "config.json"
# Fields that decide how a run is watched or stored, not what it computes.
_NOT_EFFECTIVE = {"data_dir", "lr"}


def _plain(value: Any) -> Any:
  """A config value as JSON gives it back (tuples become lists)."""
  return json.loads(json.dumps(value, default=str))


def _flat(prefix: str, tree: Any) -> dict[str, Any]:
  if isinstance(tree, (dict, ml_collections.ConfigDict)):
    items = tree.items()
    return {k: v for key, sub in items for k, v in _flat(f"{prefix}{key}.", sub).items()}
  return {prefix[:-1]: _plain(tree)}


def effective_config(stage: Any, config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Every value the stage's trained variables depend on, as {dotted field: value}.

  The learning rate and milestones are the stage's own (a teacher may have its own lr); the
  method's hyper-parameters are the effective ones of the stage (not `config.method`, which a
  teacher stage does not read).
  """
  fields = {"model": stage.model_name, "method": stage.method.name,
            "num_epochs": stage.num_epochs, "lr": stage.base_lr,
            "milestones": _plain(stage.milestones), "views": stage.method.views,
            "seed": config.seed, "batch_size": config.batch_size,
            "half_precision": config.get("half_precision", False),
            "eval_every_epochs": config.eval_every_epochs}
  for group in ("optimizer", "schedule", "dataset"):
    for key, value in _flat(f"{group}.", config[group]).items():
      # None: the default, which is what a file written before the field existed holds.
      if key.split(".")[-1] not in _NOT_EFFECTIVE and value is not None:
        fields[key] = value
  fields.update(_flat("method.", stage.hparams.to_dict()))
  fields.update(stage.recorded)
  return _plain(fields)


def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
  """'field saved -> current' for each field whose value differs (or is only in one)."""
  def show(values, key):
    return repr(values[key]) if key in values else "(absent)"
  return [f"{key} {show(saved, key)} -> {show(current, key)}"
          for key in sorted(set(saved) | set(current)) if saved.get(key) != current.get(key)
          or (key in saved) != (key in current)]


def _fix(path: epath.Path) -> str:
  return (f"restore {path}, or use a new --workdir, or --config.allow_changed_config=True to go "
          "on with this run's values (the file is then written anew)")


def read(stage_dir: str) -> Optional[dict[str, Any]]:
  """The saved record of a stage directory ({'effective': ..., 'history': ..., 'run': ...}),
  None where there is none; a file that is not such a record (damaged, truncated, a folder,
  a FIFO) is one UserError naming it and the fix."""
  path = epath.Path(os.path.join(stage_dir, CONFIG_FILE))
  if not paths.exists(str(path)):
    return None
  record, why = paths.read_json(str(path), "stage config")
  if why is None and not (isinstance(record, dict) and isinstance(record.get("effective"), dict)):
    why = "no 'effective' fields"
  if why is not None:
    raise UserError(f"{path} is not a stage config record ({why}); {_fix(path)}")
  return record


def check(stage: Any, stage_dir: str) -> None:
  """Refuses a stage directory that holds work (a checkpoint or a result) under other
  effective values than this run's, or whose config.json is missing or damaged (the work could
  not be matched to a config), unless `allow_changed_config`."""
  allowed = stage.config.get("allow_changed_config", False)
  path = epath.Path(os.path.join(stage_dir, CONFIG_FILE))
  try:
    saved = read(stage_dir)
  except UserError:
    if allowed:
      return
    raise
  if saved is None:
    if not allowed:
      raise UserError(f"{path} is missing, so the work in {stage_dir} cannot be matched to a "
                      f"config; {_fix(path)}")
    return
  changed = differences(saved["effective"], effective_config(stage, stage.config))
  if changed and not allowed:
    shown = "; ".join(changed[:6]) + ("; ..." if len(changed) > 6 else "")
    raise UserError(
        f"{stage_dir} was trained with another config ({shown}); use a new --workdir, or "
        "--config.allow_changed_config=True to go on with the new values")


def save(stage: Any, stage_dir: str, started: bool) -> None:
  """Saves this run's effective config in the stage directory (process 0), where it differs
  from the saved one. Called when the stage has work under this run's values (before its
  first checkpoint, or its result), so a run refused or failed before that leaves the file of
  the work that is there. Where the stage was `started` (it had a checkpoint) under other
  values, which the plan let through with `allow_changed_config`, the old ones are kept in
  `history` (a damaged old file is replaced)."""
  current = effective_config(stage, stage.config)
  try:
    saved = read(stage_dir) if started else None
  except UserError:
    saved = None
  if saved is not None and not differences(saved["effective"], current):
    return
  history = saved.get("history", []) + [saved["effective"]] if saved is not None else []
  if jax.process_index() == 0:
    record = {"effective": current, "history": history, "run": _plain(stage.config.to_dict())}
    paths.write_atomically(os.path.join(stage_dir, CONFIG_FILE),
                           json.dumps(record, indent=1).encode())
