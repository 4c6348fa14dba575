"""Training and evaluation of a run: checks everything, then runs its stages in order.

A run is a sequence of stages, each in its own sub-directory of the workdir and each skipped
when its `result.json` exists:

  teacher            train the teacher with cross-entropy (unless --config.teacher.checkpoint;
                     a CLIP teacher is always loaded from it, never trained)
  pretrain           instead of `teacher` with --config.teacher.pretrain=simclr: the teacher
                     trained without labels; its backbone is the frozen teacher
  teacher_<method>   for a method that prepares its teacher: its heads trained on the frozen
                     teacher (or backbone and heads jointly, replacing `teacher`)
  student_<method>_init  for a method that prepares its student: the student's feature layers
                     trained on the method's loss against the frozen teacher
  student_<method>   distil the student with `config.method`, then each `config.baselines`
                     method (e.g. `ce`: the student trained alone), for the final table
  linear_probe       with --config.linear_probe.dataset: a linear classifier on the frozen
                     features of the `config.method` student

Where each part lives: `jaxkd.stages` decides which stages a run has, `jaxkd.loop` runs one
stage, `jaxkd.steps` holds the jitted step functions. None of them branches on a method: they
read the views, heads, bridges, preparations and pure losses from the method registry.
"""

import os
from typing import Any

import jax
import ml_collections

from jaxkd import config_checks
from jaxkd import data
from jaxkd import interrupts
from jaxkd import models
from jaxkd import parallel
from jaxkd import paths
from jaxkd import workdir_lock
from jaxkd.errors import UserError
from jaxkd.interop import clip_weights
from jaxkd.loop import RESULT_FILE, STUDENT_FILE, _percent, run_stage
from jaxkd.methods import METHOD_NAMES, Method, canonical_name, get_method
from jaxkd.methods import objective
from jaxkd.models import clip
from jaxkd.stages import (Teachers, linear_probe_config, linear_probe_enabled, method_hparams,
                          run_linear_probe, student_methods, student_stage)


def check_workdir(workdir: str) -> None:
  """Fails early, with one clear error, when the workdir cannot be written."""
  paths.check_writable(workdir, "workdir", "pass a --workdir you can write to")


def validate(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
             workdir: str | None = None) -> data.DatasetInfo:
  """Every check that can fail on bad input, before any work is done. The statistics computed
  for a tfds:/folder: dataset are kept in `workdir` (jaxkd.data.sources)."""
  # Each field's value first (no device, nothing written), then the workdir is created.
  config_checks.check_config(config, method_lookup=get_method)
  if workdir is not None:
    check_workdir(workdir)
  info = data.get_dataset_info(config.dataset, cache_dir=workdir)
  teacher_name = config.teacher.name
  clip_teacher = teacher_name in clip.CLIP_MODELS
  for name in (config.student.name,) if clip_teacher else (teacher_name, config.student.name):
    models.get_model(name, info.num_classes)
  for name in student_methods(config):
    method = get_method(name)
    if method.check_pair is not None and not clip_teacher:
      method.check_pair(teacher_name, config.student.name, info.num_classes)
    if method.check_mesh is not None:
      method.check_mesh(mesh)
    if method.taps is not None:
      check_taps(config, method, info, clip_teacher)
  pretrain = config.teacher.get("pretrain", "")
  if pretrain:
    if clip_teacher:
      raise UserError(f"teacher.pretrain={pretrain!r} trains a zoo teacher, but CLIP tower "
                      f"{teacher_name!r} is used as it is; set --config.teacher.pretrain=''")
    if get_method(pretrain).uses_teacher:
      raise UserError(f"teacher.pretrain={pretrain!r} distils from a teacher itself; use a "
                      "self-supervised method, one that reads no teacher")
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
            f"({', '.join(own_head_methods())}), or a teacher trained with cross-entropy")
  if clip_teacher:
    checkpoint_path = config.teacher.checkpoint
    if not checkpoint_path or not os.path.exists(checkpoint_path):
      raise clip_weights.missing_weights_error(teacher_name, checkpoint_path)
  if linear_probe_enabled(config):
    probe_info = data.get_dataset_info(linear_probe_config(config).dataset, cache_dir=workdir)
    if probe_info.image_shape[-1] != info.image_shape[-1]:
      raise UserError(
          f"linear_probe.dataset={probe_info.name!r} has {probe_info.image_shape[-1]} image "
          f"channel(s) but the student was trained on {info.image_shape[-1]} "
          f"({info.name!r}); probe on a dataset with the same channels")
  parallel.check_batch_divides(config.batch_size, mesh)
  parallel.check_batch_divides(config.eval_batch_size, mesh)
  return info


def own_head_methods() -> list[str]:
  """The registered methods that train their own head on a frozen teacher."""
  return [name for name in METHOD_NAMES
          if get_method(name).online_teacher_head is not None and not get_method(name).teacher]


def check_taps(config: ml_collections.ConfigDict, method: Method, info: data.DatasetInfo,
               clip_teacher: bool) -> None:
  """Refuses a network that does not give the taps `method` reads (Method.taps), naming what
  is missing, and a pair whose numbers of paired taps differ."""
  hparams = method_hparams(config, method)
  networks = [("student", config.student.name)]
  if not clip_teacher:
    networks.append(("teacher", config.teacher.name))
  counts = []
  for role, model in networks:
    taps = objective.tap_shapes(model, info.num_classes, tuple(info.image_shape))
    shapes = [shape for _, shape in taps]
    missing = method.taps.missing(shapes, hparams)
    if missing is not None:
      given = ", ".join(f"{tap} {list(shape[1:])}" for tap, shape in taps)
      raise UserError(f"method {method.name!r} reads {missing}, but {role} {model!r} gives "
                      f"only {given}; return them from its feats (see jaxkd.models.register)")
    counts.append(len(method.taps.select(shapes, hparams)))
  if method.taps.paired and len(set(counts)) > 1:
    raise UserError(f"method {method.name!r} pairs {method.taps.what} one to one, but student "
                    f"{config.student.name!r} gives {counts[0]} and teacher "
                    f"{config.teacher.name!r} {counts[1]}; choose a pair with as many")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, Any]]:
  """Runs every stage of `config` in `workdir` and returns their result records."""
  mesh = parallel.create_mesh()
  info = validate(config, mesh, workdir)
  # Signals become a checkpoint and a clean exit while the stages run (jaxkd.interrupts).
  with workdir_lock.hold(workdir), interrupts.catch_signals():
    results = run_stages(config, workdir, mesh, info)
  if jax.process_index() == 0:
    print(results_table(results, workdir))
  return results


def run_stages(config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh,
               info: data.DatasetInfo) -> list[dict[str, Any]]:
  """The stages of `config` in order (see the module docstring); their result records."""
  results: list[dict[str, Any]] = []
  teachers = Teachers(config, workdir, mesh, info, results)
  main = None
  for name in student_methods(config):
    stage = student_stage(config, get_method(name), teachers, results)
    # The main student is exported, for the stages that read it (linear_probe).
    is_main = name == canonical_name(config.method.name)
    result = run_stage(stage, config, workdir, mesh, info,
                       export_file=STUDENT_FILE if is_main else None)
    results.append(result)
    if is_main:
      main = (stage, result)
  if linear_probe_enabled(config):
    results.append(run_linear_probe(config, workdir, mesh, info, *main))
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
