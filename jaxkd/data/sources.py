"""Supported datasets by config name, and how to open their tfds splits.

Only the embedded digits are built automatically. Every other dataset must already be prepared in
`dataset_config.data_dir`, as ArrayRecord files (`tfds build <name> --file_format=array_record`),
which the pipeline reads by index; when it is not (or only as TFRecord), one `UserError` says how
to get it there, instead of letting tfds try (and, offline, retry) a download.
`data_source(dataset_config, split)` opens a split for reading by index (jaxkd.data.records).

Besides the registry's names, a user's own data is named by its source:
  `tfds:<builder>[/<config>]`  any tfds image-classification dataset (features 'image' and
                               'label') prepared in data_dir;
  `folder:<dir>`               image files `<dir>/<split>/<class>/*.png|jpg`, read by tfds'
                               ImageFolder (as tinyimagenet is).
Their images are read at their stored size (all the same) or resized to `dataset.image_size`;
their mean/std are `dataset.mean`/`dataset.std`, or are computed once from the training split and
kept in `<workdir>/dataset_stats.json`.
"""

import dataclasses
import json
import os
from typing import Any, Iterable

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from jaxkd import defaults
from jaxkd import errors
from jaxkd import paths
from jaxkd.data import digits
from jaxkd.data import records
from jaxkd.data.info import DatasetInfo
from jaxkd.models.clip import CLIP_MEAN, CLIP_STD




_REGISTRY = {
    info.name: info for info in (
        DatasetInfo(
            name='digits', tfds_name=digits.TFDS_NAME, num_classes=10, image_shape=(8, 8, 1),
            num_train=0, num_eval=0,
            # Pixel mean/std of the 1,437 train images (scaled to [0, 1]), computed once.
            mean=(0.3054,), std=(0.3757,),
            # A mirrored digit is a different (or no) digit.
            crop_padding=1, flip=False),
        DatasetInfo(
            name='cifar100', tfds_name='cifar100', num_classes=100, image_shape=(32, 32, 3),
            num_train=0, num_eval=0,
            # The SSKD reference values (RepDistiller has 0.4867/0.4408 in the last two).
            mean=(0.5071, 0.4866, 0.4409), std=(0.2675, 0.2565, 0.2761),
            crop_padding=4, flip=True),
        DatasetInfo(
            name='cifar10', tfds_name='cifar10', num_classes=10, image_shape=(32, 32, 3),
            num_train=0, num_eval=0,
            mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
            crop_padding=4, flip=True),
        DatasetInfo(
            # Splits train (5,000), test (8,000) and unlabelled (100,000, label -1).
            name='stl10', tfds_name='stl10', num_classes=10, image_shape=(96, 96, 3),
            num_train=0, num_eval=0,
            # The commonly used STL-10 statistics; padding 12 is CIFAR's 4 at 96 px.
            mean=(0.4467, 0.4398, 0.4066), std=(0.2603, 0.2566, 0.2713),
            crop_padding=12, flip=True),
        DatasetInfo(
            # An extracted folder read by tfds' ImageFolder (see tinyimagenet_builder).
            name='tinyimagenet', tfds_name='tinyimagenet', num_classes=200,
            image_shape=(64, 64, 3), num_train=0, num_eval=0,
            mean=(0.4802, 0.4481, 0.3975), std=(0.2302, 0.2265, 0.2262),
            crop_padding=8, flip=True),
        DatasetInfo(
            # ILSVRC-2012: train (1,281,167) and validation (50,000, the eval split of papers).
            name='imagenet2012', tfds_name='imagenet2012', num_classes=1000,
            image_shape=(224, 224, 3), num_train=0, num_eval=0,
            mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
            crop_padding=0, flip=True, transform='inception_crop'),
    )
}

DATASET_NAMES = tuple(sorted(_REGISTRY))


# Config-name prefixes of the datasets outside the registry (see the module docstring).
TFDS_PREFIX = 'tfds:'
FOLDER_PREFIX = 'folder:'
# The file, in a run's workdir, that keeps the mean/std computed for such datasets.
STATS_FILE = 'dataset_stats.json'
# The files tfds' ImageFolder reads (the name's ending, in any case).
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')
# PIL modes of one-channel images; a folder of such images only is read with one channel.
_GREY_MODES = ('1', 'L', 'LA', 'I', 'I;16', 'I;16B', 'I;16L', 'F')


