"""A run's plan: its config (and its workdir's state) turned into ordered, fully resolved stages,
with every check that needs no device made once, here.

`make_plan(config, workdir, mesh)` checks every field (jaxkd.config_checks), reads the dataset's
sizes, checks what the fields can only be checked against together (models, method/pair, taps,
teacher kind, devices), decides the stages (`stage_list`), and reads each one's state in the
workdir: done (its result.json), resumable from a step (its checkpoints), or to run; a stage
directory trained under another config is refused here. `describe(plan)` is the table that
`python -m jaxkd.main ... --plan` prints.

The stages of a run, each in its own sub-directory of the workdir:

  teacher            train the teacher with cross-entropy, or import `teacher.checkpoint` (a
                     CLIP tower is always imported, never trained)
  pretrain           instead of `teacher` with `teacher.pretrain=simclr`: the teacher trained
                     without labels; its backbone is the frozen teacher
  teacher_<method>   for a method that prepares its teacher: its heads trained on the frozen
                     teacher (or backbone and heads jointly, replacing `teacher`)
  student_<method>_init  for a method that prepares its student: the student's feature layers
                     trained on the method's loss against the frozen teacher
  student_<method>   distil the student with `config.method`, then each `config.baselines`
                     method (e.g. `ce`: the student trained alone)
  linear_probe       with `linear_probe.dataset`: a linear classifier on the frozen features of
                     the `config.method` student

Nothing here names a method: what a method needs is read from its `Method` record.
"""

import dataclasses
import os
import sys
from typing import Any, Optional

import jax
import ml_collections

from jaxkd import checkpoint
from jaxkd import config_checks
from jaxkd import data
from jaxkd import method_inputs
from jaxkd import models
from jaxkd import networks
from jaxkd import parallel
from jaxkd import paths
from jaxkd import progress
from jaxkd import recipe
from jaxkd import results
from jaxkd import stage_config
from jaxkd.errors import UserError
from jaxkd.interop import clip_weights
from jaxkd.methods import METHOD_NAMES, Method, cross_entropy_method, get_method
from jaxkd.methods import objective
from jaxkd.methods.ce import linear_probe_heads
from jaxkd.models import clip
from jaxkd.stage import (BACKBONE_FILE, METRICS_FILE, STUDENT_FILE, TEACHER_FILE, AnyStage,
                         ImportStage, Stage, TeacherSource)

DONE, TO_RUN, IMPORT = "done", "to run", "import"


@dataclasses.dataclass(frozen=True)
class Plan:
  """The run: its stages in order, the dataset each reads, and each one's state in the workdir
  ('done', 'resume from step N', 'to run', or 'import' for a teacher loaded, not trained)."""
  config: ml_collections.ConfigDict
  workdir: Optional[str]
  stages: tuple[AnyStage, ...]
  infos: dict[str, data.DatasetInfo]
  states: dict[str, str]

  @property
  def info(self) -> data.DatasetInfo:
    """The run's dataset (a linear probe may read another: `infos`)."""
    return self.infos[""]

  def stage(self, name: str) -> AnyStage:
    return next(s for s in self.stages if s.name == name)


# ------------------------------------------------------------------------------- stages


def best_top1(scores: dict[str, float], hparams: ml_collections.ConfigDict) -> float:
  """The score by which `teacher.keep='best'` picks the teacher handed on: its test top-1."""
  del hparams
  return scores["top1"]


