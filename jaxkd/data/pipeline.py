"""tf.data input pipelines yielding host-local numpy batches.

Training is one global stream that is a pure function of (seed, step), whatever the number of
processes: global position p is training example perm_e(p mod N) of epoch e = p // N, where
N = steps_per_epoch · B (B the global batch; the rest of the training set is left out of that
epoch) and perm_e is a stateless permutation of the whole training set seeded from (seed, e).
Global batch s holds positions [s·B, (s+1)·B); process i of P reads its rows, positions
[s·B + i·B/P, s·B + (i+1)·B/P). An example's augmentation draws from (seed, e, its index in the
split), never from the process, so 1, 2 or 4 processes see the same global batches. The training
set is held in memory (fine for digits and CIFAR) so each position can be computed on its own;
resuming at `start_step` therefore starts the same stream at step start_step, with nothing to
replay.

A teacher that needs its own input (a CLIP tower at 224 px) gets it from `teacher_input`: each
batch then also holds 'teacher_image', the teacher's view of the same images, drawn independently
of the student's (jaxkd.data.teacher_views). `dataset_config.normalization` = 'clip' normalises
the student's views with CLIP's statistics instead of the dataset's (the EGA reference does so
for its CIFAR students), in training and evaluation alike.

Two switches of `dataset_config` change the training set, deterministically per seed (the eval
split never changes): `train_fraction` < 1 keeps a class-balanced subset (the few-shot
experiments of SSKD/HSAKD), `label_noise` > 0 gives that fraction of the training examples a
uniformly random other class (symmetric label noise).
"""

import math
from typing import Iterator, Optional

import ml_collections
import numpy as np
import tensorflow as tf

from jaxkd import errors
from jaxkd.data import negatives
from jaxkd.data import sources
from jaxkd.data import teacher_views
from jaxkd.data import views as views_lib
from jaxkd.data.sources import DatasetInfo
from jaxkd.data.teacher_views import TeacherInput

# Folded into an example's key for its negatives, apart from the keys of its views.
NEGATIVES_STREAM = 1 << 20


def steps_per_epoch(info: DatasetInfo, global_batch_size: int) -> int:
  """Full global batches per epoch; the remainder of the train split is dropped each epoch."""
  return info.num_train // global_batch_size


def num_eval_steps(info: DatasetInfo, global_batch_size: int) -> int:
  """Batches in one eval pass; the last one is padded."""
  return math.ceil(info.num_eval / global_batch_size)


def _views_fn(views: str, info: DatasetInfo, teacher_input: Optional[TeacherInput],
              train: bool):
  """fn(image, key) -> {'image': student views[, 'teacher_image': the teacher's view]}."""
  if teacher_input is None:
    views_fn = views_lib.make_views_fn(views, info, train)
    return lambda image, key: {'image': views_fn(image, key)}
  if views != 'none' or info.transform != 'pad_crop':
    raise errors.UserError(
        f'a teacher with its own input needs views \'none\' on a decoded dataset; got views '
        f'{views!r} on dataset {info.name!r} (transform {info.transform!r})')
  return teacher_views.make_views_fn(info, teacher_input, train)


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise errors.UserError(
        f'global batch size {global_batch_size} must be positive and divisible by the '
        f'process count {process_count}')
  return global_batch_size // process_count


def _first_examples(dataset_config: ml_collections.ConfigDict, split: str,
                    num_examples: int) -> tf.data.Dataset:
  """The first `num_examples` (image, label) pairs of the split; an error if it has fewer."""
  ds = sources.load_split(dataset_config, split)
  available = int(ds.cardinality())
  if 0 <= available < num_examples:
    raise errors.UserError(
        f'dataset {dataset_config.name!r} split {split!r} has {available} examples but the '
        f'config asks for {num_examples}; lower num_train_examples / num_eval_examples')
  return ds.take(num_examples)


def _examples(dataset_config: ml_collections.ConfigDict, split: str, num_examples: int,
              process_index: int, process_count: int) -> tf.data.Dataset:
  """(index in split, image, label) of this process's shard of the first `num_examples`."""
  ds = _first_examples(dataset_config, split, num_examples).enumerate()
  return ds.shard(process_count, process_index)


def balanced_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
  """Sorted indices of `size` examples, every class kept in proportion to its count.

  Each class is put in a random order (per seed); member p of class c, of n_c, gets the score
  (p + 1/2) / n_c, and the `size` smallest scores are kept (ties in random order), so class c
  keeps size / N · n_c members give or take one; exactly size / C each when the C classes are
  equal and C divides size (CIFAR-100 at 25/50/75 %).
  """
  rng = np.random.RandomState([seed, 1])
  order = rng.permutation(len(labels))
  score = np.empty(len(labels))
  for c in np.unique(labels):
    members = order[labels[order] == c]
    score[members] = (np.arange(len(members)) + 0.5) / len(members)
  tie_break = np.empty(len(labels), np.int64)
  tie_break[order] = np.arange(len(labels))
  return np.sort(np.lexsort((tie_break, score))[:size])


