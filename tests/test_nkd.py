"""NKD (jaxkd.methods.nkd) against the reference's numbers (tests/data/golden_modern.npz:
cls_KD's `NKDLoss(temp=3.0, gamma=3.5)` with hard labels, prefix nkd, and with mixup-style score
rows, prefix nkd_soft)."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxkd.errors import UserError
from jaxkd.methods import get_method, nkd
from jaxkd.methods.losses import cross_entropy

from modern_golden import GOLDEN, assert_grad_close


LOSS_TOL = dict(rtol=1e-5, atol=1e-8)
PREFIXES = ["nkd", "nkd_soft"]


def _inputs(p):
  g = GOLDEN
  labels = g[f"{p}_gt_label"]
  labels = labels.astype(np.int32) if labels.ndim == 1 else labels
  return jnp.asarray(g[f"{p}_logit_s"]), jnp.asarray(g[f"{p}_logit_t"]), jnp.asarray(labels)


def _hp(p):
  return float(GOLDEN[f"{p}_hp_temp"]), float(GOLDEN[f"{p}_hp_gamma"])


@pytest.mark.parametrize("p", PREFIXES)
def test_loss_terms_and_gradient_match_the_reference(p):
  s, t, y = _inputs(p)
  temperature, gamma = _hp(p)

  @jax.jit
  def run(a, b):
    loss, grads = jax.value_and_grad(
        lambda x, z: nkd.nkd_loss(x, z, y, temperature, gamma), argnums=(0, 1))(a, b)
    return (loss, grads, nkd.nkd_target_term(a, b, y),
            nkd.nkd_non_target_term(a, b, y, temperature, gamma))

  loss, (grad_s, grad_t), target, non_target = run(s, t)
  np.testing.assert_allclose(loss, GOLDEN[f"{p}_loss"], **LOSS_TOL)
  np.testing.assert_allclose(loss, GOLDEN[f"{p}_loss_f64"], rtol=1e-5)
  np.testing.assert_allclose(target, GOLDEN[f"{p}_loss_t"], **LOSS_TOL)
  np.testing.assert_allclose(target, GOLDEN[f"{p}_loss_t_f64"], rtol=1e-5)
  np.testing.assert_allclose(non_target, GOLDEN[f"{p}_loss_non"], **LOSS_TOL)
  np.testing.assert_allclose(non_target, GOLDEN[f"{p}_loss_non_f64"], rtol=1e-5)
  assert_grad_close(grad_s, GOLDEN[f"{p}_grad_logit_s"])
  # The teacher is a constant in both terms.
  assert np.all(np.asarray(grad_t) == 0)


@pytest.mark.parametrize("p", PREFIXES)
def test_objective_adds_the_heads_cross_entropy(p):
  """ClassificationDistiller: the head's CE (weight 1) + L_NKD; labels as the trainer gives
  them (class indices)."""
  s, t, y = _inputs(p)
  temperature, gamma = _hp(p)
  labels = nkd.hard_labels(y)
  hparams = ml_collections.ConfigDict(dict(nkd.NKD_DEFAULTS, T=temperature, gamma=gamma))
  (total, metrics), grad = jax.jit(jax.value_and_grad(
      lambda a: nkd.nkd_objective({"logits": a}, {"logits": t}, labels, hparams),
      has_aux=True))(s)
  np.testing.assert_allclose(metrics["loss_nkd"], GOLDEN[f"{p}_loss"], **LOSS_TOL)
  np.testing.assert_allclose(metrics["loss_nkd_target"], GOLDEN[f"{p}_loss_t"], **LOSS_TOL)
  np.testing.assert_allclose(metrics["loss_nkd_non"], GOLDEN[f"{p}_loss_non"], **LOSS_TOL)
  np.testing.assert_allclose(total, cross_entropy(s, labels) + GOLDEN[f"{p}_loss"], rtol=1e-5)
  ce_grad = jax.grad(lambda a: cross_entropy(a, labels))(s)
  assert_grad_close(grad, np.asarray(ce_grad) + GOLDEN[f"{p}_grad_logit_s"])


def test_score_rows_are_reduced_to_their_arg_max():
  """nkd_soft's labels are score rows (no ties): the loss equals the hard-label loss of their
  arg-max."""
  s, t, y = _inputs("nkd_soft")
  temperature, gamma = _hp("nkd_soft")
  rows = np.asarray(y)
  top2 = np.sort(rows, axis=1)[:, -2:]
  assert np.all(top2[:, 1] > top2[:, 0])
  hard = jnp.asarray(rows.argmax(axis=1).astype(np.int32))
  np.testing.assert_array_equal(nkd.hard_labels(y), hard)
  np.testing.assert_allclose(nkd.nkd_loss(s, t, y, temperature, gamma),
                             nkd.nkd_loss(s, t, hard, temperature, gamma), rtol=1e-7)


def test_the_label_column_is_removed_not_masked():
  """drop_column keeps the other N − 1 columns in order (the reference's mask + reshape), and
  the non-target term is a cross-entropy over them: its gradient is the KL's, and it is zero at
  the label's column."""
  s, t, y = _inputs("nkd")
  temperature, gamma = _hp("nkd")
  rows, labels = np.asarray(s), np.asarray(y)
  keep = np.ones(rows.shape, bool)
  keep[np.arange(len(labels)), labels] = False
  np.testing.assert_array_equal(nkd.drop_column(s, y), rows[keep].reshape(len(labels), -1))
  grad = jax.grad(lambda a: nkd.nkd_non_target_term(a, t, y, temperature, gamma))(s)
  assert np.all(np.asarray(grad)[np.arange(len(labels)), labels] == 0)

  def kl(a):
    q = jax.nn.softmax(nkd.drop_column(t, y) / temperature)
    log_p = jax.nn.log_softmax(nkd.drop_column(a, y) / temperature)
    return gamma * temperature ** 2 * jnp.mean(jnp.sum(q * (jnp.log(q) - log_p), axis=1))

  assert_grad_close(grad, jax.grad(kl)(s), rel=1e-5)


def test_defaults_are_the_cifar100_config():
  g = GOLDEN
  defaults = get_method("nkd").hparams()
  assert (defaults.T, defaults.gamma) == (float(g["nkd_hp_temp"]), float(g["nkd_hp_gamma"]))
  assert defaults.ce_weight == 1.0


def test_a_negative_gamma_is_refused():
  hparams = get_method("nkd").hparams(ml_collections.ConfigDict(dict(gamma=-1.0)))
  with pytest.raises(UserError, match="gamma is -1.0"):
    get_method("nkd").check_hparams(hparams)
