"""Several processes building the embedded digits into one empty data_dir at the same moment (the
processes of a multi-process run, or the hosts of a pod sharing data_dir): one builds, all read
the whole dataset in its documented order.

Run as a script (`python tests/test_data_concurrent_build.py DATA_DIR READY GO`) this file is one
of those processes: it imports everything, says it is ready, waits for the go signal, then opens
both splits and prints a digest of their examples (and `building` if it builds).
"""

import hashlib
import os
import subprocess
import sys
import time

import numpy as np
import tensorflow_datasets as tfds

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from jaxkd.data import digits  # noqa: E402  pylint: disable=g-import-not-at-top

NUM_PROCESSES = 2
TIMEOUT_S = 180


def digest(images: np.ndarray, labels: np.ndarray) -> str:
  """sha256 of the examples' bytes, in order."""
  h = hashlib.sha256()
  h.update(np.ascontiguousarray(images, np.uint8).tobytes())
  h.update(np.ascontiguousarray(labels, np.int64).tobytes())
  return h.hexdigest()


def expected_digests() -> dict[str, str]:
  """The splits as documented: sklearn's digits in the order of the fixed permutation."""
  images, labels = digits.digit_images_and_labels()
  return {name: digest(images[idx], labels[idx]) for name, idx in digits.split_indices().items()}


def worker(data_dir: str, ready: str, go: str) -> None:
  """One builder: waits for `go`, then reads both splits (building them if nobody has yet)."""
  from jaxkd import defaults  # pylint: disable=g-import-not-at-top
  from jaxkd.data import sources  # pylint: disable=g-import-not-at-top
  config = defaults.dataset_config("digits")
  config.data_dir = data_dir
  build = tfds.core.DatasetBuilder.download_and_prepare

  def say_and_build(self, *args, **kwargs):
    print("building", flush=True)
    build(self, *args, **kwargs)

  tfds.core.DatasetBuilder.download_and_prepare = say_and_build
  with open(ready, "w"):
    pass
  while not os.path.exists(go):
    time.sleep(0.01)
  for split in ("train", "test"):
    pairs = list(sources.load_split(config, split).as_numpy_iterator())
    images = np.stack([image for image, _ in pairs])
    labels = np.array([label for _, label in pairs], np.int64)
    print(f"{split} {digest(images, labels)}", flush=True)


def test_concurrent_builders_all_read_the_whole_dataset(tmp_path):
  data_dir, signals = tmp_path / "tfds", tmp_path / "signals"
  signals.mkdir()
  go = signals / "go"
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
  procs, ready = [], []
  for i in range(NUM_PROCESSES):
    ready.append(signals / f"ready_{i}")
    procs.append(subprocess.Popen(
        [sys.executable, __file__, str(data_dir), str(ready[-1]), str(go)], cwd=REPO, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  try:
    # Released together once all have imported TensorFlow, so their builds overlap.
    deadline = time.monotonic() + TIMEOUT_S
    while not all(r.exists() for r in ready):
      assert all(p.poll() is None for p in procs), "a worker died before it was ready"
      assert time.monotonic() < deadline, "workers did not start in time"
      time.sleep(0.05)
    go.touch()
    outputs = [p.communicate(timeout=TIMEOUT_S) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  want = expected_digests()
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
    got = dict(line.split() for line in out.splitlines() if line.startswith(("train ", "test ")))
    assert got == want
  # The others waited for the first build instead of building again.
  assert sum(out.splitlines().count("building") for out, _ in outputs) == 1
  # One finished dataset is left, no temporary folder beside it.
  assert sorted(os.listdir(data_dir / digits.TFDS_NAME)) == ["1.1.0"]


def test_a_build_finished_elsewhere_meanwhile_is_read_with_its_split_sizes(tmp_path,
                                                                          monkeypatch):
  """A tfds builder reads the dataset's metadata when it is made: one made just before another
  process finished the build finds the dataset prepared but knows no split sizes."""
  data_dir = str(tmp_path / "tfds")
  make = tfds.builder

  def make_then_another_process_finishes(*args, **kwargs):
    builder = make(*args, **kwargs)
    make(*args, **kwargs).download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    monkeypatch.setattr(tfds, "builder", make)  # Once.
    return builder

  monkeypatch.setattr(tfds, "builder", make_then_another_process_finishes)
  from jaxkd import defaults  # pylint: disable=g-import-not-at-top
  from jaxkd.data import sources  # pylint: disable=g-import-not-at-top
  config = defaults.dataset_config("digits")
  config.data_dir = data_dir
  builder = sources.get_builder(config)
  assert builder.info.splits["train"].num_examples == digits.NUM_TRAIN
  assert builder.info.splits["test"].num_examples == digits.NUM_TEST


if __name__ == "__main__":
  worker(*sys.argv[1:4])
