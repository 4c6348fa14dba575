"""Training and evaluation: the stages of one run, the jitted steps, checkpoints and logs.

A run is a sequence of stages, each in its own sub-directory of the workdir and each skipped
when its `result.json` exists:

  teacher            train the teacher with cross-entropy (unless --config.teacher.checkpoint;
                     a CLIP teacher is always loaded from it, never trained)
  pretrain           instead of `teacher` with --config.teacher.pretrain=simclr: the teacher
                     trained without labels; its backbone is the frozen teacher
  teacher_<method>   for a method that prepares its teacher: its heads trained on the frozen
                     teacher (or backbone and heads jointly, replacing `teacher`)
  student_<method>   distil the student with `config.method`, then each `config.baselines`
                     method (e.g. `ce`: the student trained alone), for the final table
  linear_probe       with --config.linear_probe.dataset: a linear classifier on the frozen
                     features of the `config.method` student

The trainer never branches on a method: it asks the method registry for the views, the heads
and the pure losses, and runs the same step for all of them.
"""

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable, Optional

import jax
import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metric_writers
from clu import periodic_actions
from etils import epath

from jaxkd import checkpoint
from jaxkd import data
from jaxkd import models
from jaxkd import parallel
from jaxkd import paths
from jaxkd.data import teacher_views
from jaxkd.interop import clip_weights
from jaxkd.models import clip
from jaxkd.models import layers
from jaxkd.errors import UserError
from jaxkd.methods import Method, get_method
from jaxkd.methods.base import (BridgeFactory, EvalMetricsFn, HeadsFactory, LossFn,
                                OnlineTeacherHead)
from jaxkd.methods.losses import topk_correct
from jaxkd.optim import learning_rate_schedule, make_optimizer
from jaxkd.state import Network, TrainState, variables_of

RESULT_FILE = "result.json"
TEACHER_FILE = "teacher.msgpack"
STUDENT_FILE = "student.msgpack"
BACKBONE_FILE = "backbone.msgpack"
NO_CLASSIFIER_NOTE = ("no classifier is trained in this stage, so it has no top-1; its features "
                      "are judged by the stages that use them (e.g. linear_probe)")


def compute_dtype(config: ml_collections.ConfigDict) -> Any:
  """bfloat16 with --config.half_precision (params, optimiser state and losses stay float32)."""
  return jnp.bfloat16 if config.get("half_precision", False) else jnp.float32


def backbone_only(variables: Any) -> Any:
  """The 'backbone' subtree of every collection: a network's variables without its heads."""
  return {col: {"backbone": tree["backbone"]} for col, tree in variables.items()}


def without_bridge(variables: Any) -> Any:
  """A network's variables without a method's bridge (what is exported as the network)."""
  return {col: {k: v for k, v in tree.items() if k != "bridge"}
          for col, tree in variables.items()}


def teacher_lr(config: ml_collections.ConfigDict) -> float:
  """`teacher.lr`, or `optimizer.lr` where it is −1."""
  lr = config.teacher.get("lr", -1.0)
  return lr if lr > 0 else config.optimizer.lr


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

  def network(self, num_classes: int, dtype: Any = jnp.float32,
              num_train: Optional[int] = None) -> Network:
    """The stage's network; the method's bridge too when `num_train` (training) is given."""
    network = build_network(self.model_name, num_classes, self.heads, self.hparams, dtype,
                            self.backbone_num_classes)
    bridge = self.bridge(num_train, self.hparams) if self.bridge and num_train else None
    return network.clone(frozen_backbone=self.init_backbone is not None, bridge=bridge)


# --------------------------------------------------------------------------------------------
# Pure steps.


def flatten_views(images: jax.Array) -> jax.Array:
  """[B, V, H, W, C] -> [B·V, H, W, C] with row V·i + k = image i, view k; [B, H, W, C] as is."""
  return images.reshape((-1,) + images.shape[-3:]) if images.ndim == 5 else images


@dataclasses.dataclass(frozen=True)
class TeacherHeadStep:
  """A method's online teacher head as one stage uses it: the module, its loss, its optimiser."""
  module: Any
  loss: LossFn
  tx: optax.GradientTransformation


