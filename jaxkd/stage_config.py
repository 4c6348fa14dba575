"""The config a stage was trained with, saved in its directory and checked when it is reused.

`<stage>/config.json` holds the stage's effective config (every value its result depends on, as
flat dotted fields) and the whole run config for reference. Resuming an interrupted stage, or
reusing a finished one, under a config whose effective values differ would silently mix two
schedules or report another run's numbers: it is refused, naming the fields, unless the run
sets `allow_changed_config` (then the new values are saved, the old ones kept in `history`).
"""

import json
import os
from typing import Any

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
  return _plain(fields)


def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
  """'field saved -> current' for each field whose value differs (or is only in one)."""
  def show(values, key):
    return repr(values[key]) if key in values else "(absent)"
  return [f"{key} {show(saved, key)} -> {show(current, key)}"
          for key in sorted(set(saved) | set(current)) if saved.get(key) != current.get(key)
          or (key in saved) != (key in current)]


def check(stage: Any, stage_dir: str) -> None:
  """Refuses a stage directory whose saved config.json holds other effective values than this
  run's (resuming or reusing it would mix two configs), unless `allow_changed_config`."""
  path = epath.Path(os.path.join(stage_dir, CONFIG_FILE))
  if not path.exists():
    return
  changed = differences(json.loads(path.read_text())["effective"],
                        effective_config(stage, stage.config))
  if changed and not stage.config.get("allow_changed_config", False):
    shown = "; ".join(changed[:6]) + ("; ..." if len(changed) > 6 else "")
    raise UserError(
        f"{stage_dir} was trained with another config ({shown}); use a new --workdir, or "
        "--config.allow_changed_config=True to go on with the new values")


def save(stage: Any, stage_dir: str, started: bool) -> None:
  """Saves this run's effective config in the stage directory (process 0); where the stage
  was `started` (it has a checkpoint) under other values, which the plan let through with
  `allow_changed_config`, the old ones are kept in `history`."""
  path = epath.Path(os.path.join(stage_dir, CONFIG_FILE))
  current = effective_config(stage, stage.config)
  saved = json.loads(path.read_text()) if started and path.exists() else None
  if saved is not None and not differences(saved["effective"], current):
    return
  history = saved.get("history", []) + [saved["effective"]] if saved is not None else []
  if jax.process_index() == 0:
    record = {"effective": current, "history": history, "run": _plain(stage.config.to_dict())}
    paths.write_atomically(os.path.join(stage_dir, CONFIG_FILE),
                           json.dumps(record, indent=1).encode())
