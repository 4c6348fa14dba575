"""Registry of distillation methods: one module per method, each exporting `METHOD` (or, for a
method with variants registered under several names, `METHODS`: name -> Method)."""

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
    # EGA's comparison methods on the same joint embeddings (jaxkd.methods.ega).
    "ega_kd": "ega",
    "ega_hint": "ega",
    "ega_rkd": "ega",
    "ega_pkt": "ega",
    "ega_nce": "ega",
    "ega_ccl": "ega",
    "ega_crd": "ega",
    "simclr": "simclr",
    # The baselines of the CRD, SSKD and HSAKD tables (RepDistiller; DKD from mdistiller).
    "fitnet": "fitnet",
    "at": "at",
    "sp": "sp",
    "cc": "cc",
    "vid": "vid",
    "rkd": "rkd",
    "pkt": "pkt",
    "ab": "ab",
    "ft": "ft",
    "fsp": "fsp",
    "nst": "nst",
    "kdsvd": "kdsvd",
    "crd": "crd",
    "crd_kd": "crd",
    "dkd": "dkd",
    # Methods after the CRD/SSKD/HSAKD tables.
    "ctkd": "ctkd",
    "ctkd_dkd": "ctkd",
    "dist": "dist",
    "nkd": "nkd",
    "ickd": "ickd",
    "ickd_kd": "ickd",
    "srd": "srd",
    "mlkd": "mlkd",
    # Feature distillation of mdistiller's CIFAR-100 table.
    "reviewkd": "reviewkd",
    "ofd": "ofd",
    # mdistiller's DOT: KD stepped by its own optimiser (two momentum buffers).
    "dot": "dot",
}
METHOD_NAMES = tuple(n for n in _MODULES
                     if importlib.util.find_spec(f"jaxkd.methods.{_MODULES[n]}") is not None)

# RepDistiller's `--distill` names of the same methods.
ALIASES = {
    "hint": "fitnet",
    "attention": "at",
    "similarity": "sp",
    "correlation": "cc",
    "abound": "ab",
    "factor": "ft",
}


def canonical_name(name: str) -> str:
  """jaxkd's name of a method given by jaxkd's or RepDistiller's name (others unchanged)."""
  return ALIASES.get(name, name)


def cross_entropy_method() -> Method:
  """Plain cross-entropy: how stage `teacher` trains a teacher and a linear probe its head."""
  return get_method("ce")


def get_method(name: str) -> Method:
  """The registered method `name` (jaxkd's or RepDistiller's name)."""
  name = canonical_name(name)
  if name not in _MODULES or importlib.util.find_spec(f"jaxkd.methods.{_MODULES[name]}") is None:
    raise unknown_name("method", name, METHOD_NAMES)
  module = importlib.import_module(f"jaxkd.methods.{_MODULES[name]}")
  return module.METHODS[name] if hasattr(module, "METHODS") else module.METHOD


__all__ = ["Method", "METHOD_NAMES", "ALIASES", "canonical_name", "cross_entropy_method",
           "get_method", "distill_kl"]