def _plain_teacher(config: ml_collections.ConfigDict, stages: list[AnyStage]) -> TeacherSource:
  """Appends the stage that gives the plain teacher (trained, pretrained or imported); returns
  where the students read it."""
  name, pretrain = config.teacher.name, config.teacher.get("pretrain", "")
  if name in clip.CLIP_MODELS:
    checkpoint_path = config.teacher.checkpoint
    source = TeacherSource(name, path=os.path.abspath(checkpoint_path) if checkpoint_path
                           else "", clip=True)
    stages.append(ImportStage("teacher", config, source, scores_top1=False))
    return source
  if config.teacher.checkpoint:
    source = TeacherSource(name, path=paths.absolute(config.teacher.checkpoint))
    # A backbone pretrained without labels (e.g. <workdir>/pretrain/backbone.msgpack) has no
    # classifier to evaluate.
    stages.append(ImportStage("teacher", config, source, scores_top1=not pretrain))
    return source
  if pretrain:
    method = get_method(pretrain)
    stages.append(Stage(
        name="pretrain", config=config, model_name=name, method=method,
        hparams=recipe.pretrain_hparams(config, method),
        num_epochs=config.teacher.num_epochs, base_lr=recipe.teacher_lr(config),
        scores_top1=False,
        export_file=TEACHER_FILE, backbone_file=BACKBONE_FILE,
        epochs_field="teacher.num_epochs"))
    return TeacherSource(name, stage="pretrain", file=BACKBONE_FILE)
  ce = cross_entropy_method()
  # Recorded only when not the default, so that a teacher trained before the field was saved
  # reads as keep='last'.
  best = config.teacher.get("keep", "last") == "best"
  stages.append(Stage(
      name="teacher", config=config, model_name=name, method=ce, hparams=ce.hparams(), num_epochs=config.teacher.num_epochs,
      base_lr=recipe.teacher_lr(config), export_file=TEACHER_FILE,
      select=best_top1 if best else None, epochs_field="teacher.num_epochs",
      recorded=(("teacher.keep", "best"),) if best else ()))
  return TeacherSource(name, stage="teacher")


def _method_teacher(config: ml_collections.ConfigDict, method: Method,
                    hparams: ml_collections.ConfigDict, plain_teacher: Any,
                    stages: list[AnyStage]) -> TeacherSource:
  """The teacher `method` reads: the plain one (`plain_teacher()`), or, for a method with a
  TeacherPreparation, stage `teacher_<method>` (appended here)."""
  prep = method.teacher
  if prep is None:
    return dataclasses.replace(plain_teacher(),
                               own_view=method.online_teacher_head is not None)
  base = plain_teacher() if prep.frozen_backbone else None
  name = f"teacher_{method.name}"
  stages.append(Stage(
      name=name, config=config, model_name=config.teacher.name,
      method=prep.training_method(method), hparams=hparams,
      num_epochs=int(hparams[prep.num_epochs]),
      base_lr=recipe.preparation_lr(config, hparams[prep.lr]),
      milestones=tuple(hparams[prep.milestones]) if prep.milestones else (),
      init_from=base, select=prep.select,
      export_file=TEACHER_FILE,
      epochs_field=f"{recipe.hparams_field(config, method)}.{prep.num_epochs}"))
  return TeacherSource(config.teacher.name, stage=name, heads=prep.heads, hparams=hparams)


def _student_stages(config: ml_collections.ConfigDict, method: Method,
                    teacher: Optional[TeacherSource]) -> list[Stage]:
  """Stage `student_<method>`, after `student_<method>_init` for a method with a
  StudentPreparation (RepDistiller's `init`: the student's feature layers and the
  preparation's bridge trained on its loss against the frozen teacher, at a constant learning
  rate; the student stage then starts from the prepared student, its bridge dropped)."""
  hparams = recipe.method_hparams(config, method)
  student = Stage(
      name=f"student_{method.name}", config=config, model_name=config.student.name,
      method=method, hparams=hparams, num_epochs=config.num_epochs,
      base_lr=config.optimizer.lr, teacher=teacher, export_file=STUDENT_FILE)
  prep = method.student_preparation
  if prep is None:
    return [student]
  init = dataclasses.replace(
      student, name=f"{student.name}_init", method=prep.training_method(method),
      num_epochs=int(hparams[prep.num_epochs]),
      base_lr=recipe.preparation_lr(config, hparams[prep.lr]), milestones=(),
      features_only=True, scores_top1=False,
      epochs_field=f"{recipe.hparams_field(config, method)}.{prep.num_epochs}")
  return [init, dataclasses.replace(student, init_from=init.name, freeze_backbone=False)]


def _linear_probe(config: ml_collections.ConfigDict, student: Stage,
                  num_classes: int) -> Stage:
  """Stage `linear_probe`: a linear classifier trained with cross-entropy on the pooled
  features of the finished `student`'s frozen backbone (inference mode), on
  `linear_probe.dataset`; its eval top-1 is the probe accuracy."""
  probe = config.linear_probe
  ce = cross_entropy_method()
  return Stage(
      name="linear_probe", config=recipe.linear_probe_config(config),
      model_name=config.student.name,
      method=dataclasses.replace(ce, name="linear_probe", student_heads=linear_probe_heads),
      hparams=ml_collections.ConfigDict(dict(tap="pooled")), num_epochs=probe.num_epochs,
      base_lr=probe.lr,
      milestones=tuple(probe.get("milestones", ())), init_from=student.name,
      backbone_num_classes=num_classes, epochs_field="linear_probe.num_epochs")


