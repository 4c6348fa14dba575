"""The loop that runs one stage: its network and state, the jitted steps, evaluations,
checkpoints, logs and the result record.

`run_stage` trains a `jaxkd.stage.Stage` to the end, resuming from its last checkpoint, beside
the teacher and from the initial variables the executor loaded for it (`Inputs`), and writes
`result.json` last. It decides nothing about which stages a run has (`jaxkd.plan`) and checks
no config (the plan did).
"""

import dataclasses
import functools
import gc
import os
import time
from typing import Any, Callable, Iterator, Optional

import jax
import numpy as np
import optax
from clu import metric_writers
from clu import periodic_actions

from jaxkd import checkpoint
from jaxkd import data
from jaxkd import distributed
from jaxkd import divergence
from jaxkd import interrupts
from jaxkd import metrics_log
from jaxkd import parallel
from jaxkd import paths
from jaxkd import results
from jaxkd import stage_config
from jaxkd import steps
from jaxkd.errors import UserError
from jaxkd.evaluation import evaluate
from jaxkd.networks import (Network, backbone_only, compute_dtype, teacher_output_shapes,
                            without_bridge)
from jaxkd.optim import learning_rate_schedule
from jaxkd.progress import Progress, Stopwatch, percent
from jaxkd.stage import NO_CLASSIFIER_NOTE, Stage
from jaxkd.stage_step import (Inputs, initial_state, jit_train_step, teacher_constants,
                              teacher_network)
from jaxkd.state import TrainState, variables_of
from jaxkd.steps import TeacherHeadStep
from jaxkd.teachers import teacher_image_shape

# Training batches transferred to the devices ahead of the step that reads them.
PREFETCH_BATCHES = 2


def stage_description(stage: Stage, inputs: Inputs) -> dict[str, Any]:
  """What identifies a finished stage; a workdir that holds another one is refused."""
  return {"model": stage.model_name, "method": stage.method.name,
          "num_epochs": stage.num_epochs, "dataset": stage.config.dataset.name,
          "teacher_sha256": inputs.teacher.sha256 if inputs.teacher else None,
          "backbone_sha256": inputs.init_backbone_sha256}


def restore(inputs: Inputs, mngr: Any, state: TrainState, stage_dir: str
            ) -> tuple[TrainState, dict[str, Any]]:
  """The newest intact checkpoint of the stage and its record, else `state` and a new record.

  A damaged newer checkpoint is reported and passed over (checkpoint.restore_latest).
  """
  teacher = inputs.teacher
  workdir = results.workdir_of(stage_dir)
  record = {"best_top1": 0.0, "history": [],
            "teacher_path": results.recorded_path(teacher.path, workdir) if teacher else None,
            "teacher_sha256": teacher.sha256 if teacher else None}
  restored = checkpoint.restore_latest(mngr, jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state))
  if restored is None:
    return state, record
  state, record = restored
  if teacher and record.get("teacher_sha256") != teacher.sha256:
    raise UserError(
        f"{stage_dir} was started with teacher {record.get('teacher_path')!r} "
        f"(sha256 {record.get('teacher_sha256')}) but this run uses {teacher.path!r} "
        f"(sha256 {teacher.sha256}); use a new --workdir")
  return state, record


@dataclasses.dataclass(frozen=True)
class StageSteps:
  """The network of one stage, its jitted steps and the step counts they run for.

  `network` and `eval` are the evaluated network's, the deployed one where the method deploys
  another (Method.deployed); `deploy` maps the trained variables to the evaluated ones (None:
  the same), `export` to the exported ones.
  """
  network: Any
  train: Callable
  eval: Callable
  method_eval: Optional[tuple[str, Callable]]
  steps_per_epoch: int
  total_steps: int
  deploy: Optional[Callable[[Any], Any]] = None

  def evaluated(self, variables: Any) -> Any:
    """The variables of the evaluated network."""
    return variables if self.deploy is None else self.deploy(variables)

  def export(self, variables: Any) -> Any:
    """The variables written to the stage's export file (a method's bridge left out)."""
    return without_bridge(variables) if self.deploy is None else self.deploy(variables)


def deployed_network(stage: Stage, inputs: Inputs, network: Network, constants: Any,
                     mesh: jax.sharding.Mesh, info: data.DatasetInfo
                     ) -> tuple[Any, Optional[Callable[[Any], Any]]]:
  """The network the stage evaluates and exports, and the map from the trained variables to
  its variables: the trained network itself (None), or the method's deployed one."""
  deployed = stage.method.deployed
  if deployed is None:
    return network, None
  teacher = inputs.teacher
  teacher_out = teacher_output_shapes(teacher_network(stage, inputs), teacher.variables,
                                      teacher_image_shape(teacher, info))
  module = deployed.module(network.backbone, teacher_out, info.num_classes, stage.hparams)

  def deploy(variables: Any) -> Any:
    return parallel.replicate(deployed.variables(variables, constants, stage.hparams), mesh)
  return module, deploy


