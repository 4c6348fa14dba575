"""DKD (jaxkd.methods.dkd) and Hinton's KD terms against the reference's numbers
(tests/data/golden_baselines.npz: mdistiller's `dkd_loss`, RepDistiller's `DistillKL` and its
`-r 0.1 -a 0.9` objective)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd.methods import dkd
from jaxkd.methods.losses import cross_entropy, distill_kl
from jaxkd.models import MODEL_NAMES

GOLDEN = np.load(os.path.join(os.path.dirname(__file__), "data", "golden_baselines.npz"))

LOSS_TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = dict(rtol=1e-4, atol=1e-6)


def _logits(p):
  g = GOLDEN
  return (jnp.asarray(g[f"{p}_logit_s"]), jnp.asarray(g[f"{p}_logit_t"]),
          jnp.asarray(g[f"{p}_target"].astype(np.int32)))


def _dkd_hp():
  g = GOLDEN
  return float(g["dkd_hp_alpha"]), float(g["dkd_hp_beta"]), float(g["dkd_hp_T"])


# ----------------------------------------------------------------------------------- DKD


def test_dkd_loss_and_gradient_match_the_reference():
  s, t, y = _logits("dkd")
  alpha, beta, temperature = _dkd_hp()
  loss, (grad_s, grad_t) = jax.jit(jax.value_and_grad(
      lambda a, b: dkd.dkd_loss(a, b, y, alpha, beta, temperature), argnums=(0, 1)))(s, t)
  np.testing.assert_allclose(loss, GOLDEN["dkd_loss"], **LOSS_TOL)
  np.testing.assert_allclose(loss, GOLDEN["dkd_loss_f64"], rtol=1e-5)
  np.testing.assert_allclose(grad_s, GOLDEN["dkd_grad_logit_s"], **GRAD_TOL)
  # The teacher is a constant for the student.
  assert np.all(np.asarray(grad_t) == 0)


def test_dkd_pieces_match_the_reference():
  """`dkd_loss_tckd` / `dkd_loss_nckd` are the reference's (α, β) = (1, 0) and (0, 1)."""
  s, t, y = _logits("dkd")
  _, _, temperature = _dkd_hp()
  pieces = jax.jit(lambda a, b: (dkd.tckd(a, b, y, temperature), dkd.nckd(a, b, y, temperature),
                                 dkd.dkd_loss(a, b, y, 1.0, 0.0, temperature),
                                 dkd.dkd_loss(a, b, y, 0.0, 1.0, temperature)))(s, t)
  tckd, nckd, only_tckd, only_nckd = pieces
  np.testing.assert_allclose(tckd, GOLDEN["dkd_loss_tckd"], **LOSS_TOL)
  np.testing.assert_allclose(nckd, GOLDEN["dkd_loss_nckd"], **LOSS_TOL)
  np.testing.assert_allclose(only_tckd, tckd, rtol=1e-6)
  np.testing.assert_allclose(only_nckd, nckd, rtol=1e-6)


def test_nckd_is_the_kl_of_the_non_target_classes():
  """Pushing the target logit down by 1000·T removes it from the softmax: NCKD equals the
  T²-scaled batch-mean KL between the teacher's and the student's distributions over the other
  N − 1 classes; TCKD is the binary KL of the target probability."""
  s, t, y = _logits("dkd")
  _, _, temperature = _dkd_hp()
  keep = np.ones(s.shape, bool)
  keep[np.arange(len(y)), np.asarray(y)] = False
  rest = lambda x: jnp.asarray(np.asarray(x)[keep].reshape(x.shape[0], -1))
  expected = distill_kl(rest(s), rest(t), temperature)
  np.testing.assert_allclose(dkd.nckd(s, t, y, temperature), expected, rtol=1e-5)

  def binary(x):
    p = jax.nn.softmax(x / temperature)[jnp.arange(len(y)), y]
    return p, 1.0 - p
  (ps, qs), (pt, qt) = binary(s), binary(t)
  kl = jnp.mean(pt * jnp.log(pt / ps) + qt * jnp.log(qt / qs)) * temperature ** 2
  np.testing.assert_allclose(dkd.tckd(s, t, y, temperature), kl, rtol=1e-4)


