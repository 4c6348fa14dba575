"""Logit standardization (Sun, Ren, Li, Wang and Cao, CVPR 2024): a switch of the logit losses.

As the authors' code computes it (sunshangquan/logit-standardization-KD @ f6e5aa5, `normalize`
in mdistiller/distillers/KD.py and DKD.py, CTKD/distiller_zoo/KD.py). Each row of logits z
[R, N] is z-scored over its N classes before the temperature divides it:

  standardize(z) = (z − mean(z)) / (ε + std(z)),   ε = 1e-7,
  mean(z) = 1/N Σ_j z_j,   std(z) = sqrt(1/(N − 1) Σ_j (z_j − mean(z))²)

std is torch's default, the unbiased (N − 1) estimate, and ε is added to it (not a floor). Both
the student's and the teacher's logits are standardized; the gradient reaches the raw student
logits through the standardization. The cross-entropy with the labels reads the raw logits.

It is a switch, not a method: `kd`, `dkd`, `ctkd` and `mlkd` standardize the logits of their
distillation terms when `logit_standardize` is True (`--config.method.logit_standardize=True`),
and the switch brings its own defaults (a SwitchDefaults of the method), those that the
`--logit-stand` block of the reference's tools/train.py sets with its `--base-temp 2
--kd-weight 9` (the README's command and the argparse defaults):

  KD:    T = 2, kd_weight = 9 (ce_weight keeps its 0.1)
  DKD:   α ← 9 · α, β ← 9 · β (the pair's β), T = 2 (ce_weight 1 and the warm-up stay)
  CTKD:  kd_weight = 9 (the reference's CTKD/scripts/run_cifar_distill.sh, `-a 9`; the
         temperature is the learned one)
  MLKD:  T = 2, kd_weight = 9, as KD (the fork's MLKD.py standardizes only its instance-level
         terms)

A field the config sets keeps its value (the reference's command line would multiply a BETA
given in its opts by 9 as well).
"""

from typing import Any, Callable, Mapping, Union

import jax
import jax.numpy as jnp
import ml_collections

from jaxkd.methods.base import SwitchDefaults
from jaxkd.methods.numerics import safe_norm

# The hyper-parameter that turns standardization on.
FIELD = "logit_standardize"
# ε added to the standard deviation (the reference's `1e-7 + stdv`).
STD_EPS = 1e-7
# The `--base-temp` and `--kd-weight` defaults of the reference's tools/train.py.
BASE_TEMPERATURE = 2.0
KD_WEIGHT = 9.0
# The defaults the switch sets for KD (and for MLKD, whose block sets the same fields).
KD_DEFAULTS = {"T": BASE_TEMPERATURE, "kd_weight": KD_WEIGHT}


def standardize(logits: jax.Array, eps: float = STD_EPS) -> jax.Array:
  """(z − mean(z)) / (eps + std(z)) over the last axis, std unbiased (N − 1), in float32.

  A constant row gives zeros, with a zero (not NaN) gradient through its zero std.
  """
  z = logits.astype(jnp.float32)
  centred = z - jnp.mean(z, axis=-1, keepdims=True)
  std = safe_norm(centred, axis=-1, keepdims=True) / jnp.sqrt(z.shape[-1] - 1.0)
  return centred / (eps + std)


def enabled(hparams: ml_collections.ConfigDict) -> bool:
  """Whether the switch is on in `hparams` (off when the method has no such field)."""
  return bool(hparams.get(FIELD, False))


def maybe_standardize(logits: jax.Array, hparams: ml_collections.ConfigDict) -> jax.Array:
  """standardize(logits) when the switch is on in `hparams`, else the logits unchanged."""
  return standardize(logits) if enabled(hparams) else logits


def switch(defaults: Union[Mapping[str, Any],
                           Callable[[ml_collections.ConfigDict], Mapping[str, Any]]]
           ) -> SwitchDefaults:
  """The method's defaults while `logit_standardize` is True (see SwitchDefaults)."""
  return SwitchDefaults(field=FIELD, value=True, defaults=defaults)