def compile_steps(stage: Stage, inputs: Inputs, network: Network,
                  tx: optax.GradientTransformation, schedule: optax.Schedule,
                  head: Optional[TeacherHeadStep], steps_per_epoch: int,
                  mesh: jax.sharding.Mesh, info: data.DatasetInfo) -> StageSteps:
  """Jits the stage's train step (donating the state), its eval step (of the network it
  deploys) and the method's own."""
  constants, method = teacher_constants(stage, inputs), stage.method
  train = jit_train_step(stage, inputs, network, tx, schedule, head, steps_per_epoch)
  evaluated, deploy = deployed_network(stage, inputs, network, constants, mesh, info)
  method_eval = None
  if method.eval_metrics is not None:
    method_eval = (method.views, jax.jit(functools.partial(
        steps.method_eval_step, network=evaluated, metrics_fn=method.eval_metrics,
        hparams=stage.hparams)))
  return StageSteps(network=evaluated, train=train,
                    eval=jax.jit(functools.partial(steps.eval_step, network=evaluated)),
                    method_eval=method_eval, steps_per_epoch=steps_per_epoch,
                    total_steps=stage.num_epochs * steps_per_epoch, deploy=deploy)


def reuse_stage(stage: Stage, inputs: Inputs, workdir: str) -> dict[str, Any]:
  """The record of a finished stage (its `result.json`), refused if it holds another stage or
  its export does not match the sha256 it recorded."""
  stage_dir = os.path.join(workdir, stage.name)
  result = results.read_result(workdir, stage.name)
  results.check_same_stage(result, stage_description(stage, inputs), stage_dir)
  if result.get("export") and result.get("export_sha256"):
    checkpoint.verify_file(result["export"], f"stage {stage.name}'s export",
                           result["export_sha256"], results.export_remedy(result))
  print(f"[{stage.name}] already done ({os.path.join(stage_dir, results.RESULT_FILE)}): top-1 "
        f"{percent(result['top1_last'])}")
  return result


def run_stage(stage: Stage, inputs: Inputs, workdir: str, mesh: jax.sharding.Mesh,
              info: data.DatasetInfo) -> dict[str, Any]:
  """Trains one stage to the end (resuming if interrupted) and returns its result record; a
  finished stage is not trained again (see reuse_stage).

  The record is also written to `<workdir>/<stage>/result.json`, last, so that its presence
  means the stage is complete. With `stage.export_file`, the final variables are first written
  to that file in the stage directory (how a trained network is handed to the next stages).
  """
  started = time.monotonic()
  stage_dir = os.path.join(workdir, stage.name)
  interrupts.stop_if_requested(stage.name, f"before stage {stage.name} started")
  if paths.exists(os.path.join(stage_dir, results.RESULT_FILE)):
    return reuse_stage(stage, inputs, workdir)
  paths.check_writable(stage_dir, "stage directory",
                       "make it writable, or pass another --workdir")

  config = stage.config
  network = stage.network(info.num_classes, compute_dtype(config), info.num_train)
  steps_per_epoch = data.steps_per_epoch(info, config.batch_size)
  schedule = learning_rate_schedule(config, stage.base_lr, stage.num_epochs, steps_per_epoch,
                                    stage.milestones)
  state, tx, head = initial_state(stage, inputs, network, schedule, mesh, info)
  mngr = checkpoint.manager(os.path.join(stage_dir, "checkpoints"),
                            config.checkpoint_every_steps, config.keep_checkpoints)
  state, record = restore(inputs, mngr, state, stage_dir)
  clock = Stopwatch(record.get(results.WALL_SECONDS, 0.0), started)
  start_step = int(jax.device_get(state.step))
  if start_step:
    print(f"[{stage.name}] resuming from step {start_step} ({mngr.directory})")
  compiled = compile_steps(stage, inputs, network, tx, schedule, head, steps_per_epoch, mesh,
                           info)
  interrupts.stop_if_requested(stage.name, (
      f"before step {start_step + 1}/{compiled.total_steps} "
      f"({checkpoint.stays(checkpoint.saved_steps(str(mngr.directory)), mngr.directory)})"))
  state = train_loop(stage, inputs, compiled, state, record, mngr, mesh, stage_dir, start_step,
                     clock)
  record[results.WALL_SECONDS] = clock.seconds()
  return finish_stage(stage, inputs, compiled, state, record, mngr, mesh, stage_dir)


