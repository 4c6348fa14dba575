"""The UCI handwritten digits shipped inside scikit-learn, as a tfds dataset.

`sklearn.datasets.load_digits()` reads 1,797 real 8x8 grey images (values 0..16) from the
scikit-learn wheel, so this dataset builds anywhere without a network. It is the project's
default small dataset: real enough to learn on, small enough for tests and CPU smoke runs.

Importing this module registers the builder under the tfds name `sklearn_digits`;
`prepared_builder(data_dir)` builds it on first use (`jaxkd.data.sources` calls it), also when
several processes sharing one data_dir get there at once. It is written as ArrayRecord files, which
the pipeline reads by index, like every other dataset.
"""

import contextlib
import fcntl
import os
from typing import IO, Iterator, Optional

import numpy as np
import tensorflow_datasets as tfds

from jaxkd import errors
from jaxkd import paths

TFDS_NAME = 'sklearn_digits'
NUM_EXAMPLES = 1797
NUM_TRAIN = 1437
NUM_TEST = NUM_EXAMPLES - NUM_TRAIN
# The split is a fixed permutation of sklearn's order: the first NUM_TRAIN images of
# `np.random.RandomState(SPLIT_SEED).permutation(1797)` are train, the rest test. RandomState
# (not Generator) because NumPy keeps its streams stable across versions.
SPLIT_SEED = 0
# Random access, as the pipeline reads every dataset.
FILE_FORMAT = 'array_record'


def digit_images_and_labels() -> tuple[np.ndarray, np.ndarray]:
  """All 1,797 digits in sklearn's order: uint8 [N, 8, 8, 1] in 0..255 and int64 [N] labels."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  digits = load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  return images, digits.target.astype(np.int64)


def split_indices() -> dict[str, np.ndarray]:
  """Indices into sklearn's order of the `train` and `test` examples."""
  perm = np.random.RandomState(SPLIT_SEED).permutation(NUM_EXAMPLES)
  return {'train': perm[:NUM_TRAIN], 'test': perm[NUM_TRAIN:]}


def _is_registered() -> bool:
  try:
    tfds.builder_cls(TFDS_NAME)
  except tfds.core.registered.DatasetNotFoundError:
    return False
  return True


# A second import of this file (importlib.reload, running it as a script, a Colab re-run) would
# define the class again; tfds refuses duplicate names outside notebooks, so the copy stays
# unregistered and the first registration keeps serving `tfds.builder`.
with (tfds.core.registered.skip_registration() if _is_registered()
      else contextlib.nullcontext()):

  class SklearnDigits(tfds.core.GeneratorBasedBuilder):
    """UCI ML hand-written digits (8x8, 10 classes) from scikit-learn, fixed 1437/360 split."""

    VERSION = tfds.core.Version('1.1.0')
    RELEASE_NOTES = {
        '1.0.0': 'First release: fixed permutation split with seed 0.',
        # A new version, so that a data_dir holding the TFRecord build gets this one beside it.
        '1.1.0': 'The same examples, stored as ArrayRecord (read by index).',
    }

    def _info(self) -> tfds.core.DatasetInfo:
      return tfds.core.DatasetInfo(
          builder=self,
          description=(
              'The 1,797 8x8 grey handwritten digits of the UCI "Optical Recognition of '
              'Handwritten Digits" test set, as shipped by scikit-learn. Pixel values 0..16 are '
              f'scaled to 0..255 by round(v*255/16). Split: a fixed permutation (RandomState('
              f'{SPLIT_SEED})) gives {NUM_TRAIN} train and {NUM_TEST} test images.'),
          features=tfds.features.FeaturesDict({
              'image': tfds.features.Image(shape=(8, 8, 1), dtype=np.uint8),
              'label': tfds.features.ClassLabel(num_classes=10),
          }),
          supervised_keys=('image', 'label'),
          # Keep the documented permutation order on disk instead of tfds' key-hash order.
          disable_shuffling=True,
          homepage=(
              'https://archive.ics.uci.edu/dataset/80/'
              'optical+recognition+of+handwritten+digits'),
          citation=(
              '@misc{alpaydin1998digits, author={Alpaydin, E. and Kaynak, C.}, '
              'title={Optical Recognition of Handwritten Digits}, year={1998}, '
              'howpublished={UCI Machine Learning Repository}}'),
      )

    # tfds announces a download (of "Unknown size") and its end on stdout; nothing is
    # downloaded here, so one line of jaxkd's says what happens instead.
    def _log_download_bytes(self) -> None:
      print(f"dataset digits: building tfds '{TFDS_NAME}' from scikit-learn's copy in "
            f'{self.data_dir} (once; later runs read it)', flush=True)

    def _log_download_done(self) -> None:
      pass

    def _split_generators(self, dl_manager):
      del dl_manager  # Everything comes from the scikit-learn wheel.
      images, labels = digit_images_and_labels()
      return {
          name: self._generate_examples(images, labels, indices)
          for name, indices in split_indices().items()
      }

    def _generate_examples(self, images, labels, indices):
      # With shuffling disabled tfds stores examples sorted by key: the position in the split.
      for position, i in enumerate(indices):
        yield position, {'image': images[i], 'label': int(labels[i])}