def teacher_head_step(head: TeacherHeadStep, head_state: dict[str, Any], teacher_out: Any,
                      labels: jax.Array, hparams: ml_collections.ConfigDict
                      ) -> tuple[Any, dict[str, Any], dict[str, jax.Array]]:
  """The head's outputs at its current parameters θ, and one step of its own optimiser:

  out = teacher_out ∪ head_θ(teacher_out);  θ ← θ + update(∇_θ L_head(out, y))

  Returns (out, the head's next {'params', 'opt_state'}, its metrics). `out` is computed with
  the pre-update θ and carries no gradient: the student reads it as a constant, and nothing of
  the student's loss reaches θ.
  """
  def loss_fn(params):
    out = dict(teacher_out)
    out.update(head.module.apply({"params": params}, teacher_out, train=True))
    value, metrics = head.loss(out, None, labels, hparams)
    return value, (out, metrics)

  params, opt_state = head_state["params"], head_state["opt_state"]
  grads, (out, metrics) = jax.grad(loss_fn, has_aux=True)(params)
  updates, opt_state = head.tx.update(grads, opt_state, params)
  next_state = {"params": optax.apply_updates(params, updates), "opt_state": opt_state}
  return jax.lax.stop_gradient(out), next_state, metrics


def train_step(state: TrainState, teacher_variables: Any, batch: dict[str, jax.Array], *,
               network: Network, teacher_network: Optional[Network], loss: LossFn,
               hparams: ml_collections.ConfigDict, tx: optax.GradientTransformation,
               schedule: optax.Schedule, teacher_head: Optional[TeacherHeadStep] = None
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One SGD step of the student on a global batch; the teacher runs in inference mode.

  The teacher reads `batch['teacher_image']` when the pipeline gives it its own view, else the
  student's images. With `teacher_head`, the head on the frozen teacher gives the teacher
  outputs and takes its own step (see teacher_head_step), in the same step as the student.
  """
  images = flatten_views(batch["image"])
  teacher_out = None
  head_state, head_metrics = state.teacher_head, {}
  if teacher_network is not None:
    teacher_images = flatten_views(batch.get("teacher_image", batch["image"]))
    teacher_out = jax.lax.stop_gradient(
        teacher_network.apply(teacher_variables, teacher_images, train=False))
    if teacher_head is not None:
      teacher_out, head_state, head_metrics = teacher_head_step(
          teacher_head, state.teacher_head, teacher_out, batch["label"], hparams)

  def loss_fn(params):
    out, updates = network.apply({"params": params, "batch_stats": state.batch_stats}, images,
                                 train=True, teacher_out=teacher_out, batch=batch,
                                 mutable=["batch_stats"])
    value, metrics = loss(out, teacher_out, batch["label"], hparams)
    return value, (metrics, updates["batch_stats"])

  grads, (metrics, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(metrics, **head_metrics, lr=schedule(state.step))
  return TrainState(step=state.step + 1, params=params, batch_stats=batch_stats,
                    opt_state=opt_state, teacher_head=head_state), metrics


def eval_step(variables: Any, batch: dict[str, jax.Array], *, network: Network
              ) -> dict[str, jax.Array]:
  """Counts of top-1 / top-5 hits over the real (mask = 1) rows of an eval batch."""
  logits = network.apply(variables, batch["image"], train=False)["logits"]
  mask = batch["mask"]
  k5 = min(5, logits.shape[-1])
  return {"top1": jnp.sum(topk_correct(logits, batch["label"], 1) * mask),
          "top5": jnp.sum(topk_correct(logits, batch["label"], k5) * mask),
          "count": jnp.sum(mask)}


def method_eval_step(variables: Any, batch: dict[str, jax.Array], *, network: Network,
                     metrics_fn: EvalMetricsFn, hparams: ml_collections.ConfigDict
                     ) -> dict[str, jax.Array]:
  """Sums of a method's per-image eval metrics over the real rows, on the method's views."""
  out = network.apply(variables, flatten_views(batch["image"]), train=False)
  scores = metrics_fn(out, batch["label"], hparams, batch["mask"])
  sums = {name: jnp.sum(value * batch["mask"]) for name, value in scores.items()}
  return dict(sums, count=jnp.sum(batch["mask"]))


# --------------------------------------------------------------------------------------------
# Building blocks of a stage.


def build_network(model_name: str, num_classes: int, heads: Optional[HeadsFactory] = None,
                  hparams: Optional[ml_collections.ConfigDict] = None,
                  dtype: Any = jnp.float32, backbone_num_classes: Optional[int] = None
                  ) -> Network:
  """A zoo backbone with optional heads (built by `heads(num_classes, hparams, backbone)`);
  the backbone's own classifier has `backbone_num_classes` outputs if given."""
  backbone = models.get_model(model_name, backbone_num_classes or num_classes, dtype=dtype)
  return Network(backbone=backbone,
                 heads=heads(num_classes, hparams, backbone) if heads else None)


def run_once_options(mesh: jax.sharding.Mesh) -> Optional[dict[str, Any]]:
  """Compiler options of a program that runs once (an initialisation) on the mesh.

  On CPU, LLVM's optimisation of the unrolled random-number code of an init costs seconds per
  network and saves nothing on a single run, so it is compiled unoptimised (the values may
  then differ from an optimised compile in the last bit; every run compiles them the same way).
  """
  if mesh.devices.flat[0].platform == "cpu":
    return {"xla_backend_optimization_level": 0}
  return None


def init_variables(network: Network, image_shape: tuple[int, ...], seed: int,
                   mesh: jax.sharding.Mesh) -> Any:
  """Initialises the network under jit, replicated over the mesh."""
  @functools.partial(jax.jit, out_shardings=parallel.replicated(mesh),
                     compiler_options=run_once_options(mesh))
  def init(rng):
    return network.init(rng, jnp.zeros((1,) + tuple(image_shape), jnp.float32), train=False)
  return dict(init(jax.random.key(seed)))


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
  for local in data.eval_batches(config.dataset, views, config.eval_batch_size,
                                 jax.process_index(), jax.process_count()):
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


# --------------------------------------------------------------------------------------------
# A stage.


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
  description = {"model": stage.model_name, "method": stage.method_name,
                 "num_epochs": stage.num_epochs, "dataset": config.dataset.name,
                 "teacher_sha256": stage.teacher.sha256 if stage.teacher else None,
                 "backbone_sha256": stage.init_backbone_sha256}
  if epath.Path(result_path).exists():
    result = json.loads(epath.Path(result_path).read_text())
    _check_same_stage(result, description, stage_dir)
    print(f"[{stage.name}] already done ({result_path}): top-1 {_percent(result['top1_last'])}")
    return result
  epath.Path(stage_dir).mkdir(parents=True, exist_ok=True)

  network = stage.network(info.num_classes, compute_dtype(config), info.num_train)
  steps_per_epoch = data.steps_per_epoch(info, config.batch_size)
  total_steps = stage.num_epochs * steps_per_epoch
  schedule = learning_rate_schedule(config, stage.base_lr, stage.num_epochs, steps_per_epoch,
                                    stage.milestones)
  frozen = None
  variables = init_variables(network, info.image_shape, config.seed, mesh)
  if stage.init_backbone is not None:
    # Copies: the train step donates the state, and the frozen teacher is used again later.
    frozen_backbone = jax.tree.map(jnp.copy, backbone_only(stage.init_backbone))
    variables = {col: dict(tree, backbone=frozen_backbone[col]["backbone"])
                 for col, tree in variables.items()}
    frozen = {name: name == "backbone" for name in variables["params"]}
  tx = make_optimizer(config, schedule, frozen)
  params, batch_stats = variables["params"], variables.get("batch_stats", {})
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                     opt_state=jax.jit(tx.init, out_shardings=parallel.replicated(mesh))(params))
  head = None
  if stage.online_teacher_head is not None:
    head, head_state = init_teacher_head(stage.online_teacher_head, stage.teacher, stage.hparams,
                                         info, config.seed, mesh)
    state = state.replace(teacher_head=head_state)
  state = parallel.replicate(state, mesh)

  mngr = checkpoint.manager(os.path.join(stage_dir, "checkpoints"),
                            config.checkpoint_every_steps, config.keep_checkpoints)
  record = {"best_top1": 0.0, "history": [],
            "teacher_path": stage.teacher.path if stage.teacher else None,
            "teacher_sha256": stage.teacher.sha256 if stage.teacher else None}
  restored = checkpoint.restore_latest(mngr, jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state))
  if restored is not None:
    state, record = restored
    if stage.teacher and record.get("teacher_sha256") != stage.teacher.sha256:
      raise UserError(
          f"{stage_dir} was started with teacher {record.get('teacher_path')!r} "
          f"(sha256 {record.get('teacher_sha256')}) but this run uses {stage.teacher.path!r} "
          f"(sha256 {stage.teacher.sha256}); use a new --workdir")
  start_step = int(jax.device_get(state.step))
  if start_step:
    print(f"[{stage.name}] resuming from step {start_step} ({mngr.directory})")

  teacher = stage.teacher
  step_fn = jax.jit(
      functools.partial(train_step, network=network,
                        teacher_network=teacher.network if teacher else None,
                        loss=stage.loss, hparams=stage.hparams, tx=tx, schedule=schedule,
                        teacher_head=head),
      donate_argnums=(0,), compiler_options=parallel.step_compiler_options())
  eval_fn = jax.jit(functools.partial(eval_step, network=network))
  method_eval = None
  if stage.eval_metrics is not None:
    method_eval = (stage.views, jax.jit(functools.partial(
        method_eval_step, network=network, metrics_fn=stage.eval_metrics,
        hparams=stage.hparams)))
  teacher_variables = teacher.variables if teacher else None

  writer = metric_writers.create_default_writer(
      stage_dir, just_logging=jax.process_index() > 0, asynchronous=False)
  report = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                           every_steps=config.log_every_steps, every_secs=None)
  progress = Progress(stage.name, total_steps, steps_per_epoch, config.batch_size, start_step)
  batches = data.train_batches(config.dataset, stage.views, config.batch_size,
                               seed=config.seed, start_step=start_step,
                               process_index=jax.process_index(),
                               process_count=jax.process_count(),
                               teacher_input=teacher.input if teacher else None,
                               num_negatives=stage.num_negatives)
  pending: list[dict[str, jax.Array]] = []
  eval_every = max(config.eval_every_epochs, 1)
  for step in range(start_step + 1, total_steps + 1):
    batch = parallel.to_global(next(batches), mesh)
    state, metrics = step_fn(state, teacher_variables, batch)
    pending.append(metrics)
    report(step)
    if step % config.log_every_steps == 0 or step == total_steps:
      scalars = _mean_metrics(pending)
      pending = []
      writer.write_scalars(step, {f"train/{k}": v for k, v in scalars.items()})
      print(progress.line(step, scalars), flush=True)
    epoch_end = step % steps_per_epoch == 0
    epoch = step // steps_per_epoch
    if stage.scores_top1 and (step == total_steps or (epoch_end and epoch % eval_every == 0)):
      # A background checkpoint write must not overlap opening a split: tfds' mock data
      # redirects file access while it does.
      mngr.wait_until_finished()
      scores = evaluate(network, variables_of(state), config, mesh, eval_fn, method_eval)
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
    checkpoint.save(mngr, step, state, record, force=step == total_steps)
  mngr.wait_until_finished()
  writer.flush()

  if stage.scores_top1:
    last = record["history"][-1] if record["history"] else evaluate(
        network, variables_of(state), config, mesh, eval_fn, method_eval)
    result = dict(description, stage=stage.name, steps=total_steps,
                  top1_last=last["top1"], top5_last=last["top5"],
                  top1_best=max(record["best_top1"], last["top1"]),
                  eval_last={k: v for k, v in last.items() if k not in ("step", "epoch")},
                  checkpoints=str(mngr.directory), logdir=stage_dir)
  else:
    result = dict(description, stage=stage.name, steps=total_steps, top1_last=None,
                  top5_last=None, top1_best=None, checkpoints=str(mngr.directory),
                  logdir=stage_dir, note=NO_CLASSIFIER_NOTE)
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
  _write_result(stage_dir, result)
  return result


