"""The loop that runs one stage: its network and state, the jitted steps, evaluation,
checkpoints, logs and the result record.

A stage is data (`Stage`): which network learns with which loss, on which views, for how long,
from which initial variables and beside which frozen teacher. `run_stage` trains it to the end,
resuming from its last checkpoint, and writes `result.json` last.
"""

import dataclasses
import functools
import itertools
import os
import time
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metric_writers
from clu import periodic_actions
from etils import epath

from jaxkd import checkpoint
from jaxkd import data
from jaxkd import divergence
from jaxkd import interrupts
from jaxkd import metrics_log
from jaxkd import parallel
from jaxkd import paths
from jaxkd import results
from jaxkd import stage_config
from jaxkd import steps
from jaxkd.data import teacher_views
from jaxkd.errors import UserError
from jaxkd.methods.base import (BridgeFactory, EvalMetricsFn, HeadsFactory, LossFn,
                                OnlineTeacherHead)
from jaxkd.networks import (backbone_only, build_network, compute_dtype, feature_parameters,
                            init_variables, read_variables, run_once_options,
                            teacher_output_shapes, without_bridge)
from jaxkd.optim import learning_rate_schedule, make_optimizer
from jaxkd.results import RESULT_FILE
from jaxkd.state import Network, TrainState, variables_of
from jaxkd.steps import TeacherHeadStep

