"""Per-example views for the input pipeline: pure NumPy functions of (image, key).

A view set turns one uint8 image [H, W, C] into float32 normalised views:
  `none`       one augmented view               -> [H, W, C]
  `rotations`  the SSKD layout: one shared flip, rotations by k*90 degrees counter-clockwise
               (k = 0..3, `np.rot90(img, k)`), then an independent crop per view -> [4, H, W, C]
  `rotations_of_crop`  HSAKD's order: one crop + flip, then its four rotations -> [4, H, W, C]
  `two_crops`  two independent crop+flip augmentations (contrastive methods) -> [2, H, W, C]
  `weak_strong`  MLKD's pair: view 0 the weak view, the dataset's crop + flip drawn from the
               example's key exactly as `none` draws it; view 1 the strong view, its own crop +
               flip, then RandAugment (jaxkd.data.randaugment), all drawn from
               `keys.strong_view_key(key)` -> [2, H, W, C]
Eval views skip the crop and the flip (and RandAugment). All randomness comes from `key`
(jaxkd.data.keys), derived from (seed, epoch, example index), so the data stream is a pure
function of the seed. The crops, flips and RandAugment move uint8 pixels; the conversion to float
happens once, at the end.
"""

import functools
from typing import Callable

import numpy as np

from jaxkd import errors
from jaxkd.data import keys
from jaxkd.data import randaugment
from jaxkd.data.info import DatasetInfo
from jaxkd.data.keys import example_key  # noqa: F401 (the key of one example, re-exported)

VIEWS = ('none', 'rotations', 'rotations_of_crop', 'two_crops', 'weak_strong')
_ROTATED = ('rotations', 'rotations_of_crop')


def num_views(views: str) -> int:
  """Views per example: 1 for `none` (which has no view axis), 4 rotations, 2 crops, 2 (weak,
  strong)."""
  return {'none': 1, 'rotations': 4, 'rotations_of_crop': 4, 'two_crops': 2,
          'weak_strong': 2}[check_views(views)]


def check_views(views: str, info: DatasetInfo | None = None) -> str:
  """Raises a UserError for an unknown view set (or rotations of non-square images, or
  RandAugment on images of neither 1 nor 3 channels)."""
  if views not in VIEWS:
    raise errors.unknown_name('views', views, VIEWS)
  if views in _ROTATED and info is not None and info.image_shape[0] != info.image_shape[1]:
    raise errors.UserError(
        f'views {views!r} need square images; dataset {info.name!r} has {info.image_shape}')
  if views == 'weak_strong' and info is not None and info.image_shape[-1] not in (1, 3):
    raise errors.UserError(
        f'views {views!r} need images of 1 or 3 channels (RandAugment runs on PIL L or RGB '
        f'images); dataset {info.name!r} has {info.image_shape}')
  return views


def view_shape(views: str, info: DatasetInfo) -> tuple[int, ...]:
  """Shape of one example's views: [H, W, C] for `none`, else [V, H, W, C]."""
  shape = tuple(info.image_shape)
  return shape if check_views(views, info) == 'none' else (num_views(views),) + shape


