"""Evaluation over a whole eval split: every example counted once, on every process alike."""

from typing import Any, Callable, Optional

import jax
import ml_collections

from jaxkd import data
from jaxkd import parallel
from jaxkd.networks import Network


def _eval_sums(fn: Callable, variables: Any, config: ml_collections.ConfigDict, views: str,
               mesh: jax.sharding.Mesh) -> dict[str, float]:
  totals: dict[str, float] = {}
  threads = max(config.get("input_workers", 0), data.pipeline.THREADS)
  for local in data.eval_batches(config.dataset, views, config.eval_batch_size,
                                 jax.process_index(), jax.process_count(), num_threads=threads):
    sums = jax.device_get(fn(variables, parallel.to_global(local, mesh)))
    for key, value in sums.items():
      totals[key] = totals.get(key, 0.0) + float(value)
  return totals


def evaluate(network: Network, variables: Any, config: ml_collections.ConfigDict,
             mesh: jax.sharding.Mesh, eval_fn: Callable,
             method_eval: Optional[tuple[str, Callable]] = None) -> dict[str, float]:
  """Top-1 / top-5 (percent) over the whole eval split, every example counted once, and the
  method's own metrics (percent) when `method_eval` = (views, jitted method_eval_step)."""
  del network  # The jitted `eval_fn` holds it.
  totals = _eval_sums(eval_fn, variables, config, "none", mesh)
  n = max(totals.pop("count"), 1.0)
  scores = {key: 100.0 * value / n for key, value in totals.items()}
  if method_eval is not None:
    views, fn = method_eval
    extra = _eval_sums(fn, variables, config, views, mesh)
    n = max(extra.pop("count"), 1.0)
    scores.update({key: 100.0 * value / n for key, value in extra.items()})
  return scores