def test_dkd_defaults_and_warmup_are_mdistillers():
  g = GOLDEN
  assert dkd.DKD_DEFAULTS == dict(
      ce_weight=float(g["dkd_hp_ce_weight"]), alpha=float(g["dkd_hp_alpha"]),
      beta=float(g["dkd_hp_beta"]), T=float(g["dkd_hp_T"]), warmup=int(g["dkd_hp_warmup"]))
  warmup = int(g["dkd_hp_warmup"])
  # Epochs are 1-based: the first epoch already has weight 1/warmup.
  assert float(dkd.dkd_warmup(1, warmup)) == pytest.approx(1.0 / warmup)
  assert float(dkd.dkd_warmup(warmup // 2, warmup)) == pytest.approx(0.5)
  assert float(dkd.dkd_warmup(warmup, warmup)) == 1.0
  assert float(dkd.dkd_warmup(240, warmup)) == 1.0
  traced = jax.jit(lambda e: dkd.dkd_warmup(e, warmup))(jnp.arange(1, 25))
  np.testing.assert_allclose(traced, np.minimum(np.arange(1, 25) / warmup, 1.0), rtol=1e-6)


def test_dkd_beta_follows_the_cifar100_configs():
  # The golden's β is the res32x4 → res8x4 config's.
  assert dkd.dkd_beta("resnet32x4", "resnet8x4") == float(GOLDEN["dkd_hp_beta"])
  assert dkd.dkd_beta("resnet56", "resnet20") == 2.0
  assert dkd.dkd_beta("resnet110", "resnet32") == 2.0
  for teacher, student in [("vgg13", "vgg8"), ("vgg13", "MobileNetV2"),
                           ("wrn_40_2", "wrn_16_2"), ("wrn_40_2", "wrn_40_1")]:
    assert dkd.dkd_beta(teacher, student) == 6.0
  # The wrn_40_2 → ShuffleV1 config keeps the default, as do pairs without a config.
  assert dkd.dkd_beta("wrn_40_2", "ShuffleV1") == 8.0
  assert dkd.dkd_beta("resnet32x4", "ShuffleV2") == 8.0
  assert dkd.dkd_beta("resnet56", "resnet8") == 8.0
  names = {name for pair in dkd.DKD_CIFAR100_BETA for name in pair}
  assert names <= set(MODEL_NAMES)
  assert len(dkd.DKD_CIFAR100_BETA) == 11


# ------------------------------------------------------------------------------------ KD


def test_kd_terms_and_objective_match_the_reference():
  """DistillKL(T), the student CE and the -r/-a weighted objective, and its gradient."""
  g = GOLDEN
  s, t, y = _logits("kd")
  temperature = float(g["kd_hp_T"])
  gamma, alpha = float(g["kd_w_gamma"]), float(g["kd_w_alpha"])

  def objective(a):
    return gamma * cross_entropy(a, y) + alpha * distill_kl(a, t, temperature)

  @jax.jit
  def run(a):
    kl, grad_kl = jax.value_and_grad(lambda x: distill_kl(x, t, temperature))(a)
    total, grad_total = jax.value_and_grad(objective)(a)
    return kl, grad_kl, cross_entropy(a, y), total, grad_total

  kl, grad_kl, ce, total, grad_total = run(s)
  np.testing.assert_allclose(kl, g["kd_loss"], **LOSS_TOL)
  np.testing.assert_allclose(kl, g["kd_loss_f64"], rtol=1e-5)
  np.testing.assert_allclose(grad_kl, g["kd_grad_logit_s"], **GRAD_TOL)
  np.testing.assert_allclose(ce, g["kd_loss_ce"], **LOSS_TOL)
  np.testing.assert_allclose(total, g["kd_loss_total"], **LOSS_TOL)
  np.testing.assert_allclose(grad_total, g["kd_grad_total_logit_s"], **GRAD_TOL)