def _percent(value: Optional[float]) -> str:
  """A top-1 / top-5 for printing; '-' where a stage has none (no classifier trained)."""
  return "-" if value is None else f"{value:.2f}"


def _check_same_stage(result: dict[str, Any], description: dict[str, Any], stage_dir: str):
  for key, value in description.items():
    if result.get(key) != value:
      raise UserError(
          f"{stage_dir} already holds a finished stage with {key}={result.get(key)!r}, but this "
          f"run asks for {key}={value!r}; use a new --workdir (nothing there was changed)")


def _write_result(stage_dir: str, result: dict[str, Any]) -> None:
  if jax.process_index() == 0:
    paths.write_atomically(os.path.join(stage_dir, RESULT_FILE),
                           json.dumps(result, indent=2).encode())


def _mean_metrics(pending: list[dict[str, jax.Array]]) -> dict[str, float]:
  host = jax.device_get(pending)
  return {k: float(np.mean([m[k] for m in host])) for k in host[0]}




# --------------------------------------------------------------------------------------------
# A run.


def check_workdir(workdir: str) -> None:
  """Fails early, with one clear error, when the workdir cannot be written."""
  try:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    probe = epath.Path(workdir) / f".write_probe_{os.getpid()}"
    probe.write_text("ok")
    probe.unlink()
  except paths.io_errors() as e:
    raise UserError(f"workdir {workdir!r} is not writable ({paths.reason(e)}); "
                    "pass a --workdir you can write to") from None


