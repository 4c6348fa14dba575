"""jaxkd.methods.numerics: torch's F.normalize, x / max(‖x‖₂, 1e-12), with a finite gradient at
an all-zero vector; and the losses that normalise embeddings (SSKD's cosine matrix, SimCLR's
NT-Xent) stay finite in value and gradient when a row is all zeros."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd.methods import simclr, sskd
from jaxkd.methods.numerics import NORMALIZE_EPS, l2_normalize, safe_norm


def _formula(x: np.ndarray, axis: int = -1) -> np.ndarray:
  x = x.astype(np.float64)
  return x / np.maximum(np.sqrt(np.sum(x * x, axis=axis, keepdims=True)), 1e-12)


def test_eps_is_torchs():
  assert NORMALIZE_EPS == 1e-12


def test_values_follow_the_formula_on_random_and_near_zero_rows():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(6, 5)).astype(np.float32)
  x[1] *= 1e-6     # small, above the floor
  x[2] *= 1e-14    # norm below 1e-12: divided by the floor, not by the norm
  x[3] = 0.0
  np.testing.assert_allclose(np.asarray(l2_normalize(jnp.asarray(x))), _formula(x),
                             rtol=1e-6, atol=1e-30)
  np.testing.assert_allclose(np.asarray(l2_normalize(jnp.asarray(x), axis=0)), _formula(x, 0),
                             rtol=1e-6, atol=1e-30)
  np.testing.assert_allclose(np.asarray(safe_norm(jnp.asarray(x))),
                             np.linalg.norm(x.astype(np.float64), axis=-1, keepdims=True),
                             rtol=1e-6)
  # A unit-norm row for every row above the floor.
  norms = np.linalg.norm(np.asarray(l2_normalize(jnp.asarray(x))), axis=-1)
  np.testing.assert_allclose(norms[[0, 1, 4, 5]], 1.0, rtol=1e-6)


def test_gradient_is_finite_at_a_zero_row():
  x = jnp.zeros((3, 4)).at[0].set(jnp.arange(1.0, 5.0))
  w = jnp.asarray(np.random.default_rng(1).normal(size=(3, 4)), jnp.float32)
  grad = jax.grad(lambda v: jnp.sum(l2_normalize(v) * w))(x)
  assert np.all(np.isfinite(np.asarray(grad)))
  # At a zero row the norm is floored, so x / 1e12 is linear there: its gradient is w / 1e12
  # (torch's too), and the norm contributes 0, not NaN.
  np.testing.assert_allclose(np.asarray(grad[1:]), np.asarray(w[1:]) / NORMALIZE_EPS, rtol=1e-6)
  grad_norm = jax.grad(lambda v: jnp.sum(safe_norm(v)))(x)
  np.testing.assert_array_equal(np.asarray(grad_norm[1:]), 0.0)
  np.testing.assert_allclose(np.asarray(grad_norm[0]), np.arange(1.0, 5.0) / np.sqrt(30.0),
                             rtol=1e-6)


def test_sskd_loss_has_finite_gradients_with_a_zero_embedding():
  rng = np.random.default_rng(2)
  b, v, c, d = 3, sskd.NUM_VIEWS, 5, 4
  s_logits = jnp.asarray(rng.normal(size=(v * b, c)), jnp.float32)
  t_logits = jnp.asarray(rng.normal(size=(v * b, c)), jnp.float32)
  s_rep = jnp.asarray(rng.normal(size=(v * b, d)), jnp.float32).at[0].set(0.0).at[5].set(0.0)
  t_rep = jnp.asarray(rng.normal(size=(v * b, d)), jnp.float32).at[1].set(0.0)
  labels = jnp.asarray([0, 3, 1], jnp.int32)
  hp = dict(sskd.METHOD.defaults)

  def total(logits, rep):
    return sskd.sskd_loss(logits, t_logits, rep, t_rep, labels, hp).total

  loss, grads = jax.value_and_grad(total, argnums=(0, 1))(s_logits, s_rep)
  assert np.isfinite(float(loss))
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g)))
  pre_loss, pre_grad = jax.value_and_grad(lambda r: sskd.ss_pretrain_loss(r)[0])(s_rep)
  assert np.isfinite(float(pre_loss)) and np.all(np.isfinite(np.asarray(pre_grad)))


def test_simclr_loss_has_finite_gradients_with_a_zero_embedding():
  rng = np.random.default_rng(3)
  z_a = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32).at[2].set(0.0)
  z_b = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32).at[0].set(0.0)
  temperature = simclr.METHOD.defaults["temperature"]
  loss, grads = jax.value_and_grad(lambda a, b: simclr.nt_xent(a, b, temperature)[0],
                                   argnums=(0, 1))(z_a, z_b)
  assert np.isfinite(float(loss))
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g)))
