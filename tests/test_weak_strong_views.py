"""Views 'weak_strong' (MLKD's weak and strong view of each image, jaxkd.data.views) and the
strong augmentation behind them (jaxkd.data.randaugment): pixels, keys, and the global batches
read by 1 and 2 processes."""

import dataclasses
import io
import itertools

import ml_collections
import numpy as np
import pytest
from PIL import Image, ImageEnhance

from jaxkd import errors
from jaxkd.data import imagenet
from jaxkd.data import keys
from jaxkd.data import pipeline
from jaxkd.data import randaugment
from jaxkd.data import sources
from jaxkd.data import views


def _info(shape=(12, 12, 3), padding=2, flip=True):
  """Normalisation that maps uint8 v to float v, so views show raw pixel values."""
  c = shape[-1]
  return sources.DatasetInfo(
      name='test', tfds_name='test', num_classes=10, image_shape=shape, num_train=0,
      num_eval=0, mean=(0.0,) * c, std=(1 / 255,) * c, crop_padding=padding, flip=flip)


def _image(shape=(12, 12, 3), seed=0):
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


class _Draws:
  """A stand-in for np.random.Generator that returns the given draws, in order."""

  def __init__(self, integers=(), randoms=()):
    self._integers, self._randoms = list(integers), list(randoms)

  def integers(self, low, high, size):
    del low, high
    out, self._integers = self._integers[:size], self._integers[size:]
    return np.asarray(out)

  def random(self):
    return self._randoms.pop(0)


# --- the views -----------------------------------------------------------------------------------


def test_the_weak_view_is_the_datasets_own_augmentation_of_the_key():
  """View 0 is exactly what views 'none' makes of the same image and key (crop and flip)."""
  info, image = _info(), _image()
  for i in range(16):
    key = views.example_key(3, 1, i)
    out = views.train_views('weak_strong', image, key, info)
    assert out.shape == (2, 12, 12, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out[0], views.train_views('none', image, key, info))


def test_the_strong_view_is_its_own_crop_and_flip_then_randaugment(monkeypatch):
  """Without RandAugment the strong view is the dataset's augmentation drawn from the strong
  key (not the weak view's); RandAugment then reads the same key's stream."""
  info, image = _info(), _image()
  seen = []
  monkeypatch.setattr(randaugment, 'rand_augment',
                      lambda pixels, rng: seen.append(rng.random()) or pixels)
  differ = 0
  for i in range(16):
    key = views.example_key(3, 1, i)
    out = views.train_views('weak_strong', image, key, info)
    strong_rng = keys.rng(keys.strong_view_key(key))
    expected = views._augment(image, strong_rng, info)  # pylint: disable=protected-access
    np.testing.assert_array_equal(np.rint(out[1]), expected)
    assert seen[-1] == strong_rng.random()  # RandAugment draws next from the same stream.
    differ += not np.array_equal(out[0], out[1])
  assert differ >= 12


def test_the_strong_view_is_deterministic_per_key_and_differs_across_keys():
  info, image = _info(), _image()
  a, b, c, d = (views.train_views('weak_strong', image, views.example_key(*k), info)[1]
                for k in ((1, 2, 3), (1, 2, 3), (1, 2, 4), (1, 3, 3)))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c) and not np.array_equal(a, d)
  strong = {views.train_views('weak_strong', image, views.example_key(0, 0, i), info)[1].tobytes()
            for i in range(20)}
  assert len(strong) == 20


def test_grey_images_and_eval_views():
  """One-channel images (the digits) get the same views; eval gives the image twice."""
  info, image = _info((8, 8, 1), padding=1, flip=False), _image((8, 8, 1))
  out = views.train_views('weak_strong', image, views.example_key(0, 0, 5), info)
  assert out.shape == (2, 8, 8, 1)
  np.testing.assert_array_equal(out[0], views.train_views('none', image, views.example_key(
      0, 0, 5), info))
  assert views.num_views('weak_strong') == 2
  assert views.view_shape('weak_strong', info) == (2, 8, 8, 1)
  np.testing.assert_allclose(views.eval_views('weak_strong', image, info),
                             np.stack([image, image]), atol=1e-3)
  with pytest.raises(errors.UserError, match='1 or 3 channels'):
    views.check_views('weak_strong', _info((8, 8, 4)))


def test_imagenet_weak_view_is_its_none_view():
  """ImageNet's pair: view 0 is the random-resized crop + flip of views 'none'."""
  buffer = io.BytesIO()
  Image.fromarray(_image((40, 56, 3))).save(buffer, format='PNG')
  info = dataclasses.replace(_info((224, 224, 3)), transform='inception_crop')
  key = views.example_key(0, 0, 1)
  out = imagenet.train_views('weak_strong', buffer.getvalue(), key, info)
  assert out.shape == (2, 224, 224, 3)
  np.testing.assert_array_equal(out[0], imagenet.train_views('none', buffer.getvalue(), key, info))
  assert not np.array_equal(out[0], out[1])
  assert imagenet.eval_views('weak_strong', buffer.getvalue(), info).shape == (2, 224, 224, 3)


# --- RandAugment ---------------------------------------------------------------------------------


