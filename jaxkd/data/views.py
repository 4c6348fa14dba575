"""Per-example views for the input pipeline: pure TensorFlow functions of (image, key).

A view set turns one uint8 image [H, W, C] into float32 normalised views:
  `none`       one augmented view               -> [H, W, C]
  `rotations`  the SSKD layout: one shared flip, rotations by k*90 degrees counter-clockwise
               (k = 0..3, `np.rot90(img, k)`), then an independent crop per view -> [4, H, W, C]
  `rotations_of_crop`  HSAKD's order: one crop + flip, then its four rotations -> [4, H, W, C]
  `two_crops`  two independent crop+flip augmentations (contrastive methods) -> [2, H, W, C]
Eval views skip the crop and the flip. All randomness is stateless and comes from `key`, derived
from (seed, epoch, example index), so the data stream is a pure function of the seed.
"""

import functools
from typing import Callable

import tensorflow as tf

from jaxkd import errors
from jaxkd.data.sources import DatasetInfo

VIEWS = ('none', 'rotations', 'rotations_of_crop', 'two_crops')
_ROTATED = ('rotations', 'rotations_of_crop')
# Fixed rather than 'auto_select' so the stream does not depend on which device TF picks.
_ALG = 'philox'


def num_views(views: str) -> int:
  """Views per example: 1 for `none` (which has no view axis), 4 rotations, 2 crops."""
  return {'none': 1, 'rotations': 4, 'rotations_of_crop': 4, 'two_crops': 2}[check_views(views)]


def check_views(views: str, info: DatasetInfo | None = None) -> str:
  """Raises a UserError for an unknown view set (or rotations of non-square images)."""
  if views not in VIEWS:
    raise errors.unknown_name('views', views, VIEWS)
  if views in _ROTATED and info is not None and info.image_shape[0] != info.image_shape[1]:
    raise errors.UserError(
        f'views {views!r} need square images; dataset {info.name!r} has {info.image_shape}')
  return views


def view_shape(views: str, info: DatasetInfo) -> tuple[int, ...]:
  """Shape of one example's views: [H, W, C] for `none`, else [V, H, W, C]."""
  shape = tuple(info.image_shape)
  return shape if check_views(views, info) == 'none' else (num_views(views),) + shape


def example_key(seed, epoch, index) -> tf.Tensor:
  """The stateless RNG key [2] of one example in one epoch."""
  base = tf.stack([tf.cast(seed, tf.int64), tf.cast(epoch, tf.int64)])
  return tf.random.experimental.stateless_fold_in(base, tf.cast(index, tf.int64), alg=_ALG)


def _split(key: tf.Tensor, num: int) -> list[tf.Tensor]:
  return tf.unstack(tf.random.experimental.stateless_split(key, num, alg=_ALG))


def to_unit(image: tf.Tensor) -> tf.Tensor:
  """uint8 [0, 255] -> float32 [0, 1] (torchvision's ToTensor)."""
  return tf.cast(image, tf.float32) / 255.0


def normalize(image: tf.Tensor, info: DatasetInfo) -> tf.Tensor:
  """(x - mean) / std per channel, on a float image in [0, 1]."""
  mean = tf.constant(info.mean, tf.float32)
  std = tf.constant(info.std, tf.float32)
  return (image - mean) / std


def crop_offsets(key: tf.Tensor, padding: int) -> tf.Tensor:
  """Top-left corner (y, x) int32 [2] of a crop of the padded image, each in [0, 2*padding]."""
  return tf.random.stateless_uniform(
      [2], key, minval=0, maxval=2 * padding + 1, dtype=tf.int32, alg=_ALG)


def random_crop(image: tf.Tensor, key: tf.Tensor, padding: int) -> tf.Tensor:
  """Zero-pads H and W by `padding` and crops back to the original size at a random offset."""
  if padding == 0:
    return image
  h, w, c = image.shape
  padded = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]])
  offsets = crop_offsets(key, padding)
  return tf.slice(padded, [offsets[0], offsets[1], 0], [h, w, c])


def random_flip(image: tf.Tensor, key: tf.Tensor) -> tf.Tensor:
  """Mirrors W with probability 1/2."""
  flip = tf.random.stateless_uniform([], key, alg=_ALG) < 0.5
  return tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)


def _augment(image: tf.Tensor, key: tf.Tensor, info: DatasetInfo) -> tf.Tensor:
  flip_key, crop_key = _split(key, 2)
  if info.flip:
    image = random_flip(image, flip_key)
  return random_crop(image, crop_key, info.crop_padding)


def _rotations(image: tf.Tensor) -> list[tf.Tensor]:
  # tf.image.rot90 turns counter-clockwise like np.rot90 on the H, W axes.
  return [tf.image.rot90(image, k) for k in range(4)]


def train_views(views: str, image: tf.Tensor, key: tf.Tensor, info: DatasetInfo) -> tf.Tensor:
  """Augmented, normalised float32 views of one uint8 image (see the module docstring)."""
  check_views(views, info)
  image = to_unit(image)
  if views == 'none':
    return normalize(_augment(image, key, info), info)
  if views == 'two_crops':
    return normalize(tf.stack([_augment(image, k, info) for k in _split(key, 2)]), info)
  if views == 'rotations_of_crop':
    return normalize(tf.stack(_rotations(_augment(image, key, info))), info)
  flip_key, *crop_keys = _split(key, 5)
  if info.flip:
    image = random_flip(image, flip_key)  # One decision for all four views.
  crops = [random_crop(view, k, info.crop_padding)
           for view, k in zip(_rotations(image), crop_keys)]
  return normalize(tf.stack(crops), info)


def eval_views(views: str, image: tf.Tensor, info: DatasetInfo) -> tf.Tensor:
  """Normalised views with no crop and no flip; `two_crops` gives the same image twice."""
  check_views(views, info)
  image = normalize(to_unit(image), info)
  if views == 'none':
    return image
  if views == 'two_crops':
    return tf.stack([image, image])
  return tf.stack(_rotations(image))


def make_views_fn(views: str, info: DatasetInfo,
                  train: bool) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
  """fn(image uint8 [H, W, C], key [2]) -> float32 views; eval ignores the key.

  Datasets whose `info.transform` is 'inception_crop' (ImageNet) get the functions of
  jaxkd/data/imagenet.py instead, which take the encoded JPEG.
  """
  check_views(views, info)
  if info.transform == 'inception_crop':
    from jaxkd.data import imagenet  # pylint: disable=g-import-not-at-top (it imports this module)
    return imagenet.make_views_fn(views, info, train)
  if train:
    return functools.partial(train_views, views, info=info)
  return lambda image, key: eval_views(views, image, info)
