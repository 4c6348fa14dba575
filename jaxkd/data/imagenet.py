"""ImageNet views: torchvision's standard recipe, as pure TensorFlow functions of (JPEG, key).

  train: RandomResizedCrop(224) (scale 0.08-1, aspect 3/4-4/3, 10 tries, then a center crop of
         the clamped aspect), horizontal flip, normalise with the ImageNet mean / std;
  eval:  Resize(256) of the shorter side, CenterCrop(224), normalise.

The crop window is drawn exactly as torchvision's `RandomResizedCrop.get_params` draws it, with
stateless random numbers from the example's key; the JPEG is decoded only inside that window. The
resize is bilinear with antialiasing (PIL's behaviour). View sets, as in `jaxkd.data.views`:
  `none`       one view                                        -> [224, 224, 3]
  `rotations`  one crop + flip, then its rotations by k*90 degrees (HSAKD's ImageNet batches,
               which rotate the augmented tensor)                -> [4, 224, 224, 3]
  `two_crops`  two independent crop + flip views                 -> [2, 224, 224, 3]
Images reach these functions still encoded: `sources.load_split` asks tfds not to decode the
datasets whose `DatasetInfo.transform` is 'inception_crop', so a shard kept in memory holds JPEG
bytes (about 110 KB per image) rather than decoded pixels.
"""

import math
from typing import Callable

import tensorflow as tf

from jaxkd.data import views as views_lib
from jaxkd.data.sources import DatasetInfo

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
CROP = 224
RESIZE = 256
SCALE = (0.08, 1.0)
RATIO = (3.0 / 4.0, 4.0 / 3.0)
ATTEMPTS = 10
_ALG = 'philox'


def _split(key: tf.Tensor, num: int) -> list[tf.Tensor]:
  return tf.unstack(tf.random.experimental.stateless_split(key, num, alg=_ALG))


def random_resized_crop_window(key: tf.Tensor, height, width, scale=SCALE,
                               ratio=RATIO) -> tf.Tensor:
  """(top, left, h, w) int32 of torchvision's RandomResizedCrop for an image of height x width.

  Try ATTEMPTS times: area a ~ U(scale) * H * W, aspect r = exp(U(log ratio)),
  w = round(sqrt(a * r)), h = round(sqrt(a / r)); the first try with 0 < w <= W and 0 < h <= H
  wins, at top ~ U{0..H-h}, left ~ U{0..W-w}. If none fits: the largest centered window whose
  aspect is W/H clamped to `ratio`.
  """
  height = tf.cast(height, tf.float32)
  width = tf.cast(width, tf.float32)
  area_key, ratio_key, top_key, left_key = _split(key, 4)
  area = height * width * tf.random.stateless_uniform(
      [ATTEMPTS], area_key, minval=scale[0], maxval=scale[1], alg=_ALG)
  aspect = tf.exp(tf.random.stateless_uniform(
      [ATTEMPTS], ratio_key, minval=math.log(ratio[0]), maxval=math.log(ratio[1]), alg=_ALG))
  # tf.round rounds half to even, like Python's round() in torchvision.
  w = tf.round(tf.sqrt(area * aspect))
  h = tf.round(tf.sqrt(area / aspect))
  fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  first = tf.argmax(tf.cast(fits, tf.int32))  # 0 when none fits; then `fits[first]` is False
  h_try, w_try = h[first], w[first]
  top_u = tf.random.stateless_uniform([ATTEMPTS], top_key, alg=_ALG)[first]
  left_u = tf.random.stateless_uniform([ATTEMPTS], left_key, alg=_ALG)[first]
  top_try = tf.floor(top_u * (height - h_try + 1))
  left_try = tf.floor(left_u * (width - w_try + 1))

  in_ratio = width / height
  h_fb = tf.where(in_ratio < ratio[0], tf.round(width / ratio[0]), height)
  w_fb = tf.where(in_ratio > ratio[1], tf.round(height * ratio[1]), width)
  top_fb = tf.floor((height - h_fb) / 2)
  left_fb = tf.floor((width - w_fb) / 2)

  found = fits[first]
  window = tf.where(found, tf.stack([top_try, left_try, h_try, w_try]),
                    tf.stack([top_fb, left_fb, h_fb, w_fb]))
  return tf.cast(window, tf.int32)