TEACHER_FILE = "teacher.msgpack"
STUDENT_FILE = "student.msgpack"
BACKBONE_FILE = "backbone.msgpack"
# Training batches transferred to the devices ahead of the step that reads them.
PREFETCH_BATCHES = 2
NO_CLASSIFIER_NOTE = ("no classifier is trained in this stage, so it has no top-1; its features "
                      "are judged by the stages that use them (e.g. linear_probe)")


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A frozen teacher: its network, its variables (replicated) and where they came from.

  `input`: how the teacher sees an image when it needs a view of its own (a CLIP tower: 224 px,
  CLIP statistics); the pipeline then adds `teacher_image` to the batch. None: the student's.
  """
  network: Network
  variables: Any
  path: str
  sha256: str
  input: Optional[teacher_views.TeacherInput] = None


@dataclasses.dataclass(frozen=True)
class Stage:
  """One training stage: which network learns with which loss, on which views, for how long.

  `init_backbone`: variables loaded into the backbone before training and kept frozen (the
  backbone then runs in inference mode and only the heads learn).
  `online_teacher_head`: a head trained on the frozen `teacher` beside the student (its
  parameters and optimiser state live in the train state's `teacher_head`).
  `backbone_num_classes`: classes of the backbone's own classifier when they differ from the
  stage's dataset (a linear probe on another dataset keeps the student's backbone as it is).
  `scores_top1`: False for a stage that trains no classifier (self-supervised pretraining): the
  top-1 of its network would mean nothing, so it is not evaluated and its result says so.
  `bridge`, `num_negatives`: a method's bridge factory and negatives per example (Method.bridge,
  Method.negatives).
  `freeze_backbone`: False starts the backbone from `init_backbone` and trains it (a student
  after its preparation stage).
  `features_only`: only the backbone's parameters that its taps depend on learn (and the heads
  and bridge); the classifier keeps its initial values (a student preparation stage).
  `preact`: both networks give their stage taps before the last ReLU (Method.preact).
  """
  name: str
  model_name: str
  method_name: str
  loss: LossFn
  hparams: ml_collections.ConfigDict
  num_epochs: int
  base_lr: float
  views: str = "none"
  heads: Optional[HeadsFactory] = None
  milestones: Optional[tuple[float, ...]] = None
  teacher: Optional[Teacher] = None
  init_backbone: Optional[Any] = None
  init_backbone_sha256: Optional[str] = None
  eval_metrics: Optional[EvalMetricsFn] = None
  select: Optional[Callable[[dict[str, float], ml_collections.ConfigDict], Optional[float]]] = None
  online_teacher_head: Optional[OnlineTeacherHead] = None
  backbone_num_classes: Optional[int] = None
  scores_top1: bool = True
  bridge: Optional[BridgeFactory] = None
  num_negatives: int = 0
  freeze_backbone: bool = True
  features_only: bool = False
  preact: bool = False

  def network(self, num_classes: int, dtype: Any = jnp.float32,
              num_train: Optional[int] = None) -> Network:
    """The stage's network; the method's bridge too when `num_train` (training) is given."""
    network = build_network(self.model_name, num_classes, self.heads, self.hparams, dtype,
                            self.backbone_num_classes)
    bridge = self.bridge(num_train, self.hparams) if self.bridge and num_train else None
    frozen = self.init_backbone is not None and self.freeze_backbone
    return network.clone(frozen_backbone=frozen, bridge=bridge, preact=self.preact)

  def teacher_network(self) -> Optional[Network]:
    """The frozen teacher's network as this stage runs it (its taps pre-activation with
    `preact`)."""
    if self.teacher is None:
      return None
    return self.teacher.network.clone(preact=self.preact) if self.preact else self.teacher.network


def teacher_image_shape(teacher: Teacher, info: data.DatasetInfo) -> tuple[int, ...]:
  """[H, W, C] of the images the teacher reads: its own view's, else the dataset's."""
  if teacher.input is None:
    return tuple(info.image_shape)
  return teacher_views.teacher_view_shape(info, teacher.input)


def init_teacher_head(head: OnlineTeacherHead, teacher: Teacher,
                      hparams: ml_collections.ConfigDict, info: data.DatasetInfo, seed: int,
                      mesh: jax.sharding.Mesh) -> tuple[TeacherHeadStep, dict[str, Any]]:
  """The head's step and its initial {'params', 'opt_state'}, replicated over the mesh."""
  step = TeacherHeadStep(module=head.heads(info.num_classes, hparams, teacher.network.backbone),
                         loss=head.loss, tx=head.optimizer(hparams))
  shape = (1,) + teacher_image_shape(teacher, info)
  teacher_out = jax.eval_shape(
      lambda v: teacher.network.apply(v, jnp.zeros(shape, jnp.float32), train=False),
      teacher.variables)

  @functools.partial(jax.jit, out_shardings=parallel.replicated(mesh),
                     compiler_options=run_once_options(mesh))
  def init(rng):
    sample = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), teacher_out)
    params = step.module.init(rng, sample, train=False)["params"]
    return {"params": params, "opt_state": step.tx.init(params)}

  # Its own stream of the run's seed, so the student's initialisation does not change.
  return step, dict(init(jax.random.fold_in(jax.random.key(seed), 1)))


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
  totals = _eval_sums(eval_fn, variables, config, "none", mesh)
  n = max(totals.pop("count"), 1.0)
  scores = {key: 100.0 * value / n for key, value in totals.items()}
  if method_eval is not None:
    views, fn = method_eval
    extra = _eval_sums(fn, variables, config, views, mesh)
    n = max(extra.pop("count"), 1.0)
    scores.update({key: 100.0 * value / n for key, value in extra.items()})
  return scores


