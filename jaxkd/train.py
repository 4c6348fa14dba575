"""Training and evaluation of a run: its plan, then its execution.

`train_and_evaluate(config, workdir)` makes the plan (jaxkd.plan: every check, the stages in
order, their state in the workdir), runs it (jaxkd.executor, each stage by jaxkd.loop, each step
by jaxkd.steps) and prints the closing table. None of them branches on a method: they read the
views, heads, bridges, preparations and pure losses from the method registry.
"""

import contextlib
from typing import Any, Iterator

import jax
import ml_collections
from etils import epath

from jaxkd import checkpoint
from jaxkd import distributed
from jaxkd import executor
from jaxkd import interrupts
from jaxkd import parallel
from jaxkd import paths
from jaxkd import plan as plan_lib
from jaxkd import workdir_lock
from jaxkd.errors import UserError
from jaxkd.progress import columns, percent
from jaxkd.results import RESULT_FILE


def check_workdir(workdir: str) -> None:
  """Fails early, with one clear error, when the workdir cannot be written."""
  paths.check_writable(workdir, "workdir", "pass a --workdir you can write to")


def holds_work(workdir: str) -> bool:
  """Whether `workdir` holds something a rerun reuses: a finished stage or a checkpoint."""
  return any(stage_dir.is_dir() and ((stage_dir / RESULT_FILE).exists()
                                     or checkpoint.saved_steps(str(stage_dir / "checkpoints")))
             for stage_dir in epath.Path(workdir).iterdir())


def remove_if_idle(workdir: str) -> None:
  """Removes the directory `workdir` unless it holds work (`holds_work`); best effort: a
  refusal is reported whether or not this succeeds."""
  root = epath.Path(workdir)
  try:
    if root.is_dir() and not holds_work(workdir):
      root.rmtree()
  except paths.io_errors():
    pass


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, Any]]:
  """Runs every stage of `config` in `workdir` and returns their result records.

  A refused run (a UserError, exit status 2) or one interrupted before its first checkpoint
  removes the workdir where this run created it and it holds no finished stage and no
  checkpoint (its lock, a stage's config.json, logs of a stage refused before its first
  checkpoint); a workdir that existed is never touched.
  """
  mesh = parallel.create_mesh()
  created = not epath.Path(workdir).exists()
  try:
    plan = plan_lib.make_plan(config, workdir, mesh)
    # From the first write on, a signal becomes a flag, then a checkpoint and one line
    # (jaxkd.interrupts); a lost process one line (jaxkd.distributed).
    with interrupts.catch_signals(), _lost_process_is_one_line():
      check_workdir(workdir)
      with workdir_lock.hold(workdir):
        results = executor.execute(plan, mesh)
  except UserError as e:
    removable = e.exit_status == UserError.exit_status or isinstance(e, interrupts.Interrupted)
    if created and removable and jax.process_index() == 0:
      remove_if_idle(workdir)
    raise
  if jax.process_index() == 0:
    print(results_table(results, workdir))
  return results


@contextlib.contextmanager
def _lost_process_is_one_line() -> Iterator[None]:
  """An error that says another process of the run is gone becomes one line (LostProcess)."""
  try:
    yield
  except (RuntimeError, ValueError) as e:
    lost = distributed.lost_process_error(e, interrupts.what_stays)
    if lost is None:
      raise
    raise lost from None


def results_table(results: list[dict[str, Any]], workdir: str) -> str:
  """The closing table: held-out top-1 of every stage, and where its files are."""
  rows = [("stage", "model", "method", "top-1 last", "top-1 best", "top-5 last")]
  for r in results:
    rows.append((r["stage"], r["model"], r["method"], percent(r.get("top1_last")),
                 percent(r.get("top1_best")), percent(r.get("top5_last"))))
  lines = columns(rows)
  lines.append(f"\nlogs (TensorBoard): tensorboard --logdir {workdir}")
  lines.append(f"checkpoints: {workdir}/<stage>/checkpoints; results: {workdir}/<stage>/"
               f"{RESULT_FILE}")
  return "\n".join(lines)
