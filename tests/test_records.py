"""Reading by index: each process reads only the examples of its own rows, a split read from
its ArrayRecord files is not held in memory, and input worker processes give the batches that
the training process gives."""

import os
import subprocess
import sys

import numpy as np
import tensorflow_datasets as tfds

import helpers

from jaxkd.data import pipeline
from jaxkd.data import records
from jaxkd.data import sources

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIDE = 128  # Mock images of 48 KiB each, decoded.


def _config(name, data_dir, **fields):
  return helpers.dataset_config(name, data_dir, **fields)


def test_each_process_reads_only_its_rows(digits_dir, monkeypatch):
  """Read by index from the ArrayRecord files (nothing in memory): process i's batch function
  reads the examples of its rows of each global batch, and the processes together read those
  of one process."""
  monkeypatch.setattr(pipeline, "IN_MEMORY_BYTES", 0)
  opened = sources.data_source
  read = []

  def recording(config, split, num_examples=-1):
    read.append([])
    return Recording(opened(config, split, num_examples), read[-1])

  monkeypatch.setattr(sources, "data_source", recording)
  config = _config("digits", digits_dir)
  alone = pipeline.train_batch_fn(config, "none", 64, seed=2)
  halves = [pipeline.train_batch_fn(config, "none", 64, seed=2, process_index=i,
                                    process_count=2) for i in range(2)]
  for step in (0, 1, 30):  # 30: in the third epoch (22 steps per epoch).
    del read[0][:], read[1][:], read[2][:]
    one, two = alone(step), [half(step) for half in halves]
    assert len(read[0]) == 64 and read[1] == read[0][:32] and read[2] == read[0][32:]
    np.testing.assert_array_equal(np.concatenate([two[0]["image"], two[1]["image"]]),
                                  one["image"])


class Recording:
  """A source that notes every index read."""

  def __init__(self, source, indices):
    self.source, self.indices = source, indices

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    self.indices.append(int(index))
    return self.source[index]


def _take(iterator, n):
  for _ in range(n):
    yield next(iterator)


def test_input_workers_give_the_same_batches(digits_dir):
  """Two worker processes (grain) make the batches the training process makes itself."""
  config = _config("digits", digits_dir)
  here = list(_take(pipeline.train_batches(config, "rotations", 32, seed=5, start_step=3), 4))
  workers = pipeline.train_batches(config, "rotations", 32, seed=5, start_step=3,
                                   num_workers=2)
  there = list(_take(workers, 4))
  workers.close()  # The workers stop now, not when the interpreter exits.
  for a, b in zip(here, there):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])


def test_prefetch_to_mesh_sends_batches_ahead():
  """Two batches are on the devices ahead of the one the step reads; none is lost or reordered."""
  import jax  # pylint: disable=g-import-not-at-top
  from jaxkd import parallel  # pylint: disable=g-import-not-at-top
  mesh = parallel.create_mesh()
  made = []

  def local_batches():
    for i in range(5):
      made.append(i)
      yield {"x": np.full((len(jax.devices()), 3), i, np.float32)}

  prefetched = parallel.prefetch_to_mesh(local_batches(), mesh, size=2)
  first = next(prefetched)
  assert made == [0, 1, 2] and isinstance(first["x"], jax.Array)
  assert first["x"].sharding == parallel.data_sharding(mesh)
  rest = list(prefetched)
  assert [int(b["x"][0, 0]) for b in [first] + rest] == [0, 1, 2, 3, 4]


def _write_mock(data_dir, name, num_examples):
  """A tfds dataset `name` of random SIDE x SIDE RGB PNGs, stored as ArrayRecord."""
  rng = np.random.default_rng(0)
  examples = [{"image": rng.integers(0, 256, (SIDE, SIDE, 3), np.uint8), "label": i % 10}
              for i in range(num_examples)]
  tfds.dataset_builders.store_as_tfds_dataset(
      name=name, version="1.0.0",
      features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(SIDE, SIDE, 3)),
          "label": tfds.features.ClassLabel(num_classes=10)}),
      split_datasets={"train": list(enumerate(examples)), "test": list(enumerate(examples[:8]))},
      data_dir=str(data_dir), file_format="array_record")


# Run in a fresh interpreter: reads 100 batches of 10 images of a split, first streamed from its
# files, then (IN_MEMORY_BYTES large) decoded into memory, and prints by how much the resident
# memory (MiB) rose above what it was before the pipeline was made, at most, during each pass.
_MEASURE = """
import gc, os, sys
from jaxkd import defaults
from jaxkd.data import pipeline
def rss():
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20
config = defaults.dataset_config(sys.argv[1])
config.update(data_dir=sys.argv[2], mean=(0.5,) * 3, std=(0.25,) * 3)
next(pipeline.train_batches(config, 'none', 10, seed=0))  # Imports and first-use costs.
for in_memory in (0, 1 << 40):
  pipeline.IN_MEMORY_BYTES = in_memory
  gc.collect()
  start = highest = rss()
  batches = pipeline.train_batches(config, 'none', 10, seed=0)
  for _ in range(100):
    next(batches)
    highest = max(highest, rss())
  print(highest - start)
  del batches
"""


def _growth(data_dir, name):
  out = subprocess.run(
      [sys.executable, "-c", _MEASURE, f"tfds:{name}", str(data_dir)],
      cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"),
      capture_output=True, text=True, timeout=300, check=True).stdout
  streamed, in_memory = (float(line) for line in out.split())
  return streamed, in_memory


def test_a_split_read_from_array_record_is_not_held_in_memory(tmp_path):
  """1,000 images read from a split of 100 and of 2,000 (4.7 and 94 MiB decoded): streamed from
  the files, the memory grows by a few MiB (batches in flight, buffers) for both; decoded into
  memory (the small-split path), by the split's size, so the measure sees a split held in
  memory."""
  _write_mock(tmp_path, "mock_small", 100)
  _write_mock(tmp_path, "mock_large", 2000)
  split_mib = 2000 * SIDE * SIDE * 3 / 2**20
  small, _ = _growth(tmp_path, "mock_small")
  large, large_in_memory = _growth(tmp_path, "mock_large")
  assert max(small, large) < split_mib / 4, (small, large)
  assert large_in_memory > 0.9 * split_mib, large_in_memory


def test_decode_gives_the_asked_channels():
  image = np.random.default_rng(0).integers(0, 256, (12, 24, 3), np.uint8)
  grey = records.decode(_png(image), 1)
  assert grey.shape == (12, 24, 1) and grey.dtype == np.uint8
  np.testing.assert_array_equal(records.decode(_png(image), 3), image)
  rgb = records.decode(_png(image[..., :1]), 3)  # A grey file repeats its channel.
  np.testing.assert_array_equal(rgb, np.repeat(image[..., :1], 3, axis=-1))


def _png(image):
  import io  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
  return buffer.getvalue()