def _registry_entry(name: str) -> DatasetInfo:
  if name not in _REGISTRY:
    raise errors.UserError(
        f'{errors.unknown_name("dataset", name, _REGISTRY)}; or your own data: '
        f'{TFDS_PREFIX}<tfds builder> (prepared in data_dir) or {FOLDER_PREFIX}<dir>')
  return _REGISTRY[name]


def own_source(name: str) -> tuple[str, str] | None:
  """('tfds', builder) for `tfds:<builder>`, ('folder', dir) for `folder:<dir>`; None for a
  registry name."""
  for kind, prefix, what in (('tfds', TFDS_PREFIX, 'builder'), ('folder', FOLDER_PREFIX, 'dir')):
    if name.startswith(prefix):
      if not name[len(prefix):]:
        raise errors.UserError(f'dataset {name!r} names no {what}; write {prefix}<{what}>')
      return kind, name[len(prefix):]
  return None


def hide_accelerators() -> None:
  """Keeps TensorFlow on the CPU so it never takes memory from JAX's GPUs."""
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:
    pass  # TF's devices are already initialised; nothing left to change.


def _data_dir(dataset_config: ml_collections.ConfigDict) -> str | None:
  return dataset_config.get('data_dir', '') or None


def _not_prepared(name: str, tfds_name: str,
                  builder: tfds.core.DatasetBuilder) -> errors.UserError:
  root = builder.data_dir_root
  return errors.UserError(
      f'dataset {name!r} (tfds {tfds_name!r}) is not prepared in data_dir {root}; '
      'nothing is downloaded at run time. Run '
      f'`{_build_command(tfds_name, root)}` on a machine with internet (or copy a '
      f'prepared {builder.name}/ folder there), or point the dataset data_dir at it.'
      + _manual_download_note(builder))


def _build_command(tfds_name: str, root) -> str:
  """The command that prepares a tfds dataset as the pipeline reads it (ArrayRecord files)."""
  return f'tfds build {tfds_name} --file_format=array_record --data_dir {root}'


def _tfrecord_only(name: str, tfds_name: str,
                   builder: tfds.core.DatasetBuilder) -> errors.UserError:
  return errors.UserError(
      f'dataset {name!r} (tfds {tfds_name!r}) is prepared in {builder.data_dir} as '
      f'{builder.info.file_format.value} files, which cannot be read by index; prepare it as '
      f'ArrayRecord: `{_build_command(tfds_name, "DIR")}` (a new DIR, or this data_dir once '
      f'{builder.data_dir} is removed) and point the dataset data_dir at DIR')


def _manual_download_note(builder: tfds.core.DatasetBuilder) -> str:
  """What tfds needs by hand first (e.g. the ILSVRC-2012 tar files for imagenet2012), if any."""
  instructions = getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None)
  if not instructions:
    return ''
  return (f' tfds cannot download {builder.name} itself: ' + ' '.join(instructions.split())
          + f' (manual_dir: {builder.data_dir_root}/downloads/manual, or pass --manual_dir).')


class _ImageFolder(tfds.ImageFolder, skip_registration=True):
  """tfds' ImageFolder, which reads the image files directly, so it is always prepared."""

  def is_prepared(self) -> bool:
    return True


