"""Two views of one image, for a teacher that has its own input (EGA's CLIP teacher).

From one uint8 image [H, W, C] and a key, `train_views` gives
  'image'          the student's view: the dataset's crop (zero padding) + flip, [H, W, C]
  'teacher_image'  the teacher's view: its own crop + flip, resized to the teacher's
                   resolution, normalised with the teacher's statistics, [S, S, C_t]
with the randomness of the two drawn independently (separate keys), as the reference's two
torchvision pipelines are. The teacher's view follows the reference order RandomCrop(padding) ->
bicubic Resize(S) -> RandomHorizontalFlip -> Normalize(CLIP), the resize being PIL's bicubic on
8-bit pixels, as torchvision's on PIL images. Eval views: no crop, no flip; the teacher's still
resized.

All functions are pure NumPy of (image, key), like jaxkd.data.views, so the stream is a function
of the seed. The pipeline stacks both into the batch: {'image', 'teacher_image', 'label'}.
"""

import dataclasses
import functools
from typing import Callable

import numpy as np
from PIL import Image

from jaxkd import errors
from jaxkd.data import keys
from jaxkd.data import views
from jaxkd.data.info import DatasetInfo
from jaxkd.models.clip import CLIP_MEAN, CLIP_STD  # noqa: F401 (re-exported)

# CLIP's preprocessing statistics (also jaxkd.models.clip.CLIP_MEAN / CLIP_STD).

STUDENT_NORMALIZATIONS = ('dataset', 'teacher')


@dataclasses.dataclass(frozen=True)
class TeacherInput:
  """How the teacher sees an image.

  size: side of the (square) teacher view; 0 keeps the dataset's size (no resize).
  mean, std: per-channel statistics on [0, 1] pixels; () takes the dataset's.
  channels: 3 repeats a grey image to RGB (CLIP takes RGB); 0 keeps the dataset's channels.
  """
  size: int = 0
  mean: tuple[float, ...] = ()
  std: tuple[float, ...] = ()
  channels: int = 0


# A CLIP tower at 224 px (ViT-B/32, ViT-B/16, RN50, RN101).
CLIP_224 = TeacherInput(size=224, mean=CLIP_MEAN, std=CLIP_STD, channels=3)
# A zoo teacher (e.g. SimCLR-pretrained by jaxkd): the dataset's own input, drawn independently.
DATASET_INPUT = TeacherInput()


def teacher_view_shape(info: DatasetInfo, teacher: TeacherInput) -> tuple[int, int, int]:
  """[S, S, C_t] of the teacher's view of this dataset."""
  h, w, c = info.image_shape
  size = (teacher.size, teacher.size) if teacher.size else (h, w)
  return size + (teacher.channels or c,)


def _teacher_stats(info: DatasetInfo, teacher: TeacherInput) -> tuple[tuple, tuple]:
  mean, std = teacher.mean or info.mean, teacher.std or info.std
  channels = teacher_view_shape(info, teacher)[-1]
  if len(mean) != channels or len(std) != channels:
    raise errors.UserError(
        f'teacher input statistics have {len(mean)} channels but the teacher view of dataset '
        f'{info.name!r} has {channels}; set TeacherInput.channels or its mean/std')
  return mean, std


