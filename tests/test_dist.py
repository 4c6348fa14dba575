"""DIST (jaxkd.methods.dist) against the reference's numbers (tests/data/golden_modern.npz:
`KDLoss` with `kd_method='dist_t4'`, prefix dist, and `'dist'`, prefix dist_t1), and its
in-batch intra-class term on 1 and 4 devices."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import method_steps
from jaxkd import parallel
from jaxkd.errors import UserError
from jaxkd.methods import dist, get_method

from modern_golden import (GOLDEN, assert_grad_close, assert_logit_objective_is_global,
                           logit_inputs)


LOSS_TOL = dict(rtol=1e-5, atol=1e-8)
PREFIXES = ["dist", "dist_t1"]


def _hparams(p):
  """The golden's hyper-parameters under jaxkd's names."""
  g = GOLDEN
  return ml_collections.ConfigDict(dict(
      ce_weight=float(g[f"{p}_hp_ori_loss_weight"]), dist_weight=float(g[f"{p}_hp_kd_loss_weight"]),
      beta=float(g[f"{p}_hp_beta"]), gamma=float(g[f"{p}_hp_gamma"]), T=float(g[f"{p}_hp_tau"])))


@pytest.mark.parametrize("p", PREFIXES)
def test_loss_parts_and_gradient_match_the_reference(p):
  s, t, _ = logit_inputs(p)
  hp = _hparams(p)
  assert float(GOLDEN[f"{p}_hp_eps"]) == dist.DIST_EPS

  @jax.jit
  def run(a):
    loss, (grad_s, grad_t) = jax.value_and_grad(
        lambda x, y: dist.dist_loss(x, y, hp.beta, hp.gamma, hp.T), argnums=(0, 1))(a, t)
    return loss, grad_s, grad_t, dist.dist_terms(a, t, hp.T)

  loss, grad_s, grad_t, (inter, intra) = run(s)
  np.testing.assert_allclose(loss, GOLDEN[f"{p}_loss"], **LOSS_TOL)
  np.testing.assert_allclose(loss, GOLDEN[f"{p}_loss_f64"], rtol=1e-5)
  np.testing.assert_allclose(inter, GOLDEN[f"{p}_loss_inter"], **LOSS_TOL)
  np.testing.assert_allclose(intra, GOLDEN[f"{p}_loss_intra"], **LOSS_TOL)
  np.testing.assert_allclose(inter, GOLDEN[f"{p}_loss_inter_f64"], rtol=1e-5)
  np.testing.assert_allclose(intra, GOLDEN[f"{p}_loss_intra_f64"], rtol=1e-5)
  assert_grad_close(grad_s, GOLDEN[f"{p}_grad_logit_s"])
  # The teacher is a constant.
  assert np.all(np.asarray(grad_t) == 0)
  # (β, γ) = (1, 0) and (0, 1) give the two parts, each with its τ².
  np.testing.assert_allclose(dist.dist_loss(s, t, 1.0, 0.0, hp.T), inter, rtol=1e-6)
  np.testing.assert_allclose(dist.dist_loss(s, t, 0.0, 1.0, hp.T), intra, rtol=1e-6)


@pytest.mark.parametrize("p", PREFIXES)
def test_objective_is_kdloss_weighted_sum(p):
  """KDLoss.__call__: ori_loss_weight · CE + kd_loss_weight · DIST, and its gradient."""
  s, t, y = logit_inputs(p)
  hp = _hparams(p)

  @jax.jit
  def run(a):
    return jax.value_and_grad(lambda x: dist.dist_objective({"logits": x}, {"logits": t}, y, hp),
                              has_aux=True)(a)

  (total, metrics), grad = run(s)
  np.testing.assert_allclose(total, GOLDEN[f"{p}_loss_total"], **LOSS_TOL)
  np.testing.assert_allclose(total, GOLDEN[f"{p}_loss_total_f64"], rtol=1e-5)
  np.testing.assert_allclose(metrics["loss_ce"], GOLDEN[f"{p}_loss_ce"], **LOSS_TOL)
  np.testing.assert_allclose(metrics["loss_dist"], GOLDEN[f"{p}_loss"], **LOSS_TOL)
  np.testing.assert_allclose(metrics["loss_dist_inter"], GOLDEN[f"{p}_loss_inter"], **LOSS_TOL)
  np.testing.assert_allclose(metrics["loss_dist_intra"], GOLDEN[f"{p}_loss_intra"], **LOSS_TOL)
  assert_grad_close(grad, GOLDEN[f"{p}_grad_total_logit_s"])


def test_defaults_are_the_cifar100_config():
  """dist_cifar.yaml: kd 'dist_t4' (τ 4, β = γ = 1), weights 1 and 2 — the golden `dist`."""
  defaults = get_method("dist").hparams()
  assert dict(defaults) == dict(_hparams("dist")) == dist.DIST_DEFAULTS
  # The ImageNet config's 'dist' differs only in τ.
  assert dict(_hparams("dist_t1"), T=4.0) == dict(defaults)


def test_the_relations_are_pearson_correlations():
  """inter: 1 − mean over rows of np.corrcoef of the two rows; intra: the same over columns."""
  s, t, _ = logit_inputs("dist")
  temperature = 4.0
  y_s = np.asarray(jax.nn.softmax(s / temperature), np.float64)
  y_t = np.asarray(jax.nn.softmax(t / temperature), np.float64)
  inter = 1 - np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(y_s, y_t)])
  intra = 1 - np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(y_s.T, y_t.T)])
  got_inter, got_intra = dist.dist_terms(s, t, temperature)
  np.testing.assert_allclose(got_inter, temperature ** 2 * inter, rtol=1e-5)
  np.testing.assert_allclose(got_intra, temperature ** 2 * intra, rtol=1e-5)


def test_constant_rows_and_columns_give_finite_gradients():
  """A uniform prediction (all logits equal) has a zero centred row: its correlation is 0, with
  a zero gradient through its norm (torch's norm backward at 0), not NaN."""
  s, t, _ = logit_inputs("dist")
  s = s.at[0].set(0.0)

  @jax.jit
  def run(a, b):
    return (jax.value_and_grad(lambda x: dist.dist_loss(x, b, 1.0, 1.0, 4.0))(a),
            dist.dist_terms(a, b, 4.0))

  (loss, grad), _ = run(s, t)
  assert np.isfinite(loss) and np.all(np.isfinite(grad))
  # One row: every column of the batch is constant, so intra = τ² · (1 − 0).
  (one_loss, grad_one), (one_inter, one_intra) = run(s[1:2], t[1:2])
  np.testing.assert_allclose(one_intra, 16.0, rtol=1e-6)
  assert np.isfinite(one_inter) and np.isfinite(one_loss) and np.all(np.isfinite(grad_one))


@pytest.mark.parametrize("key,value", [("beta", -1.0), ("gamma", -0.5)])
def test_negative_relation_weights_are_refused(key, value):
  hparams = get_method("dist").hparams(ml_collections.ConfigDict({key: value}))
  with pytest.raises(UserError, match=f"{key} is {value}"):
    get_method("dist").check_hparams(hparams)


def test_loss_and_gradients_do_not_depend_on_the_device_count():
  """The intra-class term reads whole columns of the batch: with the rows sharded over 4
  devices the jitted loss, its parts and its gradient are those of one device."""
  s, t, y = logit_inputs("dist")
  four = assert_logit_objective_is_global(dist.dist_objective, s, t, y, _hparams("dist"))
  np.testing.assert_allclose(four[0], GOLDEN["dist_loss_total"], **LOSS_TOL)
  assert_grad_close(four[2], GOLDEN["dist_grad_total_logit_s"])


def test_training_steps_do_not_depend_on_the_device_count():
  """Two steps of the trainer's step on a global batch of 8: the same terms and the same
  parameters on 1 and on 4 devices. Between random networks the columns of the softmax at τ = 4
  are nearly constant, so DIST's gradient is large (norm ≈ 270 at the first step); a small
  learning rate keeps the float32 rounding of the two reduction orders below the tolerance."""
  one, four = method_steps.one_and_four_devices("dist", lr=0.002)
  method_steps.assert_same_run(one, four, ["loss", "loss_dist", "loss_dist_intra",
                                           "loss_dist_inter", "grad_norm"])
