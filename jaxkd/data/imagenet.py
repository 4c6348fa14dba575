"""ImageNet views: torchvision's standard recipe, as pure functions of (JPEG bytes, key).

  train: RandomResizedCrop(224) (scale 0.08-1, aspect 3/4-4/3, 10 tries, then a center crop of
         the clamped aspect), horizontal flip, normalise with the ImageNet mean / std;
  eval:  Resize(256) of the shorter side, CenterCrop(224), normalise.

The crop window is drawn exactly as torchvision's `RandomResizedCrop.get_params` draws it, with
random numbers from the example's key (jaxkd.data.keys). Decoding and resizing are PIL's, as in
torchvision: the JPEG is decoded, the window resized to 224 x 224 with PIL's bilinear filter
(antialiased when it shrinks) on 8-bit pixels. View sets, as in `jaxkd.data.views`:
  `none`       one view                                        -> [224, 224, 3]
  `rotations`  one crop + flip, then its rotations by k*90 degrees (HSAKD's ImageNet batches,
               which rotate the augmented tensor)                -> [4, 224, 224, 3]
  `two_crops`  two independent crop + flip views                 -> [2, 224, 224, 3]
  `weak_strong`  the `none` view of the key, then a strong view: its own crop + flip from
               `keys.strong_view_key(key)`, then RandAugment drawn from that key too (MLKD's
               ImageNet pair, jaxkd.data.randaugment)   -> [2, 224, 224, 3]
Images reach these functions still encoded: the data source leaves the images of datasets whose
`DatasetInfo.transform` is 'inception_crop' undecoded (jaxkd.data.sources), so each is decoded
once, where its views are made.
"""

import functools
import io
import math
from typing import Callable

import numpy as np
from PIL import Image

from jaxkd.data import keys
from jaxkd.data import randaugment
from jaxkd.data import views as views_lib
from jaxkd.data.info import DatasetInfo

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
CROP = 224
RESIZE = 256
SCALE = (0.08, 1.0)
RATIO = (3.0 / 4.0, 4.0 / 3.0)
ATTEMPTS = 10


