"""Similarity-Preserving KD (SP) as a pure function of two feature maps.

Reference: Tung and Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019; RepDistiller's
`distiller_zoo/SP.py` (`Similarity`). RepDistiller passes a list of one map, `[feat[-2]]` (the last
stage map f3, post-ReLU), and trains on the sum of that one-entry list with weight β = 3000. The two
maps may differ in channels and size: only the batch dimension is shared.

Reproduces the reference's numbers (tests/data/golden_baselines.npz, prefixes `sp`, `spx`).
"""

import jax
import jax.numpy as jnp

from jaxkd.methods.base import Method
from jaxkd.methods.numerics import l2_normalize
from jaxkd.methods.objective import LAST_MAP, WEIGHTS, distillation_objective, taps


def similarity_matrix(f: jax.Array) -> jax.Array:
  """Row-normalised Gram matrix of a batch, [B, B]:

  G = F Fᵀ with F = f reshaped to [B, −1];  Ĝ_i = G_i / max(‖G_i‖₂, 1e-12) for each row i.

  Each row is normalised on its own (torch F.normalize), not the matrix by its Frobenius norm. The
  Gram matrix does not depend on the flattening order, so NHWC and NCHW maps give the same Ĝ.
  """
  f = f.astype(jnp.float32).reshape(f.shape[0], -1)
  return l2_normalize(f @ f.T)


def sp_loss(fs: jax.Array, ft: jax.Array) -> jax.Array:
  """SP for one pair of maps: L = ‖Ĝ_t − Ĝ_s‖²_F / B² (see `similarity_matrix`).

  The teacher map is a constant. The reference returns a shape-(1,) tensor; this is a scalar.
  """
  g_s = similarity_matrix(fs)
  g_t = similarity_matrix(jax.lax.stop_gradient(ft))
  bsz = fs.shape[0]
  return jnp.sum(jnp.square(g_t - g_s)) / (bsz * bsz)


def sp_term(student_out, teacher_out, hparams):
  """SP on the last stage map (RepDistiller's [feat[-2]])."""
  del hparams
  return sp_loss(taps(student_out)[-2], taps(teacher_out)[-2]), {}


METHOD = Method(name="sp", loss=distillation_objective("sp", sp_term),
                defaults=dict(WEIGHTS, feat_weight=3000.0),
                taps=LAST_MAP)
