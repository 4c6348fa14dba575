"""Two views of one image, for a teacher that has its own input (EGA's CLIP teacher).

From one uint8 image [H, W, C] and a stateless key, `train_views` gives
  'image'          the student's view: the dataset's crop (zero padding) + flip, [H, W, C]
  'teacher_image'  the teacher's view: its own crop + flip, resized to the teacher's
                   resolution, normalised with the teacher's statistics, [S, S, C_t]
with the randomness of the two drawn independently (separate sub-keys), as the reference's two
torchvision pipelines are. The teacher's view follows the reference order RandomCrop(padding) ->
bicubic Resize(S) -> RandomHorizontalFlip -> Normalize(CLIP), and re-quantises to 8 bits after
the resize as PIL does (tf's bicubic is Keys' a = −0.5 kernel, PIL's too; edges and rounding
may differ by one level). Eval views: no crop, no flip; the teacher's still resized.

All functions are pure TensorFlow of (image, key), like jaxkd.data.views, so the stream is a
function of the seed. The pipeline stacks both into the batch: {'image', 'teacher_image',
'label'}.
"""

import dataclasses
import functools
from typing import Callable

import tensorflow as tf

from jaxkd import errors
from jaxkd.data import views
from jaxkd.data.sources import DatasetInfo
from jaxkd.models.clip import CLIP_MEAN, CLIP_STD  # noqa: F401 (re-exported)

# CLIP's preprocessing statistics (also jaxkd.models.clip.CLIP_MEAN / CLIP_STD).

_ALG = 'philox'
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


def _normalize(image: tf.Tensor, mean, std) -> tf.Tensor:
  return (image - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def _to_teacher_pixels(image: tf.Tensor, info: DatasetInfo, teacher: TeacherInput) -> tf.Tensor:
  """[0, 1] float image -> teacher channels and size, quantised to 8 bits after a resize."""
  if teacher.channels == 3 and image.shape[-1] == 1:
    image = tf.image.grayscale_to_rgb(image)
  if teacher.size and (teacher.size, teacher.size) != tuple(info.image_shape[:2]):
    image = tf.image.resize(image, [teacher.size, teacher.size], method='bicubic',
                            antialias=True)
    image = tf.round(tf.clip_by_value(image, 0.0, 1.0) * 255.0) / 255.0
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


def train_views(image: tf.Tensor, key: tf.Tensor, info: DatasetInfo, teacher: TeacherInput,
                student_normalization: str = 'dataset') -> dict[str, tf.Tensor]:
  """{'image': student view, 'teacher_image': teacher view} of one uint8 image (training).

  Student: flip (if the dataset flips) then crop with the dataset's zero padding, as views
  'none'. Teacher: crop with the same padding -> resize to `teacher.size` -> flip -> normalise.
  The two use independent sub-keys of `key`. `student_normalization`: 'dataset' (the dataset's
  mean/std) or 'teacher' (the teacher's, which the EGA reference uses for its CIFAR student).
  """
  t_mean, t_std = _teacher_stats(info, teacher)
  s_mean, s_std = _student_stats(info, teacher, student_normalization)
  student_key, teacher_key = tf.unstack(
      tf.random.experimental.stateless_split(key, 2, alg=_ALG))
  image = views.to_unit(image)

  flip_key, crop_key = tf.unstack(tf.random.experimental.stateless_split(student_key, 2, alg=_ALG))
  student = image
  if info.flip:
    student = views.random_flip(student, flip_key)
  student = views.random_crop(student, crop_key, info.crop_padding)

  crop_key, flip_key = tf.unstack(tf.random.experimental.stateless_split(teacher_key, 2, alg=_ALG))
  teacher_view = views.random_crop(image, crop_key, info.crop_padding)
  teacher_view = _to_teacher_pixels(teacher_view, info, teacher)
  if info.flip:
    teacher_view = views.random_flip(teacher_view, flip_key)
  return {'image': _normalize(student, s_mean, s_std),
          'teacher_image': _normalize(teacher_view, t_mean, t_std)}


def eval_views(image: tf.Tensor, info: DatasetInfo, teacher: TeacherInput,
               student_normalization: str = 'dataset') -> dict[str, tf.Tensor]:
  """The two views without crop or flip (the teacher's resized and normalised)."""
  t_mean, t_std = _teacher_stats(info, teacher)
  s_mean, s_std = _student_stats(info, teacher, student_normalization)
  image = views.to_unit(image)
  return {'image': _normalize(image, s_mean, s_std),
          'teacher_image': _normalize(_to_teacher_pixels(image, info, teacher), t_mean, t_std)}


def make_views_fn(info: DatasetInfo, teacher: TeacherInput, train: bool,
                  student_normalization: str = 'dataset'
                  ) -> Callable[[tf.Tensor, tf.Tensor], dict[str, tf.Tensor]]:
  """fn(image uint8 [H, W, C], key [2]) -> {'image', 'teacher_image'}; eval ignores the key.

  Checks the statistics once, here, so that a bad combination fails before the pipeline runs.
  """
  _teacher_stats(info, teacher)
  _student_stats(info, teacher, student_normalization)
  if train:
    return functools.partial(train_views, info=info, teacher=teacher,
                             student_normalization=student_normalization)
  return lambda image, key: eval_views(image, info, teacher, student_normalization)