def _format_seconds(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
  """One line per log interval: step, epoch, loss, steps/s, images/s and ETA."""

  def __init__(self, stage: str, total_steps: int, steps_per_epoch: int, batch_size: int,
               start_step: int):
    self.stage, self.total, self.per_epoch = stage, total_steps, steps_per_epoch
    self.batch_size = batch_size
    self.last_step, self.last_time = start_step, time.perf_counter()

  def line(self, step: int, scalars: dict[str, float]) -> str:
    now = time.perf_counter()
    rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    epoch = (step - 1) // self.per_epoch + 1
    eta = (self.total - step) / max(rate, 1e-9)
    return (f"[{self.stage}] step {step}/{self.total} epoch {epoch}/"
            f"{-(-self.total // self.per_epoch)} loss {scalars.get('loss', float('nan')):.4f} | "
            f"{rate:.2f} steps/s {rate * self.batch_size:.0f} img/s | ETA {_format_seconds(eta)}")


def stage_description(stage: Stage, config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What identifies a finished stage; a workdir that holds another one is refused."""
  return {"model": stage.model_name, "method": stage.method_name,
          "num_epochs": stage.num_epochs, "dataset": config.dataset.name,
          "teacher_sha256": stage.teacher.sha256 if stage.teacher else None,
          "backbone_sha256": stage.init_backbone_sha256}


def frozen_parameters(stage: Stage, network: Network, variables: Any,
                      info: data.DatasetInfo) -> Optional[Any]:
  """A prefix of the params with True where they must not change in this stage, or None."""
  if stage.features_only:
    backbone = {col: tree["backbone"] for col, tree in variables.items()}
    used = feature_parameters(network.backbone, backbone, info.image_shape)
    frozen = {name: False for name in variables["params"]}
    frozen["backbone"] = jax.tree.map(lambda u: not u, used)
    return frozen
  if stage.init_backbone is not None and stage.freeze_backbone:
    return {name: name == "backbone" for name in variables["params"]}
  return None


def initial_state(stage: Stage, network: Network, config: ml_collections.ConfigDict,
                  schedule: optax.Schedule, mesh: jax.sharding.Mesh, info: data.DatasetInfo
                  ) -> tuple[TrainState, optax.GradientTransformation, Optional[TeacherHeadStep]]:
  """The stage's first train state (replicated), its optimiser and its online teacher head."""
  teacher_out = None
  if stage.bridge is not None and stage.teacher is not None and not stage.online_teacher_head:
    teacher_out = teacher_output_shapes(stage.teacher_network(), stage.teacher.variables,
                                        teacher_image_shape(stage.teacher, info))
  variables = init_variables(network, info.image_shape, config.seed, mesh, teacher_out)
  if stage.init_backbone is not None:
    # Copies: the train step donates the state, and the frozen teacher is used again later.
    loaded = jax.tree.map(jnp.copy, backbone_only(stage.init_backbone))
    variables = {col: dict(tree, backbone=loaded[col]["backbone"])
                 for col, tree in variables.items()}
  tx = make_optimizer(config, schedule, frozen_parameters(stage, network, variables, info))
  params, batch_stats = variables["params"], variables.get("batch_stats", {})
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                     opt_state=jax.jit(tx.init, out_shardings=parallel.replicated(mesh))(params))
  head = None
  if stage.online_teacher_head is not None:
    head, head_state = init_teacher_head(stage.online_teacher_head, stage.teacher, stage.hparams,
                                         info, config.seed, mesh)
    state = state.replace(teacher_head=head_state)
  return parallel.replicate(state, mesh), tx, head


def restore(stage: Stage, mngr: Any, state: TrainState, stage_dir: str
            ) -> tuple[TrainState, dict[str, Any]]:
  """The newest intact checkpoint of the stage and its record, else `state` and a new record.

  A damaged newer checkpoint is reported and passed over (checkpoint.restore_latest).
  """
  teacher = stage.teacher
  workdir = results.workdir_of(stage_dir)
  record = {"best_top1": 0.0, "history": [],
            "teacher_path": results.recorded_path(teacher.path, workdir) if teacher else None,
            "teacher_sha256": teacher.sha256 if teacher else None}
  restored = checkpoint.restore_latest(mngr, jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state))
  if restored is None:
    return state, record
  state, record = restored
  if stage.teacher and record.get("teacher_sha256") != stage.teacher.sha256:
    raise UserError(
        f"{stage_dir} was started with teacher {record.get('teacher_path')!r} "
        f"(sha256 {record.get('teacher_sha256')}) but this run uses {stage.teacher.path!r} "
        f"(sha256 {stage.teacher.sha256}); use a new --workdir")
  return state, record


@dataclasses.dataclass(frozen=True)
class StageSteps:
  """The network of one stage, its jitted steps and the step counts they run for."""
  network: Network
  train: Callable
  eval: Callable
  method_eval: Optional[tuple[str, Callable]]
  steps_per_epoch: int
  total_steps: int


