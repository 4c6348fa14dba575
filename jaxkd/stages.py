"""Which stages a run has: its teachers (trained, imported or prepared by a method), the
students of each method (prepared first where the method asks for it) and the linear probe.

Nothing here trains: every stage is described as a `Stage` and handed to `loop.run_stage`,
which skips it when it is done. Nothing here names a method either: what a method needs is
read from its `Method` record.
"""

import dataclasses
import functools
import os
from typing import Any

import flax.linen as nn
import jax
import ml_collections

from jaxkd import checkpoint
from jaxkd import data
from jaxkd import paths
from jaxkd import parallel
from jaxkd.data import teacher_views
from jaxkd.interop import clip_weights
from jaxkd.loop import (BACKBONE_FILE, NO_CLASSIFIER_NOTE, STUDENT_FILE, TEACHER_FILE, Stage,
                        Teacher, backbone_only, build_network, compute_dtype, evaluate,
                        load_export, load_teacher, run_stage)
from jaxkd.methods import Method, canonical_name, cross_entropy_method, get_method
from jaxkd.models import clip
from jaxkd.models import layers
from jaxkd.state import Network
from jaxkd import steps


def teacher_lr(config: ml_collections.ConfigDict) -> float:
  """`teacher.lr`, or `optimizer.lr` where it is −1."""
  lr = config.teacher.get("lr", -1.0)
  return lr if lr > 0 else config.optimizer.lr


def best_top1(scores: dict[str, float], hparams: ml_collections.ConfigDict) -> float:
  """The score by which `teacher.keep='best'` picks the teacher handed on: its test top-1."""
  del hparams
  return scores["top1"]


def preparation_lr(config: ml_collections.ConfigDict, lr: float) -> float:
  """A preparation stage's learning rate: `lr`, or the student's `optimizer.lr` where it is −1."""
  return float(lr) if lr > 0 else config.optimizer.lr


def student_methods(config: ml_collections.ConfigDict) -> list[str]:
  """config.method.name first, then the comma-separated `config.baselines`, without repeats,
  each under its canonical name (jaxkd.methods.canonical_name)."""
  names = [config.method.name] + [n.strip() for n in config.get("baselines", "").split(",")]
  return list(dict.fromkeys(canonical_name(n) for n in names if n))


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
    trained = None  # The result of the stage that trained the teacher here, if one did.
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
      ce = cross_entropy_method()
      stage = Stage(name="teacher", model_name=config.teacher.name, method_name=ce.name,
                    loss=ce.loss, hparams=ce.hparams(), num_epochs=config.teacher.num_epochs,
                    base_lr=teacher_lr(config),
                    select=best_top1 if config.teacher.get("keep", "last") == "best" else None)
      result = trained = run_stage(stage, config, self.workdir, self.mesh, self.info,
                                   export_file=TEACHER_FILE)
    # The frozen teacher computes in the run's precision too (most of a step's FLOPs on GPU/TPU).
    network = build_network(config.teacher.name, self.info.num_classes,
                            dtype=compute_dtype(config))
    teacher = (load_export(network, trained, self.info, self.mesh) if trained
               else load_teacher(network, path, self.info, self.mesh))
    if "top1_last" not in result:
      scores = evaluate(network, teacher.variables, config, self.mesh,
                        jax.jit(functools.partial(steps.eval_step, network=network)))
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
    trained = load_export(stage.network(self.info.num_classes), result, self.info, self.mesh)
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
                  num_epochs=int(hparams[prep.num_epochs]),
                  base_lr=preparation_lr(config, hparams[prep.lr]),
                  views=prep.views, heads=prep.heads,
                  milestones=tuple(hparams[prep.milestones]) if prep.milestones else (),
                  init_backbone=base.variables if base else None,
                  init_backbone_sha256=base.sha256 if base else None,
                  eval_metrics=method.eval_metrics, select=prep.select)
    result = run_stage(stage, config, self.workdir, self.mesh, self.info,
                       export_file=TEACHER_FILE)
    self.results.append(result)
    network = build_network(config.teacher.name, self.info.num_classes, prep.heads, hparams,
                            compute_dtype(config))
    teacher = load_export(network, result, self.info, self.mesh)
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
  trained = load_export(student.network(info.num_classes), student_result, info, mesh)
  lp = config.linear_probe
  ce = cross_entropy_method()
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
  """A student method's hyper-parameters: its defaults (those of the teacher/student pair
  where they differ), then `config.method` for the main method or
  `config.method_overrides.<name>` (a RepDistiller alias works too) for a baseline."""
  if method.name == canonical_name(config.method.name):
    overrides = config.method
  else:
    overrides = None
    for name, fields in config.get("method_overrides", {}).items():
      if canonical_name(name) == method.name:
        overrides = fields
  return method.hparams(overrides, pair=(config.teacher.name, config.student.name))


def student_stage(config: ml_collections.ConfigDict, method: Method, teachers: Teachers,
                  results: list[dict[str, Any]]) -> Stage:
  """Stage `student_<method>`: the student distilled by `method` from its teacher.

  For a method with a StudentPreparation, stage `student_<method>_init` runs first (see
  prepare_student) and the student stage starts from the prepared student.
  """
  hparams = method_hparams(config, method)
  stage = Stage(name=f"student_{method.name}", model_name=config.student.name,
                method_name=method.name, loss=method.loss, hparams=hparams,
                num_epochs=config.num_epochs, base_lr=config.optimizer.lr, views=method.views,
                heads=method.student_heads,
                teacher=teachers.for_method(method, hparams) if method.uses_teacher else None,
                eval_metrics=method.eval_metrics,
                online_teacher_head=method.online_teacher_head if method.uses_teacher else None,
                bridge=method.bridge,
                num_negatives=method.negatives(hparams) if method.negatives else 0,
                preact=method.preact)
  if method.student_preparation is None:
    return stage
  prepared, result = prepare_student(stage, method, config, teachers.workdir, teachers.mesh,
                                     teachers.info)
  results.append(result)
  return dataclasses.replace(stage, init_backbone=prepared.variables,
                             init_backbone_sha256=prepared.sha256, freeze_backbone=False)


def prepare_student(stage: Stage, method: Method, config: ml_collections.ConfigDict,
                    workdir: str, mesh: jax.sharding.Mesh, info: data.DatasetInfo
                    ) -> tuple[Teacher, dict[str, Any]]:
  """Stage `<student stage>_init` (RepDistiller's `init`): the student's feature layers and the
  preparation's bridge trained on its loss against the frozen teacher, at a constant learning
  rate (with the `multistep` schedule); returns the prepared student's variables (loaded like
  a teacher's, the bridge dropped) and the stage's result."""
  prep = method.student_preparation
  hparams = stage.hparams
  init = dataclasses.replace(
      stage, name=f"{stage.name}_init", loss=prep.loss, bridge=prep.bridge,
      num_epochs=int(hparams[prep.num_epochs]),
      base_lr=preparation_lr(config, hparams[prep.lr]), milestones=(), features_only=True,
      scores_top1=False, eval_metrics=None, num_negatives=0)
  result = run_stage(init, config, workdir, mesh, info, export_file=STUDENT_FILE)
  return load_export(init.network(info.num_classes), result, info, mesh), result