def _writer(stage_dir: str, start_step: int) -> Any:
  """The stage's metric writer: TensorBoard and `metrics.jsonl` (process 0), logging elsewhere."""
  writer = metric_writers.create_default_writer(
      stage_dir, just_logging=jax.process_index() > 0, asynchronous=False)
  if jax.process_index() == 0:
    writer = metric_writers.MultiWriter(
        [writer, metrics_log.JsonLinesWriter(stage_dir, resume_step=start_step)])
  return writer


def _batches(stage: Stage, inputs: Inputs, mesh: jax.sharding.Mesh, start_step: int,
             total_steps: int) -> Iterator[Any]:
  """The stage's training batches from `start_step` on, on the devices ahead of the step that
  reads them; none read past the stage's last step. Closing it stops the input workers."""
  config, teacher = stage.config, inputs.teacher
  local_batches = data.train_batches(config.dataset, stage.method.views, config.batch_size,
                                     seed=config.seed, start_step=start_step,
                                     process_index=jax.process_index(),
                                     process_count=jax.process_count(),
                                     teacher_input=teacher.input if teacher else None,
                                     num_negatives=stage.num_negatives,
                                     num_workers=config.get("input_workers", 0))
  return parallel.prefetch_to_mesh(
      _take_then_close(local_batches, total_steps - start_step, stage.name, start_step),
      mesh, PREFETCH_BATCHES)


def train_loop(stage: Stage, inputs: Inputs, compiled: StageSteps, state: TrainState,
               record: dict[str, Any], mngr: Any, mesh: jax.sharding.Mesh, stage_dir: str,
               start_step: int, clock: Stopwatch) -> TrainState:
  """Steps `start_step + 1 … total_steps`: logs, evaluations and checkpoints on their cadence.

  However it ends (the last step, divergence, a signal, an error in the input), the input is
  shut down (the prefetched batches, then the input workers), the checkpoint being written is
  finished (a write that failed ends the stage in one line) and the logs are flushed, in that
  order, before it returns or raises. Only a lost process of a multi-process run skips the
  checkpoint, which cannot complete without it (jaxkd.distributed).
  """
  writer = _writer(stage_dir, start_step)
  batches = _batches(stage, inputs, mesh, start_step, compiled.total_steps)
  kept = lambda: checkpoint.stays(checkpoint.saved_steps(str(mngr.directory)), mngr.directory)
  with interrupts.training_stage(stage.name, kept):
    try:
      state = _run_steps(stage, inputs, compiled, state, record, mngr, mesh, stage_dir,
                         start_step, batches, writer, clock)
    except KeyboardInterrupt:
      batches.close()
      raise
    except BaseException as e:
      lost = distributed.lost_process_error(e, interrupts.what_stays)
      _shut_down(batches, mngr, writer, quietly=True, wait=lost is None)
      if lost is not None:
        raise lost from None
      raise
    failed = _shut_down(batches, mngr, writer)
  if failed:
    raise _write_failed(stage.name, mngr, *failed)
  return state


def _shut_down(batches: Any, mngr: Any, writer: Any, quietly: bool = False,
               wait: bool = True) -> Optional[tuple[int, str]]:
  """Closes the input, waits for the checkpoint being written (unless not `wait`), stops the
  checkpoint manager's threads and flushes the logs; returns (step, why) of a checkpoint write
  that failed. With `quietly` (an error is on its way out) a failure here does not replace
  that error."""
  failed = []

  def finish_checkpoint():
    if wait:
      failed.append(checkpoint.finish_writes(mngr))
      checkpoint.close(mngr)

  for action in (batches.close, gc.collect, finish_checkpoint, writer.flush):
    try:
      action()
    except Exception:  # pylint: disable=broad-except
      if not quietly:
        raise
  return failed[0] if failed else None


def _write_failed(stage_name: str, mngr: Any, step: int, why: str) -> UserError:
  """The one line of a checkpoint write that failed (a disk that filled up meanwhile)."""
  steps = checkpoint.saved_steps(str(mngr.directory))  # Waited for: the complete ones.
  return UserError(f"[{stage_name}] the checkpoint of step {step} could not be written ({why}); "
                   f"{checkpoint.stays(steps, mngr.directory)}: free some space and run the "
                   f"same command again to resume from step {steps[-1] if steps else 0}")


