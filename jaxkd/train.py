"""Training and evaluation: the stages of one run, the jitted steps, checkpoints and logs.

A run is a sequence of stages, each in its own sub-directory of the workdir and each skipped
when its `result.json` exists:

  teacher            train the teacher with cross-entropy (unless --config.teacher.checkpoint)
  teacher_<method>   for a method that prepares its teacher: its heads trained on the frozen
                     teacher (or backbone and heads jointly, replacing `teacher`)
  student_<method>   distil the student with `config.method`, then each `config.baselines`
                     method (e.g. `ce`: the student trained alone), for the final table

The trainer never branches on a method: it asks the method registry for the views, the heads
and the pure losses, and runs the same step for all of them.
"""

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers
from clu import periodic_actions

from jaxkd import checkpoint
from jaxkd import data
from jaxkd import models
from jaxkd import parallel
from jaxkd.errors import UserError
from jaxkd.methods import Method, get_method
from jaxkd.methods.base import EvalMetricsFn, HeadsFactory, LossFn
from jaxkd.methods.losses import topk_correct
from jaxkd.optim import learning_rate_schedule, make_optimizer
from jaxkd.state import Network, TrainState, variables_of

RESULT_FILE = "result.json"
TEACHER_FILE = "teacher.msgpack"


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A frozen teacher: its network, its variables (replicated) and where they came from."""
  network: Network
  variables: Any
  path: str
  sha256: str


@dataclasses.dataclass(frozen=True)
class Stage:
  """One training stage: which network learns with which loss, on which views, for how long.

  `init_backbone`: variables loaded into the backbone before training and kept frozen (the
  backbone then runs in inference mode and only the heads learn).
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

  def network(self, num_classes: int, dtype: Any = jnp.float32) -> Network:
    network = build_network(self.model_name, num_classes, self.heads, self.hparams, dtype)
    return network.clone(frozen_backbone=self.init_backbone is not None)


# --------------------------------------------------------------------------------------------
# Pure steps.


def flatten_views(images: jax.Array) -> jax.Array:
  """[B, V, H, W, C] -> [B·V, H, W, C] with row V·i + k = image i, view k; [B, H, W, C] as is."""
  return images.reshape((-1,) + images.shape[-3:]) if images.ndim == 5 else images


def train_step(state: TrainState, teacher_variables: Any, batch: dict[str, jax.Array], *,
               network: Network, teacher_network: Optional[Network], loss: LossFn,
               hparams: ml_collections.ConfigDict, tx: optax.GradientTransformation,
               schedule: optax.Schedule) -> tuple[TrainState, dict[str, jax.Array]]:
  """One SGD step of the student on a global batch; the teacher runs in inference mode."""
  images = flatten_views(batch["image"])
  teacher_out = None
  if teacher_network is not None:
    teacher_out = jax.lax.stop_gradient(
        teacher_network.apply(teacher_variables, images, train=False))

  def loss_fn(params):
    out, updates = network.apply({"params": params, "batch_stats": state.batch_stats}, images,
                                 train=True, mutable=["batch_stats"])
    value, metrics = loss(out, teacher_out, batch["label"], hparams)
    return value, (metrics, updates["batch_stats"])

  grads, (metrics, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(metrics, lr=schedule(state.step))
  return TrainState(step=state.step + 1, params=params, batch_stats=batch_stats,
                    opt_state=opt_state), metrics


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
                  dtype: Any = jnp.float32) -> Network:
  """A zoo backbone with optional heads (built by `heads(num_classes, hparams, backbone)`)."""
  backbone = models.get_model(model_name, num_classes, dtype=dtype)
  return Network(backbone=backbone,
                 heads=heads(num_classes, hparams, backbone) if heads else None)


