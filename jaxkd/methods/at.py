"""Attention Transfer (AT) as pure functions of NHWC feature maps.

Reference: Zagoruyko and Komodakis, "Paying More Attention to Attention: Improving the Performance
of Convolutional Neural Networks via Attention Transfer", ICLR 2017; RepDistiller's
`distiller_zoo/AT.py` (`Attention(p=2)`). RepDistiller passes the stage maps `feat[1:-1]` of both
networks (f1..f3, post-ReLU) and trains on `sum(loss_group)` with weight β = 1000.

Maps of different sizes are compared after pooling the larger one (connectors.pool_to_smaller).

Reproduces the reference's numbers (tests/data/golden_baselines.npz, prefixes `at`, `atx`).
"""

from typing import Sequence

import jax
import jax.numpy as jnp

from jaxkd.methods.base import Method
from jaxkd.methods.connectors import pool_to_smaller
from jaxkd.methods.numerics import l2_normalize
from jaxkd.methods.objective import STAGE_MAPS, WEIGHTS, distillation_objective, taps


def _f32(x: jax.Array) -> jax.Array:
  return x.astype(jnp.float32)


def _power(f: jax.Array, p: float) -> jax.Array:
  """f^p, with an integer power (exact, NaN-free for negative f) when p is integral."""
  if float(p).is_integer():
    return f ** int(p)
  return jnp.power(f, p)


def attention_map(f: jax.Array, p: float = 2.0) -> jax.Array:
  """The spatial attention vector of an NHWC map, [B, H·W]:

  a_b = q_b / max(‖q_b‖₂, 1e-12),  q_b[h, w] = mean_c f[b, h, w, c]^p,

  flattened row-major over (H, W) (the same order as the reference's NCHW `view`).
  """
  f = _f32(f)
  q = jnp.mean(_power(f, p), axis=-1)
  return l2_normalize(q.reshape(f.shape[0], -1))


def at_tap_loss(f_s: jax.Array, f_t: jax.Array, p: float = 2.0) -> jax.Array:
  """AT for one pair of maps: mean over B·HW of (a_s − a_t)², after pooling the larger map to
  the smaller one's spatial size (`pool_to_smaller`). The teacher map is a constant."""
  f_s, f_t = pool_to_smaller(_f32(f_s), jax.lax.stop_gradient(_f32(f_t)))
  return jnp.mean(jnp.square(attention_map(f_s, p) - attention_map(f_t, p)))


def at_loss(feats_s: Sequence[jax.Array], feats_t: Sequence[jax.Array], p: float = 2.0
            ) -> tuple[jax.Array, list[jax.Array]]:
  """RepDistiller's `Attention(p)` over paired lists of maps (feat[1:-1] in the reference).

  Returns (Σ_i L_i, [L_i]) with L_i = `at_tap_loss(feats_s[i], feats_t[i], p)`; the sum is the
  reference's `loss_kd` (unweighted).
  """
  if len(feats_s) != len(feats_t):
    raise ValueError(f"at_loss: {len(feats_s)} student maps but {len(feats_t)} teacher maps")
  group = [at_tap_loss(s, t, p) for s, t in zip(feats_s, feats_t)]
  return sum(group[1:], group[0]), group


def at_term(student_out, teacher_out, hparams):
  """Σ over the stage maps f1..f3 (RepDistiller's feat[1:-1]) of the AT loss."""
  total, group = at_loss(taps(student_out)[1:-1], taps(teacher_out)[1:-1], hparams.p)
  return total, {f"loss_at_{i}": value for i, value in enumerate(group)}


METHOD = Method(name="at", loss=distillation_objective("at", at_term),
                defaults=dict(WEIGHTS, feat_weight=1000.0, p=2.0),
                taps=STAGE_MAPS)