def prepared_builder(data_dir: Optional[str]) -> tfds.core.DatasetBuilder:
  """The `sklearn_digits` builder of `data_dir` (None: tfds' default), built there if need be.

  Safe when several processes (those of one run, hosts sharing data_dir) ask at once: one builds
  while the others wait on a lock file in data_dir, then read what it built. tfds itself writes
  into a temporary folder renamed into place at the end, so nobody reads a half-built dataset,
  also where no lock can be had (a bucket) and two builds race: the loser's rename fails and it
  reads the winner's.
  """
  builder = tfds.builder(TFDS_NAME, data_dir=data_dir, file_format=FILE_FORMAT)
  if not builder.is_prepared():
    # Built where it will be read: a data_dir that cannot be written (read-only, /proc) is one
    # line before tfds tries (it would report "not enough disk space").
    paths.check_writable(os.fspath(builder.data_dir_root), 'dataset.data_dir',
                         'the digits are built there on first use; pass a --config.dataset.'
                         'data_dir you can write to')
    with _build_lock(builder.data_dir_root):
      builder = tfds.builder(TFDS_NAME, data_dir=data_dir, file_format=FILE_FORMAT)
      if not builder.is_prepared():
        try:
          builder.download_and_prepare(
              download_config=tfds.download.DownloadConfig(try_download_gcs=False))
        except Exception as e:  # pylint: disable=broad-except
          if not builder.is_prepared():
            raise errors.UserError(
                f'the digits cannot be built in data_dir {builder.data_dir_root} '
                f'({type(e).__name__}: {" ".join(str(e).split())[:200]}); pass a '
                '--config.dataset.data_dir you can write to') from None
  # A builder reads the dataset's metadata (split sizes) when it is made, so one made before
  # another process finished the build would not know them: make it now.
  return tfds.builder(TFDS_NAME, data_dir=data_dir)


@contextlib.contextmanager
def _build_lock(root: str) -> Iterator[None]:
  """Holds an exclusive lock on `<root>/.sklearn_digits.lock`, where a lock can be had.

  Elsewhere (a bucket, a read-only folder, NFS without a lock daemon) the build goes on unlocked.
  """
  lock = _open_lock_file(root)
  if lock is None:
    yield
    return
  with lock:  # Closing the file releases the lock.
    try:
      fcntl.flock(lock, fcntl.LOCK_EX)
    except OSError:
      pass  # The file system has no locks.
    yield


def _open_lock_file(root: str) -> Optional[IO[str]]:
  """`<root>/.sklearn_digits.lock` opened for appending; None on a bucket or where it cannot be."""
  if '://' in os.fspath(root):
    return None
  try:
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, f'.{TFDS_NAME}.lock')
    return open(path, 'a')  # pylint: disable=consider-using-with
  except OSError:
    return None
