"""Numerics the methods share: torch's `F.normalize` and the norms under it.

PyTorch distillation code normalises with `F.normalize(x, p=2, dim=d)`, which computes

  x / max(‖x‖₂, ε),  ε = 1e-12,

and whose autograd gives a zero (not NaN) gradient through the norm of an all-zero vector. The
functions here compute the same, with the same finite gradient at a zero vector ("the zero-row
guard"), so every method that normalises reads its ε and its guard from one place.
"""

import jax
import jax.numpy as jnp

# torch F.normalize's floor of a vector's norm (its default `eps`).
NORMALIZE_EPS = 1e-12


def safe_norm(x: jax.Array, axis: int = -1, keepdims: bool = True) -> jax.Array:
  """‖x‖₂ along `axis`, with gradient 0 (not NaN) where the vector is all zeros.

  sqrt has an infinite derivative at 0; the inner `where` keeps it out of the gradient.
  """
  sq = jnp.sum(jnp.square(x), axis=axis, keepdims=keepdims)
  positive = sq > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = NORMALIZE_EPS) -> jax.Array:
  """x / max(‖x‖₂, eps) along `axis` (torch `F.normalize(x, dim=axis, eps=eps)`), finite in
  value and gradient at a zero vector."""
  return x / jnp.maximum(safe_norm(x, axis=axis, keepdims=True), eps)
