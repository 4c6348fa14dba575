"""Helpers the test modules share: loading a file as `--config` does, dotted config overrides,
dataset configs, mock CIFAR-100 and random zoo variables."""

import dataclasses
import functools
import importlib.util
import os
import pathlib
import re
from typing import Any, Mapping, Union

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxkd import defaults
from jaxkd import networks
from jaxkd.data import records

REPO = pathlib.Path(__file__).resolve().parents[1]


def device_env(devices: int, **extra: str) -> dict[str, str]:
  """The environment of a command a test starts: `devices` CPU devices, the session's other XLA
  flags (conftest.py's) kept, so that its programs compile as the test's own do."""
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                 os.environ.get("XLA_FLAGS", "")).split()
  return dict(os.environ, **extra, XLA_FLAGS=" ".join(
      [*flags, f"--xla_force_host_platform_device_count={devices}"]))


def load_module(path: Union[str, pathlib.Path], name: str) -> Any:
  """The Python file at `path` (a recipe config, an experiments script) as module `name`."""
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def set_fields(config: ml_collections.ConfigDict,
               overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """`config` with each dotted key ('teacher.name') set, as `--config.teacher.name=` does."""
  for key, value in overrides.items():
    target = config
    *path, last = key.split(".")
    for part in path:
      target = target[part]
    target[last] = value
  return config


def dataset_config(name: str = "digits", data_dir: Union[str, pathlib.Path] = "",
                   **fields: Any) -> ml_collections.ConfigDict:
  """`config.dataset` of a recipe (`jaxkd.defaults.dataset_config`) for dataset `name` in
  `data_dir`, with `fields` set."""
  config = defaults.dataset_config(name)
  config.update(data_dir=str(data_dir), **fields)
  return config


def mock_cifar100(dataset_config, split, num_examples=-1):
  """Random CIFAR-100-shaped examples (uint8 32x32x3, labels < 100), fixed per split, read by
  index (its first `num_examples` when > 0).

  Stands in for `sources.data_source`: tfds.testing.mock_data swaps the file system while it is
  active, which would race orbax's background checkpoint writes.
  """
  assert dataset_config.name == "cifar100"
  rng = np.random.RandomState(0 if split == "train" else 1)
  images = rng.randint(0, 256, size=(32, 32, 32, 3)).astype(np.uint8)
  labels = rng.randint(0, 100, size=32).astype(np.int32)
  source = records.InMemory(images, labels)
  return records.Head(source, num_examples) if num_examples > 0 else source


def random_variables(name: str, num_classes: int = 100) -> Any:
  """Variables of zoo network `name` drawn with numpy (a jitted init costs seconds of compile)."""
  network = networks.build_network(name, num_classes)
  shapes = jax.eval_shape(functools.partial(network.init, train=False), jax.random.key(0),
                          jnp.zeros((1, 32, 32, 3)))
  rng = np.random.RandomState(0)

  def draw(path, leaf):
    if path[-1].key == "var":
      return np.ones(leaf.shape, leaf.dtype)
    if path[-1].key == "mean":
      return np.zeros(leaf.shape, leaf.dtype)
    return (0.1 * rng.normal(size=leaf.shape)).astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def mock_cifar_config(root: pathlib.Path, teacher: str, student: str, method: str,
                      baselines: str = "") -> ml_collections.ConfigDict:
  """configs/default.py:runlocal for mock CIFAR-100 (use `mock_cifar100`) shrunk to one epoch
  of two steps, distilling `student` with `method` (then `baselines`) from a teacher file of
  random weights in `root`, which stands in for stage `teacher`."""
  from configs import default  # pylint: disable=g-import-not-at-top
  from jaxkd import checkpoint  # pylint: disable=g-import-not-at-top
  config = default.get_config("runlocal")
  config.teacher.name, config.student.name = teacher, student
  config.dataset.update(num_train_examples=16, num_eval_examples=8)
  config.update(batch_size=8, eval_batch_size=8, num_epochs=1)
  config.teacher.checkpoint = str(root / f"{teacher}.msgpack")
  checkpoint.export_variables(config.teacher.checkpoint, random_variables(teacher))
  config.method = ml_collections.ConfigDict(dict(name=method))
  config.baselines = baselines
  return config



@dataclasses.dataclass(frozen=True)
class FailingBatch:
  """A training batch function that raises OSError for global batch `step`, as reading a
  damaged image file would; picklable, so that an input worker process runs it."""
  batch_fn: Any
  step: int

  def __call__(self, step: int) -> Any:
    if step == self.step:
      raise OSError(f"image file of batch {step} is damaged")
    return self.batch_fn(step)