def _normalize(pixels: np.ndarray, mean, std) -> np.ndarray:
  """uint8 pixels -> (x / 255 - mean) / std, float32."""
  return (views.to_unit(pixels) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def _to_teacher_pixels(image: np.ndarray, info: DatasetInfo, teacher: TeacherInput
                       ) -> np.ndarray:
  """uint8 image -> the teacher's channels and size (PIL bicubic, 8-bit as PIL keeps it)."""
  if teacher.channels == 3 and image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  if teacher.size and (teacher.size, teacher.size) != tuple(info.image_shape[:2]):
    grey = image.shape[-1] == 1
    resized = Image.fromarray(image[..., 0] if grey else image).resize(
        (teacher.size, teacher.size), Image.BICUBIC)
    image = np.asarray(resized)[..., None] if grey else np.asarray(resized)
  return image


def _student_stats(info: DatasetInfo, teacher: TeacherInput, student_normalization: str):
  if student_normalization not in STUDENT_NORMALIZATIONS:
    raise errors.unknown_name('student normalization', student_normalization,
                              STUDENT_NORMALIZATIONS)
  if student_normalization == 'dataset':
    return info.mean, info.std
  mean, std = teacher.mean or info.mean, teacher.std or info.std
  if len(mean) != info.image_shape[-1]:
    raise errors.UserError(
        f"student normalization 'teacher' needs {info.image_shape[-1]}-channel statistics for "
        f'dataset {info.name!r}; the teacher has {len(mean)}. Use \'dataset\'')
  return mean, std


def train_views(image: np.ndarray, key: keys.Key, info: DatasetInfo, teacher: TeacherInput,
                student_normalization: str = 'dataset') -> dict[str, np.ndarray]:
  """{'image': student view, 'teacher_image': teacher view} of one uint8 image (training).

  Student: flip (if the dataset flips) then crop with the dataset's zero padding, as views
  'none'. Teacher: crop with the same padding -> resize to `teacher.size` -> flip -> normalise.
  The two use independent keys split from `key`. `student_normalization`: 'dataset' (the
  dataset's mean/std) or 'teacher' (the teacher's, which the EGA reference uses for its CIFAR
  student).
  """
  t_mean, t_std = _teacher_stats(info, teacher)
  s_mean, s_std = _student_stats(info, teacher, student_normalization)
  image = np.asarray(image)
  student_rng, teacher_rng = (keys.rng(k) for k in keys.split(key, 2))

  student = image
  if info.flip:
    student = views.random_flip(student, student_rng)
  student = views.random_crop(student, student_rng, info.crop_padding)

  teacher_view = views.random_crop(image, teacher_rng, info.crop_padding)
  teacher_view = _to_teacher_pixels(teacher_view, info, teacher)
  if info.flip:
    teacher_view = views.random_flip(teacher_view, teacher_rng)
  return {'image': _normalize(student, s_mean, s_std),
          'teacher_image': _normalize(teacher_view, t_mean, t_std)}


def eval_views(image: np.ndarray, info: DatasetInfo, teacher: TeacherInput,
               student_normalization: str = 'dataset') -> dict[str, np.ndarray]:
  """The two views without crop or flip (the teacher's resized and normalised)."""
  t_mean, t_std = _teacher_stats(info, teacher)
  s_mean, s_std = _student_stats(info, teacher, student_normalization)
  image = np.asarray(image)
  return {'image': _normalize(image, s_mean, s_std),
          'teacher_image': _normalize(_to_teacher_pixels(image, info, teacher), t_mean, t_std)}


def make_views_fn(info: DatasetInfo, teacher: TeacherInput, train: bool,
                  student_normalization: str = 'dataset'
                  ) -> Callable[[np.ndarray, keys.Key], dict[str, np.ndarray]]:
  """fn(image uint8 [H, W, C], key) -> {'image', 'teacher_image'}; eval ignores the key.

  Checks the statistics once, here, so that a bad combination fails before the pipeline runs.
  """
  _teacher_stats(info, teacher)
  _student_stats(info, teacher, student_normalization)
  if train:
    return functools.partial(train_views, info=info, teacher=teacher,
                             student_normalization=student_normalization)
  return functools.partial(_eval_views_fn, info=info, teacher=teacher,
                           student_normalization=student_normalization)


def _eval_views_fn(image: np.ndarray, key: keys.Key, info: DatasetInfo, teacher: TeacherInput,
                   student_normalization: str) -> dict[str, np.ndarray]:
  del key  # Eval views are not random.
  return eval_views(image, info, teacher, student_normalization)
