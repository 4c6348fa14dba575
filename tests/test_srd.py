"""SRD (jaxkd.methods.srd) against the reference's numbers (tests/data/golden_modern.npz:
`OurDistillationLoss` of roymiles/Simple-Recipe-Distillation at the file's widths, prefix srd):
the projector and its two affine-free BatchNorms in training mode, both terms, the objective,
the gradients with respect to the student's map, its logits and the projector, and the running
statistics; then the bridge in the trainer's step on 1 and 4 devices."""

import collections
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import method_steps
from jaxkd.errors import UserError
from jaxkd.methods import get_method, srd

from modern_golden import GOLDEN, assert_grad_close


LOSS_TOL = dict(rtol=1e-5, atol=1e-8)
STATE_TOL = dict(rtol=1e-5, atol=1e-6)


def nhwc(x):
  return jnp.asarray(np.transpose(x, (0, 2, 3, 1)))


def _out(f, logits):
  """A network's outputs: logits, and the taps with the layer4 map and, last, its spatial mean
  (the classifier's input, which the reference computes from the map)."""
  return {"logits": logits,
          "feats": collections.OrderedDict([("stage4", f), ("pooled", jnp.mean(f, (1, 2)))])}


def _hparams():
  """The golden's hyper-parameters under jaxkd's names; the objective's factors are
  res3418.yaml's (CE 1, the loss 1)."""
  g = GOLDEN
  return ml_collections.ConfigDict(dict(
      ce_weight=1.0, srd_weight=1.0, rep_weight=float(g["srd_hp_rep_factor"]),
      exponent=float(g["srd_hp_exponent"]), bn_eps=float(g["srd_hp_bn_eps"]),
      T=float(g["srd_hp_T"])))


def _variables():
  """The reference's module before the step: embed (kernel = W.T), both BNs' running stats."""
  g = GOLDEN
  key = "srd_param.srd"
  params = {"embed": {"kernel": g[f"{key}.embed.weight"].T, "bias": g[f"{key}.embed.bias"]}}
  stats = {bn: {"mean": g[f"{key}.{bn}.running_mean"], "var": g[f"{key}.{bn}.running_var"]}
           for bn in ("bn_s", "bn_t")}
  return jax.tree.map(jnp.asarray, {"params": params, "batch_stats": stats})


def _inputs():
  g = GOLDEN
  return (nhwc(g["srd_f_s"]), nhwc(g["srd_f_t"]), jnp.asarray(g["srd_logit_s"]),
          jnp.asarray(g["srd_logit_t"]), jnp.asarray(g["srd_target"].astype(np.int32)))


def test_initialisation_projects_the_student_to_the_teachers_width():
  """From batch-1 outputs: Linear(s_dim → t_dim) with PyTorch's default init and two
  parameter-free BatchNorms over t_dim (running mean 0, variance 1)."""
  g = GOLDEN
  f_s, f_t, s, t, _ = _inputs()
  assert (f_s.shape[-1], f_t.shape[-1]) == (int(g["srd_hp_s_dim"]), int(g["srd_hp_t_dim"]))
  module = srd.srd_bridge(16, _hparams())
  out, created = module.init_with_output(jax.random.key(0), _out(f_s[:1], s[:1]),
                                         _out(f_t[:1], t[:1]))
  assert set(out) == {"loss_srd_rep"}
  assert jax.tree.map(jnp.shape, created) == jax.tree.map(jnp.shape, _variables())
  bound = 1.0 / np.sqrt(f_s.shape[-1])
  for leaf in jax.tree.leaves(created["params"]):
    assert np.all(np.abs(leaf) <= bound) and np.std(leaf) > 0
  for bn in ("bn_s", "bn_t"):
    np.testing.assert_array_equal(created["batch_stats"][bn]["mean"], 0.0)
    np.testing.assert_array_equal(created["batch_stats"][bn]["var"], 1.0)