def init_variables(network: Network, image_shape: tuple[int, ...], seed: int,
                   mesh: jax.sharding.Mesh) -> Any:
  """Initialises the network under jit, replicated over the mesh."""
  @functools.partial(jax.jit, out_shardings=parallel.replicated(mesh))
  def init(rng):
    return network.init(rng, jnp.zeros((1,) + tuple(image_shape), jnp.float32), train=False)
  return dict(init(jax.random.key(seed)))


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
  if os.path.exists(result_path):
    with open(result_path) as f:
      result = json.load(f)
    _check_same_stage(result, description, stage_dir)
    print(f"[{stage.name}] already done ({result_path}): top-1 {result['top1_last']:.2f}")
    return result
  os.makedirs(stage_dir, exist_ok=True)

  dtype = jnp.bfloat16 if config.get("half_precision", False) else jnp.float32
  network = stage.network(info.num_classes, dtype)
  steps_per_epoch = data.steps_per_epoch(info, config.batch_size)
  total_steps = stage.num_epochs * steps_per_epoch
  schedule = learning_rate_schedule(config, stage.base_lr, stage.num_epochs, steps_per_epoch,
                                    stage.milestones)
  frozen = None
  variables = init_variables(network, info.image_shape, config.seed, mesh)
  if stage.init_backbone is not None:
    # Copies: the train step donates the state, and the frozen teacher is used again later.
    variables = {col: dict(tree, backbone=jax.tree.map(jnp.copy,
                                                      stage.init_backbone[col]["backbone"]))
                 for col, tree in variables.items()}
    frozen = {"backbone": True, "heads": False}
  tx = make_optimizer(config, schedule, frozen)
  params, batch_stats = variables["params"], variables.get("batch_stats", {})
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                     opt_state=jax.jit(tx.init, out_shardings=parallel.replicated(mesh))(params))
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
                        loss=stage.loss, hparams=stage.hparams, tx=tx, schedule=schedule),
      donate_argnums=(0,))
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
                               process_count=jax.process_count())
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
    if step == total_steps or (epoch_end and epoch % eval_every == 0):
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
                                    variables_of(state))
      writer.write_scalars(step, {**{f"eval/{k}": v for k, v in scores.items()},
                                  "eval/top1_best": record["best_top1"]})
      print(f"[{stage.name}] epoch {epoch} eval top-1 {scores['top1']:.2f} "
            f"top-5 {scores['top5']:.2f} (best {record['best_top1']:.2f})", flush=True)
    checkpoint.save(mngr, step, state, record, force=step == total_steps)
  mngr.wait_until_finished()
  writer.flush()

  last = record["history"][-1] if record["history"] else evaluate(
      network, variables_of(state), config, mesh, eval_fn, method_eval)
  result = dict(description, stage=stage.name, steps=total_steps,
                top1_last=last["top1"], top5_last=last["top5"],
                top1_best=max(record["best_top1"], last["top1"]),
                eval_last={k: v for k, v in last.items() if k not in ("step", "epoch")},
                checkpoints=str(mngr.directory), logdir=stage_dir)
  if stage.teacher is not None:
    result["teacher_path"] = stage.teacher.path
  if export_file is not None:
    result["export"] = os.path.join(stage_dir, export_file)
    result["export_sha256"] = checkpoint.export_variables(result["export"], variables_of(state))
    if "selected_step" in record:
      result["export"] = os.path.join(stage_dir, "best_" + export_file)
      result["export_sha256"] = checkpoint.file_sha256(result["export"])
      result.update(selected_score=record["selected_score"],
                    selected_step=record["selected_step"])
  _write_result(stage_dir, result)
  return result


def _check_same_stage(result: dict[str, Any], description: dict[str, Any], stage_dir: str):
  for key, value in description.items():
    if result.get(key) != value:
      raise UserError(
          f"{stage_dir} already holds a finished stage with {key}={result.get(key)!r}, but this "
          f"run asks for {key}={value!r}; use a new --workdir (nothing there was changed)")


def _write_result(stage_dir: str, result: dict[str, Any]) -> None:
  if jax.process_index() == 0:
    tmp = os.path.join(stage_dir, RESULT_FILE + ".tmp")
    with open(tmp, "w") as f:
      json.dump(result, f, indent=2)
    os.replace(tmp, os.path.join(stage_dir, RESULT_FILE))


