"""Logit standardization (jaxkd.methods.logit_standardization) as a switch of KD and DKD, against
the reference's numbers (tests/data/golden_modern.npz, prefixes ls_kd and ls_dkd: the authors'
mdistiller fork with its `--logit-stand` block), and the switch-dependent defaults
(Method.switch_defaults) it brings."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import helpers
from modern_golden import GOLDEN, logit_inputs

from configs import default
from jaxkd import recipe
from jaxkd.methods import base, get_method
from jaxkd.methods import logit_standardization as ls
from jaxkd.methods.losses import distill_kl


LOSS_TOL = dict(rtol=1e-5)
SMALL_PART_TOL = dict(rtol=1e-5, atol=1e-8)
Z_TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_REL = 1e-4


def assert_grad_close(grad, ref, rel=GRAD_REL):
  """max|g − ref| ≤ rel · max|ref| over the array."""
  grad, ref = np.asarray(grad), np.asarray(ref)
  assert grad.shape == ref.shape
  assert np.max(np.abs(grad - ref)) <= rel * np.max(np.abs(ref)), np.max(np.abs(grad - ref))


def _hp(p, *names):
  return {name: GOLDEN[f"{p}_hp_{name}"].item() for name in names}


def test_standardize_is_the_references_normalize():
  """z-scores per row with the unbiased std and ε = 1e-7 added to it."""
  g = GOLDEN
  assert float(g["ls_kd_hp_eps"]) == ls.STD_EPS
  s, t, _ = logit_inputs("ls_kd")
  z_s, z_t = jax.jit(lambda a, b: (ls.standardize(a), ls.standardize(b)))(s, t)
  np.testing.assert_allclose(z_s, g["ls_kd_z_s"], **Z_TOL)
  np.testing.assert_allclose(z_t, g["ls_kd_z_t"], **Z_TOL)
  # Zero mean and unit unbiased std (up to ε) per row.
  np.testing.assert_allclose(np.mean(z_s, axis=-1), 0.0, atol=1e-6)
  np.testing.assert_allclose(np.std(np.asarray(z_t, np.float64), axis=-1, ddof=1), 1.0,
                             rtol=1e-5)


def test_standardize_of_a_constant_row_is_finite():
  x = jnp.array([[3.0, 3.0, 3.0, 3.0], [1.0, 2.0, 3.0, 4.0]])
  z, grad = jax.jit(jax.value_and_grad(lambda a: jnp.sum(ls.standardize(a) * jnp.arange(4.0))))(x)
  assert np.all(np.isfinite(grad))
  np.testing.assert_array_equal(ls.standardize(x)[0], 0.0)
  assert np.isfinite(z)


def _kd_hparams():
  g = GOLDEN
  assert int(g["ls_kd_hp_logit_stand"]) == 1
  return get_method("kd").hparams(ml_collections.ConfigDict(dict(
      logit_standardize=True, **_hp("ls_kd", "T", "kd_weight", "ce_weight"))))


def test_ls_kd_matches_the_reference():
  """`loss_kd` = 9 · T² · KL on standardized logits, 0.1 · CE on the raw ones, their sum, and
  the gradients w.r.t. the raw student logits through the standardization."""
  g = GOLDEN
  s, t, y = logit_inputs("ls_kd")
  hparams = _kd_hparams()
  method = get_method("kd")

  def parts(a):
    loss, metrics = method.loss({"logits": a}, {"logits": t}, y, hparams)
    return loss, hparams.kd_weight * metrics["loss_kd"], hparams.ce_weight * metrics["loss_ce"]

  @jax.jit
  def run(a):
    total, kd, ce = parts(a)
    return (total, kd, ce, jax.grad(lambda x: parts(x)[1])(a), jax.grad(lambda x: parts(x)[0])(a))

  total, kd, ce, grad_kd, grad_total = run(s)
  np.testing.assert_allclose(kd, g["ls_kd_loss"], **LOSS_TOL)
  np.testing.assert_allclose(kd, g["ls_kd_loss_f64"], **LOSS_TOL)
  np.testing.assert_allclose(ce, g["ls_kd_loss_ce"], **LOSS_TOL)
  np.testing.assert_allclose(total, g["ls_kd_loss_total"], **LOSS_TOL)
  np.testing.assert_allclose(total, g["ls_kd_loss_total_f64"], **LOSS_TOL)
  assert_grad_close(grad_kd, g["ls_kd_grad_logit_s"])
  assert_grad_close(grad_total, g["ls_kd_grad_total_logit_s"])
  # The switch off is KD on the raw logits.
  off = ml_collections.ConfigDict(dict(hparams.to_dict(), logit_standardize=False))
  _, metrics = jax.jit(lambda a: method.loss({"logits": a}, {"logits": t}, y, off))(s)
  np.testing.assert_allclose(metrics["loss_kd"], distill_kl(s, t, hparams.T), rtol=1e-6)


def test_ls_dkd_matches_the_reference():
  """`loss_kd` = min(8/20, 1) · (9·TCKD + 72·NCKD) on standardized logits (T = 2, the −1000·1_g
  after standardization and /T), the two parts, CE, the total and both gradients."""
  g = GOLDEN
  s, t, y = logit_inputs("ls_dkd")
  assert int(g["ls_dkd_hp_logit_stand"]) == 1
  method = get_method("dkd")
  hparams = method.hparams(ml_collections.ConfigDict(dict(
      logit_standardize=True, **_hp("ls_dkd", "alpha", "beta", "T", "ce_weight", "warmup"))))
  epoch = int(g["ls_dkd_hp_epoch"])

  def parts(a):
    loss, metrics = method.loss({"logits": a, "epoch": epoch}, {"logits": t}, y, hparams)
    return loss, metrics

  @jax.jit
  def run(a):
    total, metrics = parts(a)
    kd = lambda x: parts(x)[1]["dkd_warmup"] * parts(x)[1]["loss_dkd"]  # noqa: E731
    return total, metrics, jax.grad(kd)(a), jax.grad(lambda x: parts(x)[0])(a)

  total, metrics, grad_kd, grad_total = run(s)
  np.testing.assert_allclose(metrics["dkd_warmup"], g["ls_dkd_hp_warmup_factor"], rtol=1e-7)
  kd = metrics["dkd_warmup"] * metrics["loss_dkd"]
  np.testing.assert_allclose(kd, g["ls_dkd_loss"], **LOSS_TOL)
  np.testing.assert_allclose(kd, g["ls_dkd_loss_f64"], **LOSS_TOL)
  np.testing.assert_allclose(metrics["loss_tckd"], g["ls_dkd_loss_tckd"], **SMALL_PART_TOL)
  np.testing.assert_allclose(metrics["loss_tckd"], g["ls_dkd_loss_tckd_f64"], **SMALL_PART_TOL)
  np.testing.assert_allclose(metrics["loss_nckd"], g["ls_dkd_loss_nckd"], **LOSS_TOL)
  np.testing.assert_allclose(hparams.ce_weight * metrics["loss_ce"], g["ls_dkd_loss_ce"],
                             **LOSS_TOL)
  np.testing.assert_allclose(total, g["ls_dkd_loss_total"], **LOSS_TOL)
  np.testing.assert_allclose(total, g["ls_dkd_loss_total_f64"], **LOSS_TOL)
  assert_grad_close(grad_kd, g["ls_dkd_grad_logit_s"])
  assert_grad_close(grad_total, g["ls_dkd_grad_total_logit_s"])


# ------------------------------------------------------------------ switch defaults


def test_the_switch_brings_the_references_defaults():
  """The `--logit-stand` block with `--base-temp 2 --kd-weight 9`: KD T 2, weight 9 (CE
  0.1 kept); DKD α·9, β·9 of the pair's β, T 2 (CE 1, warm-up 20 kept); CTKD's KL weight 9.
  Off (absent or False), each method keeps its own defaults."""
  on = ml_collections.ConfigDict(dict(logit_standardize=True))
  kd = get_method("kd").hparams(on)
  assert dict(kd) == dict(T=2.0, ce_weight=0.1, kd_weight=9.0, logit_standardize=True)
  assert {k: kd[k] for k in ("T", "kd_weight", "ce_weight")} == _hp(
      "ls_kd", "T", "kd_weight", "ce_weight")
  dkd = get_method("dkd")
  standardized = dkd.hparams(on, pair=("resnet32x4", "resnet8x4"))
  assert {k: standardized[k] for k in ("alpha", "beta", "T", "ce_weight", "warmup")} == _hp(
      "ls_dkd", "alpha", "beta", "T", "ce_weight", "warmup")
  assert dkd.hparams(on, pair=("resnet56", "resnet20")).beta == 2.0 * 9.0
  assert get_method("ctkd").hparams(on).kd_weight == 9.0
  for method in ("kd", "dkd", "ctkd"):
    plain = get_method(method).hparams(pair=("resnet56", "resnet20"))
    assert "logit_standardize" not in plain
    assert get_method(method).hparams(ml_collections.ConfigDict(dict(
        logit_standardize=False)), pair=("resnet56", "resnet20")) == ml_collections.ConfigDict(
            dict(plain, logit_standardize=False))
  # A field the config sets keeps its value; a None placeholder is the switch's default.
  given = ml_collections.ConfigDict(dict(logit_standardize=True, beta=3.0, T=None))
  assert (dkd.hparams(given).beta, dkd.hparams(given).T, dkd.hparams(given).alpha) == (
      3.0, 2.0, 9.0)


def test_switch_defaults_are_general():
  """A Method's switches: a mapping or a function of the defaults so far, applied in order
  after the pair's, when the switch's field (the config's value, else the default) has the
  switch's value; the config's fields win."""
  method = base.Method(
      name="toy", loss=None, defaults=dict(w=1.0, T=4.0, mode="a"),
      pair_defaults=lambda teacher, student: {"w": 2.0},
      switch_defaults=(
          base.SwitchDefaults("mode", "b", {"T": 1.0}),
          base.SwitchDefaults("fast", True, lambda h: {"w": h.w * 10, "T": h.T + 1})))
  assert dict(method.hparams()) == dict(w=1.0, T=4.0, mode="a")
  assert dict(method.hparams(ml_collections.ConfigDict(dict(mode="b")))) == dict(
      w=1.0, T=1.0, mode="b")
  both = ml_collections.ConfigDict(dict(mode="b", fast=True))
  assert dict(method.hparams(both, pair=("t", "s"))) == dict(w=20.0, T=2.0, mode="b", fast=True)
  both.w = 0.5
  assert method.hparams(both, pair=("t", "s")).w == 0.5
  assert method.switched_fields() == {"T", "w"}
  assert method.switches() == {"mode": str, "fast": bool}


def test_configs_leave_the_switched_fields_to_the_switch():
  """configs/default.py: `--config.method.logit_standardize=True` on the default config, or on
  `:dkd`, whose fields a switch may change are None placeholders (and the switch itself)."""
  config = default.get_config()
  config.lock()
  config.method.logit_standardize = True
  hparams = recipe.method_hparams(config, get_method("kd"))
  assert (hparams.T, hparams.ce_weight, hparams.kd_weight) == (2.0, 0.1, 9.0)
  config.method.T = 3.0
  assert recipe.method_hparams(config, get_method("kd")).T == 3.0

  config = default.get_config("dkd")
  assert {k for k, v in config.method.items() if v is None} == {
      "alpha", "beta", "T", "logit_standardize"}
  config.teacher.name, config.student.name = "resnet56", "resnet20"
  assert recipe.method_hparams(config, get_method("dkd")) == get_method("dkd").hparams(
      pair=("resnet56", "resnet20"))
  config = helpers.set_fields(config, {"method.logit_standardize": True})
  hparams = recipe.method_hparams(config, get_method("dkd"))
  assert (hparams.alpha, hparams.beta, hparams.T, hparams.warmup) == (9.0, 18.0, 2.0, 20)
