"""Registry of distillation methods: one module per method, each exporting `METHOD`."""

import importlib
import importlib.util

from jaxkd.errors import unknown_name
from jaxkd.methods.base import Method
from jaxkd.methods.losses import distill_kl

# name -> module under jaxkd.methods; adding a method is one file and one line here.
_MODULES = {
    "ce": "ce",
    "kd": "kd",
    "sskd": "sskd",
    "hsakd": "hsakd",
    "hsakd_star": "hsakd_star",
    "ega": "ega",
    "simclr": "simclr",
}
METHOD_NAMES = tuple(n for n in _MODULES
                     if importlib.util.find_spec(f"jaxkd.methods.{_MODULES[n]}") is not None)


def get_method(name: str) -> Method:
  if name not in _MODULES or importlib.util.find_spec(f"jaxkd.methods.{_MODULES[name]}") is None:
    raise unknown_name("method", name, METHOD_NAMES)
  return importlib.import_module(f"jaxkd.methods.{_MODULES[name]}").METHOD


__all__ = ["Method", "METHOD_NAMES", "get_method", "distill_kl"]
