"""What one stage of a run is: data, made by `jaxkd.plan` and read by the executor and the loop.

A `Stage` says which network learns with which loss, on which views, for how long, under which
config, beside which frozen teacher (`TeacherSource`) and from which initial variables; an
`ImportStage` loads a teacher that is not trained here. Neither holds arrays: what they read
(a teacher's variables, a finished stage's export) is loaded by the executor when the stage
runs. The names of the files a stage leaves in its directory live here too.
"""

import dataclasses
from typing import Any, Callable, Optional, Union

import jax.numpy as jnp
import ml_collections

from jaxkd.methods.base import HeadsFactory, Method
from jaxkd.networks import Network, build_network

TEACHER_FILE = "teacher.msgpack"
STUDENT_FILE = "student.msgpack"
BACKBONE_FILE = "backbone.msgpack"
METRICS_FILE = "metrics.jsonl"  # Every scalar the stage logs (jaxkd.metrics_log).
NO_CLASSIFIER_NOTE = ("no classifier is trained in this stage, so it has no top-1; its features "
                      "are judged by the stages that use them (e.g. linear_probe)")


@dataclasses.dataclass(frozen=True)
class TeacherSource:
  """Where a frozen teacher comes from, and the network that reads it.

  `stage`: the export of that stage of this run (checked against the sha256 it recorded), or,
  with `file`, that file in the stage's directory (a pretrained backbone). `path`: a file given
  by the config (`teacher.checkpoint`). `clip`: `path` holds a CLIP tower's weights.
  `heads`/`hparams`: the method's heads on the teacher (a teacher prepared by a method).
  `own_view`: the method feeds the teacher a view of its own, drawn independently of the
  student's (EGA); a zoo teacher's is the dataset's crop + flip at the dataset's size.
  """
  model_name: str
  stage: Optional[str] = None
  file: Optional[str] = None
  path: Optional[str] = None
  clip: bool = False
  heads: Optional[HeadsFactory] = None
  hparams: Optional[ml_collections.ConfigDict] = None
  own_view: bool = False

  @property
  def key(self) -> str:
    """Identifies the variables read: one teacher is loaded once per run."""
    return f"{self.stage}/{self.file}" if self.stage else f"file:{self.path}"

  def describe(self) -> str:
    """For the plan's table: 'stage teacher', 'file x.msgpack', 'CLIP ViT-B/32 (…)'."""
    if self.stage:
      return f"{self.stage}/{self.file}" if self.file else f"stage {self.stage}"
    return f"{'CLIP ' if self.clip else ''}{self.path}"


@dataclasses.dataclass(frozen=True)
class ImportStage:
  """Stage `teacher` when the teacher is not trained here: a file or a CLIP tower, loaded and
  (where it has a classifier) evaluated."""
  name: str
  config: ml_collections.ConfigDict
  source: TeacherSource
  scores_top1: bool = True


@dataclasses.dataclass(frozen=True)
class Stage:
  """One training stage: which network learns with which loss, on which views, for how long.

  `method`: how the stage trains — its loss, views, heads, bridge, optimiser, taps, deployed
  network and evaluation metrics (`jaxkd.methods.base.Method`; a preparation stage's is made by
  its TeacherPreparation/StudentPreparation, a teacher's and a linear probe's is
  cross-entropy).
  `config`: the config the stage runs under (the run's; the linear probe's has its own dataset
  and epochs). `hparams`: the method's effective hyper-parameters.
  `teacher`: the frozen teacher beside the student, if the loss reads one.
  `init_from`: variables loaded into the backbone before training: a finished stage's export
  (its name) or a teacher's. Kept frozen (the backbone runs in inference mode and only the heads
  learn) unless `freeze_backbone` is False (a student after its preparation stage).
  `export_file`: the final variables (bridge left out) are written to this file in the stage
  directory, how a trained network is handed to later stages and to users; `backbone_file`:
  the backbone alone is written there too (a pretrained teacher).
  `backbone_num_classes`: classes of the backbone's own classifier when they differ from the
  stage's dataset (a linear probe on another dataset keeps the student's backbone as it is).
  `scores_top1`: False for a stage that trains no classifier (self-supervised pretraining): the
  top-1 of its network would mean nothing, so it is not evaluated and its result says so.
  `features_only`: only the backbone's parameters that its taps depend on learn (and the heads
  and bridge); the classifier keeps its initial values (a student preparation stage).
  `select`: `(eval scores, hparams) -> score or None`; the export is the evaluation with the
  highest score (e.g. `teacher.keep='best'`), else the last.
  `epochs_field`: the config field `num_epochs` comes from (named by the plan's refusals).
  `recorded`: (field, value) pairs of the run config that decide this stage's result beyond
  what every stage records (`teacher.keep='best'`); saved in its config.json and compared on
  resume and reuse like the rest (jaxkd.stage_config).
  """
  name: str
  config: ml_collections.ConfigDict
  model_name: str
  method: Method
  hparams: ml_collections.ConfigDict
  num_epochs: int
  base_lr: float
  milestones: Optional[tuple[float, ...]] = None
  teacher: Optional[TeacherSource] = None
  init_from: Optional[Union[str, TeacherSource]] = None
  export_file: Optional[str] = None
  backbone_file: Optional[str] = None
  select: Optional[Callable[[dict[str, float], ml_collections.ConfigDict], Optional[float]]] = None
  backbone_num_classes: Optional[int] = None
  scores_top1: bool = True
  freeze_backbone: bool = True
  features_only: bool = False
  epochs_field: str = "num_epochs"
  recorded: tuple[tuple[str, Any], ...] = ()

  @property
  def num_negatives(self) -> int:
    """Negatives drawn per example by the input pipeline (Method.negatives)."""
    return self.method.negatives(self.hparams) if self.method.negatives else 0

  def network(self, num_classes: int, dtype: Any = jnp.float32,
              num_train: Optional[int] = None) -> Network:
    """The stage's network; the method's bridge too when `num_train` (training) is given."""
    method = self.method
    network = build_network(self.model_name, num_classes, method.student_heads, self.hparams,
                            dtype, self.backbone_num_classes)
    bridge = method.bridge(num_train, self.hparams) if method.bridge and num_train else None
    frozen = self.init_from is not None and self.freeze_backbone
    return network.clone(frozen_backbone=frozen, bridge=bridge, preact=method.preact,
                         class_maps=method.class_maps)


AnyStage = Union[Stage, ImportStage]
