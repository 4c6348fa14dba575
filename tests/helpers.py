"""Helpers the test modules share: loading a file as `--config` does, dotted config overrides."""

import importlib.util
import pathlib
from typing import Any, Mapping, Union

import ml_collections

REPO = pathlib.Path(__file__).resolve().parents[1]


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