def stage_list(config: ml_collections.ConfigDict, num_classes: int) -> list[AnyStage]:
  """The stages of `config`, in the order they run (see the module docstring). The plain
  teacher's stage comes first, and only where a stage reads it. `num_classes`: the dataset's."""
  stages: list[AnyStage] = []
  plain: list[TeacherSource] = []

  def plain_teacher() -> TeacherSource:
    if not plain:
      plain.append(_plain_teacher(config, stages))
    return plain[0]

  main = None
  for name in recipe.student_methods(config):
    method = get_method(name)
    hparams = recipe.method_hparams(config, method)
    teacher = (_method_teacher(config, method, hparams, plain_teacher, stages)
               if method.uses_teacher else None)
    stages += _student_stages(config, method, teacher)
    if recipe.is_main_method(config, method):
      main = stages[-1]
  if recipe.linear_probe_enabled(config):
    if main.method.deployed is not None:
      raise UserError(f"linear_probe reads the backbone of the {main.method.name!r} student's "
                      f"export, but {main.method.name!r} exports the network it deploys; probe "
                      f"another method's student (--config.method.name)")
    stages.append(_linear_probe(config, main, num_classes))
  return stages


# ------------------------------------------------------------------------------- checks


def own_head_methods() -> list[str]:
  """The registered methods that train their own head on a frozen teacher."""
  return [name for name in METHOD_NAMES
          if get_method(name).online_teacher_head is not None and not get_method(name).teacher]


def check_taps(config: ml_collections.ConfigDict, method: Method, info: data.DatasetInfo,
               clip_teacher: bool) -> None:
  """Refuses a network that does not give the taps `method` reads (Method.taps), naming what
  is missing, and a pair whose numbers of paired taps differ."""
  hparams = recipe.method_hparams(config, method)
  roles = [("student", config.student.name)]
  if not clip_teacher:
    roles.append(("teacher", config.teacher.name))
  counts = []
  for role, model in roles:
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


def check_class_maps(config: ml_collections.ConfigDict, method: Method,
                     info: data.DatasetInfo) -> None:
  """Refuses a network that gives no class activation maps (Method.class_maps)."""
  for role, model in (("student", config.student.name), ("teacher", config.teacher.name)):
    if objective.class_map_shape(model, info.num_classes, tuple(info.image_shape)) is None:
      raise UserError(f"method {method.name!r} reads the class activation maps of both "
                      f"networks, but {role} {model!r} gives none with class_maps=True; "
                      f"return them from its feats (see jaxkd.models.register)")


def check_distils(config: ml_collections.ConfigDict, method: Method,
                  info: data.DatasetInfo) -> None:
  """Refuses a student method that learns no classes: one that reads no teacher and whose loss
  does not read the labels (a self-supervised objective, jaxkd.method_inputs)."""
  if method.uses_teacher or method_inputs.reads_labels(
      method, recipe.method_hparams(config, method), config.student.name, info.num_classes,
      tuple(info.image_shape)):
    return
  field = recipe.hparams_field(config, method)
  where = "method.name" if field == "method" else "baselines"
  raise UserError(
      f"{where} names {method.name!r}, which is not a distillation method: it reads no teacher "
      "and its loss no labels (a self-supervised objective, it trains no classifier); "
      "distil with e.g. kd (ce: the student alone), and pretrain a teacher with it: "
      f"--config.teacher.pretrain={method.name}")


def _check_methods(config: ml_collections.ConfigDict, info: data.DatasetInfo,
                   mesh: jax.sharding.Mesh, clip_teacher: bool) -> None:
  """Each student method: one that distils or trains a classifier, against the pair, the
  devices, the taps the networks give and the config its own optimiser reads."""
  for name in recipe.student_methods(config):
    method = get_method(name)
    check_distils(config, method, info)
    if method.check_pair is not None and not clip_teacher:
      method.check_pair(config.teacher.name, config.student.name, info.num_classes)
    if method.check_mesh is not None:
      method.check_mesh(mesh)
    if method.taps is not None:
      check_taps(config, method, info, clip_teacher)
    if method.class_maps and not clip_teacher:
      check_class_maps(config, method, info)
    if method.optimizer is not None and method.optimizer.check is not None:
      method.optimizer.check(config, recipe.method_hparams(config, method))


