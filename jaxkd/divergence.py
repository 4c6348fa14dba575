"""Divergence: a loss term, the gradient norm or the variables that are no longer finite stop the
stage.

The train step's metrics stay on the device; they are fetched (one host sync) only where the
loop syncs anyway: a log line, an evaluation, a checkpoint. A step's metrics describe the
variables it started from, so before the variables themselves are evaluated, selected, exported
or checkpointed they are checked too (on the devices; read back only to name a bad leaf):
an update that overflows (a learning rate or weight decay too large for float32) is caught at
the step that made it, and the last good checkpoint is the newest one on disk (the one being
written is waited for before the line names it).
"""

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd import checkpoint
from jaxkd.errors import Diverged


def watched(metric: str) -> bool:
  """The metrics whose non-finite value means divergence: the loss terms and the gradient norm
  (a method's other metrics, e.g. an accuracy over rows that a batch may lack, are only logged)."""
  return metric.startswith("loss") or metric == "grad_norm"


@jax.jit
def _all_finite(leaves: list[jax.Array]) -> jax.Array:
  """One boolean on the devices: every entry of every leaf is finite."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def nonfinite_leaf(state: Any) -> Optional[str]:
  """The path of the first floating-point leaf of `state` that is not finite, or None. Checked
  on the devices first (one boolean comes back); the leaves are read only to name a bad one."""
  leaves = [(path, x) for path, x in jax.tree_util.tree_leaves_with_path(state)
            if np.issubdtype(getattr(x, "dtype", np.int32), np.inexact)]
  if not leaves or bool(checkpoint.host_values([_all_finite([x for _, x in leaves])])[0]):
    return None
  values = checkpoint.host_values([x for _, x in leaves])
  for (path, _), value in zip(leaves, values):
    if not np.all(np.isfinite(value)):
      return jax.tree_util.keystr(path)
  return None


class Unchecked:
  """The step metrics not yet checked for divergence: fetched (one host sync) only where the
  loop would sync anyway (a log line, an evaluation, a checkpoint)."""

  def __init__(self, stage_name: str, mngr: Any):
    self.stage_name, self.mngr = stage_name, mngr
    self.steps: list[tuple[int, dict[str, jax.Array]]] = []
    self.last: tuple[int, dict[str, Any]] = (0, {})

  def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
    self.steps.append((step, metrics))

  def check(self, state: Optional[Any] = None) -> None:
    """Raises Diverged at the first step whose loss terms or gradient norm are not finite; with
    `state` (the variables after the last step added), also when one of them is not."""
    host = jax.device_get([metrics for _, metrics in self.steps])
    for (step, _), metrics in zip(self.steps, host):
      bad = {k: float(v) for k, v in metrics.items()
             if watched(k) and not np.all(np.isfinite(v))}
      if bad:
        terms = sorted(bad, key=lambda k: (k in ("loss", "grad_norm"), k))
        self._stop(step, ", ".join(f"{k}={bad[k]}" for k in terms), metrics)
    if host:
      self.last = (self.steps[-1][0], host[-1])
    self.steps = []
    if state is not None:
      leaf = nonfinite_leaf(state)
      if leaf is not None:
        step, metrics = self.last
        self._stop(step, f"its update made the variables non-finite ({leaf})", metrics)

  def _stop(self, step: int, what: str, metrics: dict[str, Any]) -> None:
    # The checkpoint being written is waited for first: the line names one that is on disk.
    committed = checkpoint.committed_steps(self.mngr)
    raise Diverged(diverged_message(self.stage_name, step, what, metrics,
                                    committed[-1] if committed else None,
                                    str(self.mngr.directory)))


def check_final(stage_name: str, variables: Any, step: int, directory: str) -> None:
  """Raises Diverged when the variables a stage ends with (about to be exported) are not all
  finite: whatever the checkpoint they were resumed from held, nothing non-finite is
  exported."""
  leaf = nonfinite_leaf(variables)
  if leaf is not None:
    raise Diverged(
        f"[{stage_name}] the variables of its last step {step} are not finite ({leaf}), so "
        f"nothing was exported; they come from the checkpoint {directory}/{step}: remove it to "
        "resume from the one before, or rerun in a new --workdir with a fixed config")


def diverged_message(stage_name: str, step: int, what: str, metrics: dict[str, Any],
                     last_good: Optional[int], directory: str) -> str:
  """What went non-finite where (`what`: the terms, named before their sum, or the variables),
  what was kept, and the likely causes."""
  kept = (f"the last good checkpoint (step {last_good}) stays in {directory}"
          if last_good is not None else "no checkpoint was written")
  return (f"[{stage_name}] diverged at step {step}: {what}"
          + f" (lr {float(metrics.get('lr', float('nan'))):.4g}); {kept} and nothing was "
          "exported. Likely causes: a learning rate too high for this batch size "
          "(--config.optimizer.lr), a temperature or weight of 0 or a huge loss weight "
          "(--config.method.*); rerun in a new --workdir with a fixed config")
