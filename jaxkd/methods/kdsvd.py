"""KD with singular value decomposition (KDSVD) as pure functions of NHWC feature maps.

Reference: Lee, Kim and Song, "Self-supervised Knowledge Distillation Using Singular Value
Decomposition", ECCV 2018; RepDistiller's `distiller_zoo/KDSVD.py` (`KDSVD(k=1)`). RepDistiller
passes the stage maps `feat[1:-1]` (f1..f3, post-ReLU) and trains on `sum(loss_group)`; its scripts
give no β for it. Student and teacher need equal channels at every tap (the reference's alignment
matmul fails otherwise).

What the reference computes, per tap i (X = the map as a [B, H·W, C] matrix, NHWC
`reshape(B, H·W, C)` = the reference's `view(B, C, HW).transpose`):

1. SVD X = U S Vᵀ. The teacher keeps its top k right singular vectors v_t [B, C, k] and values
   s_t; the student keeps its top k + 3 vectors. Non-finite entries are zeroed, and then the kept
   values and each kept vector are L2-normalised (torch F.normalize) — so for k = 1, s_t = 1.
2. `align_rsv`: for each teacher vector the student vector with the largest |cosine| is picked and
   multiplied by the sign of that cosine (the selection is a constant for the gradient).
3. Both vectors are scaled by s_t (`v * s_t`).
4. For each tap i > 0, with the previous tap's vectors:
   R[b, c, c', j] = exp(−(v_i[b, c, j] − v_{i−1}[b, c', j])² / 8)  (student and teacher alike),
   L_i = Σ (R_s − R_t)² / B (non-finite terms zeroed).
   So 3 taps give 2 losses (pairs (f1, f2) and (f2, f3)).

Signs. A singular vector is defined only up to its sign, and which sign a library returns depends
on the LAPACK / cuSOLVER build: for the post-ReLU golden maps torch (MKL gesdd) returned negative
top vectors for the tall and square matrices (H·W ≥ C: f1, f2) and positive ones for the wide
matrix (f3), whereas numpy (OpenBLAS) and jax on CPU return negative ones for all three. The
student's sign never matters (step 2 aligns it to the teacher), but the loss does depend on the
relative sign of the teacher's vectors at consecutive taps. `kdsvd_teacher_svd` therefore does not
keep the library's sign: it orients every teacher vector so that its entries sum to ≥ 0. For a
non-negative map the top right singular vector has entries of one sign (Perron–Frobenius), so
this is its non-negative version, the same on every backend. The loss stays a valid distillation
target under any fixed choice of teacher signs: flipping v_t at a tap flips the student's aligned
vector with it, so the loss is still 0 exactly when the student's aligned vectors equal the
teacher's, and flipping all taps of a sample together changes nothing. Its scale does change: on
the golden maps the reference's signs give 0.1247 and the non-negative orientation 0.0099. The
`teacher_signs` argument multiplies the oriented vectors, e.g. (−1, −1, +1) reproduces the
reference's MKL run on those tall, square, wide taps.

Gradients flow through the student's SVD with a NaN-free rule (`svd_right`): pairs of singular
values that are equal to float32 precision (e.g. an all-zero sample, or equal activations) and zero
singular values contribute no gradient instead of 0·∞.

Reproduces the reference's numbers (tests/data/golden_baselines.npz, prefix `kdsvd`) once the
teacher signs are matched to the reference's.
"""

from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
from jaxkd.errors import UserError
from jaxkd.methods.base import Method
from jaxkd.methods.numerics import l2_normalize
from jaxkd.methods.objective import (STAGE_MAPS, WEIGHTS, distillation_objective, equal_channels,
                                     taps)

RBF_SCALE = 8.0   # the reference's exp(−d² / 8)

Sign = Union[float, jax.Array]


def _swap(x: jax.Array) -> jax.Array:
  return jnp.swapaxes(x, -1, -2)


def _finite(x: jax.Array) -> jax.Array:
  """x with its non-finite entries set to 0 (the reference's `removenan`)."""
  return jnp.where(jnp.isfinite(x), x, 0.0)


