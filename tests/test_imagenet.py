"""The imagenet2012 dataset: registry entry, torchvision's crops, the pipeline under mock data."""

import math
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import helpers

from jaxkd import errors
from jaxkd.data import imagenet
from jaxkd.data import pipeline
from jaxkd.data import sources


def _config(data_dir, **overrides):
  return helpers.dataset_config('imagenet2012', data_dir, eval_split='validation', **overrides)


def _jpeg(image: np.ndarray) -> bytes:
  return tf.io.encode_jpeg(tf.constant(image, tf.uint8), quality=100).numpy()


def test_registry_entry(tmp_path):
  info = sources.get_dataset_info(_config(tmp_path, num_train_examples=16, num_eval_examples=8))
  assert (info.num_classes, info.image_shape, info.transform) == (
      1000, (224, 224, 3), 'inception_crop')
  assert info.mean == (0.485, 0.456, 0.406) and info.std == (0.229, 0.224, 0.225)


def test_unprepared_imagenet_raises_one_clear_error_quickly(tmp_path):
  start = time.time()
  for call in (lambda: sources.get_dataset_info(_config(tmp_path)),
               lambda: pipeline.eval_batches(
                   _config(tmp_path, num_train_examples=8, num_eval_examples=8), 'none', 8)):
    with pytest.raises(errors.UserError, match='imagenet2012') as excinfo:
      call()
    message = str(excinfo.value)
    assert str(tmp_path) in message and 'ILSVRC2012_img_train.tar' in message
  assert time.time() - start < 60  # Refused before any download: never a wait on the network.
  assert list(tmp_path.iterdir()) == []


# --- the crops -----------------------------------------------------------------------------------


def test_random_resized_crop_windows_follow_torchvision():
  height, width = 300, 400
  windows = np.stack([
      imagenet.random_resized_crop_window((i, 7), height, width)
      for i in range(200)])
  top, left, h, w = windows.T
  assert np.all((top >= 0) & (left >= 0) & (top + h <= height) & (left + w <= width))
  area = h * w / (height * width)
  # round() of sqrt(a r) and sqrt(a / r) moves the area and the aspect a little.
  assert area.min() >= 0.07 and area.max() <= 1.0 and area.min() < 0.2 and area.max() > 0.8
  aspect = w / h
  assert aspect.min() > 0.74 and aspect.max() < 1.36
  assert len({tuple(x) for x in windows}) == 200  # Every key gives its own window.
  again = imagenet.random_resized_crop_window((3, 7), height, width)
  np.testing.assert_array_equal(again, windows[3])


def test_random_resized_crop_falls_back_to_a_clamped_center_crop():
  # 10 x 1000: no window of >= 8% of the area and aspect <= 4/3 fits in 10 rows, so torchvision
  # takes h = 10, w = round(10 * 4/3) = 13, centered: left = (1000 - 13) // 2 = 493.
  window = imagenet.random_resized_crop_window((0, 0), 10, 1000)
  np.testing.assert_array_equal(window, [0, 493, 10, 13])
  # 1000 x 10: w = 10, h = round(10 / (3/4)) = 13, top = (1000 - 13) // 2 = 493.
  window = imagenet.random_resized_crop_window((0, 0), 1000, 10)
  np.testing.assert_array_equal(window, [493, 0, 13, 10])


def test_resize_and_center_crop_geometry():
  # torchvision Resize(256): the other side is int(256 * long / short).
  np.testing.assert_array_equal(imagenet.resize_shorter_side(300, 400), [256, 341])
  np.testing.assert_array_equal(imagenet.resize_shorter_side(500, 375), [341, 256])
  # CenterCrop(224): round((341 - 224) / 2) = round(58.5) = 58 (half to even, as Python's round).
  np.testing.assert_array_equal(imagenet.center_crop_offsets(256, 341), [16, 58])
  assert round(58.5) == 58 and math.floor((341 - 224) / 2 + 0.5) == 59


def test_eval_view_of_a_flat_image_is_the_normalised_color():
  info = sources._registry_entry('imagenet2012')
  color = np.array([200, 100, 50], np.uint8)
  view = imagenet.eval_views('none', _jpeg(np.broadcast_to(color, (300, 400, 3))), info)
  assert view.shape == (224, 224, 3)
  want = (color / 255.0 - np.array(info.mean)) / np.array(info.std)
  np.testing.assert_allclose(view, np.broadcast_to(want, view.shape), atol=0.03)


def test_train_views_depend_only_on_the_key_and_rotations_share_the_crop():
  info = sources._registry_entry('imagenet2012')
  rng = np.random.RandomState(0)
  jpeg = _jpeg(rng.randint(0, 256, (120, 160, 3)))
  key = (5, 9)
  one = imagenet.train_views('none', jpeg, key, info)
  np.testing.assert_array_equal(one, imagenet.train_views('none', jpeg, key, info))
  other = imagenet.train_views('none', jpeg, (6, 9), info)
  assert not np.array_equal(one, other)
  rotated = imagenet.train_views('rotations', jpeg, key, info)
  assert rotated.shape == (4, 224, 224, 3)
  np.testing.assert_array_equal(rotated[0], one)
  for k in range(1, 4):
    np.testing.assert_array_equal(rotated[k], np.rot90(one, k))
  two = imagenet.train_views('two_crops', jpeg, key, info)
  assert two.shape == (2, 224, 224, 3) and not np.array_equal(two[0], two[1])


# --- the pipeline --------------------------------------------------------------------------------


def test_pipeline_under_mock_data(tmp_path):
  config = _config(tmp_path, num_train_examples=8, num_eval_examples=6)
  info = sources.get_dataset_info(config)
  mean, std = np.array(info.mean), np.array(info.std)
  with tfds.testing.mock_data(num_examples=8):
    train = next(pipeline.train_batches(config, 'none', 4, seed=0))
    rotations = next(pipeline.train_batches(config, 'rotations', 4, seed=0))
    evals = list(pipeline.eval_batches(config, 'none', 4))
  assert train['image'].shape == (4, 224, 224, 3) and train['image'].dtype == np.float32
  assert rotations['image'].shape == (4, 4, 224, 224, 3)
  for batch in (train['image'], rotations['image'], evals[0]['image']):
    unit = batch * std + mean
    assert unit.min() > -1e-4 and unit.max() < 1 + 1e-4 and unit.std() > 0.05
  assert train['label'].dtype == np.int32 and train['label'].max() < 1000
  assert [e['image'].shape for e in evals] == [(4, 224, 224, 3)] * 2
  assert sum(e['mask'].sum() for e in evals) == 6
