"""Own data by config name: `folder:<dir>` (image files) and `tfds:<builder>` (a prepared tfds
dataset), their mean/std computed once per workdir, the views and switches on them, and every
malformed source refused with one clear error."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import helpers

from configs import demo
from jaxkd import checkpoint
from jaxkd import defaults
from jaxkd import train
from jaxkd.data import digits
from jaxkd.data import pipeline
from jaxkd.data import sources
from jaxkd.errors import UserError

CLASSES = ("c0", "c1", "c2")
PER_CLASS = {"train": 16, "test": 8}


def _rgb_digits():
  """sklearn's digits 0-2 upscaled to 16x16 and made RGB (three different channels): uint8
  [N, 16, 16, 3] and labels."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  raw = load_digits(n_class=len(CLASSES))
  grey = np.round(np.kron(raw.images, np.ones((2, 2))) * 255 / 16).astype(np.uint8)
  return np.stack([grey, 255 - grey, grey // 2], axis=-1), raw.target


def _write_png(path, image):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tf.io.write_file(str(path), tf.io.encode_png(image))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """<root>/{train,test}/<class>/*.png with 16 + 8 images of each class; returns the root and
  what was written: split -> [(label, image)]."""
  root = tmp_path_factory.mktemp("own") / "digits"
  images, labels = _rgb_digits()
  written = {"train": [], "test": []}
  for label, name in enumerate(CLASSES):
    members = images[labels == label]
    start = 0
    for split, count in PER_CLASS.items():
      for i, image in enumerate(members[start:start + count]):
        _write_png(root / split / name / f"{i}.png", image)
        written[split].append((label, image))
      start += count
  return str(root), written


def _dataset_config(name, **fields):
  config = defaults.dataset_config(name)
  config.update(fields)
  return config


def _expected_statistics(images):
  pixels = np.concatenate([image.reshape(-1, 3) for image in images]) / 255.0
  return pixels.mean(0), pixels.std(0)


# --------------------------------------------------------------------------- folder:


def test_folder_reads_the_files_pixels_and_labels(folder):
  root, written = folder
  config = _dataset_config(f"folder:{root}")
  info = sources.get_dataset_info(config)
  assert (info.num_classes, info.image_shape, info.num_train, info.num_eval) == (
      3, (16, 16, 3), 48, 24)
  # CIFAR's padding 4 at 32 px, scaled; no flips (a mirrored digit, letter or scan changes).
  assert (info.crop_padding, info.flip) == (2, False)
  mean, std = _expected_statistics([image for _, image in written["train"]])
  np.testing.assert_allclose(info.mean, mean, rtol=1e-12)
  np.testing.assert_allclose(info.std, std, rtol=1e-12)
  for split in ("train", "test"):
    read = [(int(label), image.tobytes())
            for image, label in sources.load_split(config, split).as_numpy_iterator()]
    assert sorted(read) == sorted((label, image.tobytes()) for label, image in written[split])


def test_folder_resized_to_image_size(folder):
  root, _ = folder
  config = _dataset_config(f"folder:{root}", image_size=8)
  info = sources.get_dataset_info(config)
  assert (info.image_shape, info.crop_padding) == ((8, 8, 3), 1)
  images = [image for image, _ in sources.load_split(config, "test").as_numpy_iterator()]
  assert len(images) == 24 and all(image.shape == (8, 8, 3) for image in images)


def test_resize_scales_the_shorter_side_then_crops_the_centre():
  image = np.random.default_rng(0).integers(0, 256, (12, 24, 3), np.uint8)
  # Shorter side already 12: only the central 12 columns are kept, untouched.
  np.testing.assert_array_equal(sources.resize(tf.constant(image), 12), image[:, 6:18])
  flat = np.full((30, 20, 3), (10, 200, 77), np.uint8)
  np.testing.assert_array_equal(sources.resize(tf.constant(flat), 8), flat[:8, :8])


@pytest.fixture(scope="module")
def folder_run(folder, tmp_path_factory):
  """A KD run (resnet8 from a resnet8 teacher file, one epoch) on folder:<root>."""
  root, _ = folder
  work = tmp_path_factory.mktemp("run")
  config = demo.get_config("runlocal")
  config.dataset.update(name=f"folder:{root}", num_train_examples=-1, num_eval_examples=-1)
  config.teacher.name = config.student.name = "resnet8"
  config.teacher.checkpoint = str(work / "teacher.msgpack")
  checkpoint.export_variables(config.teacher.checkpoint,
                              helpers.random_variables("resnet8", num_classes=len(CLASSES)))
  config.update(baselines="", num_epochs=1, batch_size=16, eval_batch_size=24)
  workdir = str(work / "workdir")
  results = train.train_and_evaluate(config, workdir)
  return config, workdir, results


def test_training_on_a_folder_writes_its_statistics_once(folder, folder_run, monkeypatch):
  root, written = folder
  config, workdir, results = folder_run
  assert [r["stage"] for r in results] == ["teacher", "student_kd"]  # teacher: the file
  assert 0.0 <= results[1]["top1_last"] <= 100.0
  with open(os.path.join(workdir, sources.STATS_FILE)) as f:
    stats = json.load(f)
  (key, entry), = stats.items()
  assert key.startswith(f"folder:{root} ") and "split=train" in key and "image_size=0" in key
  mean, std = _expected_statistics([image for _, image in written["train"]])
  np.testing.assert_allclose(entry["mean"], mean, rtol=1e-12)
  np.testing.assert_allclose(entry["std"], std, rtol=1e-12)

  # Another process (empty memory) on the same workdir reads them, and computes nothing.
  monkeypatch.setattr(sources, "_STATISTICS", {})

  def fail(*args):
    raise AssertionError("statistics computed again")

  monkeypatch.setattr(sources, "pixel_statistics", fail)
  again = train.train_and_evaluate(config, workdir)
  assert [r["top1_last"] for r in again] == [r["top1_last"] for r in results]
  # Without the file, they would have been.
  monkeypatch.setattr(sources, "_STATISTICS", {})
  with pytest.raises(AssertionError, match="computed again"):
    sources.get_dataset_info(config.dataset, cache_dir=str(os.path.dirname(workdir)))


def test_views_and_switches_go_through_the_pipeline(folder):
  root, _ = folder
  config = _dataset_config(f"folder:{root}", train_fraction=0.5)
  info = sources.get_dataset_info(config)
  assert info.num_train == 24
  # A class-balanced half: 8 of each class.
  indices, labels = pipeline.training_set(config, info, seed=0)
  assert np.bincount(labels).tolist() == [8, 8, 8]
  batch = next(pipeline.train_batches(config, "rotations", 8, seed=0))
  assert batch["image"].shape == (8, 4, 16, 16, 3) and set(batch["label"]) <= {0, 1, 2}
  # Eval views are normalised with the computed statistics, rotation k = np.rot90(image, k).
  (image, label), = sources.load_split(config, "test").take(1).as_numpy_iterator()
  batch = next(pipeline.eval_batches(config, "rotations", 8))
  normalised = (image / 255.0 - np.array(info.mean)) / np.array(info.std)
  for k in range(4):
    np.testing.assert_allclose(batch["image"][0, k], np.rot90(normalised, k), atol=1e-5)
  assert batch["label"][0] == label
  # Two processes: each reads its own half; together the eval split once.
  shards = [list(pipeline.eval_batches(config, "none", 8, process_index=i, process_count=2))
            for i in range(2)]
  assert sum(float(b["mask"].sum()) for shard in shards for b in shard) == 24
  assert len(shards[0]) == len(shards[1]) == 3
  clean = _dataset_config(f"folder:{root}")
  noisy = _dataset_config(f"folder:{root}", label_noise=0.25)
  _, clean_labels = pipeline.training_set(clean, sources.get_dataset_info(clean), seed=0)
  _, noisy_labels = pipeline.training_set(noisy, sources.get_dataset_info(noisy), seed=0)
  assert int((clean_labels != noisy_labels).sum()) == 12  # int(0.25 * 48)


def _ramps(root, size=8):
  """<root>/{train,test}/{a,b}/*.png: grey images whose pixels grow from left to right."""
  ramp = np.tile((10 + 30 * np.arange(size, dtype=np.uint8))[None, :, None], (size, 1, 1))
  for split in ("train", "test"):
    for label in ("a", "b"):
      for i in range(4):
        _write_png(root / split / label / f"{i}.png", ramp)


def _row_orders(batch, info):
  """For each row of each training view, +1 where its pixels (back in [0, 255], the crop's zero
  padding left out) grow from left to right, -1 where they shrink (a flipped view)."""
  pixels = np.round((batch["image"] * np.array(info.std) + np.array(info.mean)) * 255)
  orders = set()
  for row in pixels.reshape(-1, pixels.shape[-2]):
    row = row[row > 0]
    if len(row) > 1:
      steps = np.sign(np.diff(row))
      assert len(set(steps)) == 1, row  # a crop moves the ramp, never breaks it
      orders.add(int(steps[0]))
  return orders


@pytest.mark.parametrize("views", ["none", "rotations"])
def test_flip_off_never_mirrors_an_example(tmp_path, views):
  """Every training view of a folder of left-to-right ramps (padding 1, 16 steps of 8 views)
  still rises from left to right with flips off (the folder's default); with dataset.flip=True
  some are mirrored. Rotated views (k = 1..3) are left out of the count."""
  _ramps(tmp_path / "ramps")
  for flip, want in ((None, {1}), (False, {1}), (True, {1, -1})):
    config = _dataset_config(f"folder:{tmp_path / 'ramps'}", flip=flip)
    info = sources.get_dataset_info(config)
    assert info.flip is bool(flip)
    orders = set()
    for _, batch in zip(range(16), pipeline.train_batches(config, views, 8, seed=0)):
      if views == "rotations":
        batch = dict(batch, image=batch["image"][:, 0])  # k = 0: the view as cropped
      orders |= _row_orders(batch, info)
    assert orders == want, (flip, views)


def test_default_flips_follow_the_registry():
  """`defaults.default_flip` (what --print_config shows) agrees with every registry entry."""
  for name in sources.DATASET_NAMES:
    assert defaults.default_flip(name) == sources._REGISTRY[name].flip, name
  assert defaults.default_flip("tfds:mnist") and not defaults.default_flip("folder:/data")


# --------------------------------------------------------------------------- tfds:


def test_tfds_source_on_prepared_digits(tmp_path):
  digits.prepared_builder(str(tmp_path))
  config = _dataset_config("tfds:sklearn_digits", data_dir=str(tmp_path))
  info = sources.get_dataset_info(config, cache_dir=str(tmp_path / "work"))
  assert (info.num_classes, info.image_shape, info.num_train, info.num_eval) == (
      10, (8, 8, 1), 1437, 360)
  assert (info.crop_padding, info.flip) == (1, True)
  registry = _dataset_config("digits", data_dir=str(tmp_path))
  # The registry's constants were computed the same way, to four decimals.
  np.testing.assert_allclose(info.mean, sources.get_dataset_info(registry).mean, atol=5e-5)
  np.testing.assert_allclose(info.std, sources.get_dataset_info(registry).std, atol=5e-5)
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  train = np.round(load_digits().images[digits.split_indices()["train"]] * 255 / 16) / 255
  np.testing.assert_allclose(info.mean, [train.mean()], rtol=1e-12)
  np.testing.assert_allclose(info.std, [train.std()], rtol=1e-12)
  ours = list(sources.load_split(config, "test").take(5).as_numpy_iterator())
  theirs = list(sources.load_split(registry, "test").take(5).as_numpy_iterator())
  for (a, la), (b, lb) in zip(ours, theirs):
    np.testing.assert_array_equal(a, b)
    assert la == lb
  assert os.path.isfile(tmp_path / "work" / sources.STATS_FILE)


def _store(data_dir, name, features, examples, file_format="array_record"):
  tfds.dataset_builders.store_as_tfds_dataset(
      name=name, version="1.0.0", features=tfds.features.FeaturesDict(features),
      split_datasets={"train": list(enumerate(examples)), "test": list(enumerate(examples))},
      data_dir=str(data_dir), file_format=file_format)


def test_tfds_images_of_variable_size_need_image_size(tmp_path):
  rng = np.random.default_rng(0)
  examples = [{"image": rng.integers(0, 256, (10 + i, 14 - i, 3), np.uint8), "label": i % 2}
              for i in range(4)]
  _store(tmp_path, "own_shapes", {"image": tfds.features.Image(shape=(None, None, 3)),
                                  "label": tfds.features.ClassLabel(num_classes=2)}, examples)
  config = _dataset_config("tfds:own_shapes", data_dir=str(tmp_path))
  with pytest.raises(UserError, match=r"variable size \(None, None, 3\).*image_size=N"):
    sources.get_dataset_info(config)
  config.image_size = 6
  info = sources.get_dataset_info(config)
  assert (info.image_shape, info.num_classes, info.num_train) == ((6, 6, 3), 2, 4)
  images = [image for image, _ in sources.load_split(config, "train").as_numpy_iterator()]
  assert all(image.shape == (6, 6, 3) for image in images)


def test_tfds_prepared_as_tfrecord_only_names_the_command(tmp_path):
  examples = [{"image": np.full((4, 4, 3), i, np.uint8), "label": i % 2} for i in range(4)]
  _store(tmp_path, "own_tfrecord", {"image": tfds.features.Image(shape=(4, 4, 3)),
                                    "label": tfds.features.ClassLabel(num_classes=2)},
         examples, file_format="tfrecord")
  config = _dataset_config("tfds:own_tfrecord", data_dir=str(tmp_path),
                           mean=(0.5,) * 3, std=(0.2,) * 3)
  assert sources.get_dataset_info(config).num_train == 4  # Its metadata reads.
  for call in (lambda: sources.data_source(config, "train"),
               lambda: pipeline.train_batches(config, "none", 2, seed=0)):
    with pytest.raises(UserError, match=r"prepared in .*own_tfrecord/1.0.0 as tfrecord files.*"
                                        r"`tfds build own_tfrecord --file_format=array_record "
                                        r"--data_dir DIR`"):
      call()


def test_tfds_errors(tmp_path):
  with pytest.raises(UserError, match="tfds has no builder 'no_such_builder'"):
    sources.get_dataset_info(_dataset_config("tfds:no_such_builder", data_dir=str(tmp_path)))
  with pytest.raises(UserError, match=r"'tfds:mnist'.*not prepared.*tfds build mnist"):
    sources.get_dataset_info(_dataset_config("tfds:mnist", data_dir=str(tmp_path)))
  _store(tmp_path, "own_vectors", {"x": tfds.features.Tensor(shape=(2,), dtype=np.float32),
                                   "label": tfds.features.ClassLabel(num_classes=2)},
         [{"x": np.zeros(2, np.float32), "label": 0}])
  with pytest.raises(UserError, match=r"not an image-classification dataset.*'image'.*"
                                     r"its features: label \(ClassLabel\), x \(Tensor\)$"):
    sources.get_dataset_info(_dataset_config("tfds:own_vectors", data_dir=str(tmp_path)))
  with pytest.raises(UserError, match="names no builder"):
    sources.get_dataset_info(_dataset_config("tfds:"))


# --------------------------------------------------------------------------- malformed


def _tree(root, files):
  """Writes `files`, {relative path: (H, W)} of random PNGs (or None: an empty folder)."""
  rng = np.random.default_rng(0)
  for path, size in files.items():
    if size is None:
      os.makedirs(root / path, exist_ok=True)
    else:
      _write_png(root / path, rng.integers(0, 256, size + (3,), np.uint8))
  return _dataset_config(f"folder:{root}")


LAYOUT = r"expected the layout .*/train/<class>/\*\.png\|jpg and .*/test/<class>/\*\.png\|jpg"


@pytest.mark.parametrize("files, message", [
    ({}, "does not exist"),
    ({"test/a/0.png": (8, 8)}, "has no train/ folder"),
    ({"train/a/0.png": (8, 8)}, "has no test/ folder"),
    ({"train/0.png": (8, 8), "test/a/0.png": (8, 8)}, "train has no class folders"),
    ({"train/a": None, "test/a/0.png": (8, 8)}, r"class folder .*train/a has no images"),
    ({"train/a/0.png": (8, 8), "train/b/0.png": (8, 8), "test/a/0.png": (8, 8),
      "test/c/0.png": (8, 8)}, r"classes of .*train/ and .*test/ differ \(only in train/: b; "
                               r"only in test/: c\)"),
])
def test_malformed_folders_are_refused_naming_the_layout(tmp_path, files, message):
  config = _tree(tmp_path / "data", files)
  with pytest.raises(UserError, match=f"{message}[^;]*; {LAYOUT}"):
    sources.get_dataset_info(config)


def test_mixed_sizes_need_image_size(tmp_path):
  config = _tree(tmp_path, {"train/a/0.png": (8, 8), "train/a/1.png": (8, 10),
                            "test/a/0.png": (8, 8)})
  with pytest.raises(UserError, match=r"images of different sizes .*0.png is 8x8, .*1.png is "
                                      r"8x10\).*image_size=N"):
    sources.get_dataset_info(config)
  config.image_size = 8
  assert sources.get_dataset_info(config).image_shape == (8, 8, 3)


def test_bad_files_and_fields_are_refused(tmp_path):
  config = _tree(tmp_path, {"train/a/0.png": (8, 8), "test/a/0.png": (8, 8)})
  (tmp_path / "train" / "a" / "1.png").write_bytes(b"not an image")
  with pytest.raises(UserError, match=r"1.png is not a readable PNG or JPEG image"):
    sources.get_dataset_info(config)
  os.remove(tmp_path / "train" / "a" / "1.png")
  config.update(mean=(0.5,), std=(0.2,))
  with pytest.raises(UserError, match=r"one value per channel of .* \(3\)"):
    sources.get_dataset_info(config)
  config.update(mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))
  info = sources.get_dataset_info(config)  # Given: nothing is computed.
  assert (info.mean, info.std) == ((0.5, 0.5, 0.5), (0.2, 0.2, 0.2))
  config.normalization = "clip"
  with pytest.raises(UserError, match="both set the statistics"):
    sources.get_dataset_info(config)
  with pytest.raises(UserError, match="image_size resizes tfds:/folder: datasets"):
    sources.get_dataset_info(_dataset_config("cifar100", image_size=16, num_train_examples=8,
                                             num_eval_examples=8))
  with pytest.raises(UserError, match=r"unknown dataset 'cifar1000'.*folder:<dir>"):
    sources.get_dataset_info(_dataset_config("cifar1000"))


def test_greyscale_folders_have_one_channel_and_mixed_ones_three(tmp_path):
  grey = np.arange(64, dtype=np.uint8).reshape(8, 8, 1) * 3
  for split in ("train", "test"):
    _write_png(tmp_path / "grey" / split / "a" / "0.png", grey)
  config = _dataset_config(f"folder:{tmp_path / 'grey'}")
  assert sources.get_dataset_info(config).image_shape == (8, 8, 1)
  (image, _), = sources.load_split(config, "train").as_numpy_iterator()
  np.testing.assert_array_equal(image, grey)
  _write_png(tmp_path / "grey" / "train" / "a" / "1.png", np.zeros((8, 8, 3), np.uint8))
  assert sources.get_dataset_info(config).image_shape == (8, 8, 3)
  read = {int(image.sum()): image for image, _ in sources.load_split(config, "train")
          .as_numpy_iterator()}
  np.testing.assert_array_equal(read[3 * int(grey.sum())], np.repeat(grey, 3, axis=-1))
