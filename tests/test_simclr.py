"""SimCLR's NT-Xent loss against hand-computed numbers, its head and its pretrain description."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxkd.methods import simclr

# Two views of B = 2 images in 2-d; temperature 0.5.
Z_A = np.array([[1.0, 0.0], [0.0, 2.0]], np.float32)
Z_B = np.array([[3.0, 4.0], [-1.0, 1.0]], np.float32)
TAU = 0.5


def _hand_computed():
  """Row by row, with the cosines written out: u = [z_a; z_b] normalised.

  u0 = (1, 0), u1 = (0, 1), u2 = (0.6, 0.8), u3 = (−1/√2, 1/√2); positives 0↔2, 1↔3.
  Per row −log(e^{s_pos} / Σ_{j≠i} e^{s_ij}) with s = cos/0.5: 0.3180, 0.8950, 1.0618, 0.3233.
  """
  r = 1 / math.sqrt(2)
  cos = {(0, 1): 0.0, (0, 2): 0.6, (0, 3): -r, (1, 2): 0.8, (1, 3): r, (2, 3): -0.6 * r + 0.8 * r}
  cos.update({(j, i): c for (i, j), c in list(cos.items())})
  positive = {0: 2, 1: 3, 2: 0, 3: 1}
  losses = []
  for i in range(4):
    denominator = sum(math.exp(cos[i, j] / TAU) for j in range(4) if j != i)
    losses.append(-math.log(math.exp(cos[i, positive[i]] / TAU) / denominator))
  return sum(losses) / 4


def test_nt_xent_matches_hand_computed_example():
  loss, correct = simclr.nt_xent(Z_A, Z_B, TAU)
  np.testing.assert_allclose(loss, _hand_computed(), rtol=1e-6)
  assert _hand_computed() == pytest.approx(0.64952, abs=1e-5)  # The number itself, once.
  # Most similar other row: 0 → 2 (0.6), 1 → 2 (0.8, not its positive 3), 2 → 1, 3 → 1.
  np.testing.assert_array_equal(correct, [1.0, 0.0, 0.0, 1.0])


def test_nt_xent_is_scale_invariant_and_symmetric_in_views():
  loss = simclr.nt_xent(Z_A, Z_B, TAU)[0]
  np.testing.assert_allclose(simclr.nt_xent(3 * Z_A, 0.5 * Z_B, TAU)[0], loss, rtol=1e-6)
  np.testing.assert_allclose(simclr.nt_xent(Z_B, Z_A, TAU)[0], loss, rtol=1e-6)


def test_nt_xent_gradient_is_finite_and_pulls_positives_together():
  rng = np.random.default_rng(0)
  z_a = rng.normal(size=(8, 16)).astype(np.float32)
  z_b = z_a + 0.3 * rng.normal(size=(8, 16)).astype(np.float32)
  loss_fn = jax.jit(lambda a: simclr.nt_xent(a, z_b, 0.2)[0])
  grad = jax.jit(jax.grad(loss_fn))(z_a)
  assert np.all(np.isfinite(grad))
  assert loss_fn(z_a - 0.5 * grad) < loss_fn(z_a)


def test_simclr_loss_reads_interleaved_two_crop_rows():
  """Row 2i + k = image i, view k: the Method loss equals nt_xent on the de-interleaved views."""
  z = np.stack([Z_A, Z_B], axis=1).reshape(4, 2)
  hparams = simclr.METHOD.hparams(ml_collections.ConfigDict({"temperature": TAU}))
  loss, metrics = simclr.simclr_loss({"projection": z}, None, jnp.zeros((2,), jnp.int32),
                                     hparams)
  np.testing.assert_allclose(loss, _hand_computed(), rtol=1e-6)
  np.testing.assert_allclose(metrics["contrastive_acc"], 0.5)


def test_projection_head_and_pretrain_description():
  method = simclr.METHOD
  assert method.views == "two_crops" and not method.uses_teacher
  hparams = method.hparams()
  assert hparams.temperature == 0.5 and hparams.proj_dim == 128
  head = method.student_heads(100, hparams)
  feats = {"pooled": np.ones((4, 24), np.float32)}
  variables = jax.eval_shape(head.init, jax.random.key(0), {"feats": feats})
  shapes = jax.tree.map(jnp.shape, variables["params"])
  assert shapes == {"fc1": {"kernel": (24, 24), "bias": (24,)},
                    "fc2": {"kernel": (24, 128), "bias": (128,)}}
  out = jax.eval_shape(head.apply, variables, {"feats": feats, "logits": np.zeros((4, 3))})
  assert set(out) == {"projection"} and out["projection"].shape == (4, 128)
