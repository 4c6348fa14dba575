"""Tests of jaxkd.data: the embedded digits, the views and the pipelines."""

import dataclasses
import importlib
import itertools
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

import helpers

from jaxkd import errors
from jaxkd.data import digits
from jaxkd.data import pipeline
from jaxkd.data import sources
from jaxkd.data import views


def _config(name='digits', data_dir='', **overrides):
  return helpers.dataset_config(name, data_dir, **overrides)


def _read_all(builder, split):
  """{'image': [N, ...], 'label': [N]} of a split, read by index."""
  records = builder.as_data_source(split=split)
  return {key: np.stack([record[key] for record in records]) for key in ('image', 'label')}


# Digits

def test_digits_builds_offline_with_fixed_split(digits_dir):
  builder = tfds.builder('sklearn_digits', data_dir=str(digits_dir))
  assert builder.is_prepared()
  assert str(builder.version) == '1.1.0'
  assert builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD
  assert builder.info.features['label'].num_classes == 10
  assert builder.info.splits['train'].num_examples == 1437
  assert builder.info.splits['test'].num_examples == 360
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  raw = load_digits()
  perm = np.random.RandomState(0).permutation(1797)
  for split, idx in (('train', perm[:1437]), ('test', perm[1437:])):
    stored = _read_all(builder, split)
    assert stored['image'].shape == (len(idx), 8, 8, 1)
    assert stored['image'].dtype == np.uint8
    expected = np.round(raw.images[idx] * 255 / 16).astype(np.uint8)[..., None]
    np.testing.assert_array_equal(stored['image'], expected)
    np.testing.assert_array_equal(stored['label'], raw.target[idx])
  assert sorted(np.unique(expected).tolist())[:3] == [0, 16, 32]


def test_digits_info_and_normalisation_constants(digits_dir):
  info = sources.get_dataset_info(_config(data_dir=digits_dir))
  assert (info.num_train, info.num_eval, info.num_classes) == (1437, 360, 10)
  assert info.image_shape == (8, 8, 1) and info.crop_padding == 1 and not info.flip
  images, _ = digits.digit_images_and_labels()
  train = images[digits.split_indices()['train']] / 255.0
  np.testing.assert_allclose(info.mean, [train.mean()], atol=1e-4)
  np.testing.assert_allclose(info.std, [train.std()], atol=1e-4)


def test_digits_module_reimport_is_harmless(digits_dir):
  importlib.reload(digits)
  builder = tfds.builder('sklearn_digits', data_dir=str(digits_dir))
  assert builder.is_prepared()


# Sources

def test_unknown_dataset_lists_valid_names():
  with pytest.raises(errors.UserError, match="'imagenet'.*cifar10, cifar100, digits"):
    sources.get_dataset_info(_config(name='imagenet'))


def test_cifar100_registry_constants():
  info = sources.get_dataset_info(
      _config(name='cifar100', num_train_examples=10, num_eval_examples=5))
  assert info.mean == (0.5071, 0.4866, 0.4409) and info.std == (0.2675, 0.2565, 0.2761)
  assert (info.num_classes, info.image_shape, info.crop_padding, info.flip) == (
      100, (32, 32, 3), 4, True)
  assert (info.num_train, info.num_eval) == (10, 5)


def test_unprepared_cifar100_raises_one_user_error_quickly(tmp_path):
  start = time.time()
  for call in (
      lambda: sources.get_dataset_info(_config('cifar100', tmp_path)),
      lambda: pipeline.train_batches(
          _config('cifar100', tmp_path, num_train_examples=64, num_eval_examples=64),
          'none', 16, seed=0),
      lambda: pipeline.eval_batches(
          _config('cifar100', tmp_path, num_train_examples=64, num_eval_examples=64),
          'none', 16)):
    with pytest.raises(errors.UserError, match='cifar100') as excinfo:
      call()
    assert str(tmp_path) in str(excinfo.value) and 'tfds build' in str(excinfo.value)
  assert time.time() - start < 60  # Refused before any download: never a wait on the network.
  assert list(tmp_path.iterdir()) == []  # Nothing was downloaded or created.


# Views

def _test_info(shape=(6, 6, 3), padding=2, flip=True):
  """Normalisation that maps uint8 v to float v, so views show raw pixel values."""
  c = shape[-1]
  return sources.DatasetInfo(
      name='test', tfds_name='test', num_classes=10, image_shape=shape, num_train=0,
      num_eval=0, mean=(0.0,) * c, std=(1 / 255,) * c, crop_padding=padding, flip=flip)