def resize_shorter_side(height, width, size: int = RESIZE) -> tf.Tensor:
  """(new_h, new_w) int32 of torchvision's Resize(size): shorter side -> size, the other
  int(size * long / short) (truncated)."""
  height = tf.cast(height, tf.float32)
  width = tf.cast(width, tf.float32)
  short, long = tf.minimum(height, width), tf.maximum(height, width)
  other = tf.floor(size * long / short)
  return tf.cast(tf.where(height <= width, tf.stack([float(size), other]),
                          tf.stack([other, float(size)])), tf.int32)


def center_crop_offsets(height, width, size: int = CROP) -> tf.Tensor:
  """(top, left) int32 of torchvision's CenterCrop(size): round((H - size) / 2), half to even."""
  height = tf.cast(height, tf.float32)
  width = tf.cast(width, tf.float32)
  return tf.cast(tf.round(tf.stack([(height - size) / 2, (width - size) / 2])), tf.int32)


def _resize(image: tf.Tensor, size) -> tf.Tensor:
  return tf.image.resize(image, size, method='bilinear', antialias=True)


def _train_crop(jpeg: tf.Tensor, key: tf.Tensor) -> tf.Tensor:
  """Random-resized crop + flip of one JPEG, float32 in [0, 1], [224, 224, 3]."""
  crop_key, flip_key = _split(key, 2)
  shape = tf.image.extract_jpeg_shape(jpeg)
  window = random_resized_crop_window(crop_key, shape[0], shape[1])
  image = tf.image.decode_and_crop_jpeg(jpeg, window, channels=3)
  image = _resize(views_lib.to_unit(image), [CROP, CROP])
  image = tf.clip_by_value(image, 0.0, 1.0)  # Antialiased bilinear can overshoot slightly.
  image = views_lib.random_flip(image, flip_key)
  return tf.ensure_shape(image, [CROP, CROP, 3])


def _eval_crop(jpeg: tf.Tensor) -> tf.Tensor:
  """Resize(256) + CenterCrop(224) of one JPEG, float32 in [0, 1], [224, 224, 3]."""
  image = views_lib.to_unit(tf.io.decode_jpeg(jpeg, channels=3))
  shape = tf.shape(image)
  size = resize_shorter_side(shape[0], shape[1])
  image = tf.clip_by_value(_resize(image, size), 0.0, 1.0)
  offsets = center_crop_offsets(size[0], size[1])
  image = tf.slice(image, [offsets[0], offsets[1], 0], [CROP, CROP, 3])
  return tf.ensure_shape(image, [CROP, CROP, 3])


def _rotations(image: tf.Tensor) -> tf.Tensor:
  return tf.stack([tf.image.rot90(image, k) for k in range(4)])


def train_views(views: str, jpeg: tf.Tensor, key: tf.Tensor, info: DatasetInfo) -> tf.Tensor:
  """Augmented, normalised float32 views of one JPEG (see the module docstring)."""
  views_lib.check_views(views, info)
  if views == 'none':
    return views_lib.normalize(_train_crop(jpeg, key), info)
  if views == 'two_crops':
    return views_lib.normalize(tf.stack([_train_crop(jpeg, k) for k in _split(key, 2)]), info)
  return views_lib.normalize(_rotations(_train_crop(jpeg, key)), info)


def eval_views(views: str, jpeg: tf.Tensor, info: DatasetInfo) -> tf.Tensor:
  """Resize + center crop, normalised; `two_crops` gives it twice, `rotations` rotated 4 ways."""
  views_lib.check_views(views, info)
  image = views_lib.normalize(_eval_crop(jpeg), info)
  if views == 'none':
    return image
  if views == 'two_crops':
    return tf.stack([image, image])
  return _rotations(image)


def make_views_fn(views: str, info: DatasetInfo,
                  train: bool) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
  """fn(JPEG bytes (scalar string), key [2]) -> float32 views; eval ignores the key."""
  views_lib.check_views(views, info)
  if train:
    return lambda jpeg, key: train_views(views, jpeg, key, info)
  return lambda jpeg, key: eval_views(views, jpeg, info)
