"""Neuron Selectivity Transfer (NST) as pure functions of NHWC feature maps.

Reference: Huang and Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity
Transfer", arXiv:1707.01219, 2017; RepDistiller's `distiller_zoo/NST.py` (`NSTLoss`, with its
`full_loss = True` branch). RepDistiller passes the stage maps `feat[1:-1]` of both networks
(f1..f3, post-ReLU) and trains on `sum(loss_group)` with weight β = 50. Channel counts may differ
between student and teacher; the spatially larger map is average-pooled to the smaller one.

Reproduces the reference's numbers (tests/data/golden_baselines.npz, prefixes `nst`, `nstx`).
"""

from typing import Sequence

import jax
import jax.numpy as jnp

from jaxkd.methods.connectors import pool_to_smaller
from jaxkd.methods.base import Method
from jaxkd.methods.numerics import l2_normalize
from jaxkd.methods.objective import STAGE_MAPS, WEIGHTS, distillation_objective, taps


def channel_distributions(f: jax.Array) -> jax.Array:
  """Each channel of an NHWC map as a unit vector over its H·W positions, [B, H·W, C]:

  z[b, :, c] = f[b, :, :, c] / max(‖f[b, :, :, c]‖₂, 1e-12).
  """
  f = f.astype(jnp.float32)
  return l2_normalize(f.reshape(f.shape[0], -1, f.shape[-1]), axis=1)


def poly_kernel_mean(a: jax.Array, b: jax.Array) -> jax.Array:
  """mean over b, i, j of the degree-2 polynomial kernel k(a_i, b_j) = (a_i · b_j)², where a_i,
  b_j are the channel vectors of `channel_distributions` ([B, HW, C_a], [B, HW, C_b])."""
  return jnp.mean(jnp.square(jnp.einsum("bpi,bpj->bij", a, b)))


def nst_tap_loss(f_s: jax.Array, f_t: jax.Array) -> jax.Array:
  """NST for one pair of maps, the squared MMD with the kernel (a·b)²:

  L = mean K(t, t) + mean K(s, s) − 2 · mean K(s, t),

  on the channel distributions of the two maps after pooling the larger map to the smaller one's
  spatial size. The teacher–teacher term is a constant (detached in the reference).
  """
  f_s, f_t = pool_to_smaller(f_s.astype(jnp.float32),
                             jax.lax.stop_gradient(f_t.astype(jnp.float32)))
  z_s = channel_distributions(f_s)
  z_t = channel_distributions(f_t)
  return (jax.lax.stop_gradient(poly_kernel_mean(z_t, z_t)) + poly_kernel_mean(z_s, z_s)
          - 2.0 * poly_kernel_mean(z_s, z_t))


def nst_loss(feats_s: Sequence[jax.Array], feats_t: Sequence[jax.Array]
             ) -> tuple[jax.Array, list[jax.Array]]:
  """RepDistiller's `NSTLoss` over paired lists of maps (feat[1:-1] in the reference).

  Returns (Σ_i L_i, [L_i]) with L_i = `nst_tap_loss(feats_s[i], feats_t[i])`.
  """
  if len(feats_s) != len(feats_t):
    raise ValueError(f"nst_loss: {len(feats_s)} student maps but {len(feats_t)} teacher maps")
  group = [nst_tap_loss(s, t) for s, t in zip(feats_s, feats_t)]
  return sum(group[1:], group[0]), group


def nst_term(student_out, teacher_out, hparams):
  """Σ over the stage maps f1..f3 (RepDistiller's feat[1:-1]) of the NST loss."""
  del hparams
  total, group = nst_loss(taps(student_out)[1:-1], taps(teacher_out)[1:-1])
  return total, {f"loss_nst_{i}": value for i, value in enumerate(group)}


METHOD = Method(name="nst", loss=distillation_objective("nst", nst_term),
                defaults=dict(WEIGHTS, feat_weight=50.0),
                taps=STAGE_MAPS)