def _distinct_image(shape=(6, 6, 3)):
  return np.arange(1, np.prod(shape) + 1, dtype=np.uint8).reshape(shape)


def _crops(image, padding):
  """{(dy, dx): crop} for every crop offset of the zero-padded image."""
  h, w, _ = image.shape
  padded = np.pad(image, [(padding, padding), (padding, padding), (0, 0)])
  return {(dy, dx): padded[dy:dy + h, dx:dx + w]
          for dy in range(2 * padding + 1) for dx in range(2 * padding + 1)}


def _explain(view, image, padding, rotation=0):
  """All (flipped, offset) with view == crop(rot90(maybe-flipped image, rotation), offset)."""
  matches = []
  for flipped in (False, True):
    source = np.rot90(image[:, ::-1] if flipped else image, rotation)
    for offset, crop in _crops(source, padding).items():
      if np.array_equal(np.rint(view), crop):
        matches.append((flipped, offset))
  return matches


def test_rotations_without_padding_are_ccw_rotations_of_one_flipped_image():
  info, image = _test_info(padding=0), _distinct_image()
  seen_flips = set()
  for i in range(16):
    out = views.train_views('rotations', image, views.example_key(7, 0, i), info)
    assert out.shape == (4, 6, 6, 3) and out.dtype == np.float32
    flipped = not np.allclose(out[0], image, atol=1e-3)
    source = image[:, ::-1] if flipped else image
    for k in range(4):
      np.testing.assert_allclose(out[k], np.rot90(source, k), atol=1e-3)
    seen_flips.add(flipped)
  assert seen_flips == {False, True}


def test_rotations_share_the_flip_and_crop_each_view_independently():
  info, image = _test_info(padding=2), _distinct_image()
  exact_rotations, flips = 0, set()
  for i in range(24):
    out = views.train_views('rotations', image, views.example_key(3, 1, i), info)
    explained = [_explain(out[k], image, 2, rotation=k) for k in range(4)]
    assert all(len(m) == 1 for m in explained), explained  # Each view is one exact crop.
    view_flips = {m[0][0] for m in explained}
    assert len(view_flips) == 1  # One flip decision for all four views.
    flips |= view_flips
    # One crop shared by the views (or taken before rotating) would make them exact rotations.
    exact_rotations += all(np.array_equal(out[k], np.rot90(out[0], k)) for k in range(4))
  assert flips == {False, True}
  assert exact_rotations <= 2  # Chance: (1/25)**3 per image.


def test_rotations_of_crop_rotate_one_crop():
  """HSAKD's order: one crop and flip, then the four rotations of that same crop."""
  info, image = _test_info(padding=2), _distinct_image()
  uncropped = 0
  for i in range(12):
    out = views.train_views('rotations_of_crop', image, views.example_key(3, 1, i), info)
    assert out.shape == (4, 6, 6, 3)
    assert len(_explain(out[0], image, 2, rotation=0)) == 1
    for k in range(4):
      np.testing.assert_array_equal(out[k], np.rot90(out[0], k))
    uncropped += np.allclose(out[0], image, atol=1e-3) or np.allclose(out[0], image[:, ::-1],
                                                                          atol=1e-3)
  assert uncropped < 12


def test_rotations_eval_has_no_crop_or_flip():
  info, image = _test_info(), _distinct_image()
  out = views.eval_views('rotations', image, info)
  for k in range(4):
    np.testing.assert_allclose(out[k], np.rot90(image, k), atol=1e-3)


def test_two_crops_are_independent_augmentations():
  info, image = _test_info(padding=2), _distinct_image()
  differ, flips_differ = 0, 0
  for i in range(24):
    out = views.train_views('two_crops', image, views.example_key(5, 2, i), info)
    assert out.shape == (2, 6, 6, 3)
    explained = [_explain(out[v], image, 2) for v in range(2)]
    assert all(len(m) == 1 for m in explained)
    differ += explained[0] != explained[1]
    flips_differ += explained[0][0][0] != explained[1][0][0]
  assert differ >= 20 and flips_differ > 0
  np.testing.assert_allclose(views.eval_views('two_crops', image, info),
                             np.stack([image, image]), atol=1e-3)