def test_one_step_matches_the_reference():
  g = GOLDEN
  hparams = _hparams()
  module = srd.srd_bridge(16, hparams)
  variables = _variables()
  f_s, f_t, s, t, y = _inputs()

  @jax.jit
  def step(params, f_s, logits_s):
    def loss_fn(params, f_s, logits_s, f_t):
      student = _out(f_s, logits_s)
      out, updates = module.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                  student, _out(f_t, t), None, train=True,
                                  mutable=["batch_stats"])
      total, metrics = srd.srd_objective(dict(student, **out), _out(f_t, t), y, hparams)
      return metrics["loss_srd"], (total, metrics, updates["batch_stats"])
    (loss, (total, metrics, stats)), grads = jax.value_and_grad(
        loss_fn, argnums=(0, 1, 2, 3), has_aux=True)(params, f_s, logits_s, f_t)
    grad_total = jax.grad(lambda x: loss_fn(params, f_s, x, f_t)[1][0])(logits_s)
    return loss, total, metrics, stats, grads, grad_total

  loss, total, metrics, stats, grads, grad_total = step(variables["params"], f_s, s)
  grad_params, grad_fs, grad_logits, grad_ft = grads
  np.testing.assert_allclose(loss, g["srd_loss"], **LOSS_TOL)
  np.testing.assert_allclose(loss, g["srd_loss_f64"], rtol=1e-5)
  for part in ("rep", "logit", "ce"):
    np.testing.assert_allclose(metrics[f"loss_srd_{part}" if part != "ce" else "loss_ce"],
                               g[f"srd_loss_{part}"], **LOSS_TOL)
    np.testing.assert_allclose(metrics[f"loss_srd_{part}" if part != "ce" else "loss_ce"],
                               g[f"srd_loss_{part}_f64"], rtol=1e-5)
  np.testing.assert_allclose(total, g["srd_loss_total"], **LOSS_TOL)
  np.testing.assert_allclose(total, g["srd_loss_total_f64"], rtol=1e-5)

  assert_grad_close(grad_fs, nhwc(g["srd_grad_f_s"]))
  assert_grad_close(grad_logits, g["srd_grad_logit_s"])
  assert_grad_close(grad_total, g["srd_grad_total_logit_s"])
  assert_grad_close(grad_params["embed"]["kernel"], g["srd_grad_param.srd.embed.weight"].T)
  # The projector's bias is removed by BN_s's mean: its gradient is 0 but for rounding, in
  # the reference (|g| ≤ 2.3e-7) as here; both are compared at the scale of the kernel's.
  scale = np.max(np.abs(g["srd_grad_param.srd.embed.weight"]))
  np.testing.assert_allclose(grad_params["embed"]["bias"], g["srd_grad_param.srd.embed.bias"],
                             rtol=0, atol=1e-4 * scale)
  assert np.max(np.abs(grad_params["embed"]["bias"])) <= 1e-6 * scale
  # The teacher's map is a constant (its BatchNorm still moves).
  assert np.all(np.asarray(grad_ft) == 0)

  for bn in ("bn_s", "bn_t"):
    np.testing.assert_allclose(stats[bn]["mean"], g[f"srd_updated.srd.{bn}.running_mean"],
                               **STATE_TOL)
    np.testing.assert_allclose(stats[bn]["var"], g[f"srd_updated.srd.{bn}.running_var"],
                               **STATE_TOL)
    assert int(g[f"srd_updated.srd.{bn}.num_batches_tracked"]) == 1


def test_rep_term_is_the_log_of_a_sum_over_batch_and_features():
  """L_rep = 2 · log Σ_{b,d} |n_s − n_t|⁴ on batch-normalised (biased variance, eps 1e-4)
  spatial means: recomputed here in float64 NumPy from the golden's inputs and projector."""
  g = GOLDEN
  z_s = g["srd_f_s"].astype(np.float64).mean(axis=(2, 3))
  z_t = g["srd_f_t"].astype(np.float64).mean(axis=(2, 3))
  e_s = z_s @ g["srd_param.srd.embed.weight"].T.astype(np.float64) + g["srd_param.srd.embed.bias"]

  def bn(x):
    return (x - x.mean(0)) / np.sqrt(x.var(0) + float(g["srd_hp_bn_eps"]))

  expected = 2.0 * np.log(np.sum(np.abs(bn(e_s) - bn(z_t)) ** 4))
  np.testing.assert_allclose(expected, g["srd_loss_rep_f64"], rtol=1e-6)
  f_s, f_t, _, _, _ = _inputs()
  got = srd.rep_loss(srd.AffineFreeBatchNorm().apply({}, jnp.asarray(e_s, jnp.float32),
                                                     train=True, mutable=["batch_stats"])[0],
                     srd.AffineFreeBatchNorm().apply({}, jnp.mean(f_t, (1, 2)), train=True,
                                                     mutable=["batch_stats"])[0], 2.0, 4.0)
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_defaults_are_the_references_constants():
  g = GOLDEN
  defaults = get_method("srd").hparams()
  assert dict(defaults) == dict(_hparams()) == srd.SRD_DEFAULTS
  assert (defaults.rep_weight, defaults.exponent, defaults.bn_eps, defaults.T) == (
      float(g["srd_hp_rep_factor"]), float(g["srd_hp_exponent"]), float(g["srd_hp_bn_eps"]),
      float(g["srd_hp_T"]))


@pytest.mark.parametrize("key", ["exponent", "bn_eps"])
def test_non_positive_exponent_or_eps_is_refused(key):
  hparams = get_method("srd").hparams(ml_collections.ConfigDict({key: 0.0}))
  with pytest.raises(UserError, match=f"{key} is 0.0"):
    get_method("srd").check_hparams(hparams)


def test_training_steps_do_not_depend_on_the_device_count():
  """resnet8x4 → resnet8 through the trainer's step: the BatchNorms and the sum of L_rep read
  the global batch, so 1 and 4 devices give the same terms, parameters (the projector's
  included) and running statistics of both BatchNorms."""
  one, four = method_steps.one_and_four_devices("srd")
  method_steps.assert_same_run(one, four, ["loss", "loss_srd", "loss_srd_rep", "loss_srd_logit",
                                           "grad_norm"])
  state, metrics = one
  assert set(state.params["bridge"]) == {"embed"}
  # resnet8's pooled 64 → resnet8x4's 256.
  assert state.params["bridge"]["embed"]["kernel"].shape == (64, 256)
  assert set(state.batch_stats["bridge"]) == {"bn_s", "bn_t"}
  assert not np.allclose(state.batch_stats["bridge"]["bn_t"]["mean"], 0.0)
  assert np.isfinite(float(metrics[0]["loss_srd_rep"]))