def compile_steps(stage: Stage, network: Network, tx: optax.GradientTransformation,
                  schedule: optax.Schedule, head: Optional[TeacherHeadStep],
                  steps_per_epoch: int) -> StageSteps:
  """Jits the stage's train step (donating the state), its eval step and the method's own."""
  train = jax.jit(
      functools.partial(steps.train_step, network=network,
                        teacher_network=stage.teacher_network(), loss=stage.loss,
                        hparams=stage.hparams, tx=tx, schedule=schedule,
                        steps_per_epoch=steps_per_epoch, teacher_head=head),
      donate_argnums=(0,), compiler_options=parallel.step_compiler_options())
  method_eval = None
  if stage.eval_metrics is not None:
    method_eval = (stage.views, jax.jit(functools.partial(
        steps.method_eval_step, network=network, metrics_fn=stage.eval_metrics,
        hparams=stage.hparams)))
  return StageSteps(network=network, train=train, eval=jax.jit(functools.partial(steps.eval_step,
                                                                network=network)),
                    method_eval=method_eval, steps_per_epoch=steps_per_epoch,
                    total_steps=stage.num_epochs * steps_per_epoch)


def run_stage(stage: Stage, config: ml_collections.ConfigDict, workdir: str,
              mesh: jax.sharding.Mesh, info: data.DatasetInfo,
              export_file: Optional[str] = None) -> dict[str, Any]:
  """Trains one stage to the end (resuming if interrupted) and returns its result record.

  The record is also written to `<workdir>/<stage>/result.json`, last, so that its presence
  means the stage is complete. With `export_file`, the final variables are first written to
  that file in the stage directory (how a trained teacher is handed to the next stages).
  """
  stage_dir = os.path.join(workdir, stage.name)
  result_path = os.path.join(stage_dir, RESULT_FILE)
  description = stage_description(stage, config)
  stop_if_interrupted(stage.name, f"before stage {stage.name} started")
  if epath.Path(result_path).exists():
    result = results.read_result(workdir, stage.name)
    results.check_same_stage(result, description, stage_dir)
    stage_config.check(stage, config, stage_dir)
    print(f"[{stage.name}] already done ({result_path}): top-1 {_percent(result['top1_last'])}")
    return result
  paths.check_writable(stage_dir, "stage directory",
                       "make it writable, or pass another --workdir")
  stage_config.check_and_save(stage, config, stage_dir,
                              started=_has_checkpoint(os.path.join(stage_dir, "checkpoints")))

  network = stage.network(info.num_classes, compute_dtype(config), info.num_train)
  steps_per_epoch = data.steps_per_epoch(info, config.batch_size)
  schedule = learning_rate_schedule(config, stage.base_lr, stage.num_epochs, steps_per_epoch,
                                    stage.milestones)
  state, tx, head = initial_state(stage, network, config, schedule, mesh, info)
  mngr = checkpoint.manager(os.path.join(stage_dir, "checkpoints"),
                            config.checkpoint_every_steps, config.keep_checkpoints)
  state, record = restore(stage, mngr, state, stage_dir)
  start_step = int(jax.device_get(state.step))
  if start_step:
    print(f"[{stage.name}] resuming from step {start_step} ({mngr.directory})")
  compiled = compile_steps(stage, network, tx, schedule, head, steps_per_epoch)
  state = train_loop(stage, compiled, state, record, mngr, config, mesh, stage_dir, start_step,
                     export_file)
  return finish_stage(stage, compiled, state, record, mngr, config, mesh, stage_dir,
                      description, export_file)


