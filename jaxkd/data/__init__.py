"""Datasets read by index, per-example views and the grain input pipeline.

The names below are imported on first use, so that importing one module of this package (an
input worker unpickling its batch function) does not import the others (TensorFlow, the models).
"""

import importlib

_EXPORTS = {
    'SklearnDigits': 'jaxkd.data.digits',
    'eval_batches': 'jaxkd.data.pipeline',
    'num_eval_steps': 'jaxkd.data.pipeline',
    'steps_per_epoch': 'jaxkd.data.pipeline',
    'train_batches': 'jaxkd.data.pipeline',
    'DATASET_NAMES': 'jaxkd.data.sources',
    'check_readable': 'jaxkd.data.sources',
    'DatasetInfo': 'jaxkd.data.info',
    'get_builder': 'jaxkd.data.sources',
    'get_dataset_info': 'jaxkd.data.sources',
    'VIEWS': 'jaxkd.data.views',
    'num_views': 'jaxkd.data.views',
    'view_shape': 'jaxkd.data.views',
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name in _EXPORTS:
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
  else:
    try:  # A submodule, e.g. jaxkd.data.pipeline.
      value = importlib.import_module(f'{__name__}.{name}')
    except ModuleNotFoundError:
      raise AttributeError(f'module {__name__!r} has no attribute {name!r}') from None
  globals()[name] = value
  return value
