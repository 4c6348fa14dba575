"""Distillation terms between two batches of embeddings, as small pure functions.

These are the comparison methods of the EGA reference, applied there to the student's and the
teacher's 256-d joint embeddings fs, ft [B, D]: FitNet's hint (MSE), RKD's distance and angle
terms, PKT's probabilistic transfer, and the class-aware contrastive NCE term (and its CCL
combination with a symmetric KL). CRD needs a memory bank and lives in jaxkd.methods.crd.

Every function takes the student side first; the teacher side is a constant for the student
(`stop_gradient`), as it is for the student's optimiser in the reference.
"""

import jax
import jax.numpy as jnp

from jaxkd.methods.losses import distill_kl
from jaxkd.methods.numerics import l2_normalize, safe_norm

# The epsilons the reference formulas add; they decide values near degenerate inputs.
PDIST_EPS = 1e-12   # floor of RKD's squared distances
PKT_EPS = 1e-7
NCE_EPS = 1e-10


def _f32(x: jax.Array) -> jax.Array:
  return x.astype(jnp.float32)


def _teacher(x: jax.Array) -> jax.Array:
  return jax.lax.stop_gradient(_f32(x))


def hint_loss(fs: jax.Array, ft: jax.Array) -> jax.Array:
  """FitNet's hint on embeddings: L = mean over all entries of (fs − ft)²  (torch MSELoss)."""
  return jnp.mean(jnp.square(_f32(fs) - _teacher(ft)))


def pairwise_distances(e: jax.Array, eps: float = PDIST_EPS) -> jax.Array:
  """d_ij = sqrt(max(‖e_i‖² + ‖e_j‖² − 2 e_i·e_j, eps)) for i ≠ j, d_ii = 0; shape [B, B]."""
  sq = jnp.sum(jnp.square(e), axis=-1)
  d = jnp.sqrt(jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * e @ e.T, eps))
  return jnp.where(jnp.eye(e.shape[0], dtype=bool), 0.0, d)


def _normalized_by_mean_positive(d: jax.Array) -> jax.Array:
  """d / mean(d over its entries > 0)."""
  positive = d > 0
  mean = jnp.sum(jnp.where(positive, d, 0.0)) / jnp.maximum(jnp.sum(positive), 1)
  return d / mean


def smooth_l1(a: jax.Array, b: jax.Array) -> jax.Array:
  """mean of 0.5·x² where |x| < 1, |x| − 0.5 elsewhere, x = a − b (torch smooth_l1_loss, β=1)."""
  x = jnp.abs(a - b)
  return jnp.mean(jnp.where(x < 1.0, 0.5 * jnp.square(x), x - 0.5))


def _angles(e: jax.Array) -> jax.Array:
  """a_ijk = <n_ji, n_ki> with n_ji = (e_j − e_i)/max(‖e_j − e_i‖, ε) (the unit vector from
  e_i to e_j): the cosine of the angle at e_i, for every triple; shape [B·B·B]."""
  diff = e[None, :, :] - e[:, None, :]  # diff[i, j] = e_j − e_i
  unit = l2_normalize(diff)
  return jnp.einsum("ijd,ikd->ijk", unit, unit).reshape(-1)


def rkd_loss(fs: jax.Array, ft: jax.Array, distance_weight: float = 25.0,
             angle_weight: float = 50.0) -> jax.Array:
  """Relational KD (Park et al., CVPR 2019), the reference's RKDLoss:

  L_d = smoothL1(d_s / μ_s, d_t / μ_t) over all B² pairs, d = pairwise_distances, μ = the mean
        of the positive distances;
  L_a = smoothL1(a_s, a_t) over all B³ triples, a = cosines of the angles (see `_angles`);
  L   = w_d · L_d + w_a · L_a  (w_d = 25, w_a = 50).
  """
  s = _f32(fs).reshape(fs.shape[0], -1)
  t = _teacher(ft).reshape(ft.shape[0], -1)
  loss_d = smooth_l1(_normalized_by_mean_positive(pairwise_distances(s)),
                     _normalized_by_mean_positive(pairwise_distances(t)))
  loss_a = smooth_l1(_angles(s), _angles(t))
  return distance_weight * loss_d + angle_weight * loss_a