def train_loop(stage: Stage, compiled: StageSteps, state: TrainState, record: dict[str, Any],
               mngr: Any, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
               stage_dir: str, start_step: int, export_file: Optional[str]) -> TrainState:
  """Steps `start_step + 1 … total_steps`: logs, evaluations and checkpoints on their cadence."""
  teacher = stage.teacher
  teacher_variables = teacher.variables if teacher else None
  total_steps, steps_per_epoch = compiled.total_steps, compiled.steps_per_epoch
  writer = metric_writers.create_default_writer(
      stage_dir, just_logging=jax.process_index() > 0, asynchronous=False)
  if jax.process_index() == 0:
    writer = metric_writers.MultiWriter(
        [writer, metrics_log.JsonLinesWriter(stage_dir, resume_step=start_step)])
  report = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                           every_steps=config.log_every_steps, every_secs=None)
  progress = Progress(stage.name, total_steps, steps_per_epoch, config.batch_size, start_step)
  local_batches = data.train_batches(config.dataset, stage.views, config.batch_size,
                                     seed=config.seed, start_step=start_step,
                                     process_index=jax.process_index(),
                                     process_count=jax.process_count(),
                                     teacher_input=teacher.input if teacher else None,
                                     num_negatives=stage.num_negatives,
                                     num_workers=config.get("input_workers", 0))
  # On the devices ahead of the step that reads them; none read past the stage's last step.
  batches = parallel.prefetch_to_mesh(_take_then_close(local_batches, total_steps - start_step),
                                      mesh, PREFETCH_BATCHES)
  checkpoint_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  pending: list[dict[str, jax.Array]] = []  # Since the last log line.
  unchecked = divergence.Unchecked(stage.name, mngr)  # Since the last finiteness check.
  eval_every = max(config.eval_every_epochs, 1)
  for step in range(start_step + 1, total_steps + 1):
    batch = next(batches)
    state, metrics = compiled.train(state, teacher_variables, batch)
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
      unchecked.check()  # A diverged network is never evaluated, selected or exported.
      evaluate_and_record(stage, compiled, state, record, mngr, config, mesh, stage_dir, step,
                          epoch, writer, export_file)
    signum = interrupts.stop_requested(step, config.log_every_steps)
    if signum or step == total_steps or mngr.should_save(step):
      unchecked.check()  # Only finite states are checkpointed.
      # Twice the state: orbax writes the new checkpoint before it deletes the oldest.
      paths.check_free_space(stage_dir, 2 * checkpoint_bytes, (
          f"free some and run the same command again to resume from step "
          f"{mngr.latest_step() or 0}"))
      checkpoint.save(mngr, step, state, record, force=True)  # The loop decided: save now.
    if signum:
      mngr.wait_until_finished()
      writer.flush()
      raise interrupts.Interrupted(signum, (
          f"[{stage.name}] {interrupts.signal_name(signum)} at step {step}/{total_steps}: "
          f"checkpoint written to {mngr.directory}; run the same command again to resume"))
  mngr.wait_until_finished()
  writer.flush()
  return state


def _take_then_close(batches: Iterator[Any], num: int) -> Iterator[Any]:
  """The first `num` of `batches`, which are then closed (input workers stop at once)."""
  try:
    yield from itertools.islice(batches, num)
  finally:
    close = getattr(batches, "close", None)
    if close is not None:
      close()


def evaluate_and_record(stage: Stage, compiled: StageSteps, state: TrainState,
                        record: dict[str, Any], mngr: Any, config: ml_collections.ConfigDict,
                        mesh: jax.sharding.Mesh, stage_dir: str, step: int, epoch: int,
                        writer: Any, export_file: Optional[str]) -> None:
  """One evaluation: logged, added to the record, and the selected variables kept if best."""
  # A background checkpoint write must not overlap opening a split: tfds' mock data
  # redirects file access while it does.
  mngr.wait_until_finished()
  scores = evaluate(compiled.network, variables_of(state), config, mesh, compiled.eval,
                    compiled.method_eval)
  record["best_top1"] = max(record["best_top1"], scores["top1"])
  record["history"].append({"step": step, "epoch": epoch, **scores})
  selected = stage.select(scores, stage.hparams) if stage.select and export_file else None
  if selected is not None and selected > record.get("selected_score", -float("inf")):
    # Written before the checkpoint that records it, so a resumed run never loses it.
    record["selected_score"], record["selected_step"] = selected, step
    checkpoint.export_variables(os.path.join(stage_dir, "best_" + export_file),
                                without_bridge(variables_of(state)))
  writer.write_scalars(step, {**{f"eval/{k}": v for k, v in scores.items()},
                              "eval/top1_best": record["best_top1"]})
  print(f"[{stage.name}] epoch {epoch} eval top-1 {scores['top1']:.2f} "
        f"top-5 {scores['top5']:.2f} (best {record['best_top1']:.2f})", flush=True)