def test_the_ops_are_the_references_in_its_order_and_ranges():
  assert randaugment.OP_NAMES == (
      'AutoContrast', 'Brightness', 'Color', 'Contrast', 'Equalize', 'Identity', 'Posterize',
      'Rotate', 'Sharpness', 'ShearX', 'ShearY', 'Solarize', 'TranslateX', 'TranslateY')
  ranges = {name: (low, high) for name, _, low, high in randaugment.OPS}
  assert ranges['Brightness'] == ranges['Sharpness'] == (0.05, 0.95)
  assert ranges['Rotate'] == (-30.0, 30.0) and ranges['ShearX'] == (-0.3, 0.3)
  assert ranges['Posterize'] == (4.0, 8.0) and ranges['Solarize'] == (0.0, 256.0)
  assert ranges['TranslateY'] == (-0.3, 0.3)


def test_two_drawn_ops_are_applied_in_turn_with_values_from_their_ranges():
  """Ops 7 (Rotate) then 1 (Brightness) with u = 0.75 and 0.5: rotate by 15°, brighten by
  0.5; a cutout draw of 0 then leaves the image alone."""
  pil = Image.fromarray(_image((16, 16, 3)))
  out = randaugment.rand_augment_pil(pil, _Draws(integers=[7, 1], randoms=[0.75, 0.5, 0.0]))
  expected = ImageEnhance.Brightness(pil.rotate(15.0)).enhance(0.5)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))
  # Posterize keeps int(v) bits: u = 0.9 → v = 7.6 → 7 bits.
  out = randaugment.rand_augment_pil(pil, _Draws(integers=[6, 5], randoms=[0.9, 0.3, 0.0]))
  np.testing.assert_array_equal(np.asarray(out), np.asarray(pil) & 0b11111110)
  # A translation moves by v · the side: u = 1/6 → v = −0.2 → 3.2 px of 16.
  out = randaugment.rand_augment_pil(pil, _Draws(integers=[12, 5], randoms=[1 / 6, 0.0, 0.0]))
  expected = pil.transform(pil.size, Image.AFFINE, (1, 0, (-0.3 + 0.6 / 6) * 16, 0, 1, 0))
  np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))


def test_cutout_centre_is_drawn_from_1_to_the_side():
  """The reference draws the centre with np.random.uniform(w) (low = W, high = 1): a draw of 0
  puts it at W, a draw near 1 near 1. v = 0.25 of 32 px: side 8; corners x0 = 32 − 4 = 28,
  y0 = max(0, 1.03 − 4) = 0; PIL fills columns 28..31 and rows 0..8 (edges included)."""
  pixels = np.zeros((32, 32, 3), np.uint8)
  out = randaugment.from_pil(randaugment.cutout(randaugment.to_pil(pixels),
                                                _Draws(randoms=[0.5, 0.0, 0.999])))
  filled = np.all(out == randaugment.CUTOUT_FILL, axis=-1)
  expected = np.zeros((32, 32), bool)
  expected[0:9, 28:32] = True
  np.testing.assert_array_equal(filled, expected)
  assert np.all(out[~filled] == 0)
  grey = randaugment.cutout(randaugment.to_pil(pixels[..., :1]), _Draws(randoms=[0.5, 0.0, 0.999]))
  assert randaugment.cutout_fill('L') == 123 and np.asarray(grey)[0, 30] == 123


def test_rand_augment_is_a_function_of_its_generator():
  pixels = _image((32, 32, 3))
  a, b, c = (randaugment.rand_augment(pixels, np.random.default_rng(s)) for s in (4, 4, 5))
  np.testing.assert_array_equal(a, b)
  assert a.dtype == np.uint8 and a.shape == pixels.shape and not np.array_equal(a, c)


# --- the pipeline --------------------------------------------------------------------------------


def _config(data_dir):
  return ml_collections.ConfigDict(dict(
      name='digits', data_dir=str(data_dir), train_split='train', eval_split='test',
      num_train_examples=-1, num_eval_examples=-1))


@pytest.fixture(scope='module')
def digits_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp('tfds')
  sources.get_builder(_config(data_dir))
  return data_dir


def _global_batches(config, batch, process_count, steps, start_step=0):
  streams = [pipeline.train_batches(config, 'weak_strong', batch, seed=4, process_index=i,
                                    process_count=process_count, start_step=start_step)
             for i in range(process_count)]
  return [{key: np.concatenate([local[key] for local in locals_]) for key in locals_[0]}
          for locals_ in zip(*(list(itertools.islice(s, steps)) for s in streams))]


def test_global_batches_are_the_same_for_1_and_2_processes_and_resume(digits_dir):
  """Across an epoch boundary (5 steps per epoch at batch 256) and from a resumed step."""
  config = _config(digits_dir)
  one = _global_batches(config, 256, 1, 6)
  assert one[0]['image'].shape == (256, 2, 8, 8, 1)
  two = _global_batches(config, 256, 2, 6)
  for a, b in zip(one, two):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  resumed = _global_batches(config, 256, 2, 1, start_step=5)
  np.testing.assert_array_equal(one[5]['image'], resumed[0]['image'])
  none = next(pipeline.train_batches(config, 'none', 256, seed=4))
  np.testing.assert_array_equal(one[0]['image'][:, 0], none['image'])