def _run_steps(stage: Stage, inputs: Inputs, compiled: StageSteps, state: TrainState,
               record: dict[str, Any], mngr: Any, mesh: jax.sharding.Mesh, stage_dir: str,
               start_step: int, batches: Iterator[Any], writer: Any, clock: Stopwatch
               ) -> TrainState:
  """The steps of train_loop."""
  config = stage.config
  teacher_variables = inputs.teacher.variables if inputs.teacher else None
  total_steps, steps_per_epoch = compiled.total_steps, compiled.steps_per_epoch
  report = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                           every_steps=config.log_every_steps, every_secs=None)
  progress = Progress(stage.name, total_steps, steps_per_epoch, config.batch_size, start_step)
  checkpoint_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  pending: list[dict[str, jax.Array]] = []  # Since the last log line.
  unchecked = divergence.Unchecked(stage.name, mngr)  # Since the last finiteness check.
  eval_every = max(config.eval_every_epochs, 1)
  for step in range(start_step + 1, total_steps + 1):
    state, metrics = compiled.train(state, teacher_variables, next(batches))
    pending.append(metrics)
    unchecked.add(step, metrics)
    report(step)
    if step % config.log_every_steps == 0 or step == total_steps:
      unchecked.check()
      scalars = _mean_metrics(pending)
      pending = []
      writer.write_scalars(step, {f"train/{k}": v for k, v in scalars.items()})
      print(progress.line(step, scalars), flush=True)
    epoch = step // steps_per_epoch
    if stage.scores_top1 and (step == total_steps or (step % steps_per_epoch == 0
                                                      and epoch % eval_every == 0)):
      unchecked.check(state)  # A diverged network is never evaluated, selected or exported.
      evaluate_and_record(stage, compiled, state, record, mngr, mesh, stage_dir, step, epoch,
                          writer)
    signum = interrupts.stop_requested(step, config.log_every_steps)
    if signum or step == total_steps or mngr.should_save(step):
      unchecked.check(state)  # Only finite states are checkpointed.
      _make_room(stage.name, mngr, stage_dir, 2 * checkpoint_bytes)
      record[results.WALL_SECONDS] = clock.seconds()  # Carried over to a run that resumes from it.
      # The config this checkpoint is trained under (rewritten only once there is one).
      stage_config.save(stage, stage_dir, started=mngr.latest_step() is not None)
      checkpoint.save(mngr, step, state, record, force=True)  # The loop decided: save now.
    if signum:
      writer.flush()
      raise interrupts.Interrupted(signum, _stopped_line(stage.name, mngr, signum, step,
                                                        total_steps))
  return state


def _finish_writes(stage_name: str, mngr: Any) -> None:
  """Waits for the checkpoint being written; one that failed ends the stage in one line."""
  failed = checkpoint.finish_writes(mngr)
  if failed:
    raise _write_failed(stage_name, mngr, *failed)


def _make_room(stage_name: str, mngr: Any, stage_dir: str, needed: int) -> None:
  """Before a checkpoint: the one being written is finished (one that failed ends the stage in
  one line), then `needed` bytes must be free (twice the state: orbax writes the new checkpoint
  before it deletes the oldest). The step to resume from is then one complete on disk."""
  _finish_writes(stage_name, mngr)
  paths.check_free_space(stage_dir, needed, (
      f"free some and run the same command again to resume from step {mngr.latest_step() or 0}"))


def _stopped_line(stage_name: str, mngr: Any, signum: int, step: int, total_steps: int) -> str:
  """The line of a stop on a signal at `step`, once its checkpoint is written or failed."""
  where = f"[{stage_name}] {interrupts.signal_name(signum)} at step {step}/{total_steps}: "
  failed = checkpoint.finish_writes(mngr)
  if not failed:
    return (f"{where}checkpoint written to {mngr.directory}; run the same command again to "
            "resume")
  steps = checkpoint.committed_steps(mngr)
  return (f"{where}its checkpoint could not be written ({failed[1]}); "
          f"{checkpoint.stays(steps, mngr.directory)}; run the same command again to resume "
          "from it")


def _take_then_close(batches: Iterator[Any], num: int, stage_name: str = "",
                     start_step: int = 0) -> Iterator[Any]:
  """The first `num` of `batches`, which are then closed (input workers stop at once). An error
  raised while a batch is made (in a thread or an input worker: a damaged image file, ...)
  becomes one line naming the stage and the step."""
  try:
    for step in range(start_step + 1, start_step + num + 1):
      try:
        batch = next(batches)
      except StopIteration:
        return
      except UserError:
        raise
      except Exception as e:  # pylint: disable=broad-except  (the input's errors: one line)
        where = f"[{stage_name}] " if stage_name else ""
        raise UserError(
            f"{where}the input pipeline failed making the batch of step {step}: "
            f"{type(e).__name__}: {' '.join(str(e).split())}; the last checkpoint stays: fix "
            "the data and run the same command again to resume") from None
      yield batch
  finally:
    close = getattr(batches, "close", None)
    if close is not None:
      close()


