"""The training and eval streams as functions of a step, and grain iterators over them.

Training is one global stream, a pure function of (seed, step) whatever the number of processes:
global position p is training example j = perm_e(p mod N) of epoch e = p // N, where
N = steps_per_epoch · B (B the global batch; the rest of the training set is left out of that
epoch) and perm_e is a permutation of the whole training set drawn from (seed, e)
(jaxkd.data.keys.permuted). Global batch s holds positions [s·B, (s+1)·B); process i of P reads
its rows, positions [s·B + i·b, s·B + (i+1)·b) with b = B / P. Example j's augmentation (and its
contrastive negatives) draws from the key (seed, e, its index in the split), never from the
process, so 1, 2 or 4 processes see the same global batches, and resuming at step s starts the
same stream there, with nothing to replay.

The eval stream is one pass: eval batch t holds examples [t·B, (t+1)·B) of the split, padded past
its end (mask 0), process i reading rows [i·b, (i+1)·b) of each.

`TrainBatch(step)` and `EvalBatch(step)` compute one process's batch of a step by reading its
examples by index; `batches` runs them with grain, in this process's threads or in input worker
processes. Nothing here imports TensorFlow, so workers start light.
"""

import dataclasses
import signal
from typing import Any, Callable, Iterator, Optional

import grain
import numpy as np

from jaxkd.data import keys
from jaxkd.data import negatives
from jaxkd.data import records

# Appended to an example's key for its negatives, apart from the keys of its views.
NEGATIVES_STREAM = 1 << 20
# Batches prepared ahead of the one being read: per thread of this process, per worker.
_BUFFER = 2


def position(step: int, row: int, global_batch_size: int, process_index: int,
             local_batch_size: int) -> int:
  """The global position of row `row` of process `process_index`'s batch of `step`."""
  return step * global_batch_size + process_index * local_batch_size + row


def image_only(views_fn: Callable[[Any, Optional[keys.Key]], np.ndarray], image: Any,
               key: Optional[keys.Key]) -> dict[str, np.ndarray]:
  """{'image': views_fn(image, key)}: a views function as the batch functions call it."""
  return {'image': views_fn(image, key)}


def _stack(examples: list[dict[str, Any]]) -> dict[str, np.ndarray]:
  return {key: np.stack([example[key] for example in examples]) for key in examples[0]}


@dataclasses.dataclass(frozen=True)
class TrainBatch:
  """step -> this process's training batch of that step (see the module docstring).

  `split_index[j]` / `label_of[j]`: the index in the split and the label of training example j
  (None: j itself / the record's label). `views_fn(image, key)` -> {'image': ...[,
  'teacher_image']}. With a `sampler`, each example also gets 'index' (j) and
  'contrast_index' (jaxkd.data.negatives).
  """
  source: records.Source
  views_fn: Callable[[Any, keys.Key], dict[str, np.ndarray]]
  seed: int
  global_batch_size: int
  local_batch_size: int
  process_index: int
  per_epoch: int  # N
  num_train: int
  split_index: Optional[np.ndarray] = None
  label_of: Optional[np.ndarray] = None
  sampler: Optional[negatives.OtherClassSampler] = None

  def example(self, p: int) -> dict[str, Any]:
    """The example at global position p, with its views."""
    epoch, offset = divmod(p, self.per_epoch)
    j = keys.permuted(offset, self.num_train, self.seed, epoch)
    index = j if self.split_index is None else int(self.split_index[j])
    image, label = self.source[index]
    if self.label_of is not None:
      label = int(self.label_of[j])
    key = keys.example_key(self.seed, epoch, index)
    example = dict(self.views_fn(image, key), label=np.int32(label))
    if self.sampler is not None:
      example['index'] = np.int32(j)
      example['contrast_index'] = self.sampler(j, label, key + (NEGATIVES_STREAM,))
    return example

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    return _stack([self.example(position(step, row, self.global_batch_size,
                                         self.process_index, self.local_batch_size))
                   for row in range(self.local_batch_size)])


@dataclasses.dataclass(frozen=True)
class EvalBatch:
  """step -> this process's eval batch of that step, its rows past the split's end padding.

  Each example: views_fn(image, None), 'label', 'mask' 1.0; padding: `pad` (zeros), mask 0.0.
  """
  source: records.Source
  views_fn: Callable[[Any, Optional[keys.Key]], dict[str, np.ndarray]]
  global_batch_size: int
  local_batch_size: int
  process_index: int
  pad: dict[str, np.ndarray]

  def example(self, p: int) -> dict[str, Any]:
    if p >= len(self.source):
      return dict(self.pad, label=np.int32(0), mask=np.float32(0.0))
    image, label = self.source[p]
    return dict(self.views_fn(image, None), label=np.int32(label), mask=np.float32(1.0))

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    return _stack([self.example(position(step, row, self.global_batch_size,
                                         self.process_index, self.local_batch_size))
                   for row in range(self.local_batch_size)])


def _allow_workers() -> None:
  """grain's worker processes read absl flags; outside an absl app (a notebook, a test) mark
  them parsed, so that their defaults apply."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _leave_signals_to_the_trainer(worker_index: int, worker_count: int) -> None:
  """An input worker ignores SIGINT and SIGTERM: Ctrl-C reaches every process of the terminal's
  group, and a worker that died of it would end the run with its traceback instead of the
  trainer's checkpoint; the trainer stops its workers when it stops."""
  del worker_index, worker_count
  for signum in (signal.SIGINT, signal.SIGTERM):
    signal.signal(signum, signal.SIG_IGN)


def batches(batch_fn: Callable[[int], dict[str, np.ndarray]], start: int, stop: int,
            num_workers: int = 0, num_threads: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """batch_fn(start), batch_fn(start + 1), ... up to `stop`, made ahead of the reader.

  `num_workers` 0: by `num_threads` threads of this process; N > 0: by N worker processes
  (grain's multiprocessing; each makes whole batches), which `batch_fn` is pickled to.
  """
  ds = grain.MapDataset.range(start, stop).map(batch_fn)
  threads = max(num_threads, 1)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                            prefetch_buffer_size=_BUFFER * threads))
  if num_workers > 0:
    _allow_workers()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                     per_worker_buffer_size=_BUFFER),
                        worker_init_fn=_leave_signals_to_the_trainer)
  return iter(it)