@jax.custom_jvp
def svd_right(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Singular values s [..., K] (descending) and right singular vectors V [..., n, K] (columns) of
  x [..., m, n], K = min(m, n): x = U diag(s) Vᵀ (`jnp.linalg.svd`, reduced).

  Its derivative is the usual one (dP = Uᵀ dx V, ds = diag dP,
  dV = V (F ∘ (S dP + dPᵀ S)) [+ (I − V Vᵀ) dxᵀ U S⁻¹ when n > m], F_ij = 1 / (s_j² − s_i²)),
  except that F_ij is set to 0 where |s_j² − s_i²| ≤ K·ε·s_max² and 1/s_j to 0 where
  s_j ≤ max(m, n)·ε·s_max (ε the float32 epsilon). Such values are equal (or zero) to the
  precision of the decomposition, their vectors are not determined individually, and jax's own
  rule would multiply a zero cotangent by ∞ there and return NaN.
  """
  _, s, vt = jnp.linalg.svd(x, full_matrices=False)
  return s, _swap(vt)


@svd_right.defjvp
def _svd_right_jvp(primals, tangents):
  x, = primals
  dx, = tangents
  u, s, vt = jnp.linalg.svd(x, full_matrices=False)
  v = _swap(vt)
  m, n = x.shape[-2:]
  k = s.shape[-1]
  eps = jnp.finfo(s.dtype).eps
  s_max = jnp.max(s, axis=-1, keepdims=True)[..., None]   # [..., 1, 1]

  dp = _swap(u) @ dx @ v   # [..., K, K]
  ds = jnp.diagonal(dp, axis1=-2, axis2=-1)

  s_sq = jnp.square(s)
  gap = s_sq[..., None, :] - s_sq[..., :, None]   # [i, j] = s_j² − s_i²
  resolved = jnp.abs(gap) > k * eps * jnp.square(s_max)
  f = jnp.where(resolved, 1.0 / jnp.where(resolved, gap, 1.0), 0.0)
  s_dp = s[..., :, None] * dp   # s_i dP_ij
  dv = v @ (f * (s_dp + _swap(s_dp)))
  if n > m:
    nonzero = s[..., None, :] > max(m, n) * eps * s_max
    s_inv = jnp.where(nonzero, 1.0 / jnp.where(nonzero, s[..., None, :], 1.0), 0.0)
    dxt_u = _swap(dx) @ u
    dv = dv + (dxt_u - v @ (vt @ dxt_u)) * s_inv
  return (s, v), (ds, dv)


def top_right_singular(f: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
  """The reference's `svd(feat, n)` without U, on an NHWC map [B, H, W, C]:

  X = f as [B, H·W, C];  X = U S Vᵀ;  s = normalize(s[:, :n]) [B, n'],
  v = normalize(V[:, :, :n]) per column [B, C, n'],  n' = min(n, H·W, C),

  non-finite entries zeroed before normalising. The sign of each vector is the library's.
  """
  f = f.astype(jnp.float32)
  b, height, width, c = f.shape
  s, v = svd_right(f.reshape(b, height * width, c))
  s, v = _finite(s), _finite(v)
  if n > 0:
    s = l2_normalize(s[:, :n], axis=1)
    v = l2_normalize(v[:, :, :n], axis=1)
  return s, v


def _sign_array(sign: Sign) -> jax.Array:
  """A sign given as a scalar, [B] or [B, k], shaped to multiply v [B, C, k]."""
  sign = jnp.asarray(sign, jnp.float32)
  if sign.ndim == 1:
    return sign[:, None, None]
  if sign.ndim == 2:
    return sign[:, None, :]
  return sign


def kdsvd_teacher_svd(f_t: jax.Array, k: int = 1, sign: Optional[Sign] = None
                      ) -> tuple[jax.Array, jax.Array]:
  """The teacher side of KDSVD at one tap: (s_t [B, k], v_t [B, C, k]) of `top_right_singular`,
  each vector oriented so that Σ_c v_t[b, c, j] ≥ 0 and then multiplied by `sign` (scalar, [B] or
  [B, k]; None = +1). A constant for the student (no gradient)."""
  s, v = top_right_singular(jax.lax.stop_gradient(f_t), k)
  v = v * jnp.where(jnp.sum(v, axis=1, keepdims=True) < 0, -1.0, 1.0)
  if sign is not None:
    v = v * _sign_array(sign)
  return s, v


def align_rsv(v_s: jax.Array, v_t: jax.Array) -> jax.Array:
  """The reference's `align_rsv`: for each teacher vector v_t[:, :, j], the student vector with the
  largest |cosine| to it, times the sign of that cosine; [B, C, k].

  The selection (which vector, which sign) carries no gradient, as in the reference.
  """
  cosine = _swap(v_s) @ v_t   # [B, n_s, k]
  best = jnp.max(jnp.abs(cosine), axis=1, keepdims=True)
  mask = jax.lax.stop_gradient(jnp.where(jnp.abs(cosine) == best, jnp.sign(cosine), 0.0))
  return v_s @ mask


def kdsvd_tap_vectors(f_s: jax.Array, f_t: jax.Array, k: int = 1,
                      teacher_sign: Optional[Sign] = None
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(v_s aligned [B, C, k], v_t [B, C, k], s_t [B, k]) at one tap, before the `* s_t` scaling:
  the teacher's top k vectors (`kdsvd_teacher_svd`) and the student's best match among its top
  k + 3 (`align_rsv`)."""
  if f_s.shape[-1] != f_t.shape[-1]:
    raise ValueError(f"KDSVD needs equal student and teacher channels at every tap; got "
                     f"{f_s.shape[-1]} student and {f_t.shape[-1]} teacher channels")
  s_t, v_t = kdsvd_teacher_svd(f_t, k, teacher_sign)
  _, v_s = top_right_singular(f_s, k + 3)
  return align_rsv(v_s, v_t), v_t, s_t


def _relations(v: jax.Array, v_prev: jax.Array) -> jax.Array:
  """R[b, c, c', j] = exp(−(v[b, c, j] − v_prev[b, c', j])² / 8)."""
  return jnp.exp(-jnp.square(v[:, :, None, :] - v_prev[:, None, :, :]) / RBF_SCALE)


def kdsvd_loss(feats_s: Sequence[jax.Array], feats_t: Sequence[jax.Array], k: int = 1,
               teacher_signs: Optional[Sequence[Optional[Sign]]] = None
               ) -> tuple[jax.Array, list[jax.Array]]:
  """RepDistiller's `KDSVD(k)` over paired lists of maps (feat[1:-1] in the reference).

  With v_s, v_t, s_t from `kdsvd_tap_vectors` scaled by s_t, for each tap i ≥ 1:
  L_i = Σ_{b, c, c', j} (R_s,i − R_t,i)² / B, R_i = exp(−(v_i[c] − v_{i−1}[c'])² / 8) (see
  `_relations`), non-finite terms zeroed. Returns (Σ_i L_i, [L_1, …]) — one entry fewer than taps.

  `teacher_signs[i]` (scalar, [B] or [B, k]) multiplies the teacher's oriented vectors at tap i;
  see the module docstring for the sign convention.
  """
  if len(feats_s) != len(feats_t):
    raise ValueError(f"kdsvd_loss: {len(feats_s)} student maps but {len(feats_t)} teacher maps")
  if teacher_signs is None:
    teacher_signs = [None] * len(feats_t)
  group = []
  v_s_prev = v_t_prev = None
  for i, (f_s, f_t) in enumerate(zip(feats_s, feats_t)):
    v_s, v_t, s_t = kdsvd_tap_vectors(f_s, f_t, k, teacher_signs[i])
    v_s = v_s * s_t[:, None, :]
    v_t = v_t * s_t[:, None, :]
    if i > 0:
      diff = _relations(v_s, v_s_prev) - jax.lax.stop_gradient(_relations(v_t, v_t_prev))
      sq = _finite(jnp.square(diff))
      group.append(jnp.sum(sq) / f_s.shape[0])
    v_s_prev, v_t_prev = v_s, v_t
  if not group:
    return jnp.zeros((), jnp.float32), group
  return sum(group[1:], group[0]), group


def kdsvd_term(student_out, teacher_out, hparams):
  """KDSVD over the stage maps f1..f3 (RepDistiller's feat[1:-1]), jaxkd's teacher signs."""
  total, group = kdsvd_loss(taps(student_out)[1:-1], taps(teacher_out)[1:-1], hparams.k)
  return total, {f"loss_kdsvd_{i}": value for i, value in enumerate(group)}


def check_mesh(mesh: Any) -> None:
  """Refuses several CPU devices: XLA:CPU runs their batched LAPACK SVDs at once, and the
  step then never returns (seen with simulated devices); one CPU device runs it."""
  devices = list(mesh.devices.flat)
  if len(devices) > 1 and devices[0].platform == "cpu":
    raise UserError(
        f"method kdsvd cannot run on {len(devices)} CPU devices (their concurrent SVDs hang "
        "XLA:CPU); run it on one CPU device (XLA_FLAGS=--xla_force_host_platform_device_count=1)"
        " or on GPUs/TPUs")


# RepDistiller's scripts give KDSVD no weight; 1.0 is mdistiller's (KDSVD.LOSS.FEAT_WEIGHT).
METHOD = Method(name="kdsvd", loss=distillation_objective("kdsvd", kdsvd_term),
                defaults=dict(WEIGHTS, feat_weight=1.0, k=1),
                check_pair=equal_channels("KDSVD", lambda channels: channels[1:-1]),
                check_mesh=check_mesh, taps=STAGE_MAPS)
