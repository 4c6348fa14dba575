"""Input pipelines yielding host-local numpy batches, read by index and made with grain.

Training is one global stream that is a pure function of (seed, step), whatever the number of
processes (jaxkd.data.stream has the definition): global position p is training example
perm_e(p mod N) of epoch e = p // N, N = steps_per_epoch · B; process i of P reads rows
[i·B/P, (i+1)·B/P) of every global batch; an example's augmentation draws from (seed, e, its
index in the split). Every process reads only the examples of its own rows, by index, from the
split's ArrayRecord files (or image files), so no process holds the dataset; resuming at
`start_step` starts the same stream at that step, with nothing to replay. A training split whose
decoded images fit in IN_MEMORY_BYTES (digits, CIFAR, STL-10's train split) is decoded once into
memory instead, which makes each example cheaper to read (experiments/README.md); the stream is
the same either way.

The batches of each step are made ahead of the reader, by threads of the process or by
`num_workers` input worker processes (grain).

A teacher that needs its own input (a CLIP tower at 224 px) gets it from `teacher_input`: each
batch then also holds 'teacher_image', the teacher's view of the same images, drawn independently
of the student's (jaxkd.data.teacher_views). `dataset_config.normalization` = 'clip' normalises
the student's views with CLIP's statistics instead of the dataset's (the EGA reference does so
for its CIFAR students), in training and evaluation alike.

Two switches of `dataset_config` change the training set, deterministically per seed (the eval
split never changes): `train_fraction` < 1 keeps a class-balanced subset (the few-shot
experiments of SSKD/HSAKD), `label_noise` > 0 gives that fraction of the training examples a
uniformly random other class (symmetric label noise). Both, and contrastive negatives, read
every label of the split once.
"""

import functools
import math
from typing import Iterator, Optional

import ml_collections
import numpy as np

from jaxkd import errors
from jaxkd.data import imagenet
from jaxkd.data import negatives
from jaxkd.data import records
from jaxkd.data import sources
from jaxkd.data import stream
from jaxkd.data import teacher_views
from jaxkd.data import views as views_lib
from jaxkd.data.sources import DatasetInfo
from jaxkd.data.teacher_views import TeacherInput

# A training split whose decoded images take at most this many bytes is read into memory once.
IN_MEMORY_BYTES = 1 << 30
# Threads of this process that make batches ahead when there are no input workers.
THREADS = 2
# Training steps in the stream: never reached.
_ENDLESS = 1 << 62


def steps_per_epoch(info: DatasetInfo, global_batch_size: int) -> int:
  """Full global batches per epoch; the remainder of the train split is dropped each epoch."""
  return info.num_train // global_batch_size


def num_eval_steps(info: DatasetInfo, global_batch_size: int) -> int:
  """Batches in one eval pass; the last one is padded."""
  return math.ceil(info.num_eval / global_batch_size)


def _views_fn(views: str, info: DatasetInfo, teacher_input: Optional[TeacherInput],
              train: bool):
  """fn(image, key) -> {'image': student views[, 'teacher_image': the teacher's view]}.

  The student's views are made by the module of the dataset's `transform`: jaxkd.data.views for
  'pad_crop' (decoded images), jaxkd.data.imagenet for 'inception_crop' (encoded JPEGs).
  """
  if teacher_input is None:
    family = imagenet if info.transform == 'inception_crop' else views_lib
    return functools.partial(stream.image_only, family.make_views_fn(views, info, train))
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


def _train_pool(dataset_config: ml_collections.ConfigDict) -> records.Source:
  """The examples the training set is chosen from (all of the split, or its first
  num_train_examples)."""
  return sources.data_source(dataset_config, dataset_config.get('train_split', 'train'),
                             dataset_config.get('num_train_examples', -1) or -1)


def _check_label_noise(dataset_config: ml_collections.ConfigDict) -> float:
  noise = dataset_config.get('label_noise', 0.0)
  if not 0.0 <= noise < 1.0:
    raise errors.UserError(f'dataset.label_noise is {noise}; it must be in [0, 1) (0: clean)')
  return noise


def training_set(dataset_config: ml_collections.ConfigDict, info: DatasetInfo, seed: int
                 ) -> tuple[np.ndarray, np.ndarray]:
  """(index in the split, label) of every training example, ascending by index.

  After `train_fraction` and `label_noise` (see above), which need every label of the split.
  """
  noise = _check_label_noise(dataset_config)
  pool = _train_pool(dataset_config)
  if not _is_altered(dataset_config):
    return np.arange(info.num_train), records.labels(records.Head(pool, info.num_train))
  labels = records.labels(pool)
  keep = balanced_subset(labels, info.num_train, seed)
  return keep, symmetric_label_noise(labels[keep], noise, info.num_classes, seed)


def _train_source(dataset_config: ml_collections.ConfigDict, info: DatasetInfo
                  ) -> records.Source:
  """The training split by index; in memory when its decoded images fit IN_MEMORY_BYTES."""
  source = _train_pool(dataset_config)
  if (info.transform == 'pad_crop'
      and len(source) * math.prod(info.image_shape) <= IN_MEMORY_BYTES):
    return records.InMemory.read(source)
  return source