def student_methods(config: ml_collections.ConfigDict) -> list[str]:
  """config.method.name first, then the comma-separated `config.baselines`, without repeats."""
  names = [config.method.name] + [n.strip() for n in config.get("baselines", "").split(",")]
  return list(dict.fromkeys(n for n in names if n))


def load_teacher(network: Network, path: str, info: data.DatasetInfo,
                 mesh: jax.sharding.Mesh) -> Teacher:
  """A frozen teacher from a jaxkd variables file, checked against the network's tree."""
  template = jax.eval_shape(lambda: network.init(
      jax.random.key(0), jnp.zeros((1,) + tuple(info.image_shape)), train=False))
  variables = parallel.replicate(checkpoint.import_variables(path, template), mesh)
  return Teacher(network=network, variables=variables, path=path,
                 sha256=checkpoint.file_sha256(path))


class Teachers:
  """The run's teachers, each prepared once, on first use.

  plain(): stage `teacher` trains the teacher with cross-entropy, unless
    `config.teacher.checkpoint` names a file to import; with `config.teacher.pretrain` (e.g.
    'simclr'), stage `pretrain` trains it with that self-supervised method instead and the
    teacher is its backbone alone (the method's heads dropped). A CLIP tower
    (`config.teacher.name` in jaxkd.models.clip.CLIP_MODELS) is loaded from
    `config.teacher.checkpoint` and never trained; it sees its own 224-px view of each image.
  for_method(m): the plain teacher, or, for a method with a `TeacherPreparation`, stage
    `teacher_<m>`: the method's heads trained on the frozen plain teacher, or backbone and heads
    trained jointly from scratch.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh,
               info: data.DatasetInfo, results: list[dict[str, Any]]):
    self.config, self.workdir, self.mesh, self.info = config, workdir, mesh, info
    self.results = results
    self._cache: dict[str, Teacher] = {}

  def plain(self) -> Teacher:
    if "" in self._cache:
      return self._cache[""]
    config = self.config
    if config.teacher.name in clip.CLIP_MODELS:
      teacher = load_clip_teacher(config, self.mesh)
      self.results.append({"stage": "teacher", "model": config.teacher.name,
                           "method": "imported", "checkpoint": teacher.path,
                           "teacher_sha256": teacher.sha256, "top1_last": None,
                           "top5_last": None, "top1_best": None, "note": NO_CLASSIFIER_NOTE})
      self._cache[""] = teacher
      return teacher
    if config.teacher.checkpoint:
      path = paths.absolute(config.teacher.checkpoint)
      result = {"stage": "teacher", "model": config.teacher.name, "method": "imported",
                "checkpoint": path}
      if config.teacher.get("pretrain", ""):
        # A backbone pretrained without labels (e.g. <workdir>/pretrain/backbone.msgpack).
        result.update(top1_last=None, top5_last=None, top1_best=None, note=NO_CLASSIFIER_NOTE)
    elif config.teacher.get("pretrain", ""):
      path, result = self._pretrain(config.teacher.pretrain)
    else:
      ce = get_method("ce")
      stage = Stage(name="teacher", model_name=config.teacher.name, method_name=ce.name,
                    loss=ce.loss, hparams=ce.hparams(), num_epochs=config.teacher.num_epochs,
                    base_lr=teacher_lr(config))
      result = run_stage(stage, config, self.workdir, self.mesh, self.info,
                         export_file=TEACHER_FILE)
      path = result["export"]
    # The frozen teacher computes in the run's precision too (most of a step's FLOPs on GPU/TPU).
    network = build_network(config.teacher.name, self.info.num_classes,
                            dtype=compute_dtype(config))
    teacher = load_teacher(network, path, self.info, self.mesh)
    if "top1_last" not in result:
      scores = evaluate(network, teacher.variables, config, self.mesh,
                        jax.jit(functools.partial(eval_step, network=network)))
      result.update(top1_last=scores["top1"], top5_last=scores["top5"],
                    top1_best=scores["top1"])
    self.results.append(result)
    self._cache[""] = teacher
    return teacher

  def _pretrain(self, method_name: str) -> tuple[str, dict[str, Any]]:
    """Stage `pretrain`: the teacher trained by a self-supervised method; returns the path of
    its backbone's variables (the method's heads dropped) and the stage's result."""
    config = self.config
    method = get_method(method_name)
    hparams = method.hparams(config.get("method_overrides", {}).get(method_name))
    stage = Stage(name="pretrain", model_name=config.teacher.name, method_name=method.name,
                  loss=method.loss, hparams=hparams, num_epochs=config.teacher.num_epochs,
                  base_lr=teacher_lr(config), views=method.views,
                  heads=method.student_heads, scores_top1=False)
    result = run_stage(stage, config, self.workdir, self.mesh, self.info,
                       export_file=TEACHER_FILE)
    trained = load_teacher(stage.network(self.info.num_classes), result["export"], self.info,
                           self.mesh)
    path = os.path.join(os.path.dirname(result["export"]), BACKBONE_FILE)
    checkpoint.export_variables(path, backbone_only(trained.variables))
    return path, result

  def for_method(self, method: Method, hparams: ml_collections.ConfigDict) -> Teacher:
    prep = method.teacher
    if prep is None:
      teacher = self.plain()
      if (method.online_teacher_head is not None and teacher.input is None
          and self.info.transform == "pad_crop"):
        # EGA's reference feeds its teacher a view of its own, drawn independently of the
        # student's; a zoo teacher's is the dataset's crop + flip at the dataset's size.
        teacher = dataclasses.replace(teacher, input=teacher_views.DATASET_INPUT)
      return teacher
    if method.name in self._cache:
      return self._cache[method.name]
    config = self.config
    base = self.plain() if prep.frozen_backbone else None
    stage = Stage(name=f"teacher_{method.name}", model_name=config.teacher.name,
                  method_name=method.name, loss=prep.loss, hparams=hparams,
                  num_epochs=int(hparams[prep.num_epochs]), base_lr=float(hparams[prep.lr]),
                  views=prep.views, heads=prep.heads,
                  milestones=tuple(hparams[prep.milestones]),
                  init_backbone=base.variables if base else None,
                  init_backbone_sha256=base.sha256 if base else None,
                  eval_metrics=method.eval_metrics, select=prep.select)
    result = run_stage(stage, config, self.workdir, self.mesh, self.info,
                       export_file=TEACHER_FILE)
    self.results.append(result)
    network = build_network(config.teacher.name, self.info.num_classes, prep.heads, hparams,
                            compute_dtype(config))
    teacher = load_teacher(network, result["export"], self.info, self.mesh)
    self._cache[method.name] = teacher
    return teacher


