"""Supported datasets by config name, and how to open their tfds splits.

Only the embedded digits are built automatically. Every other dataset must already be prepared in
`dataset_config.data_dir`; when it is not, one `UserError` says how to get it there, instead of
letting tfds try (and, offline, retry) a download.
"""

import dataclasses
import os

import ml_collections
import tensorflow as tf
import tensorflow_datasets as tfds

from jaxkd import errors
from jaxkd.data import digits
from jaxkd.models.clip import CLIP_MEAN, CLIP_STD


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the pipeline, the models and the metrics need to know about a dataset."""
  name: str  # Config name, e.g. 'cifar100'.
  tfds_name: str
  num_classes: int
  image_shape: tuple[int, int, int]  # (H, W, C)
  num_train: int  # Training examples used, after `train_fraction` (0 in the registry).
  num_eval: int
  mean: tuple[float, ...]  # Per channel, on images scaled to [0, 1].
  std: tuple[float, ...]
  crop_padding: int  # Zero padding of the random crop back to image_shape.
  flip: bool  # Random horizontal flips in training.
  # How an example becomes views: 'pad_crop', the recipe of jaxkd/data/views.py (zero-pad, crop,
  # flip) on decoded images; 'inception_crop', jaxkd/data/imagenet.py (random-resized crop or
  # resize + center crop) on the still-encoded JPEG, which `load_split` then leaves undecoded.
  transform: str = 'pad_crop'


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


def _registry_entry(name: str) -> DatasetInfo:
  if name not in _REGISTRY:
    raise errors.unknown_name('dataset', name, _REGISTRY)
  return _REGISTRY[name]


def hide_accelerators() -> None:
  """Keeps TensorFlow on the CPU so it never takes memory from JAX's GPUs."""
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:
    pass  # TF's devices are already initialised; nothing left to change.


def _data_dir(dataset_config: ml_collections.ConfigDict) -> str | None:
  return dataset_config.get('data_dir', '') or None


def _not_prepared(info: DatasetInfo, builder: tfds.core.DatasetBuilder) -> errors.UserError:
  root = builder.data_dir_root
  return errors.UserError(
      f'dataset {info.name!r} (tfds {info.tfds_name!r}) is not prepared in data_dir {root}; '
      'nothing is downloaded at run time. Run '
      f'`tfds build {info.tfds_name} --data_dir {root}` on a machine with internet (or copy a '
      f'prepared {info.tfds_name}/ folder there), or point the dataset data_dir at it.'
      + _manual_download_note(builder))


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
  info = _registry_entry(dataset_config.name)
  hide_accelerators()  # Before building runs the first TF op.
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


def get_dataset_info(dataset_config: ml_collections.ConfigDict) -> DatasetInfo:
  """The registry entry of `dataset_config.name` with the split sizes filled in.

  `num_train_examples` / `num_eval_examples` win when > 0 (the pipeline then uses the first that
  many examples of the split); otherwise the counts come from the prepared dataset's metadata.
  `train_fraction` < 1 keeps int(fraction · count) of those training examples (the pipeline picks
  a class-balanced subset of that size). `normalization` = 'clip' replaces the dataset's mean/std
  by CLIP's (the reference normalises EGA's students so).
  """
  info = _normalization(_registry_entry(dataset_config.name), dataset_config)
  num_train = dataset_config.get('num_train_examples', -1) or -1
  num_eval = dataset_config.get('num_eval_examples', -1) or -1
  if num_train <= 0 or num_eval <= 0:
    builder = get_builder(dataset_config)
    if not builder.is_prepared():
      raise _not_prepared(info, builder)
    splits = builder.info.splits
    train_split = dataset_config.get('train_split', 'train')
    eval_split = dataset_config.get('eval_split', 'test')
    for split in (train_split, eval_split):
      try:
        splits[split]
      except (KeyError, ValueError) as e:
        raise errors.UserError(
            f'dataset {info.name!r} has no split {split!r}; its splits: '
            f'{", ".join(sorted(splits))}') from e
    if num_train <= 0:
      num_train = splits[train_split].num_examples
    if num_eval <= 0:
      num_eval = splits[eval_split].num_examples
  fraction = dataset_config.get('train_fraction', 1.0)
  if not 0.0 < fraction <= 1.0:
    raise errors.UserError(
        f'dataset.train_fraction is {fraction}; it must be in (0, 1] (1: the whole train split)')
  num_train = int(num_train * fraction)
  return dataclasses.replace(info, num_train=num_train, num_eval=num_eval)


def load_split(dataset_config: ml_collections.ConfigDict, split: str) -> tf.data.Dataset:
  """The split in its stored order, as `(image uint8 [H, W, C], label int32)` pairs."""
  info = _registry_entry(dataset_config.name)
  builder = get_builder(dataset_config)
  # Asking as_dataset (rather than checking the folder first) keeps tfds.testing.mock_data
  # working: it patches as_dataset and points data_dir at a folder that does not exist.
  try:
    decoders = ({'image': tfds.decode.SkipDecoding()}
                if info.transform == 'inception_crop' else None)
    ds = builder.as_dataset(split=split, shuffle_files=False, decoders=decoders)
  except AssertionError as e:
    if builder.is_prepared():
      raise
    raise _not_prepared(info, builder) from e
  return ds.map(
      lambda ex: (ex['image'], tf.cast(ex['label'], tf.int32)),
      num_parallel_calls=tf.data.AUTOTUNE)