def test_none_view_and_normalisation():
  info, image = _test_info(padding=1, flip=False), _distinct_image()
  out = views.train_views('none', image, views.example_key(0, 0, 0), info)
  assert out.shape == (6, 6, 3)
  assert [m[0] for m in _explain(out, image, 1)] == [False]
  info = dataclasses.replace(info, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 2.0))
  out = views.eval_views('none', image, info)
  np.testing.assert_allclose(out, (image / 255 - [0.5, 0.25, 0.0]) / [0.5, 0.25, 2.0], atol=1e-6)


def test_views_depend_only_on_the_key():
  info, image = _test_info(), _distinct_image()
  a, b, c = (views.train_views('rotations', image, views.example_key(*k), info)
             for k in ((1, 2, 3), (1, 2, 3), (1, 3, 3)))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_unknown_views_list_valid_names(digits_dir):
  with pytest.raises(errors.UserError, match="'jigsaw'.*none, rotations, rotations_of_crop, two_crops"):
    pipeline.train_batches(_config(data_dir=digits_dir), 'jigsaw', 64, seed=0)


# Pipeline

def _take(iterator, n):
  return list(itertools.islice(iterator, n))


def test_train_batches_shapes(digits_dir):
  config = _config(data_dir=digits_dir)
  for name, shape in (('none', (64, 8, 8, 1)), ('rotations', (64, 4, 8, 8, 1)),
                      ('two_crops', (64, 2, 8, 8, 1))):
    batch = next(pipeline.train_batches(config, name, 64, seed=0))
    assert batch['image'].shape == shape and batch['image'].dtype == np.float32
    assert batch['label'].shape == (64,) and batch['label'].dtype == np.int32


def test_train_stream_is_deterministic_and_resumes_exactly(digits_dir):
  config = _config(data_dir=digits_dir)
  info = sources.get_dataset_info(config)
  assert pipeline.steps_per_epoch(info, 128) == 11
  full = _take(pipeline.train_batches(config, 'rotations', 128, seed=1), 26)
  again = _take(pipeline.train_batches(config, 'rotations', 128, seed=1), 26)
  other = _take(pipeline.train_batches(config, 'rotations', 128, seed=2), 1)
  for a, b in zip(full, again):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  assert not np.array_equal(full[0]['image'], other[0]['image'])
  for start in (11, 13):  # An epoch boundary and the middle of the second epoch.
    resumed = _take(pipeline.train_batches(config, 'rotations', 128, seed=1, start_step=start),
                    26 - start)
    for a, b in zip(full[start:], resumed):
      np.testing.assert_array_equal(a['image'], b['image'])
      np.testing.assert_array_equal(a['label'], b['label'])


def _global_batches(config, views_name, batch, process_count, steps, **kwargs):
  """The first `steps` global batches, each the processes' local batches concatenated."""
  streams = [pipeline.train_batches(config, views_name, batch, seed=4, process_index=i,
                                    process_count=process_count, **kwargs)
             for i in range(process_count)]
  return [{key: np.concatenate([local[key] for local in locals_])
           for key in locals_[0]} for locals_ in zip(*(_take(s, steps) for s in streams))]


@pytest.mark.parametrize('in_memory', [True, False])
def test_global_batches_do_not_depend_on_the_process_count(digits_dir, monkeypatch, in_memory):
  """1, 2 and 4 processes read the same global batches, views and negatives included, across
  an epoch boundary (5 steps per epoch at batch 256) and from a resumed step; with the training
  split in memory and read from its files."""
  if not in_memory:
    monkeypatch.setattr(pipeline, 'IN_MEMORY_BYTES', 0)
  config = _config(data_dir=digits_dir)
  one = _global_batches(config, 'rotations', 256, 1, 7, num_negatives=3)
  assert one[0]['image'].shape == (256, 4, 8, 8, 1)
  for process_count in (2, 4):
    many = _global_batches(config, 'rotations', 256, process_count, 7, num_negatives=3)
    for a, b in zip(one, many):
      assert set(a) == set(b) == {'image', 'label', 'index', 'contrast_index'}
      for key in a:
        np.testing.assert_array_equal(a[key], b[key])
  resumed = _global_batches(config, 'rotations', 256, 2, 2, start_step=5, num_negatives=3)
  for a, b in zip(one[5:], resumed):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['contrast_index'], b['contrast_index'])


def _raw_views(monkeypatch):
  """Makes the pipeline emit the raw uint8 image (as float) so examples can be identified."""
  raw = lambda image, key: np.asarray(image, np.float32)
  monkeypatch.setattr(views, 'make_views_fn', lambda name, info, train: raw)