def _cosine_affinity(e: jax.Array, eps: float) -> jax.Array:
  """Row-stochastic P_ij ∝ (1 + cos(e_i, e_j)) / 2, cosines of e_i / (‖e_i‖ + eps)."""
  unit = e / (safe_norm(e) + eps)
  unit = jnp.where(jnp.isnan(unit), 0.0, unit)
  similarity = (unit @ unit.T + 1.0) / 2.0
  return similarity / jnp.sum(similarity, axis=-1, keepdims=True)


def pkt_loss(fs: jax.Array, ft: jax.Array, eps: float = PKT_EPS) -> jax.Array:
  """Probabilistic Knowledge Transfer (Passalis and Tefas, ECCV 2018), the reference's PKT:

  P_s, P_t = row-normalised cosine affinities (see `_cosine_affinity`);
  L = mean over all B² entries of P_t · log((P_t + eps) / (P_s + eps)).
  """
  p_s = _cosine_affinity(_f32(fs), eps)
  p_t = _cosine_affinity(_teacher(ft), eps)
  return jnp.mean(p_t * jnp.log((p_t + eps) / (p_s + eps)))


def class_nce_loss(fs: jax.Array, ft: jax.Array, labels: jax.Array, temperature: float = 0.1
                   ) -> jax.Array:
  """The class-aware contrastive term of the reference (`NCELoss`, and CCL's `nce`):

  with unit rows u = fs/‖fs‖, v = ft/‖ft‖ and P = softmax_j((1 − ½‖u_i − v_j‖²) / τ) (row i),
  positives j of the same class as i, negatives of another class:
    ℓ_i = mean_{j pos} −log(P_ij + ε) + mean_{j neg} −log(1 − P_ij + ε),   L = mean_i ℓ_i.

  A row with no negative in the batch (all one class) gives 0/0 = NaN in the reference; here its
  negative mean is 0.
  """
  u = l2_normalize(_f32(fs))
  v = l2_normalize(_teacher(ft))
  dist = jnp.sum(jnp.square(u[:, None, :] - v[None, :, :]), axis=-1)
  p = jax.nn.softmax((1.0 - 0.5 * dist) / temperature, axis=-1)
  positive = (labels[:, None] == labels[None, :]).astype(jnp.float32)
  negative = 1.0 - positive
  pos_term = jnp.sum(-jnp.log(p + NCE_EPS) * positive, axis=-1) / jnp.sum(positive, axis=-1)
  neg_term = (jnp.sum(-jnp.log(1.0 - p + NCE_EPS) * negative, axis=-1)
              / jnp.maximum(jnp.sum(negative, axis=-1), 1.0))
  return jnp.mean(pos_term + neg_term)


def symmetric_kl(logit_s: jax.Array, logit_t: jax.Array, temperature: float = 1.0) -> jax.Array:
  """½ (DistillKL(s, t) + DistillKL(t, s)) (CCL's JSDLoss), both with T² / B.

  The teacher logits are a constant for the student in both directions.
  """
  t = _teacher(logit_t)
  return 0.5 * (distill_kl(logit_s, t, temperature) + _reverse_kl(logit_s, t, temperature))


def _reverse_kl(logit_s: jax.Array, logit_t: jax.Array, temperature: float) -> jax.Array:
  """T²/B Σ_i KL(softmax(s_i/T) ‖ softmax(t_i/T)), with the gradient reaching the student."""
  log_p_s = jax.nn.log_softmax(_f32(logit_s) / temperature, axis=-1)
  log_p_t = jax.nn.log_softmax(logit_t / temperature, axis=-1)
  kl = jnp.sum(jnp.exp(log_p_s) * (log_p_s - log_p_t), axis=-1)
  return temperature ** 2 * jnp.mean(kl)


def ccl_loss(fs: jax.Array, ft: jax.Array, labels: jax.Array, logit_s: jax.Array,
             logit_t: jax.Array) -> jax.Array:
  """The reference's CCL: class_nce_loss(τ = 0.1) + symmetric_kl(T = 1)."""
  return class_nce_loss(fs, ft, labels, 0.1) + symmetric_kl(logit_s, logit_t, 1.0)