def _mean_metrics(pending: list[dict[str, jax.Array]]) -> dict[str, float]:
  host = jax.device_get(pending)
  return {k: float(np.mean([m[k] for m in host])) for k in host[0]}




# --------------------------------------------------------------------------------------------
# A run.


def check_workdir(workdir: str) -> None:
  """Fails early, with one clear error, when the workdir cannot be written."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_probe_{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise UserError(f"workdir {workdir!r} is not writable ({e.strerror}); "
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
    `config.teacher.checkpoint` names a file to import.
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
    if config.teacher.checkpoint:
      path = os.path.abspath(config.teacher.checkpoint)
      result = {"stage": "teacher", "model": config.teacher.name, "method": "imported",
                "checkpoint": path}
    else:
      lr = config.teacher.get("lr", -1.0)
      ce = get_method("ce")
      stage = Stage(name="teacher", model_name=config.teacher.name, method_name=ce.name,
                    loss=ce.loss, hparams=ce.hparams(), num_epochs=config.teacher.num_epochs,
                    base_lr=lr if lr > 0 else config.optimizer.lr)
      result = run_stage(stage, config, self.workdir, self.mesh, self.info,
                         export_file=TEACHER_FILE)
      path = result["export"]
    network = build_network(config.teacher.name, self.info.num_classes)
    teacher = load_teacher(network, path, self.info, self.mesh)
    if "top1_last" not in result:
      scores = evaluate(network, teacher.variables, config, self.mesh,
                        jax.jit(functools.partial(eval_step, network=network)))
      result.update(top1_last=scores["top1"], top5_last=scores["top5"],
                    top1_best=scores["top1"])
    self.results.append(result)
    self._cache[""] = teacher
    return teacher

  def for_method(self, method: Method, hparams: ml_collections.ConfigDict) -> Teacher:
    prep = method.teacher
    if prep is None:
      return self.plain()
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
    network = build_network(config.teacher.name, self.info.num_classes, prep.heads, hparams)
    teacher = load_teacher(network, result["export"], self.info, self.mesh)
    self._cache[method.name] = teacher
    return teacher


def validate(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> data.DatasetInfo:
  """Every check that can fail on bad input, before any work is done."""
  info = data.get_dataset_info(config.dataset)
  for name in (config.teacher.name, config.student.name):
    models.get_model(name, info.num_classes)
  for name in student_methods(config) + list(config.get("method_overrides", {}).keys()):
    get_method(name)
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
  for name in student_methods(config):
    method = get_method(name)
    hparams = method.hparams(config.method if name == config.method.name
                             else config.get("method_overrides", {}).get(name))
    stage = Stage(name=f"student_{name}", model_name=config.student.name, method_name=name,
                  loss=method.loss, hparams=hparams, num_epochs=config.num_epochs,
                  base_lr=config.optimizer.lr, views=method.views, heads=method.student_heads,
                  teacher=teachers.for_method(method, hparams) if method.uses_teacher else None,
                  eval_metrics=method.eval_metrics)
    results.append(run_stage(stage, config, workdir, mesh, info))
  if jax.process_index() == 0:
    print(results_table(results, workdir))
  return results


def results_table(results: list[dict[str, Any]], workdir: str) -> str:
  """The closing table: held-out top-1 of every stage, and where its files are."""
  rows = [("stage", "model", "method", "top-1 last", "top-1 best", "top-5 last")]
  for r in results:
    rows.append((r["stage"], r["model"], r["method"], f"{r['top1_last']:.2f}",
                 f"{r['top1_best']:.2f}", f"{r['top5_last']:.2f}"))
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  lines.append(f"\nlogs (TensorBoard): tensorboard --logdir {workdir}")
  lines.append(f"checkpoints: {workdir}/<stage>/checkpoints; results: {workdir}/<stage>/"
               f"{RESULT_FILE}")
  return "\n".join(lines)
