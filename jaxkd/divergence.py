"""Divergence: a loss term or the gradient norm that is no longer finite stops the stage.

The train step's metrics stay on the device; they are fetched (one host sync) only where the
loop syncs anyway: a log line, an evaluation, a checkpoint. So a non-finite step is caught
before its state is evaluated, selected, exported or checkpointed, and the last good checkpoint
is the newest one on disk.
"""

from typing import Any, Optional

import jax
import numpy as np

from jaxkd.errors import Diverged


def watched(metric: str) -> bool:
  """The metrics whose non-finite value means divergence: the loss terms and the gradient norm
  (a method's other metrics, e.g. an accuracy over rows that a batch may lack, are only logged)."""
  return metric.startswith("loss") or metric == "grad_norm"


class Unchecked:
  """The step metrics not yet checked for divergence: fetched (one host sync) only where the
  loop would sync anyway (a log line, an evaluation, a checkpoint)."""

  def __init__(self, stage_name: str, mngr: Any):
    self.stage_name, self.mngr = stage_name, mngr
    self.steps: list[tuple[int, dict[str, jax.Array]]] = []

  def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
    self.steps.append((step, metrics))

  def check(self) -> None:
    """Raises Diverged at the first step whose loss terms or gradient norm are not finite."""
    host = jax.device_get([metrics for _, metrics in self.steps])
    for (step, _), metrics in zip(self.steps, host):
      bad = {k: float(v) for k, v in metrics.items()
             if watched(k) and not np.all(np.isfinite(v))}
      if bad:
        raise Diverged(diverged_message(self.stage_name, step, bad, metrics,
                                        self.mngr.latest_step(), str(self.mngr.directory)))
    self.steps = []


def diverged_message(stage_name: str, step: int, bad: dict[str, float],
                     metrics: dict[str, Any], last_good: Optional[int], directory: str) -> str:
  """What went non-finite where, what was kept, and the likely causes."""
  # The named terms before their sum: 'kd' says more than 'loss'.
  terms = sorted(bad, key=lambda k: (k in ("loss", "grad_norm"), k))
  kept = (f"the last good checkpoint (step {last_good}) stays in {directory}"
          if last_good is not None else "no checkpoint was written")
  return (f"[{stage_name}] diverged at step {step}: "
          + ", ".join(f"{k}={bad[k]}" for k in terms)
          + f" (lr {float(metrics.get('lr', float('nan'))):.4g}); {kept} and nothing was "
          "exported. Likely causes: a learning rate too high for this batch size "
          "(--config.optimizer.lr), a temperature or weight of 0 or a huge loss weight "
          "(--config.method.*); rerun in a new --workdir with a fixed config")