def random_resized_crop_window(key: keys.Key, height: int, width: int, scale=SCALE,
                               ratio=RATIO) -> np.ndarray:
  """(top, left, h, w) int32 of torchvision's RandomResizedCrop for an image of height x width.

  Try ATTEMPTS times: area a ~ U(scale) * H * W, aspect r = exp(U(log ratio)),
  w = round(sqrt(a * r)), h = round(sqrt(a / r)); the first try with 0 < w <= W and 0 < h <= H
  wins, at top ~ U{0..H-h}, left ~ U{0..W-w}. If none fits: the largest centered window whose
  aspect is W/H clamped to `ratio`.
  """
  rng = keys.rng(key)
  area = height * width * rng.uniform(scale[0], scale[1], ATTEMPTS)
  aspect = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), ATTEMPTS))
  top_u, left_u = rng.random(ATTEMPTS), rng.random(ATTEMPTS)
  # np.round rounds half to even, like Python's round() in torchvision.
  w = np.round(np.sqrt(area * aspect))
  h = np.round(np.sqrt(area / aspect))
  fits = np.flatnonzero((w > 0) & (w <= width) & (h > 0) & (h <= height))
  if len(fits):
    i = fits[0]
    top = math.floor(top_u[i] * (height - h[i] + 1))
    left = math.floor(left_u[i] * (width - w[i] + 1))
    return np.array([top, left, h[i], w[i]], np.int32)
  in_ratio = width / height
  h_fb = round(width / ratio[0]) if in_ratio < ratio[0] else height
  w_fb = round(height * ratio[1]) if in_ratio > ratio[1] else width
  return np.array([(height - h_fb) // 2, (width - w_fb) // 2, h_fb, w_fb], np.int32)


def resize_shorter_side(height: int, width: int, size: int = RESIZE) -> np.ndarray:
  """(new_h, new_w) int32 of torchvision's Resize(size): shorter side -> size, the other
  int(size * long / short) (truncated)."""
  short, long = min(height, width), max(height, width)
  other = int(size * long / short)
  return np.array([size, other] if height <= width else [other, size], np.int32)


def center_crop_offsets(height: int, width: int, size: int = CROP) -> np.ndarray:
  """(top, left) int32 of torchvision's CenterCrop(size): round((H - size) / 2), half to even."""
  return np.round(np.array([(height - size) / 2, (width - size) / 2])).astype(np.int32)


def decode(jpeg: bytes) -> Image.Image:
  """The encoded image (JPEG, or any format PIL reads) as an RGB PIL image."""
  image = Image.open(io.BytesIO(jpeg))
  return image if image.mode == 'RGB' else image.convert('RGB')


def _train_crop(image: Image.Image, key: keys.Key, flip: bool = True) -> np.ndarray:
  """Random-resized crop + flip (unless `flip` is False) of one decoded image: uint8
  [224, 224, 3]."""
  crop_key, flip_key = keys.split(key, 2)
  top, left, h, w = (int(v) for v in random_resized_crop_window(crop_key, image.height,
                                                                 image.width))
  crop = np.asarray(image.resize((CROP, CROP), Image.BILINEAR,
                                 box=(left, top, left + w, top + h)))
  return views_lib.random_flip(crop, keys.rng(flip_key)) if flip else crop


def _eval_crop(image: Image.Image) -> np.ndarray:
  """Resize(256) + CenterCrop(224) of one decoded image: uint8 [224, 224, 3]."""
  height, width = (int(v) for v in resize_shorter_side(image.height, image.width))
  top, left = (int(v) for v in center_crop_offsets(height, width))
  resized = np.asarray(image.resize((width, height), Image.BILINEAR))
  return resized[top:top + CROP, left:left + CROP]


def _rotations(image: np.ndarray) -> np.ndarray:
  return np.stack([np.rot90(image, k) for k in range(4)])


def train_views(views: str, jpeg: bytes, key: keys.Key, info: DatasetInfo) -> np.ndarray:
  """Augmented, normalised float32 views of one JPEG (see the module docstring)."""
  views_lib.check_views(views, info)
  image = decode(jpeg)
  if views == 'none':
    return views_lib.normalized(_train_crop(image, key, info.flip), info)
  if views == 'two_crops':
    return views_lib.normalized(
        np.stack([_train_crop(image, k, info.flip) for k in keys.split(key, 2)]), info)
  if views == 'weak_strong':
    strong_key = keys.strong_view_key(key)
    strong = randaugment.rand_augment(_train_crop(image, strong_key, info.flip),
                                      keys.rng(strong_key))
    return views_lib.normalized(np.stack([_train_crop(image, key, info.flip), strong]), info)
  return views_lib.normalized(_rotations(_train_crop(image, key, info.flip)), info)


def eval_views(views: str, jpeg: bytes, info: DatasetInfo) -> np.ndarray:
  """Resize + center crop, normalised; `two_crops` and `weak_strong` give it twice, `rotations`
  rotated 4 ways."""
  views_lib.check_views(views, info)
  image = views_lib.normalized(_eval_crop(decode(jpeg)), info)
  if views == 'none':
    return image
  if views in ('two_crops', 'weak_strong'):
    return np.stack([image, image])
  return _rotations(image)


def make_views_fn(views: str, info: DatasetInfo,
                  train: bool) -> Callable[[bytes, keys.Key], np.ndarray]:
  """fn(JPEG bytes, key) -> float32 views; eval ignores the key."""
  views_lib.check_views(views, info)
  if train:
    return functools.partial(train_views, views, info=info)
  return functools.partial(_eval_views_fn, views, info=info)


def _eval_views_fn(views: str, jpeg: bytes, key: keys.Key, info: DatasetInfo) -> np.ndarray:
  del key  # Eval views are not random.
  return eval_views(views, jpeg, info)