def _check_teacher(config: ml_collections.ConfigDict, clip_teacher: bool) -> None:
  """A pretrained or CLIP teacher has no classifier: only methods that train their own head
  on it can read it; a CLIP tower needs its weights."""
  teacher_name, pretrain = config.teacher.name, config.teacher.get("pretrain", "")
  if pretrain:
    if clip_teacher:
      raise UserError(f"teacher.pretrain={pretrain!r} trains a zoo teacher, but CLIP tower "
                      f"{teacher_name!r} is used as it is; set --config.teacher.pretrain=''")
    if get_method(pretrain).uses_teacher:
      raise UserError(f"teacher.pretrain={pretrain!r} distils from a teacher itself; use a "
                      "self-supervised method, one that reads no teacher")
  if clip_teacher or pretrain:
    why = "is a CLIP image tower" if clip_teacher else f"is pretrained by {pretrain!r}"
    for name in recipe.student_methods(config):
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
    clip_weights.check_weights_path(checkpoint_path)


def check_run(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
              cache_dir: Optional[str] = None) -> dict[str, data.DatasetInfo]:
  """The checks that read the dataset and the networks, after every field was checked alone;
  returns the dataset info of the run ('') and of the linear probe ('linear_probe')."""
  info = data.get_dataset_info(config.dataset, cache_dir=cache_dir)
  data.check_readable(config.dataset)
  clip_teacher = config.teacher.name in clip.CLIP_MODELS
  for name in (config.student.name,) if clip_teacher else (config.teacher.name,
                                                           config.student.name):
    models.get_model(name, info.num_classes)
  _check_methods(config, info, mesh, clip_teacher)
  _check_teacher(config, clip_teacher)
  infos = {"": info}
  if recipe.linear_probe_enabled(config):
    probe_info = data.get_dataset_info(recipe.linear_probe_config(config).dataset,
                                       cache_dir=cache_dir)
    data.check_readable(recipe.linear_probe_config(config).dataset)
    if probe_info.image_shape[-1] != info.image_shape[-1]:
      raise UserError(
          f"linear_probe.dataset={probe_info.name!r} has {probe_info.image_shape[-1]} image "
          f"channel(s) but the student was trained on {info.image_shape[-1]} "
          f"({info.name!r}); probe on a dataset with the same channels")
    infos["linear_probe"] = probe_info
  parallel.check_batch_divides(config.batch_size, mesh)
  parallel.check_batch_divides(config.eval_batch_size, mesh, "eval_batch_size")
  return infos


def check_teacher_file(stage: ImportStage, info: data.DatasetInfo) -> None:
  """An imported teacher's file (`teacher.checkpoint`) exists and fits its network for the
  dataset, read as the executor will read it (no device: the network's tree is evaluated
  abstractly); a file that does not fit names the zoo networks it does fit."""
  source = stage.source
  if source.clip:
    return  # Checked by _check_teacher; read when the stage runs.
  network = networks.build_network(source.model_name, info.num_classes)
  try:
    networks.read_variables(network, source.path, info.image_shape)
  except checkpoint.Misfit as e:
    raise networks.misfit_error(e, info.num_classes, tuple(info.image_shape),
                                "--config.teacher.name") from None


# ------------------------------------------------------------------------------ the plan


def stage_state(stage: AnyStage, workdir: Optional[str]) -> str:
  """'import', 'done', 'resume from step N' or 'to run'; a stage directory trained under
  another effective config, or holding a damaged record, is refused (jaxkd.stage_config,
  jaxkd.results), and so is one that could not be written where the stage will run."""
  if isinstance(stage, ImportStage):
    return IMPORT
  if workdir is None:
    return TO_RUN
  stage_dir = os.path.join(workdir, stage.name)
  done = paths.exists(os.path.join(stage_dir, results.RESULT_FILE))
  if not done:
    check_stage_folders(stage, workdir)
  saved = checkpoint.saved_steps(os.path.join(stage_dir, "checkpoints"))
  if done or saved:
    stage_config.check(stage, stage_dir)
  if done:
    results.read_result(workdir, stage.name)  # A damaged record: one line, before any work.
    return DONE
  return f"resume from step {saved[-1]}" if saved else TO_RUN