def to_unit(image: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [0, 1] (torchvision's ToTensor)."""
  return np.asarray(image, np.float32) / np.float32(255.0)


def normalize(image: np.ndarray, info: DatasetInfo) -> np.ndarray:
  """(x - mean) / std per channel, on a float image in [0, 1]."""
  return (image - np.asarray(info.mean, np.float32)) / np.asarray(info.std, np.float32)


def normalized(pixels: np.ndarray, info: DatasetInfo) -> np.ndarray:
  """uint8 pixels -> normalised float32: normalize(to_unit(pixels))."""
  return normalize(to_unit(pixels), info)


def crop_offsets(rng: np.random.Generator, padding: int) -> tuple[int, int]:
  """Top-left corner (y, x) of a crop of the padded image, each uniform in [0, 2*padding]."""
  y, x = rng.integers(0, 2 * padding + 1, size=2)
  return int(y), int(x)


def random_crop(image: np.ndarray, rng: np.random.Generator, padding: int) -> np.ndarray:
  """Zero-pads H and W by `padding` and crops back to the original size at a random offset."""
  if padding == 0:
    return image
  h, w = image.shape[:2]
  y, x = crop_offsets(rng, padding)
  padded = np.pad(image, [(padding, padding), (padding, padding), (0, 0)])
  return padded[y:y + h, x:x + w]


def random_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Mirrors W with probability 1/2."""
  return image[:, ::-1] if rng.random() < 0.5 else image


def _augment(image: np.ndarray, rng: np.random.Generator, info: DatasetInfo) -> np.ndarray:
  if info.flip:
    image = random_flip(image, rng)
  return random_crop(image, rng, info.crop_padding)


def weak_strong(image: np.ndarray, key: keys.Key, info: DatasetInfo) -> np.ndarray:
  """uint8 [2, H, W, C]: the weak view (`none`'s augmentation of `key`) and the strong view
  (crop + flip + RandAugment, all from `keys.strong_view_key(key)`)."""
  weak = _augment(image, keys.rng(key), info)
  strong_rng = keys.rng(keys.strong_view_key(key))
  strong = randaugment.rand_augment(_augment(image, strong_rng, info), strong_rng)
  return np.stack([weak, strong])


def _rotations(image: np.ndarray) -> list[np.ndarray]:
  return [np.rot90(image, k) for k in range(4)]


def train_views(views: str, image: np.ndarray, key: keys.Key, info: DatasetInfo) -> np.ndarray:
  """Augmented, normalised float32 views of one uint8 image (see the module docstring)."""
  check_views(views, info)
  image = np.asarray(image)
  rng = keys.rng(key)
  if views == 'none':
    return normalized(_augment(image, rng, info), info)
  if views == 'two_crops':
    return normalized(np.stack([_augment(image, rng, info) for _ in range(2)]), info)
  if views == 'weak_strong':
    return normalized(weak_strong(image, key, info), info)
  if views == 'rotations_of_crop':
    return normalized(np.stack(_rotations(_augment(image, rng, info))), info)
  if info.flip:
    image = random_flip(image, rng)  # One decision for all four views.
  return normalized(np.stack([random_crop(view, rng, info.crop_padding)
                              for view in _rotations(image)]), info)


def eval_views(views: str, image: np.ndarray, info: DatasetInfo) -> np.ndarray:
  """Normalised views with no crop and no flip; `two_crops` and `weak_strong` give the same
  image twice."""
  check_views(views, info)
  image = normalized(image, info)
  if views == 'none':
    return image
  if views in ('two_crops', 'weak_strong'):
    return np.stack([image, image])
  return np.stack(_rotations(image))


def make_views_fn(views: str, info: DatasetInfo,
                  train: bool) -> Callable[[np.ndarray, keys.Key], np.ndarray]:
  """fn(image uint8 [H, W, C], key) -> float32 views; eval ignores the key (None).

  For datasets whose `info.transform` is 'pad_crop'; those with 'inception_crop' (ImageNet) take
  `jaxkd.data.imagenet.make_views_fn`, on the encoded JPEG (the pipeline picks by the transform).
  The function pickles (it is a partial of module functions), so input workers in other
  processes can run it.
  """
  check_views(views, info)
  if info.transform == 'inception_crop':
    raise ValueError(f'dataset {info.name!r} has transform {info.transform!r}: its views are '
                     'made by jaxkd.data.imagenet.make_views_fn, not jaxkd.data.views')
  if train:
    return functools.partial(train_views, views, info=info)
  return functools.partial(_eval_views_fn, views, info=info)


def _eval_views_fn(views: str, image: np.ndarray, key: keys.Key, info: DatasetInfo
                   ) -> np.ndarray:
  del key  # Eval views are not random.
  return eval_views(views, image, info)