def load_clip_teacher(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Teacher:
  """The frozen CLIP tower `config.teacher.name` from `config.teacher.checkpoint` (a Hugging Face
  folder or an OpenAI .pt file); its checksum is that of the weight file."""
  path = os.path.abspath(config.teacher.checkpoint) if config.teacher.checkpoint else ""
  tower, variables = clip_weights.load_clip(path, config.teacher.name, compute_dtype(config))
  weights = os.path.join(path, "model.safetensors") if os.path.isdir(path) else path
  size = tower.config.image_size
  return Teacher(network=Network(backbone=tower),
                 variables=parallel.replicate({col: {"backbone": tree}
                                               for col, tree in variables.items()}, mesh),
                 path=path, sha256=checkpoint.file_sha256(weights),
                 input=teacher_views.TeacherInput(size=size, mean=clip.CLIP_MEAN,
                                                  std=clip.CLIP_STD, channels=3))


def linear_probe_enabled(config: ml_collections.ConfigDict) -> bool:
  return bool(config.get("linear_probe") and config.linear_probe.get("dataset", ""))


def linear_probe_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The run's config with the probe's dataset (the run's own, as it is, or another one with
  the same data_dir and normalisation) and the probe's epochs."""
  probe = ml_collections.ConfigDict(config.to_dict())
  name = config.linear_probe.dataset
  if name != config.dataset.name:
    probe.dataset = ml_collections.ConfigDict(dict(
        name=name, data_dir=config.dataset.data_dir,
        normalization=config.dataset.get("normalization", "dataset")))
  probe.num_epochs = config.linear_probe.num_epochs
  return probe


class LinearClassifier(nn.Module):
  """logits = Linear(N)(feats[tap]): the linear probe on a frozen backbone's features."""
  num_classes: int
  tap: str = "pooled"

  @nn.compact
  def __call__(self, outputs: Any, train: bool = False) -> dict[str, jax.Array]:
    del train
    return {"logits": layers.Linear(self.num_classes, name="probe")(outputs["feats"][self.tap])}


def linear_probe_heads(num_classes: int, hparams: ml_collections.ConfigDict,
                       backbone: Any = None) -> nn.Module:
  return LinearClassifier(num_classes, hparams.get("tap", "pooled"))


def run_linear_probe(config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh,
                     info: data.DatasetInfo, student: Stage,
                     student_result: dict[str, Any]) -> dict[str, Any]:
  """Stage `linear_probe`: a linear classifier trained with cross-entropy on the pooled
  features of the finished student's frozen backbone (inference mode), on
  `config.linear_probe.dataset`; its eval top-1 is the probe accuracy."""
  probe_config = linear_probe_config(config)
  probe_info = data.get_dataset_info(probe_config.dataset)
  trained = load_teacher(student.network(info.num_classes), student_result["export"], info,
                         mesh)
  lp = config.linear_probe
  ce = get_method("ce")
  stage = Stage(name="linear_probe", model_name=config.student.name,
                method_name="linear_probe", loss=ce.loss,
                hparams=ml_collections.ConfigDict(dict(tap="pooled")),
                num_epochs=lp.num_epochs, base_lr=lp.lr, heads=linear_probe_heads,
                milestones=tuple(lp.get("milestones", ())),
                init_backbone=backbone_only(trained.variables),
                init_backbone_sha256=student_result["export_sha256"],
                backbone_num_classes=info.num_classes)
  return run_stage(stage, probe_config, workdir, mesh, probe_info)


def method_hparams(config: ml_collections.ConfigDict, method: Method
                   ) -> ml_collections.ConfigDict:
  """A student method's hyper-parameters: its defaults, then `config.method` for the main
  method or `config.method_overrides.<name>` for a baseline."""
  overrides = (config.method if method.name == config.method.name
               else config.get("method_overrides", {}).get(method.name))
  return method.hparams(overrides)


def validate(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> data.DatasetInfo:
  """Every check that can fail on bad input, before any work is done."""
  info = data.get_dataset_info(config.dataset)
  teacher_name = config.teacher.name
  clip_teacher = teacher_name in clip.CLIP_MODELS
  for name in (config.student.name,) if clip_teacher else (teacher_name, config.student.name):
    models.get_model(name, info.num_classes)
  for name in student_methods(config) + list(config.get("method_overrides", {}).keys()):
    get_method(name)
  for name in student_methods(config):
    method = get_method(name)
    if method.check_hparams is not None:
      method.check_hparams(method_hparams(config, method))
    if method.check_pair is not None and not clip_teacher:
      method.check_pair(teacher_name, config.student.name, info.num_classes)
  pretrain = config.teacher.get("pretrain", "")
  if pretrain:
    if clip_teacher:
      raise UserError(f"teacher.pretrain={pretrain!r} trains a zoo teacher, but CLIP tower "
                      f"{teacher_name!r} is used as it is; set --config.teacher.pretrain=''")
    if get_method(pretrain).uses_teacher:
      raise UserError(f"teacher.pretrain={pretrain!r} distils from a teacher itself; use a "
                      "self-supervised method such as 'simclr'")
  if clip_teacher or pretrain:
    # Such a teacher has no trained classifier: only methods that train their own head on it
    # can read it.
    why = "is a CLIP image tower" if clip_teacher else f"is pretrained by {pretrain!r}"
    for name in student_methods(config):
      method = get_method(name)
      if method.uses_teacher and (method.online_teacher_head is None or method.teacher):
        raise UserError(
            f"method {name!r} reads the teacher's classifier, but teacher {teacher_name!r} "
            f"{why} and has none; use a method that trains its own head on the teacher "
            "(e.g. ega), or a teacher trained with cross-entropy")
  if clip_teacher:
    checkpoint_path = config.teacher.checkpoint
    if not checkpoint_path or not os.path.exists(checkpoint_path):
      raise clip_weights.missing_weights_error(teacher_name, checkpoint_path)
  if linear_probe_enabled(config):
    probe_info = data.get_dataset_info(linear_probe_config(config).dataset)
    if probe_info.image_shape[-1] != info.image_shape[-1]:
      raise UserError(
          f"linear_probe.dataset={probe_info.name!r} has {probe_info.image_shape[-1]} image "
          f"channel(s) but the student was trained on {info.image_shape[-1]} "
          f"({info.name!r}); probe on a dataset with the same channels")
    if config.linear_probe.num_epochs <= 0:
      raise UserError(f"linear_probe.num_epochs is {config.linear_probe.num_epochs}; it must "
                      "be positive (or set --config.linear_probe.dataset='' to skip the probe)")
  parallel.check_batch_divides(config.batch_size, mesh)
  parallel.check_batch_divides(config.eval_batch_size, mesh)
  if config.log_every_steps <= 0 or config.checkpoint_every_steps <= 0:
    raise UserError("log_every_steps and checkpoint_every_steps must be positive")
  return info


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, Any]]:
  """Runs every stage of `config` in `workdir` and returns their result records."""
  check_workdir(workdir)
  mesh = parallel.create_mesh()
  info = validate(config, mesh)
  results: list[dict[str, Any]] = []
  teachers = Teachers(config, workdir, mesh, info, results)
  main = None
  for name in student_methods(config):
    method = get_method(name)
    hparams = method_hparams(config, method)
    stage = Stage(name=f"student_{name}", model_name=config.student.name, method_name=name,
                  loss=method.loss, hparams=hparams, num_epochs=config.num_epochs,
                  base_lr=config.optimizer.lr, views=method.views, heads=method.student_heads,
                  teacher=teachers.for_method(method, hparams) if method.uses_teacher else None,
                  eval_metrics=method.eval_metrics,
                  online_teacher_head=method.online_teacher_head if method.uses_teacher
                  else None, bridge=method.bridge,
                  num_negatives=method.negatives(hparams) if method.negatives else 0)
    # The main student is exported, for the stages that read it (linear_probe).
    result = run_stage(stage, config, workdir, mesh, info,
                       export_file=STUDENT_FILE if name == config.method.name else None)
    results.append(result)
    if name == config.method.name:
      main = (stage, result)
  if linear_probe_enabled(config):
    results.append(run_linear_probe(config, workdir, mesh, info, *main))
  if jax.process_index() == 0:
    print(results_table(results, workdir))
  return results


def results_table(results: list[dict[str, Any]], workdir: str) -> str:
  """The closing table: held-out top-1 of every stage, and where its files are."""
  rows = [("stage", "model", "method", "top-1 last", "top-1 best", "top-5 last")]
  for r in results:
    rows.append((r["stage"], r["model"], r["method"], _percent(r.get("top1_last")),
                 _percent(r.get("top1_best")), _percent(r.get("top5_last"))))
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  lines.append(f"\nlogs (TensorBoard): tensorboard --logdir {workdir}")
  lines.append(f"checkpoints: {workdir}/<stage>/checkpoints; results: {workdir}/<stage>/"
               f"{RESULT_FILE}")
  return "\n".join(lines)
