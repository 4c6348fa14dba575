"""RepDistiller's parameter-free feature losses (AT, SP, NST, KDSVD, FSP, RKD, PKT) against the
reference's numbers (tests/data/golden_baselines.npz): the loss, its per-tap entries and the
gradients w.r.t. every student input, with the teacher inputs a constant."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd.errors import UserError
from jaxkd.methods import embedding_losses as el
from jaxkd.methods.at import at_loss, attention_map
from jaxkd.methods.connectors import adaptive_avg_pool2d
from jaxkd.methods import get_method
from jaxkd.methods.fsp import fsp_loss, fsp_matrix
from jaxkd.methods.objective import unequal_channels
from jaxkd.methods.kdsvd import (kdsvd_loss, kdsvd_tap_vectors, kdsvd_teacher_svd, svd_right,
                                 top_right_singular)
from jaxkd.methods.nst import nst_loss
from jaxkd.methods.sp import sp_loss

GOLDEN = np.load(os.path.join(os.path.dirname(__file__), "data", "golden_baselines.npz"))

SMALL_LOSSES = ("at", "atx", "sp", "spx", "pkt", "pktx")   # < 0.11: rtol decides
SMALL_GRADS = ("sp", "spx", "pkt", "pktx")   # ≤ 5e-4: also relative to max|ref|


def _nhwc(a: np.ndarray) -> jax.Array:
  return jnp.asarray(np.transpose(a, (0, 2, 3, 1)))


def _nchw(a: jax.Array) -> np.ndarray:
  return np.transpose(np.asarray(a), (0, 3, 1, 2))


def _feats(prefix: str, side: str) -> list[jax.Array]:
  out = []
  while f"{prefix}_feat_{side}.{len(out)}" in GOLDEN:
    out.append(_nhwc(GOLDEN[f"{prefix}_feat_{side}.{len(out)}"]))
  return out


def _group(prefix: str) -> list[np.ndarray]:
  out = []
  while f"{prefix}_loss_group.{len(out)}" in GOLDEN:
    out.append(GOLDEN[f"{prefix}_loss_group.{len(out)}"])
  return out


def _check_loss(prefix: str, value, reference) -> None:
  rtol = 5e-5 if prefix.startswith("pkt") else 1e-5
  atol = 1e-8 if prefix in SMALL_LOSSES else 1e-5
  np.testing.assert_allclose(np.asarray(value), reference, rtol=rtol, atol=atol)


def _check_grad(prefix: str, grad: np.ndarray, reference: np.ndarray) -> None:
  assert np.all(np.isfinite(grad))
  np.testing.assert_allclose(grad, reference, rtol=1e-4, atol=1e-6)
  if prefix in SMALL_GRADS:
    assert np.max(np.abs(grad - reference)) <= 1e-3 * np.max(np.abs(reference))


def _sp_group(feats_s, feats_t):
  group = [sp_loss(s, t) for s, t in zip(feats_s, feats_t)]
  return sum(group[1:], group[0]), group


LIST_LOSSES = {
    "at": lambda p: lambda fs, ft: at_loss(fs, ft, float(GOLDEN[f"{p}_hp_p"])),
    "atx": lambda p: lambda fs, ft: at_loss(fs, ft, float(GOLDEN[f"{p}_hp_p"])),
    "sp": lambda p: _sp_group,
    "spx": lambda p: _sp_group,
    "nst": lambda p: nst_loss,
    "nstx": lambda p: nst_loss,
    "fsp": lambda p: fsp_loss,
}


def _check_list_loss(prefix, fn, feats_s, feats_t):
  (value, group), (grad_s, grad_t) = jax.jit(jax.value_and_grad(
      fn, argnums=(0, 1), has_aux=True))(feats_s, feats_t)
  _check_loss(prefix, value, GOLDEN[f"{prefix}_loss"])
  reference_group = _group(prefix)
  assert len(group) == len(reference_group)
  for entry, reference in zip(group, reference_group):
    _check_loss(prefix, entry, reference)
  for i, g in enumerate(grad_s):
    _check_grad(prefix, _nchw(g), GOLDEN[f"{prefix}_grad_feat_s.{i}"])
  # The teacher maps are a constant for the student.
  for g in grad_t:
    assert np.all(np.asarray(g) == 0)


@pytest.mark.parametrize("prefix", sorted(LIST_LOSSES))
def test_feature_loss_matches_the_reference(prefix):
  _check_list_loss(prefix, LIST_LOSSES[prefix](prefix), _feats(prefix, "s"), _feats(prefix, "t"))


@pytest.mark.parametrize("prefix", ["rkd", "rkdx", "pkt", "pktx"])
def test_embedding_loss_matches_the_reference(prefix):
  if prefix.startswith("rkd"):
    fn = lambda fs, ft: el.rkd_loss(fs, ft, float(GOLDEN[f"{prefix}_hp_w_d"]),  # noqa: E731
                                    float(GOLDEN[f"{prefix}_hp_w_a"]))
  else:
    fn = el.pkt_loss
  f_s, f_t = jnp.asarray(GOLDEN[f"{prefix}_f_s"]), jnp.asarray(GOLDEN[f"{prefix}_f_t"])
  value, (grad_s, grad_t) = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(f_s, f_t)
  _check_loss(prefix, value, GOLDEN[f"{prefix}_loss"])
  # RKD's angle term has the degenerate i = j difference vectors: zero gradient there, not NaN.
  _check_grad(prefix, np.asarray(grad_s), GOLDEN[f"{prefix}_grad_f_s"])
  assert np.all(np.asarray(grad_t) == 0)


def _reference_teacher_signs(feats_t, k):
  """Per tap, the sign [B, k] that turns jaxkd's oriented v_t into the reference's v_t."""
  signs = []
  for i, f_t in enumerate(feats_t):
    s_t, v_t = jax.jit(kdsvd_teacher_svd, static_argnums=1)(f_t, k)
    reference = GOLDEN[f"kdsvd_svd_v_t.{i}"]
    dots = np.sum(np.asarray(v_t) * reference, axis=1)   # [B, k]
    np.testing.assert_allclose(np.abs(dots), 1.0, atol=1e-5)
    np.testing.assert_allclose(s_t, GOLDEN[f"kdsvd_svd_s_t.{i}"], rtol=1e-6)
    signs.append(np.sign(dots))
  return signs


def test_kdsvd_matches_the_reference_with_its_teacher_signs():
  k = int(GOLDEN["kdsvd_hp_k"])
  feats_s, feats_t = _feats("kdsvd", "s"), _feats("kdsvd", "t")
  signs = _reference_teacher_signs(feats_t, k)
  # jaxkd orients the teacher vectors non-negative; the reference's torch build returned negative
  # vectors for the tall matrices (f1, f2: H·W ≥ C) and positive ones for the wide one (f3).
  assert [np.unique(s).tolist() for s in signs] == [[-1.0], [-1.0], [1.0]]
  for i, (f_s, f_t) in enumerate(zip(feats_s, feats_t)):
    v_s, v_t, _ = jax.jit(kdsvd_tap_vectors, static_argnums=2)(f_s, f_t, k,
                                                              jnp.asarray(signs[i]))
    np.testing.assert_allclose(v_t, GOLDEN[f"kdsvd_svd_v_t.{i}"], atol=1e-5)
    np.testing.assert_allclose(v_s, GOLDEN[f"kdsvd_svd_v_s_aligned.{i}"], atol=1e-5)
  signs = [jnp.asarray(s) for s in signs]
  _check_list_loss("kdsvd", lambda fs, ft: kdsvd_loss(fs, ft, k, signs), feats_s, feats_t)


def test_kdsvd_sign_conventions():
  """Flipping every teacher tap of a sample together, or the student's maps, changes nothing;
  flipping one tap changes the loss (the relative sign of consecutive taps is part of it)."""
  k = int(GOLDEN["kdsvd_hp_k"])
  feats_s, feats_t = _feats("kdsvd", "s"), _feats("kdsvd", "t")
  loss = jax.jit(lambda fs, ft, signs: kdsvd_loss(fs, ft, k, signs)[0])
  ones = [jnp.ones((8,))] * 3
  base = loss(feats_s, feats_t, ones)
  flip_sample = jnp.ones((8,)).at[3].set(-1.0)
  np.testing.assert_allclose(loss(feats_s, feats_t, [flip_sample] * 3), base, rtol=1e-6)
  np.testing.assert_allclose(loss([-f for f in feats_s], feats_t, ones), base, rtol=1e-6)
  assert abs(float(loss(feats_s, feats_t, [ones[0], ones[1], flip_sample])) - float(base)) > 1e-4
  # The oriented teacher vectors are non-negative for these post-ReLU maps, on any backend.
  teacher_svd = jax.jit(kdsvd_teacher_svd, static_argnums=1)
  for f_t in feats_t:
    assert np.all(np.asarray(teacher_svd(f_t, k)[1]) >= -1e-6)


@pytest.mark.parametrize("shape", [(3, 7, 4), (3, 4, 7), (2, 5, 5)])
def test_svd_right_derivative_is_the_usual_one(shape):
  """On well-separated singular values the NaN-free rule equals jax's own SVD derivative."""
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  dx = jax.random.normal(jax.random.PRNGKey(1), shape)

  def reference(a):
    _, s, vt = jnp.linalg.svd(a, full_matrices=False)
    return s, jnp.swapaxes(vt, -1, -2)

  (s, v), (ds, dv) = jax.jvp(svd_right, (x,), (dx,))
  (s_ref, v_ref), (ds_ref, dv_ref) = jax.jvp(reference, (x,), (dx,))
  np.testing.assert_allclose(s, s_ref, rtol=1e-6)
  np.testing.assert_allclose(v, v_ref, atol=1e-6)
  np.testing.assert_allclose(ds, ds_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dv, dv_ref, rtol=1e-4, atol=1e-4)