def symmetric_label_noise(labels: np.ndarray, rate: float, num_classes: int,
                          seed: int) -> np.ndarray:
  """`labels` with int(rate · N) of them, chosen per seed, changed to a uniform other class."""
  rng = np.random.RandomState([seed, 2])
  noisy = np.array(labels, copy=True)
  chosen = rng.permutation(len(labels))[:int(rate * len(labels))]
  noisy[chosen] = (noisy[chosen] + rng.randint(1, num_classes, size=len(chosen))) % num_classes
  return noisy


def _is_altered(dataset_config: ml_collections.ConfigDict) -> bool:
  return (dataset_config.get('train_fraction', 1.0) < 1.0
          or dataset_config.get('label_noise', 0.0) != 0.0)


def _labels(ds: tf.data.Dataset) -> np.ndarray:
  return np.concatenate(list(
      ds.map(lambda image, label: label).batch(1 << 16).as_numpy_iterator()))


def _train_pool(dataset_config: ml_collections.ConfigDict) -> tf.data.Dataset:
  """The examples the training set is chosen from (all of the split, or its first
  num_train_examples)."""
  split = dataset_config.get('train_split', 'train')
  pool = dataset_config.get('num_train_examples', -1) or -1
  return (_first_examples(dataset_config, split, pool) if pool > 0
          else sources.load_split(dataset_config, split))


def training_set(dataset_config: ml_collections.ConfigDict, info: DatasetInfo, seed: int
                 ) -> tuple[np.ndarray, np.ndarray]:
  """(index in the split, label) of every training example, ascending by index.

  After `train_fraction` and `label_noise` (see above), which need every label of the split.
  """
  if not _is_altered(dataset_config):
    split = dataset_config.get('train_split', 'train')
    labels = _labels(_first_examples(dataset_config, split, info.num_train))
    return np.arange(len(labels)), labels
  noise = dataset_config.get('label_noise', 0.0)
  if not 0.0 <= noise < 1.0:
    raise errors.UserError(f'dataset.label_noise is {noise}; it must be in [0, 1) (0: clean)')
  labels = _labels(_train_pool(dataset_config))
  keep = balanced_subset(labels, info.num_train, seed)
  return keep, symmetric_label_noise(labels[keep], noise, info.num_classes, seed)


def _altered_examples(dataset_config: ml_collections.ConfigDict, info: DatasetInfo, seed: int,
                      process_index: int, process_count: int) -> tf.data.Dataset:
  """`_examples` of the train split after `train_fraction` and `label_noise` (see above).

  The index of an example stays its index in the split.
  """
  keep, kept_labels = training_set(dataset_config, info, seed)
  ds = _train_pool(dataset_config)
  labels = np.zeros(int(keep[-1]) + 1, np.int32)
  labels[keep] = kept_labels
  kept = tf.constant(np.isin(np.arange(len(labels)), keep))
  new_labels = tf.constant(labels, tf.int32)
  ds = ds.take(len(labels)).enumerate().filter(lambda index, example: tf.gather(kept, index))
  ds = ds.map(lambda index, example: (index, (example[0], tf.gather(new_labels, index))))
  return ds.shard(process_count, process_index)


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  return options