def _splits(dataset_config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The config's train and eval split names (once each)."""
  return tuple(dict.fromkeys((dataset_config.get('train_split', 'train'),
                              dataset_config.get('eval_split', 'test'))))


def _image_files(split_dir: str, label: str) -> list[str]:
  folder = os.path.join(split_dir, label)
  return sorted(os.path.join(folder, f) for f in tf.io.gfile.listdir(folder)
                if f.lower().endswith(IMAGE_EXTENSIONS))


def folder_files(root: str, splits: tuple[str, ...]) -> dict[str, dict[str, list[str]]]:
  """split -> class -> image files of the tree `<root>/<split>/<class>/<image>`, as ImageFolder
  reads it (sorted class names are the labels 0, 1, ...).

  One UserError, naming the layout, for what ImageFolder would misread or fail on: no folder,
  a split without a folder, a split without class folders, a class folder without images,
  classes that differ between the splits (the first split, train, against the others).
  """
  layout = ' and '.join(f'{root}/{split}/<class>/*.png|jpg' for split in splits)

  def bad(what: str) -> errors.UserError:
    return errors.UserError(f'{what}; expected the layout {layout}')

  if not tf.io.gfile.isdir(root):
    raise bad(f'dataset folder {root} does not exist')
  files = {}
  for split in splits:
    split_dir = os.path.join(root, split)
    if not tf.io.gfile.isdir(split_dir):
      raise bad(f'dataset folder {root} has no {split}/ folder (split {split!r})')
    labels = sorted(name.rstrip('/') for name in tf.io.gfile.listdir(split_dir)
                    if tf.io.gfile.isdir(os.path.join(split_dir, name)))
    if not labels:
      raise bad(f'{split_dir} has no class folders')
    files[split] = {label: _image_files(split_dir, label) for label in labels}
    for label, images in files[split].items():
      if not images:
        raise bad(f'class folder {os.path.join(split_dir, label)} has no images '
                  f'({", ".join(IMAGE_EXTENSIONS)})')
  first, *others = splits
  for split in others:
    if set(files[split]) != set(files[first]):
      only = lambda a, b: ', '.join(sorted(set(files[a]) - set(files[b]))[:5]) or '-'
      raise bad(f'the classes of {root}/{first}/ and {root}/{split}/ differ (only in {first}/: '
                f'{only(first, split)}; only in {split}/: {only(split, first)})')
  return files


def _stored_shape(path: str) -> tuple[int, int, int]:
  """(H, W, C) of an image file, from its header; C is 1 for a greyscale file, else 3 (RGB).
  A FIFO or a device under an image's name is refused by its kind, never opened."""
  paths.check_regular_file(path, 'image file', 'replace or remove it')
  try:
    with tf.io.gfile.GFile(path, 'rb') as f, Image.open(f) as image:
      width, height = image.size
      return height, width, 1 if image.mode in _GREY_MODES else 3
  except (OSError, tf.errors.OpError) as e:
    raise errors.UserError(f'{path} is not a readable PNG or JPEG image ({paths.reason(e)}); '
                           'replace or remove it') from None


# (root, image_size, every file) -> the shape the folder's images are read at.
_FOLDER_SHAPES: dict[tuple, tuple[int, int, int]] = {}


def folder_image_shape(root: str, files: dict[str, dict[str, list[str]]],
                       image_size: int) -> tuple[int, int, int]:
  """The (H, W, C) the folder's images are read at: their common stored size, or image_size²
  when set; C = 1 when every file is greyscale, else 3 (greyscale files then repeat it).

  Reads every file's header (not its pixels) once per process.
  """
  every = tuple(path for split in files.values() for images in split.values() for path in images)
  key = (root, image_size, every)
  if key not in _FOLDER_SHAPES:
    sizes, channels = {}, 1
    for path in every:
      height, width, c = _stored_shape(path)
      sizes.setdefault((height, width), path)
      channels = max(channels, c)
    if not image_size and len(sizes) > 1:
      (a, path_a), (b, path_b) = list(sizes.items())[:2]
      raise errors.UserError(
          f'dataset folder {root} has images of different sizes ({path_a} is {a[0]}x{a[1]}, '
          f'{path_b} is {b[0]}x{b[1]}); set --config.dataset.image_size=N to resize them all '
          'to NxN')
    height, width = (image_size, image_size) if image_size else next(iter(sizes))
    _FOLDER_SHAPES[key] = (height, width, channels)
  return _FOLDER_SHAPES[key]


def _image_size(dataset_config: ml_collections.ConfigDict) -> int:
  size = dataset_config.get('image_size', 0)
  if size < 0:
    raise errors.UserError(f'dataset.image_size is {size}; it must be >= 0 (0: as stored)')
  return size


def folder_root(dataset_config: ml_collections.ConfigDict) -> str:
  """The absolute directory of `folder:<dir>` (a URL stays as it is)."""
  return paths.absolute(os.path.expanduser(own_source(dataset_config.name)[1]))


def folder_builder(dataset_config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """An ImageFolder builder over `folder:<dir>`, its layout checked first (`folder_files`).

  Its images are decoded at their stored size, or at any size (then resized by the data
  source) when dataset.image_size is set.
  """
  root = folder_root(dataset_config)
  size = _image_size(dataset_config)
  height, width, channels = folder_image_shape(root, folder_files(root, _splits(dataset_config)),
                                               size)
  return _ImageFolder(root, shape=(None, None, channels) if size else (height, width, channels))


def tfds_builder(dataset_config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """The tfds builder of `tfds:<builder>[/<config>][:<version>]` in data_dir (not prepared)."""
  name = own_source(dataset_config.name)[1]
  data_dir = _data_dir(dataset_config)
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError:
    raise errors.UserError(
        f'dataset {dataset_config.name!r}: tfds has no builder {name!r} and data_dir '
        f'{data_dir or "~/tensorflow_datasets"} holds no prepared dataset of that name; see '
        'tfds.list_builders() or https://www.tensorflow.org/datasets/catalog') from None
  except (ValueError, AssertionError) as e:
    raise errors.UserError(
        f'dataset {dataset_config.name!r}: {str(e).splitlines()[0]}') from None


def tinyimagenet_folder(dataset_config: ml_collections.ConfigDict) -> str:
  """`<data_dir>/tinyimagenet`, data_dir being the tfds one (default ~/tensorflow_datasets)."""
  root = _data_dir(dataset_config) or os.path.join('~', 'tensorflow_datasets')
  return os.path.join(os.path.expanduser(root), 'tinyimagenet')


def tinyimagenet_builder(dataset_config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """An ImageFolder builder over `<root>/<split>/<wnid>/*.JPEG` (splits train and val).

  The official archive (tiny-imagenet-200.zip) extracts to another layout (train images one
  folder deeper, val images in one folder with an annotation file); `arrange_tinyimagenet`
  links it into this one. Either mistake is reported, rather than read with wrong labels.
  """
  root = tinyimagenet_folder(dataset_config)
  arrange = ('python -c "from jaxkd.data.sources import arrange_tinyimagenet; '
             f"arrange_tinyimagenet('/path/to/tiny-imagenet-200', '{root}')\"")
  if not os.path.isdir(os.path.join(root, 'train')):
    raise errors.UserError(
        f'dataset tinyimagenet is not in {root} (no train/ folder); nothing is downloaded at '
        'run time. Extract tiny-imagenet-200.zip (http://cs231n.stanford.edu/) on this machine '
        f'and run {arrange}, or set the dataset data_dir to the folder holding tinyimagenet/.')
  if (os.path.isfile(os.path.join(root, 'val', 'val_annotations.txt'))
      or os.path.isdir(os.path.join(root, 'val', 'images'))):
    raise errors.UserError(
        f'{root} has the layout of the extracted archive (val/images/ + val_annotations.txt), '
        f'which ImageFolder would label wrongly; arrange it first: {arrange}')
  folder_files(root, _splits(dataset_config))
  return _ImageFolder(root, shape=(64, 64, 3))


def arrange_tinyimagenet(extracted: str, root: str) -> None:
  """Links the extracted tiny-imagenet-200/ into ImageFolder's layout under `root`.

  train/<wnid>/images/*.JPEG -> root/train/<wnid>/; val/images/*.JPEG -> root/val/<wnid>/ by
  val/val_annotations.txt. The unlabelled test split is left out. Symbolic links, no copies.
  """
  annotations = os.path.join(extracted, 'val', 'val_annotations.txt')
  if not os.path.isfile(annotations):
    raise errors.UserError(f'{extracted!r} is not an extracted tiny-imagenet-200 folder (no '
                           'val/val_annotations.txt)')
  links = []
  train_dir = os.path.join(extracted, 'train')
  for wnid in sorted(os.listdir(train_dir)):
    images = os.path.join(train_dir, wnid, 'images')
    for name in sorted(os.listdir(images)):
      links.append((os.path.join(images, name), os.path.join(root, 'train', wnid, name)))
  with open(annotations) as f:
    for line in f:
      fields = line.split('\t')
      if len(fields) >= 2:
        links.append((os.path.join(extracted, 'val', 'images', fields[0]),
                      os.path.join(root, 'val', fields[1], fields[0])))
  for src, dst in links:
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if not os.path.lexists(dst):
      os.symlink(os.path.abspath(src), dst)


def get_builder(dataset_config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """The tfds builder of `dataset_config.name`; the embedded digits are built on first use."""
  hide_accelerators()  # Before building runs the first TF op.
  source = own_source(dataset_config.name)
  if source is not None:
    return folder_builder(dataset_config) if source[0] == 'folder' else tfds_builder(
        dataset_config)
  info = _registry_entry(dataset_config.name)
  if info.name == 'tinyimagenet':
    return tinyimagenet_builder(dataset_config)
  if info.tfds_name == digits.TFDS_NAME:
    return digits.prepared_builder(_data_dir(dataset_config))
  return tfds.builder(info.tfds_name, data_dir=_data_dir(dataset_config))


# dataset_config.normalization -> (mean, std) of the student's views; 'dataset': the dataset's.
NORMALIZATIONS = {'dataset': None, 'clip': (CLIP_MEAN, CLIP_STD)}


def _normalization(info: DatasetInfo, dataset_config: ml_collections.ConfigDict) -> DatasetInfo:
  """`info` with the statistics of `dataset_config.normalization` ('dataset' keeps its own)."""
  name = dataset_config.get('normalization', 'dataset') or 'dataset'
  if name not in NORMALIZATIONS:
    raise errors.unknown_name('normalization', name, NORMALIZATIONS)
  if NORMALIZATIONS[name] is None:
    return info
  mean, std = NORMALIZATIONS[name]
  if len(mean) != info.image_shape[-1]:
    raise errors.UserError(
        f'normalization {name!r} has {len(mean)}-channel statistics but dataset {info.name!r} '
        f"has {info.image_shape[-1]} channel(s); use --config.dataset.normalization=dataset")
  return dataclasses.replace(info, mean=mean, std=std)


def _own_entry(dataset_config: ml_collections.ConfigDict
               ) -> tuple[DatasetInfo, tfds.core.DatasetBuilder]:
  """The entry of a `tfds:` or `folder:` dataset, mean/std still empty, and its builder.

  Classes and image shape come from the builder's features; a variable image size is refused
  unless dataset.image_size is set. Augmentation as CIFAR's: padding 1/8 of the side; flips
  for a tfds dataset, none for a folder (mirroring changes what digits, text or medical images
  show; `dataset.flip` decides otherwise).
  """
  name = dataset_config.name
  builder = get_builder(dataset_config)
  kind, source = own_source(name)
  tfds_name = source if kind == 'tfds' else 'image_folder'
  if not builder.is_prepared():
    raise _not_prepared(name, tfds_name, builder)
  features = builder.info.features
  image, label = (features[key] if key in features.keys() else None for key in ('image', 'label'))
  if (not isinstance(image, tfds.features.Image) or image.np_dtype != np.uint8
      or not isinstance(label, tfds.features.ClassLabel) or len(image.shape) != 3):
    raise errors.UserError(
        f'dataset {name!r} is not an image-classification dataset: it needs a uint8 image '
        f'feature \'image\' [H, W, C] and a ClassLabel \'label\'; its features: '
        + ', '.join(f'{key} ({type(f).__name__})' for key, f in sorted(features.items())))
  size = _image_size(dataset_config)
  height, width, channels = image.shape
  if size:
    height = width = size
  elif height is None or width is None:
    raise errors.UserError(
        f'dataset {name!r} has images of variable size {image.shape}; set '
        '--config.dataset.image_size=N to resize them to NxN')
  if channels is None:
    raise errors.UserError(f'dataset {name!r} has images of unknown channels {image.shape}')
  info = DatasetInfo(
      name=name, tfds_name=tfds_name, num_classes=label.num_classes,
      image_shape=(height, width, channels), num_train=0, num_eval=0, mean=(), std=(),
      crop_padding=min(height, width) // 8, flip=defaults.default_flip(name))
  _check_splits(info, dataset_config, builder)
  return info, builder


def _split_sizes(info: DatasetInfo, dataset_config: ml_collections.ConfigDict,
                 builder: tfds.core.DatasetBuilder | None = None) -> tuple[int, int]:
  """(num_train, num_eval) before `train_fraction`: the config's counts when > 0, else the
  prepared dataset's."""
  num_train = dataset_config.get('num_train_examples', -1) or -1
  num_eval = dataset_config.get('num_eval_examples', -1) or -1
  if num_train > 0 and num_eval > 0:
    return num_train, num_eval
  if builder is None:
    builder = get_builder(dataset_config)
    if not builder.is_prepared():
      raise _not_prepared(info.name, info.tfds_name, builder)
  _check_splits(info, dataset_config, builder)
  splits = builder.info.splits
  if num_train <= 0:
    num_train = splits[dataset_config.get('train_split', 'train')].num_examples
  if num_eval <= 0:
    num_eval = splits[dataset_config.get('eval_split', 'test')].num_examples
  return num_train, num_eval


def _check_splits(info: DatasetInfo, dataset_config: ml_collections.ConfigDict,
                  builder: tfds.core.DatasetBuilder) -> None:
  """Refuses a train_split or eval_split the prepared dataset does not have, naming those it has."""
  splits = builder.info.splits
  for split in _splits(dataset_config):
    try:
      splits[split]
    except (KeyError, ValueError) as e:
      raise errors.UserError(
          f'dataset {info.name!r} has no split {split!r}; its splits: '
          f'{", ".join(sorted(splits))}') from e


def get_dataset_info(dataset_config: ml_collections.ConfigDict,
                     cache_dir: str | None = None) -> DatasetInfo:
  """The registry entry of `dataset_config.name` (or of a `tfds:`/`folder:` source) with the
  split sizes and the normalisation statistics filled in.

  `num_train_examples` / `num_eval_examples` win when > 0 (the pipeline then uses the first that
  many examples of the split); otherwise the counts come from the prepared dataset's metadata.
  `train_fraction` < 1 keeps int(fraction · count) of those training examples (the pipeline picks
  a class-balanced subset of that size). Mean/std: `dataset.mean`/`dataset.std` when given;
  else `normalization` = 'clip' gives CLIP's (the reference normalises EGA's students so); else
  the registry's, or, for a `tfds:`/`folder:` source, those of its train split, computed once
  (`pixel_statistics`) and kept in `<cache_dir>/dataset_stats.json` when cache_dir is given.
  Flips: `dataset.flip` when it is set (True / False), else the dataset's own.
  """
  builder = None
  if own_source(dataset_config.name) is not None:
    info, builder = _own_entry(dataset_config)
  else:
    info = _registry_entry(dataset_config.name)
    if _image_size(dataset_config):
      raise errors.UserError(
          f'dataset.image_size resizes tfds:/folder: datasets; {info.name!r} is read at its '
          f'own size {info.image_shape[:2]}: set --config.dataset.image_size=0')
  num_train, num_eval = _split_sizes(info, dataset_config, builder)
  fraction = dataset_config.get('train_fraction', 1.0)
  if not 0.0 < fraction <= 1.0:
    raise errors.UserError(
        f'dataset.train_fraction is {fraction}; it must be in (0, 1] (1: the whole train split)')
  info = dataclasses.replace(info, num_train=int(num_train * fraction), num_eval=num_eval)
  flip = dataset_config.get('flip', None)
  if flip is not None:
    info = dataclasses.replace(info, flip=bool(flip))
  return _statistics(info, dataset_config, cache_dir, builder)


def _statistics(info: DatasetInfo, dataset_config: ml_collections.ConfigDict,
                cache_dir: str | None, builder: tfds.core.DatasetBuilder | None) -> DatasetInfo:
  """`info` with the mean/std of the student's views (see get_dataset_info); `builder`: that
  of a tfds:/folder: source."""
  mean = tuple(float(m) for m in dataset_config.get('mean', ()) or ())
  std = tuple(float(s) for s in dataset_config.get('std', ()) or ())
  if mean or std:
    _check_given_statistics(info, dataset_config, mean, std)
    return dataclasses.replace(info, mean=mean, std=std)
  info = _normalization(info, dataset_config)
  if info.mean:
    return info
  mean, std = _train_split_statistics(info, dataset_config, cache_dir, builder)
  return dataclasses.replace(info, mean=mean, std=std)


def _check_given_statistics(info: DatasetInfo, dataset_config: ml_collections.ConfigDict,
                            mean: tuple[float, ...], std: tuple[float, ...]) -> None:
  channels = info.image_shape[-1]
  if len(mean) != channels or len(std) != channels or min(std) <= 0:
    raise errors.UserError(
        f'dataset.mean={mean} and dataset.std={std} must both have one value per channel of '
        f'{info.name!r} ({channels}), std > 0 (both empty: computed from the train split)')
  normalization = dataset_config.get('normalization', 'dataset') or 'dataset'
  if normalization != 'dataset':
    raise errors.UserError(
        f'dataset.mean/std and dataset.normalization={normalization!r} both set the statistics; '
        'keep one (normalization=dataset, or mean=() std=())')


def pixel_statistics(examples: Iterable[tuple[np.ndarray, Any]], channels: int
                     ) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean and std of every pixel of `(image uint8, label)` pairs scaled to [0, 1].

  μ_c = Σx / N and σ_c = sqrt(Σx² / N − μ_c²) over the N pixels of all images (the population
  std, as the registry's CIFAR values). The sums are integers, so they do not depend on the
  order of the images, and every process gets the same numbers.
  """
  total, total_sq, count = np.zeros(channels, np.int64), np.zeros(channels, np.int64), 0
  for image, _ in examples:
    x = np.asarray(image, np.int64).reshape(-1, channels)
    total += x.sum(0)
    total_sq += (x * x).sum(0)
    count += len(x)
  if count == 0:
    raise errors.UserError('no images to compute the mean/std from; set dataset.mean and '
                           'dataset.std')
  mean = total / (255.0 * count)
  std = np.sqrt(np.maximum(total_sq / (255.0 ** 2 * count) - mean ** 2, 0.0))
  return tuple(float(m) for m in mean), tuple(float(s) for s in std)


# Statistics computed or read in this process, by `_statistics_key`: the pipeline asks for the
# dataset's info again (without the workdir) for every pass.
_STATISTICS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {}


def _statistics_key(info: DatasetInfo, dataset_config: ml_collections.ConfigDict, split: str,
                    num_examples: int) -> str:
  """What the statistics depend on: source, data_dir, split, image_size (and the split's size,
  so a folder that gained or lost images is computed again)."""
  kind, source = own_source(info.name)
  source = folder_root(dataset_config) if kind == 'folder' else source
  return (f'{kind}:{source} data_dir={_data_dir(dataset_config) or ""} split={split} '
          f'image_size={_image_size(dataset_config)} examples={num_examples}')


def _read_statistics_file(path: str) -> dict:
  try:
    entries = json.loads(epath.Path(path).read_text())
  except paths.io_errors():
    return {}  # No file yet.
  except ValueError:
    return {}  # Damaged: computed again and rewritten.
  return entries if isinstance(entries, dict) else {}


def _train_split_statistics(info: DatasetInfo, dataset_config: ml_collections.ConfigDict,
                            cache_dir: str | None, builder: tfds.core.DatasetBuilder
                            ) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """(mean, std) of the whole train split: from `<cache_dir>/dataset_stats.json`, else from this
  process's memory, else computed; then written there (by process 0) if it was not yet."""
  split = dataset_config.get('train_split', 'train')
  num_examples = builder.info.splits[split].num_examples
  key = _statistics_key(info, dataset_config, split, num_examples)
  path = os.path.join(cache_dir, STATS_FILE) if cache_dir else None
  entries = _read_statistics_file(path) if path else {}
  if key in entries:
    _STATISTICS[key] = (tuple(entries[key]['mean']), tuple(entries[key]['std']))
  elif key not in _STATISTICS:
    print(f'dataset {info.name}: computing the mean/std of the {num_examples} images of split '
          f'{split!r}' + (f' (once: kept in {path})' if path else ''), flush=True)
    _STATISTICS[key] = pixel_statistics(records.examples(data_source(dataset_config, split)),
                                        info.image_shape[-1])
  mean, std = _STATISTICS[key]
  if path and key not in entries and jax.process_index() == 0:
    entries[key] = dict(mean=list(mean), std=list(std))
    epath.Path(cache_dir).mkdir(parents=True, exist_ok=True)
    paths.write_atomically(path, json.dumps(entries, indent=1, sort_keys=True).encode())
  return mean, std


resize = records.resize  # uint8 image -> its central size x size square (see there).


def _folder_source(dataset_config: ml_collections.ConfigDict, builder: tfds.ImageFolder,
                   split: str) -> records.FolderSource:
  """The files of an ImageFolder split, in the order tfds' ImageFolder reads them (its own
  deterministic shuffle of the sorted files), with their labels."""
  features = builder.info.features
  listed = builder._split_examples[split]  # pylint: disable=protected-access
  return records.FolderSource(
      paths=tuple(str(example.image_path) for example in listed),
      label_of=np.array([features['label'].str2int(example.label) for example in listed],
                        np.int32),
      channels=features['image'].shape[-1], image_size=_image_size(dataset_config))


def data_source(dataset_config: ml_collections.ConfigDict, split: str,
                num_examples: int = -1) -> records.Source:
  """The split (its first `num_examples` when > 0) for reading by index, in its stored order.

  Images come decoded (uint8 [H, W, C], resized to dataset.image_size for a `tfds:`/`folder:`
  source when it is set), except for datasets whose views decode them (ImageNet: the JPEG
  bytes). A tfds dataset is read from its ArrayRecord files; one prepared only as TFRecord is
  refused with the command that prepares it as ArrayRecord.
  """
  name, source = dataset_config.name, own_source(dataset_config.name)
  entry = _registry_entry(name) if source is None else None
  tfds_name = entry.tfds_name if entry else source[1]
  builder = get_builder(dataset_config)
  if isinstance(builder, tfds.ImageFolder):
    opened = _folder_source(dataset_config, builder, split)
  else:
    encoded = entry is not None and entry.transform == 'inception_crop'
    # Asking for the data source (rather than checking the folder first) keeps
    # tfds.testing.mock_data working: it patches as_data_source and points data_dir at a folder
    # that does not exist.
    try:
      opened = records.TfdsSource(
          builder.as_data_source(
              split=split, decoders={'image': tfds.decode.SkipDecoding()} if encoded else None),
          image_size=_image_size(dataset_config) if source is not None else 0)
    except (NotImplementedError, AssertionError) as e:
      if builder.is_prepared():
        if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
          raise _tfrecord_only(name, tfds_name, builder) from None
        raise
      raise _not_prepared(name, tfds_name, builder) from e
  if num_examples > 0:
    if len(opened) < num_examples:
      raise errors.UserError(
          f'dataset {name!r} split {split!r} has {len(opened)} examples but the config asks '
          f'for {num_examples}; lower num_train_examples / num_eval_examples')
    opened = records.Head(opened, num_examples)
  return opened


def check_readable(dataset_config: ml_collections.ConfigDict) -> None:
  """Opens the train and eval splits as the pipeline will (`data_source`), so that a dataset
  that is not prepared, or only as TFRecord, is refused before anything is written (also
  where the example counts are given and no split size was read)."""
  for split in _splits(dataset_config):
    data_source(dataset_config, split)


def load_split(dataset_config: ml_collections.ConfigDict, split: str) -> tf.data.Dataset:
  """The split in its stored order, as a tf.data.Dataset of `(image uint8 [H, W, C], label
  int32)` pairs (the JPEG bytes for ImageNet), read from `data_source`.

  Images of a `tfds:`/`folder:` source are resized to dataset.image_size when it is set.
  """
  source = data_source(dataset_config, split)
  first, _ = source[0]
  image_spec = (tf.TensorSpec([], tf.string) if isinstance(first, bytes)
                else tf.TensorSpec([None, None, np.shape(first)[-1]], tf.uint8))
  return tf.data.Dataset.from_generator(
      lambda: ((image, np.int32(label)) for image, label in records.examples(source)),
      output_signature=(image_spec, tf.TensorSpec([], tf.int32)))