def _degenerate_map(rng, hw, c):
  """Post-ReLU maps where sample 1 is all zero, and sample 2 is one-hot per position with equal
  entries (all its singular values but the first are exactly equal)."""
  f = np.maximum(rng.normal(0.5, 1.0, (4, hw, hw, c)), 0.0).astype(np.float32)
  f[1] = 0.0
  x = np.zeros((hw * hw, c), np.float32)
  x[np.arange(min(hw * hw, c)), np.arange(min(hw * hw, c))] = 1.0
  x[0, 0] = 2.0
  f[2] = x.reshape(hw, hw, c)
  return jnp.asarray(f)


def test_kdsvd_gradients_stay_finite_on_degenerate_maps():
  """Zero and exactly equal singular values (where jax's own SVD derivative gives 0·∞ = NaN):
  the loss and the gradient through the student's SVD are finite, for tall and wide matrices."""
  rng = np.random.default_rng(0)
  shapes = [(4, 8), (2, 16)]   # H·W = 16 ≥ C = 8; H·W = 4 < C = 16
  feats_s = [_degenerate_map(rng, hw, c) for hw, c in shapes]
  feats_t = [jnp.asarray(np.maximum(rng.normal(0.5, 1.0, f.shape), 0.0).astype(np.float32))
             for f in feats_s]
  value, grads = jax.jit(jax.value_and_grad(lambda fs: kdsvd_loss(fs, feats_t)[0]))(feats_s)
  assert np.isfinite(float(value))
  assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
  assert np.all(np.isfinite(np.asarray(jax.jit(top_right_singular, static_argnums=1)(
      feats_s[1], 4)[1])))