def train_dataset(dataset_config: ml_collections.ConfigDict, views: str, global_batch_size: int,
                  seed: int, start_step: int = 0, process_index: int = 0,
                  process_count: int = 1, teacher_input: Optional[TeacherInput] = None,
                  num_negatives: int = 0) -> tf.data.Dataset:
  """The infinite training stream of this process as a tf.data.Dataset (see train_batches)."""
  sources.hide_accelerators()
  views_lib.check_views(views)
  info = sources.get_dataset_info(dataset_config)
  views_fn = _views_fn(views, info, teacher_input, train=True)
  batch = _local_batch_size(global_batch_size, process_count)
  steps = steps_per_epoch(info, global_batch_size)
  if start_step < 0:
    raise errors.UserError(f'start_step must be >= 0, got {start_step}')
  if steps == 0:
    raise errors.UserError(
        f'global batch size {global_batch_size} is larger than the {info.num_train} training '
        f'examples of dataset {info.name!r}')
  if _is_altered(dataset_config):
    examples = _altered_examples(dataset_config, info, seed, 0, 1)
  else:
    examples = _examples(dataset_config, dataset_config.get('train_split', 'train'),
                         info.num_train, 0, 1)
  # The whole training set as three tensors, for random access by shuffled position.
  indices, (images, labels) = examples.batch(info.num_train).get_single_element()
  max_index = tf.cast(tf.shape(indices)[0] - 1, tf.int64)
  per_epoch = steps * global_batch_size  # N: never more than the training set.
  sampler, position_in_set = None, None
  if num_negatives > 0:
    split_indices, set_labels = training_set(dataset_config, info, seed)
    sampler = negatives.OtherClassSampler(set_labels, num_negatives)
    position_in_set = tf.searchsorted(tf.constant(split_indices, tf.int64), indices)

  def element(local):
    # The local-th example this process reads: row local % b of its rows of step local // b.
    position = (local // batch) * global_batch_size + process_index * batch + local % batch
    epoch = position // per_epoch
    # Example keys fold in indices >= 0, so -1 gives the epoch's shuffle its own key.
    shuffle_key = views_lib.example_key(seed, epoch, -1)
    j = tf.random.experimental.index_shuffle(position % per_epoch, shuffle_key, max_index)
    key = views_lib.example_key(seed, epoch, indices[j])
    example = dict(views_fn(images[j], key), label=labels[j])
    if sampler is not None:
      index = position_in_set[j]
      example['index'] = tf.cast(index, tf.int32)
      example['contrast_index'] = sampler(
          index, labels[j], tf.random.experimental.stateless_fold_in(key, NEGATIVES_STREAM))
    return example

  ds = tf.data.Dataset.counter(start=start_step * batch, dtype=tf.int64)
  ds = ds.map(element, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(batch, drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE).with_options(_options())


def train_batches(dataset_config: ml_collections.ConfigDict, views: str, global_batch_size: int,
                  seed: int, start_step: int = 0, process_index: int = 0,
                  process_count: int = 1, teacher_input: Optional[TeacherInput] = None,
                  num_negatives: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Infinite host-local training batches, starting at global step `start_step`.

  Yields {'image': float32 [b, H, W, C] (views 'none') or [b, V, H, W, C], 'label': int32 [b]}
  with b = global_batch_size // process_count; process i reads rows [i·b, (i+1)·b) of every
  global batch (see the module docstring), so the global batches do not depend on
  process_count.
  With `teacher_input`, also 'teacher_image' [b, S, S, C_t] (views 'none' only). With
  `num_negatives` K > 0, also 'index' int32 [b] (the example's position in the training set)
  and 'contrast_index' int32 [b, K + 1] (see jaxkd.data.negatives).
  Batch s is the same whether the iterator started at 0 or at `start_step` <= s.
  """
  return train_dataset(dataset_config, views, global_batch_size, seed, start_step,
                       process_index, process_count, teacher_input,
                       num_negatives).as_numpy_iterator()


def eval_dataset(dataset_config: ml_collections.ConfigDict, views: str, global_batch_size: int,
                 process_index: int = 0, process_count: int = 1,
                 teacher_input: Optional[TeacherInput] = None) -> tf.data.Dataset:
  """One padded pass over this process's shard of the eval split (see eval_batches)."""
  sources.hide_accelerators()
  views_lib.check_views(views)
  info = sources.get_dataset_info(dataset_config)
  views_fn = _views_fn(views, info, teacher_input, train=False)
  batch = _local_batch_size(global_batch_size, process_count)
  ds = _examples(dataset_config, dataset_config.get('eval_split', 'test'), info.num_eval,
                 process_index, process_count)
  ds = ds.map(
      lambda index, example: dict(
          views_fn(example[0], None), label=example[1], mask=tf.constant(1.0, tf.float32)),
      num_parallel_calls=tf.data.AUTOTUNE)
  pad = {'image': tf.zeros(views_lib.view_shape(views, info), tf.float32),
         'label': tf.constant(0, tf.int32), 'mask': tf.constant(0.0, tf.float32)}
  if teacher_input is not None:
    pad['teacher_image'] = tf.zeros(teacher_views.teacher_view_shape(info, teacher_input),
                                    tf.float32)
  padding = tf.data.Dataset.from_tensors(pad).repeat()
  # Every process pads its shard to the same number of batches, so collective steps line up.
  ds = ds.concatenate(padding).take(num_eval_steps(info, global_batch_size) * batch)
  return ds.batch(batch).prefetch(tf.data.AUTOTUNE).with_options(_options())


def eval_batches(dataset_config: ml_collections.ConfigDict, views: str, global_batch_size: int,
                 process_index: int = 0, process_count: int = 1,
                 teacher_input: Optional[TeacherInput] = None
                 ) -> Iterator[dict[str, np.ndarray]]:
  """One pass over the eval split in host-local batches with a 'mask' (1 real, 0 padding).

  Every batch is full size; summing mask-weighted metrics over all processes and batches counts
  each eval example exactly once. With `teacher_input`, also the teacher's 'teacher_image'.
  """
  return eval_dataset(dataset_config, views, global_batch_size, process_index,
                      process_count, teacher_input).as_numpy_iterator()