def finish_stage(stage: Stage, compiled: StageSteps, state: TrainState, record: dict[str, Any],
                 mngr: Any, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                 stage_dir: str, description: dict[str, Any], export_file: Optional[str]
                 ) -> dict[str, Any]:
  """The stage's result record, written last (after the exported variables, if any).

  Returned with its paths as this run reaches them; written with those inside the workdir
  relative to it (jaxkd.results).
  """
  common = dict(description, stage=stage.name, steps=compiled.total_steps,
                checkpoints=os.path.join(stage_dir, "checkpoints"), logdir=stage_dir)
  if stage.scores_top1:
    last = record["history"][-1] if record["history"] else evaluate(
        compiled.network, variables_of(state), config, mesh, compiled.eval,
        compiled.method_eval)
    result = dict(common, top1_last=last["top1"], top5_last=last["top5"],
                  top1_best=max(record["best_top1"], last["top1"]),
                  eval_last={k: v for k, v in last.items() if k not in ("step", "epoch")})
  else:
    result = dict(common, top1_last=None, top5_last=None, top1_best=None,
                  note=NO_CLASSIFIER_NOTE)
  if stage.teacher is not None:
    result["teacher_path"] = stage.teacher.path
  if export_file is not None:
    result["export"] = os.path.join(stage_dir, export_file)
    result["export_sha256"] = checkpoint.export_variables(result["export"],
                                                          without_bridge(variables_of(state)))
    if "selected_step" in record:
      result["export"] = os.path.join(stage_dir, "best_" + export_file)
      result["export_sha256"] = checkpoint.file_sha256(result["export"])
      result.update(selected_score=record["selected_score"],
                    selected_step=record["selected_step"])
  return results.write_result(stage_dir, result)


def _percent(value: Optional[float]) -> str:
  """A top-1 / top-5 for printing; '-' where a stage has none (no classifier trained)."""
  return "-" if value is None else f"{value:.2f}"


def _mean_metrics(pending: list[dict[str, jax.Array]]) -> dict[str, float]:
  host = jax.device_get(pending)
  return {k: float(np.mean([m[k] for m in host])) for k in host[0]}


def _has_checkpoint(directory: str) -> bool:
  """Whether orbax has saved any step in `directory` (a started stage)."""
  path = epath.Path(directory)
  return path.exists() and any(child.name.isdigit() for child in path.iterdir())


def stop_if_interrupted(stage_name: str, where: str) -> None:
  """Raises Interrupted when a signal came while no stage was training (every process)."""
  signum = interrupts.stop_requested(0, 1)
  if signum:
    raise interrupts.Interrupted(signum, f"[{stage_name}] {interrupts.signal_name(signum)} "
                                 f"{where}; run the same command again to go on")




def load_teacher(network: Network, path: str, info: data.DatasetInfo,
                 mesh: jax.sharding.Mesh, sha256: Optional[str] = None, remedy: str = "",
                 what: str = "teacher checkpoint") -> Teacher:
  """A frozen teacher from a jaxkd variables file, checked against the network's tree.

  With `sha256` the file must have that checksum (see checkpoint.read_verified).
  """
  variables = parallel.replicate(
      read_variables(network, path, info.image_shape, what, sha256, remedy), mesh)
  return Teacher(network=network, variables=variables, path=path,
                 sha256=sha256 or checkpoint.file_sha256(path))


def load_export(network: Network, result: dict[str, Any], info: data.DatasetInfo,
                mesh: jax.sharding.Mesh) -> Teacher:
  """The variables a finished stage exported (its `result`, paths resolved), as a frozen
  teacher; refused unless the file has the sha256 the stage recorded, with the rerun that
  writes it again: the stage finished again from its last checkpoint, or (a `best_` file,
  which no checkpoint keeps) trained again."""
  stage_dir, export = result["logdir"], result["export"]
  if os.path.basename(export).startswith("best_"):
    remedy = f"remove {stage_dir} and rerun (stage {result['stage']} is trained again)"
  else:
    remedy = (f"remove {os.path.join(stage_dir, RESULT_FILE)} and rerun (stage "
              f"{result['stage']} is finished again from its last checkpoint)")
  return load_teacher(network, export, info, mesh, sha256=result.get("export_sha256"),
                      remedy=remedy, what=f"stage {result['stage']}'s export")