def test_fsp_and_kdsvd_refuse_unequal_channels():
  # wrn_40_2 → wrn_40_1 taps f0..f3: RepDistiller lists FSP as N/A for this pair.
  problem = unequal_channels("FSP", [16, 32, 64, 128], [16, 16, 32, 64])
  assert "tap 1" in problem and "32 student" in problem and "16 teacher" in problem
  assert "taps" in unequal_channels("FSP", [16, 32], [16, 32, 64])
  assert unequal_channels("FSP", [32, 64, 128, 256], [32, 64, 128, 256]) is None
  with pytest.raises(UserError, match="wrn_40_2 -> student wrn_40_1: FSP.*tap 1"):
    get_method("fsp").check_pair("wrn_40_2", "wrn_40_1", 100)
  get_method("fsp").check_pair("resnet32x4", "resnet8x4", 100)
  with pytest.raises(UserError, match="KDSVD"):
    get_method("kdsvd").check_pair("wrn_40_2", "wrn_40_1", 100)
  feats = [jnp.ones((2, 4, 4, 3)), jnp.ones((2, 2, 2, 5))]
  with pytest.raises(ValueError):
    fsp_loss(feats, [jnp.ones((2, 4, 4, 3)), jnp.ones((2, 2, 2, 6))])
  with pytest.raises(ValueError):
    kdsvd_loss(feats, [jnp.ones((2, 4, 4, 3)), jnp.ones((2, 2, 2, 6))])


def test_fsp_matrix_and_attention_map_on_small_examples():
  top = jnp.arange(8.0).reshape(1, 2, 2, 2)
  bottom = jnp.arange(16.0).reshape(1, 4, 4, 1)   # pooled 2×2 → [[2.5, 4.5], [10.5, 12.5]]
  pooled = np.array([2.5, 4.5, 10.5, 12.5])
  expected = np.stack([np.arange(0, 8, 2) @ pooled, np.arange(1, 8, 2) @ pooled]) / 4
  np.testing.assert_allclose(fsp_matrix(top, bottom)[0, :, 0], expected, rtol=1e-6)
  # Attention: mean over channels of f², L2-normalised over the positions.
  a = attention_map(top)[0]
  q = np.mean(np.arange(8.0).reshape(4, 2) ** 2, axis=1)
  np.testing.assert_allclose(a, q / np.linalg.norm(q), rtol=1e-6)


def test_adaptive_avg_pool2d_uses_torchs_windows():
  """Window i covers floor(i·n/m) … ceil((i+1)·n/m) − 1, overlapping when m does not divide n."""
  x = jnp.arange(2 * 5 * 7 * 3, dtype=jnp.float32).reshape(2, 5, 7, 3)
  y = adaptive_avg_pool2d(x, (3, 4))
  xn = np.asarray(x)
  for i in range(3):
    for j in range(4):
      h0, h1 = (i * 5) // 3, -(-(i + 1) * 5 // 3)
      w0, w1 = (j * 7) // 4, -(-(j + 1) * 7 // 4)
      np.testing.assert_allclose(y[:, i, j], xn[:, h0:h1, w0:w1].mean(axis=(1, 2)), rtol=1e-6)
