"""The few-shot and label-noise switches of the input pipeline, on the embedded digits."""

import collections

import numpy as np
import pytest

import helpers

from jaxkd import errors
from jaxkd.data import pipeline
from jaxkd.data import sources


def _config(data_dir, **overrides):
  return helpers.dataset_config('digits', data_dir, **overrides)


@pytest.fixture(scope='module')
def clean_labels(digits_dir):
  ds = sources.load_split(_config(digits_dir), 'train')
  return np.array([label for _, label in ds.as_numpy_iterator()])


def test_balanced_subset_keeps_every_class_in_proportion():
  labels = np.repeat(np.arange(100), 500)  # CIFAR-100's train split
  for fraction in (0.25, 0.5, 0.75):
    keep = pipeline.balanced_subset(labels, int(fraction * 50000), seed=0)
    assert len(np.unique(keep)) == len(keep) == int(fraction * 50000)
    np.testing.assert_array_equal(np.bincount(labels[keep]), int(fraction * 500))
  rng = np.random.RandomState(0)
  labels = rng.randint(0, 7, size=1001)
  keep = pipeline.balanced_subset(labels, 300, seed=3)
  assert len(keep) == 300 and np.all(np.diff(keep) > 0)
  expected = np.bincount(labels) * 300 / 1001
  assert np.all(np.abs(np.bincount(labels[keep]) - expected) <= 1)
  np.testing.assert_array_equal(keep, pipeline.balanced_subset(labels, 300, seed=3))
  assert not np.array_equal(keep, pipeline.balanced_subset(labels, 300, seed=4))


def test_symmetric_label_noise_changes_exactly_the_rate_to_other_classes():
  labels = np.repeat(np.arange(10), 100)
  noisy = pipeline.symmetric_label_noise(labels, 0.4, 10, seed=0)
  changed = noisy != labels
  assert changed.sum() == 400
  assert noisy.min() >= 0 and noisy.max() < 10
  # The new class is uniform over the 9 others: c − y mod 10 covers 1..9 evenly.
  shifts = np.bincount((noisy[changed] - labels[changed]) % 10, minlength=10)
  assert shifts[0] == 0 and shifts[1:].min() > 25
  np.testing.assert_array_equal(noisy, pipeline.symmetric_label_noise(labels, 0.4, 10, seed=0))
  assert not np.array_equal(noisy, pipeline.symmetric_label_noise(labels, 0.4, 10, seed=1))
  np.testing.assert_array_equal(pipeline.symmetric_label_noise(labels, 0.0, 10, 0), labels)


def test_fraction_and_noise_pick_the_training_examples(digits_dir, clean_labels):
  config = _config(digits_dir, train_fraction=0.25, label_noise=0.2)
  info = sources.get_dataset_info(config)
  assert info.num_train == int(0.25 * 1437) == 359 and info.num_eval == 360
  keep = pipeline.balanced_subset(clean_labels, 359, seed=5)
  counts = np.bincount(clean_labels[keep], minlength=10)
  assert np.all(np.abs(counts - np.bincount(clean_labels) * 359 / 1437) <= 1)

  indices, noisy = pipeline.training_set(config, info, 5)
  np.testing.assert_array_equal(indices, keep)
  assert (noisy != clean_labels[keep]).sum() == int(0.2 * 359)
  np.testing.assert_array_equal(
      noisy, pipeline.symmetric_label_noise(clean_labels[keep], 0.2, 10, seed=5))


def test_training_stream_runs_over_the_subset_only(digits_dir, clean_labels):
  # The first 400 examples, a quarter of them: 100 per epoch, 5 batches of 20.
  config = _config(digits_dir, num_train_examples=400, train_fraction=0.25, label_noise=0.3)
  info = sources.get_dataset_info(config)
  assert pipeline.steps_per_epoch(info, 20) == 5
  batches = pipeline.train_batches(config, 'none', 20, seed=1)
  epoch = [next(batches) for _ in range(5)]
  keep = pipeline.balanced_subset(clean_labels[:400], 100, seed=1)
  expected = pipeline.symmetric_label_noise(clean_labels[:400][keep], 0.3, 10, seed=1)
  got = np.concatenate([b['label'] for b in epoch])
  assert collections.Counter(got.tolist()) == collections.Counter(expected.tolist())
  # The same seed gives the same stream; the eval split is untouched.
  again = next(pipeline.train_batches(config, 'none', 20, seed=1))
  np.testing.assert_array_equal(again['image'], epoch[0]['image'])
  eval_labels = np.concatenate([b['label'] for b in pipeline.eval_batches(config, 'none', 120)])
  clean_eval = [label for _, label in sources.load_split(config, 'test').as_numpy_iterator()]
  np.testing.assert_array_equal(eval_labels, clean_eval)


@pytest.mark.parametrize('field,value,message', [
    ('train_fraction', 0.0, r'train_fraction is 0.0; it must be in \(0, 1\]'),
    ('train_fraction', 1.5, r'train_fraction is 1.5; it must be in \(0, 1\]'),
    ('label_noise', 1.0, r'label_noise is 1.0; it must be in \[0, 1\)'),
])
def test_bad_switch_values_are_refused(digits_dir, field, value, message):
  config = _config(digits_dir, **{field: value})
  with pytest.raises(errors.UserError, match=message):
    next(pipeline.train_batches(config, 'none', 20, seed=0))
