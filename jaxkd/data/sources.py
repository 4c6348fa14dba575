"""Supported datasets by config name, and how to open their tfds splits.

Only the embedded digits are built automatically. Every other dataset must already be prepared in
`dataset_config.data_dir`; when it is not, one `UserError` says how to get it there, instead of
letting tfds try (and, offline, retry) a download.
"""

import dataclasses

import ml_collections
import tensorflow as tf
import tensorflow_datasets as tfds

from jaxkd import errors
from jaxkd.data import digits


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the pipeline, the models and the metrics need to know about a dataset."""
  name: str  # Config name, e.g. 'cifar100'.
  tfds_name: str
  num_classes: int
  image_shape: tuple[int, int, int]  # (H, W, C)
  num_train: int  # Examples in the train split (0 in the registry: filled in from config/tfds).
  num_eval: int
  mean: tuple[float, ...]  # Per channel, on images scaled to [0, 1].
  std: tuple[float, ...]
  crop_padding: int  # Zero padding of the random crop back to image_shape.
  flip: bool  # Random horizontal flips in training.


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
      f'prepared {info.tfds_name}/ folder there), or point the dataset data_dir at it.')


def get_builder(dataset_config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """The tfds builder of `dataset_config.name`; the embedded digits are built on first use."""
  info = _registry_entry(dataset_config.name)
  hide_accelerators()  # Before building runs the first TF op.
  builder = tfds.builder(info.tfds_name, data_dir=_data_dir(dataset_config))
  if info.tfds_name == digits.TFDS_NAME and not builder.is_prepared():
    try:
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    except Exception:  # pylint: disable=broad-except
      # Another process (pod host) may have finished the same build first.
      if not builder.is_prepared():
        raise
  return builder


def get_dataset_info(dataset_config: ml_collections.ConfigDict) -> DatasetInfo:
  """The registry entry of `dataset_config.name` with the split sizes filled in.

  `num_train_examples` / `num_eval_examples` win when > 0 (the pipeline then uses the first that
  many examples of the split); otherwise the counts come from the prepared dataset's metadata.
  """
  info = _registry_entry(dataset_config.name)
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
  return dataclasses.replace(info, num_train=num_train, num_eval=num_eval)


def load_split(dataset_config: ml_collections.ConfigDict, split: str) -> tf.data.Dataset:
  """The split in its stored order, as `(image uint8 [H, W, C], label int32)` pairs."""
  info = _registry_entry(dataset_config.name)
  builder = get_builder(dataset_config)
  # Asking as_dataset (rather than checking the folder first) keeps tfds.testing.mock_data
  # working: it patches as_dataset and points data_dir at a folder that does not exist.
  try:
    ds = builder.as_dataset(split=split, shuffle_files=False)
  except AssertionError as e:
    if builder.is_prepared():
      raise
    raise _not_prepared(info, builder) from e
  return ds.map(
      lambda ex: (ex['image'], tf.cast(ex['label'], tf.int32)),
      num_parallel_calls=tf.data.AUTOTUNE)