def train_batch_fn(dataset_config: ml_collections.ConfigDict, views: str,
                   global_batch_size: int, seed: int, process_index: int = 0,
                   process_count: int = 1, teacher_input: Optional[TeacherInput] = None,
                   num_negatives: int = 0) -> stream.TrainBatch:
  """step -> this process's training batch of that step (see train_batches)."""
  views_lib.check_views(views)
  info = sources.get_dataset_info(dataset_config)
  views_fn = _views_fn(views, info, teacher_input, train=True)
  batch = _local_batch_size(global_batch_size, process_count)
  steps = steps_per_epoch(info, global_batch_size)
  if steps == 0:
    raise errors.UserError(
        f'global batch size {global_batch_size} is larger than the {info.num_train} training '
        f'examples of dataset {info.name!r}')
  _check_label_noise(dataset_config)
  split_index = label_of = sampler = None
  if _is_altered(dataset_config) or num_negatives > 0:
    split_index, label_of = training_set(dataset_config, info, seed)
  if num_negatives > 0:
    sampler = negatives.OtherClassSampler(label_of, num_negatives)
  return stream.TrainBatch(
      source=_train_source(dataset_config, info), views_fn=views_fn, seed=seed,
      global_batch_size=global_batch_size, local_batch_size=batch,
      process_index=process_index, per_epoch=steps * global_batch_size,
      num_train=info.num_train, split_index=split_index, label_of=label_of, sampler=sampler)


def train_batches(dataset_config: ml_collections.ConfigDict, views: str, global_batch_size: int,
                  seed: int, start_step: int = 0, process_index: int = 0,
                  process_count: int = 1, teacher_input: Optional[TeacherInput] = None,
                  num_negatives: int = 0, num_workers: int = 0
                  ) -> Iterator[dict[str, np.ndarray]]:
  """Infinite host-local training batches, starting at global step `start_step`.

  Yields {'image': float32 [b, H, W, C] (views 'none') or [b, V, H, W, C], 'label': int32 [b]}
  with b = global_batch_size // process_count; process i reads rows [i·b, (i+1)·b) of every
  global batch (see the module docstring), so the global batches do not depend on
  process_count. With `teacher_input`, also 'teacher_image' [b, S, S, C_t] (views 'none' only).
  With `num_negatives` K > 0, also 'index' int32 [b] (the example's position in the training
  set) and 'contrast_index' int32 [b, K + 1] (see jaxkd.data.negatives).
  Batch s is the same whether the iterator started at 0 or at `start_step` <= s.
  `num_workers` > 0 makes the batches in that many worker processes.
  """
  if start_step < 0:
    raise errors.UserError(f'start_step must be >= 0, got {start_step}')
  batch_fn = train_batch_fn(dataset_config, views, global_batch_size, seed, process_index,
                            process_count, teacher_input, num_negatives)
  return stream.batches(batch_fn, start_step, _ENDLESS, num_workers, THREADS)


def eval_batch_fn(dataset_config: ml_collections.ConfigDict, views: str, global_batch_size: int,
                  process_index: int = 0, process_count: int = 1,
                  teacher_input: Optional[TeacherInput] = None) -> stream.EvalBatch:
  """step -> this process's eval batch of that step (see eval_batches)."""
  views_lib.check_views(views)
  info = sources.get_dataset_info(dataset_config)
  views_fn = _views_fn(views, info, teacher_input, train=False)
  pad = {'image': np.zeros(views_lib.view_shape(views, info), np.float32)}
  if teacher_input is not None:
    pad['teacher_image'] = np.zeros(teacher_views.teacher_view_shape(info, teacher_input),
                                    np.float32)
  source = sources.data_source(dataset_config, dataset_config.get('eval_split', 'test'),
                               info.num_eval)
  return stream.EvalBatch(
      source=source, views_fn=views_fn, global_batch_size=global_batch_size,
      local_batch_size=_local_batch_size(global_batch_size, process_count),
      process_index=process_index, pad=pad)


def eval_batches(dataset_config: ml_collections.ConfigDict, views: str, global_batch_size: int,
                 process_index: int = 0, process_count: int = 1,
                 teacher_input: Optional[TeacherInput] = None, num_threads: int = THREADS
                 ) -> Iterator[dict[str, np.ndarray]]:
  """One pass over the eval split in host-local batches with a 'mask' (1 real, 0 padding).

  Every batch is full size, and every process reads the same number of batches (so collective
  steps line up); summing mask-weighted metrics over all processes and batches counts each eval
  example exactly once. With `teacher_input`, also the teacher's 'teacher_image'. The batches
  are made by `num_threads` threads of this process (a pass is too short to start worker
  processes for; PIL decodes and resizes without the interpreter lock, so threads share the
  cost of JPEGs).
  """
  batch_fn = eval_batch_fn(dataset_config, views, global_batch_size, process_index,
                           process_count, teacher_input)
  steps = num_eval_steps(sources.get_dataset_info(dataset_config), global_batch_size)
  return stream.batches(batch_fn, 0, steps, num_workers=0, num_threads=num_threads)