def evaluate_and_record(stage: Stage, compiled: StageSteps, state: TrainState,
                        record: dict[str, Any], mngr: Any, mesh: jax.sharding.Mesh,
                        stage_dir: str, step: int, epoch: int, writer: Any) -> None:
  """One evaluation: logged, added to the record, and the selected variables kept if best."""
  # A background checkpoint write must not overlap opening a split: tfds' mock data
  # redirects file access while it does.
  _finish_writes(stage.name, mngr)
  scores = evaluate(compiled.network, compiled.evaluated(variables_of(state)), stage.config,
                    mesh, compiled.eval, compiled.method_eval)
  record["best_top1"] = max(record["best_top1"], scores["top1"])
  record["history"].append({"step": step, "epoch": epoch, **scores})
  export_file = stage.export_file
  selected = stage.select(scores, stage.hparams) if stage.select and export_file else None
  if selected is not None and selected > record.get("selected_score", -float("inf")):
    # Written before the checkpoint that records it, so a resumed run never loses it.
    record["selected_score"], record["selected_step"] = selected, step
    checkpoint.export_variables(os.path.join(stage_dir, "best_" + export_file),
                                compiled.export(variables_of(state)))
  writer.write_scalars(step, {**{f"eval/{k}": v for k, v in scores.items()},
                              "eval/top1_best": record["best_top1"]})
  print(f"[{stage.name}] epoch {epoch} eval top-1 {scores['top1']:.2f} "
        f"top-5 {scores['top5']:.2f} (best {record['best_top1']:.2f})", flush=True)


def _scores(stage: Stage, compiled: StageSteps, state: TrainState, record: dict[str, Any],
            mesh: jax.sharding.Mesh) -> dict[str, Any]:
  """The result's top-1 fields: the last evaluation's (or one now), or none without a
  classifier."""
  if not stage.scores_top1:
    return dict(top1_last=None, top5_last=None, top1_best=None, note=NO_CLASSIFIER_NOTE)
  last = record["history"][-1] if record["history"] else evaluate(
      compiled.network, compiled.evaluated(variables_of(state)), stage.config, mesh,
      compiled.eval, compiled.method_eval)
  return dict(top1_last=last["top1"], top5_last=last["top5"],
              top1_best=max(record["best_top1"], last["top1"]),
              eval_last={k: v for k, v in last.items() if k not in ("step", "epoch")})


def finish_stage(stage: Stage, inputs: Inputs, compiled: StageSteps, state: TrainState,
                 record: dict[str, Any], mngr: Any, mesh: jax.sharding.Mesh, stage_dir: str
                 ) -> dict[str, Any]:
  """The stage's result record, written last (after the exported variables, if any), for
  variables that are finite (else Diverged: nothing is exported).

  Returned with its paths as this run reaches them; written with those inside the workdir
  relative to it (jaxkd.results).
  """
  divergence.check_final(stage.name, variables_of(state), compiled.total_steps,
                         str(mngr.directory))
  stage_config.save(stage, stage_dir, started=mngr.latest_step() is not None)
  result = dict(stage_description(stage, inputs), stage=stage.name,
                steps=compiled.total_steps, checkpoints=os.path.join(stage_dir, "checkpoints"),
                logdir=stage_dir, **_scores(stage, compiled, state, record, mesh))
  result[results.WALL_SECONDS] = record.get(results.WALL_SECONDS)
  if inputs.teacher is not None:
    result["teacher_path"] = inputs.teacher.path
  if stage.export_file is not None:
    result["export"] = os.path.join(stage_dir, stage.export_file)
    result["export_sha256"] = checkpoint.export_variables(result["export"],
                                                          compiled.export(variables_of(state)))
    if "selected_step" in record:
      result["export"] = os.path.join(stage_dir, "best_" + stage.export_file)
      result["export_sha256"] = checkpoint.file_sha256(result["export"])
      result.update(selected_score=record["selected_score"],
                    selected_step=record["selected_step"])
  if stage.backbone_file is not None:
    checkpoint.export_variables(os.path.join(stage_dir, stage.backbone_file),
                                backbone_only(compiled.export(variables_of(state))))
  return results.write_result(stage_dir, result)


def _mean_metrics(pending: list[dict[str, jax.Array]]) -> dict[str, float]:
  host = jax.device_get(pending)
  return {k: float(np.mean([m[k] for m in host])) for k in host[0]}
