"""Frozen teachers: loaded once per run from where the plan says (a stage's export, a file, a
CLIP tower), checked against their network and replicated over the mesh."""

import dataclasses
import os
from typing import Any, Optional

import jax
import ml_collections

from jaxkd import checkpoint
from jaxkd import data
from jaxkd import parallel
from jaxkd.data import teacher_views
from jaxkd.interop import clip_weights
from jaxkd.models import clip
from jaxkd.networks import Network, build_network, compute_dtype, read_variables
from jaxkd.results import export_remedy
from jaxkd.stage import TeacherSource


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


def teacher_image_shape(teacher: Teacher, info: data.DatasetInfo) -> tuple[int, ...]:
  """[H, W, C] of the images the teacher reads: its own view's, else the dataset's."""
  if teacher.input is None:
    return tuple(info.image_shape)
  return teacher_views.teacher_view_shape(info, teacher.input)


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
  return load_teacher(network, result["export"], info, mesh,
                      sha256=result.get("export_sha256"), remedy=export_remedy(result),
                      what=f"stage {result['stage']}'s export")


def load_clip_teacher(path: str, model_name: str, config: ml_collections.ConfigDict,
                      mesh: jax.sharding.Mesh) -> Teacher:
  """The frozen CLIP tower `model_name` from `path` (a Hugging Face folder or an OpenAI .pt
  file); its checksum is that of the weight file."""
  path = os.path.abspath(path) if path else ""
  tower, variables = clip_weights.load_clip(path, model_name, compute_dtype(config))
  weights = os.path.join(path, "model.safetensors") if os.path.isdir(path) else path
  return Teacher(network=Network(backbone=tower),
                 variables=parallel.replicate({col: {"backbone": tree}
                                               for col, tree in variables.items()}, mesh),
                 path=path, sha256=checkpoint.file_sha256(weights), input=clip_input(tower))


def clip_input(tower: Any) -> teacher_views.TeacherInput:
  """How a CLIP tower sees an image: its own resolution, CLIP's statistics, RGB."""
  return teacher_views.TeacherInput(size=tower.config.image_size, mean=clip.CLIP_MEAN,
                                    std=clip.CLIP_STD, channels=3)


class Teachers:
  """The run's frozen teachers, each loaded once, when a stage first reads it."""

  def __init__(self, config: ml_collections.ConfigDict, info: data.DatasetInfo,
               mesh: jax.sharding.Mesh):
    self.config, self.info, self.mesh = config, info, mesh
    self._loaded: dict[str, Teacher] = {}

  def get(self, source: TeacherSource, results: dict[str, dict[str, Any]]) -> Teacher:
    """The teacher `source` names; `results`: the records of the stages already run."""
    if source.key not in self._loaded:
      self._loaded[source.key] = self._load(source, results)
    teacher = self._loaded[source.key]
    if source.own_view and teacher.input is None and self.info.transform == "pad_crop":
      teacher = dataclasses.replace(teacher, input=teacher_views.DATASET_INPUT)
    return teacher

  def _load(self, source: TeacherSource, results: dict[str, dict[str, Any]]) -> Teacher:
    # The frozen teacher computes in the run's precision too (most of a step's FLOPs on GPU).
    if source.clip:
      return load_clip_teacher(source.path, source.model_name, self.config, self.mesh)
    network = build_network(source.model_name, self.info.num_classes, source.heads,
                            source.hparams, compute_dtype(self.config))
    if source.stage is None:
      return load_teacher(network, source.path, self.info, self.mesh)
    if source.file is None:
      return load_export(network, results[source.stage], self.info, self.mesh)
    path = os.path.join(results[source.stage]["logdir"], source.file)
    return load_teacher(network, path, self.info, self.mesh)