def stage_files(stage: Stage) -> list[str]:
  """The files a stage writes in its directory, besides its checkpoints/ and its result."""
  names = [stage_config.CONFIG_FILE, METRICS_FILE]
  if stage.export_file:
    names += [stage.export_file] + (["best_" + stage.export_file] if stage.select else [])
  return names + ([stage.backbone_file] if stage.backbone_file else [])


def check_stage_folders(stage: Stage, workdir: str) -> None:
  """Every folder the stage writes (its directory: logs, metrics, exports and result; its
  checkpoints/) can be written, probed where it is or would be made, leaving nothing behind;
  a folder, FIFO or device under the name of a file it writes is refused too. One line each,
  before any stage trains (orbax would retry a refused checkpoint folder for minutes)."""
  stage_dir = os.path.join(workdir, stage.name)
  fix = "make it writable, or pass another --workdir"
  paths.check_writable_ahead(stage_dir, "stage directory", fix)
  paths.check_writable_ahead(os.path.join(stage_dir, "checkpoints"), "checkpoint folder", fix)
  for name in stage_files(stage):
    path = os.path.join(stage_dir, name)
    kind = paths.file_kind(path)
    if kind is not None:
      raise UserError(f"{path} is {kind}, where stage {stage.name} writes its {name}; remove "
                      "it, or pass another --workdir")


def make_plan(config: ml_collections.ConfigDict, workdir: Optional[str],
              mesh: jax.sharding.Mesh, cache: bool = True) -> Plan:
  """The run's plan; raises a one-line UserError for every mistake found before any work.
  `cache`: a dataset's computed statistics are kept in the workdir (jaxkd.data.sources)."""
  warnings = config_checks.check_config(config, method_lookup=get_method)
  infos = check_run(config, mesh, cache_dir=workdir if cache else None)
  stages = tuple(stage_list(config, infos[""].num_classes))
  for stage in stages:
    if isinstance(stage, ImportStage):
      check_teacher_file(stage, infos[""])
  stage_infos = {"": infos[""]}
  stage_infos.update({s.name: infos.get(s.name, infos[""]) for s in stages})
  for stage in stages:
    if isinstance(stage, Stage):
      info = stage_infos[stage.name]
      config_checks.check_steps(stage.config, stage.name, stage.epochs_field, stage.num_epochs,
                                data.steps_per_epoch(info, stage.config.batch_size),
                                info.num_train)
  states = {s.name: stage_state(s, workdir) for s in stages}
  if jax.process_index() == 0:
    for line in warnings:  # Once every check passed: a refused run prints its error alone.
      print(line, file=sys.stderr, flush=True)
  return Plan(config=config, workdir=workdir, stages=stages, infos=stage_infos,
              states=states)


def _row(plan: Plan, stage: AnyStage) -> tuple[str, ...]:
  info = plan.infos[stage.name]
  if isinstance(stage, ImportStage):
    return (stage.name, stage.source.model_name, "imported", "-", "-", "-", "-",
            stage.source.describe(), "-", plan.states[stage.name])
  steps_per_epoch = data.steps_per_epoch(info, stage.config.batch_size)
  views = data.num_views(stage.method.views)
  teacher = stage.teacher.describe() if stage.teacher else "-"
  init = stage.init_from
  start = "-" if init is None else (f"stage {init}" if isinstance(init, str)
                                    else init.describe())
  return (stage.name, stage.model_name, stage.method.name, str(stage.num_epochs),
          f"{stage.num_epochs * steps_per_epoch:,}",
          f"{stage.config.batch_size * views:,}", f"{stage.base_lr:g}", teacher, start,
          plan.states[stage.name])


def describe(plan: Plan) -> str:
  """The plan as a table: stage, network, method, epochs, steps, images per step (views
  included), learning rate, the teacher beside it, the variables its backbone starts from, and
  its state in the workdir."""
  info = plan.info
  rows = [("stage", "model", "method", "epochs", "steps", "images/step", "lr", "teacher",
           "starts from", "state")]
  rows += [_row(plan, stage) for stage in plan.stages]
  lines = [f"plan of {plan.workdir or '(no workdir)'}: {info.name}, {info.num_train:,} "
           f"training / {info.num_eval:,} eval examples, {info.num_classes} classes, "
           f"{jax.device_count()} device(s)"]
  return "\n".join(lines + progress.columns(rows))