def test_each_epoch_is_a_fresh_permutation_read_in_disjoint_rows(digits_dir, monkeypatch):
  _raw_views(monkeypatch)
  config = _config(data_dir=digits_dir)
  train = _read_all(tfds.builder('sklearn_digits', data_dir=str(digits_dir)), 'train')
  all_examples = {ex.tobytes() for ex in train['image']}
  assert len(all_examples) == 1437  # No duplicate images, so images identify examples.
  epochs = {}
  for process in range(2):
    batches = _take(pipeline.train_batches(config, 'none', 256, seed=3, process_index=process,
                                           process_count=2), 10)
    assert all(b['image'].shape == (128, 8, 8, 1) for b in batches)  # 5 steps per epoch.
    images = np.concatenate([b['image'] for b in batches]).astype(np.uint8)
    for epoch in range(2):
      epoch_images = [x.tobytes() for x in images[epoch * 640:(epoch + 1) * 640]]
      assert len(set(epoch_images)) == 640
      assert set(epoch_images) <= all_examples
      epochs[process, epoch] = epoch_images
  assert not set(epochs[0, 0]) & set(epochs[1, 0])  # The processes read disjoint rows.
  assert epochs[0, 0] != epochs[0, 1]  # Reshuffled every epoch.


def test_eval_batches_count_every_example_once(digits_dir, monkeypatch):
  _raw_views(monkeypatch)
  config = _config(data_dir=digits_dir)
  test = _read_all(tfds.builder('sklearn_digits', data_dir=str(digits_dir)), 'test')
  expected = sorted(zip((x.tobytes() for x in test['image']), test['label'].tolist()))
  for process_count in (1, 3):
    seen, num_batches = [], set()
    for process in range(process_count):
      batches = list(pipeline.eval_batches(config, 'none', 96, process, process_count))
      num_batches.add(len(batches))
      for b in batches:
        assert b['image'].shape == (96 // process_count, 8, 8, 1)
        assert b['mask'].dtype == np.float32 and set(np.unique(b['mask'])) <= {0.0, 1.0}
        real = b['mask'] == 1
        assert not b['image'][~real].any()
        seen += zip((x.tobytes() for x in b['image'][real].astype(np.uint8)),
                    b['label'][real].tolist())
    assert num_batches == {4}  # ceil(360 / 96), the same on every process.
    assert sorted(seen) == expected


def test_eval_rotations_are_rows_4i_plus_k(digits_dir):
  batch = next(pipeline.eval_batches(_config(data_dir=digits_dir), 'rotations', 32))
  rows = batch['image'].reshape((-1, 8, 8, 1))  # What the train step does: [B, 4] -> 4B rows.
  for i in range(32):
    for k in range(4):
      np.testing.assert_array_equal(rows[4 * i + k], np.rot90(rows[4 * i], k))


def test_batch_size_errors(digits_dir):
  config = _config(data_dir=digits_dir)
  with pytest.raises(errors.UserError, match='2048.*1437'):
    pipeline.train_batches(config, 'none', 2048, seed=0)
  with pytest.raises(errors.UserError, match='100.*3'):
    pipeline.train_batches(config, 'none', 100, seed=0, process_count=3)
  with pytest.raises(errors.UserError, match='100.*3'):
    pipeline.eval_batches(config, 'none', 100, process_count=3)


def test_unknown_split_lists_the_splits(digits_dir):
  with pytest.raises(errors.UserError, match="'validation'.*test, train"):
    sources.get_dataset_info(_config(data_dir=digits_dir, eval_split='validation'))


def test_cifar100_under_mock_data(tmp_path):
  config = _config('cifar100', tmp_path, num_train_examples=40, num_eval_examples=20)
  info = sources.get_dataset_info(config)
  mean, std = np.array(info.mean), np.array(info.std)
  with tfds.testing.mock_data(num_examples=40):
    batches = _take(pipeline.train_batches(config, 'rotations', 16, seed=0), 3)
    evals = list(pipeline.eval_batches(config, 'none', 16))
  for b in batches:
    assert b['image'].shape == (16, 4, 32, 32, 3) and b['image'].dtype == np.float32
    unit = b['image'] * std + mean  # Back to [0, 1] pixels (zero padding included).
    assert unit.min() > -1e-5 and unit.max() < 1 + 1e-5 and unit.std() > 0.1
    assert b['label'].dtype == np.int32 and 0 <= b['label'].min() and b['label'].max() < 100
  assert [e['image'].shape for e in evals] == [(16, 32, 32, 3)] * 2
  assert sum(e['mask'].sum() for e in evals) == 20
