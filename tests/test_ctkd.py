"""CTKD (jaxkd.methods.ctkd) against the reference's numbers (tests/data/golden_modern.npz:
zhengli97/CTKD's Global_T, gradient reversal, DistillKL/DKDloss iteration and λ schedules, prefixes
ctkd, ctkd_dkd, ctkd_inst, ctkd_sched), and its temperature trained by the student's step."""

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default
from jaxkd import steps
from jaxkd.errors import UserError
from jaxkd.methods import ctkd, get_method
from jaxkd.methods import logit_standardization as ls
from jaxkd.optim import learning_rate_schedule, make_optimizer
from jaxkd.networks import Network
from jaxkd.state import TrainState

from modern_golden import GOLDEN, logit_inputs


LOSS_TOL = dict(rtol=1e-5)
# The float32 reference is noisy at τ ≈ 15.6 (nearly uniform softmaxes): 2e-4 of the max.
GRAD_REL = 2e-4
SCHED_TOL = dict(rtol=0, atol=1e-12)


def assert_grad_close(grad, ref, rel=GRAD_REL, scale=None):
  """max|g − ref| ≤ rel · max|ref| over the array (· `scale` instead, when given)."""
  grad, ref = np.asarray(grad), np.asarray(ref)
  assert grad.shape == ref.shape
  assert np.all(np.isfinite(grad))
  scale = np.max(np.abs(ref)) if scale is None else scale
  assert np.max(np.abs(grad - ref)) <= rel * scale, (np.max(np.abs(grad - ref)), rel * scale)


def _prefix_grad_max(p):
  """max|grad| over every stored gradient of prefix `p`: the scale of the reference's own
  float32 noise (its float32 gradients differ from float64 by up to 3.1e-5 of it)."""
  return max(float(np.max(np.abs(GOLDEN[k]))) for k in GOLDEN.files
             if k.startswith(f"{p}_grad_"))


def _hparams(p):
  """The method's hyper-parameters from `<p>_hp_*` (γ, α, β are the script's -r -a -b)."""
  g = GOLDEN
  hp = lambda name: g[f"{p}_hp_{name}"].item()  # noqa: E731
  name = "ctkd_dkd" if p == "ctkd_dkd" else "ctkd"
  fields = dict(ce_weight=hp("gamma"), kd_weight=hp("alpha"), t_start=hp("t_start"),
                t_end=hp("t_end"), decay="cosine", decay_max=hp("decay_max"),
                decay_min=hp("decay_min"), decay_loops=hp("decay_loops"))
  if name == "ctkd_dkd":
    fields.update(dkd_weight=hp("beta"), dkd_alpha=hp("dkd_alpha"), dkd_beta=hp("dkd_beta"))
  else:
    assert hp("beta") == 0.0   # the reference's loss_kd is 0 for KD
  method = get_method(name)
  hparams = method.hparams(ml_collections.ConfigDict(fields))
  # The golden's settings are the script's, i.e. the methods' defaults.
  assert hparams == method.hparams()
  return method, hparams


# ----------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("suffix,hp", [("", "ctkd_sched"), ("_alt1", "ctkd_sched_alt1")])
def test_schedules_match_cosine_and_linear_decay(suffix, hp):
  """CosineDecay / LinearDecay.get_value at the listed epochs, in float64; the step's λ is that
  value rounded to float32, at any (traced) epoch."""
  g = GOLDEN
  args = [float(g[f"{hp}_hp_decay_{k}"]) for k in ("max", "min", "loops")]
  epochs = [int(e) for e in g["ctkd_sched_epochs"]]
  cosine = [ctkd.cosine_decay(e, *args) for e in epochs]
  linear = [ctkd.linear_decay(e, *args) for e in epochs]
  np.testing.assert_allclose(cosine, g[f"ctkd_sched_cosine{suffix}"], **SCHED_TOL)
  np.testing.assert_allclose(linear, g[f"ctkd_sched_linear{suffix}"], **SCHED_TOL)
  for decay, expected in (("cosine", cosine), ("linear", linear)):
    hparams = ml_collections.ConfigDict(dict(
        decay=decay, decay_max=args[0], decay_min=args[1], decay_loops=args[2]))
    traced = jax.jit(jax.vmap(lambda e: ctkd.grl_lambda(e, hparams)))(jnp.asarray(epochs))
    np.testing.assert_array_equal(traced, np.asarray(expected, np.float32))


def test_gradient_reversal_multiplies_by_lambda():
  """Identity forward; the gradient times λ (not −λ: the schedule is ≤ 0); none reaches λ."""
  x = jnp.array([0.3, -1.2])
  value, (grad_x, grad_lambda) = jax.value_and_grad(
      lambda a, lam: jnp.sum(jnp.sin(ctkd.grad_reverse(a, lam))), argnums=(0, 1))(
          x, jnp.float32(-0.25))
  np.testing.assert_allclose(value, jnp.sum(jnp.sin(x)), rtol=1e-7)
  np.testing.assert_allclose(grad_x, -0.25 * jnp.cos(x), rtol=1e-6)
  assert float(grad_lambda) == 0.0


# ------------------------------------------------------------------------ the iteration


def _run(p):
  """The method as the trainer runs it: Global_T's parameter from the bridge, λ at the step's
  epoch, the objective; with the gradients w.r.t. the logits, the parameter and τ."""
  g = GOLDEN
  method, hparams = _hparams(p)
  s, t, y = logit_inputs(p)
  bridge = method.bridge(50_000, hparams)
  variables = bridge.init(jax.random.key(0), {"logits": s}, {"logits": t}, None)
  np.testing.assert_array_equal(variables["params"]["global_T"], g[f"{p}_param.global_T"])
  epoch = int(g[f"{p}_hp_epoch"])

  def objective(params, a):
    out = bridge.apply({"params": params}, {"logits": a}, {"logits": t}, None, train=True)
    return method.loss(dict(out, logits=a, epoch=epoch), {"logits": t}, y, hparams)

  @jax.jit
  def run(params, a):
    (loss, metrics), (grad_params, grad_s) = jax.value_and_grad(
        objective, argnums=(0, 1), has_aux=True)(params, a)
    temp = metrics["ctkd_temperature"]
    grad_temp = jax.grad(lambda tau: ctkd.ctkd_loss(a, t, y, tau, hparams)[0])(temp)
    return loss, metrics, grad_params, grad_s, grad_temp

  return (method, hparams) + run(variables["params"], s)


@pytest.mark.parametrize("p", ["ctkd", "ctkd_dkd"])
def test_iteration_matches_the_reference(p):
  """τ = 1 + 20·σ(1), λ at the epoch, the loss and its unweighted parts, d loss / d logit_s,
  d loss / d τ and what the optimiser sees for global_T: λ · d loss / d τ · t_end · σ'(θ).
  ctkd_dkd's gradients are finite: the teacher's NCKD probability at the label is exactly 0 and
  gets the zero gradient of the reference's torch 1.11 (`zero_target_grad_masked`).

  d loss / d τ is a small difference of large terms at τ ≈ 15.6: in float32 it is noise at
  ~1e-3 of itself (the reference's own value is 2.0e-4 (ctkd) and 1.7e-4 (ctkd_dkd) away from
  float64 autodiff of this port: −0.00306923, −0.00824058), so the two temperature gradients
  are compared at 2e-4 of the prefix's largest stored gradient, the scale at which the
  reference's float32 noise is measured, and the chain rule through the reversal exactly."""
  g = GOLDEN
  _, _, loss, metrics, grad_params, grad_s, grad_temp = _run(p)
  np.testing.assert_allclose(metrics["ctkd_lambda"], np.float32(g[f"{p}_hp_grl_lambda"]),
                             rtol=0)
  np.testing.assert_allclose(metrics["ctkd_temperature"], g[f"{p}_temp"][0], rtol=1e-6)
  np.testing.assert_allclose(loss, g[f"{p}_loss"], **LOSS_TOL)
  np.testing.assert_allclose(loss, g[f"{p}_loss_f64"], **LOSS_TOL)
  parts = ["cls", "div"] + (["kd"] if p == "ctkd_dkd" else [])
  assert ("loss_kd" in metrics) == (p == "ctkd_dkd")
  for part in parts:
    np.testing.assert_allclose(metrics[f"loss_{part}"], g[f"{p}_loss_{part}"], **LOSS_TOL)
    np.testing.assert_allclose(metrics[f"loss_{part}"], g[f"{p}_loss_{part}_f64"], **LOSS_TOL)
  assert_grad_close(grad_s, g[f"{p}_grad_logit_s"])
  scale = _prefix_grad_max(p)
  assert_grad_close(np.reshape(grad_temp, (1,)), g[f"{p}_grad_temp"], scale=scale)
  assert_grad_close(grad_params["global_T"], g[f"{p}_grad_param.global_T"], scale=scale)
  sigma = jax.nn.sigmoid(1.0)
  chain = metrics["ctkd_lambda"] * grad_temp * g[f"{p}_hp_t_end"] * sigma * (1 - sigma)
  # The reversal and the sigmoid pass d loss / d τ on exactly so...
  theta = jnp.ones((1,), jnp.float32)
  _, back = jax.vjp(lambda th: ctkd.temperature(th, metrics["ctkd_lambda"], 1.0,
                                                float(g[f"{p}_hp_t_end"])), theta)
  np.testing.assert_allclose(back(jnp.reshape(grad_temp, (1,)))[0], chain, rtol=1e-6)
  # ...and the optimiser's gradient is that product, up to the float32 noise of d loss / d τ
  # between two compilations of it (3e-5 of itself measured with jax 0.12.1).
  np.testing.assert_allclose(grad_params["global_T"], chain, rtol=2e-4)
  # The reference's parameter gradient is the same product of its own numbers.
  np.testing.assert_allclose(g[f"{p}_grad_param.global_T"], g[f"{p}_hp_grl_lambda"]
                             * g[f"{p}_grad_temp"] * g[f"{p}_hp_t_end"] * sigma * (1 - sigma),
                             rtol=1e-5)
  if p == "ctkd_dkd":
    assert int(g["ctkd_dkd_hp_zero_target_grad_masked"]) == 1


def test_instance_wise_loss_matches_the_reference():
  """The README's per-sample KL_Loss with temperatures T [B] (ε = 1e-7 in the weight and the
  log), averaged over the batch; gradients w.r.t. the student logits and each T_i."""
  g = GOLDEN
  assert float(g["ctkd_inst_hp_prob_eps"]) == ctkd.INSTANCE_PROB_EPS
  s, t = jnp.asarray(g["ctkd_inst_logit_s"]), jnp.asarray(g["ctkd_inst_logit_t"])
  temps = jnp.asarray(g["ctkd_inst_temp"])
  loss, (grad_s, grad_temp) = jax.jit(jax.value_and_grad(
      lambda a, tau: ctkd.instance_kd_loss(a, t, tau), argnums=(0, 1)))(s, temps)
  np.testing.assert_allclose(loss, g["ctkd_inst_loss"], **LOSS_TOL)
  np.testing.assert_allclose(loss, g["ctkd_inst_loss_f64"], **LOSS_TOL)
  assert_grad_close(grad_s, g["ctkd_inst_grad_logit_s"])
  assert_grad_close(grad_temp, g["ctkd_inst_grad_temp"])


def test_logit_standardization_switch_standardizes_the_kl_term():
  """With `logit_standardize` the KL term reads standardized logits: at τ = 2 and weight 9 it
  is logit-standardized KD's `loss_kd` (golden ls_kd)."""
  g = GOLDEN
  s, t, y = logit_inputs("ls_kd")
  hparams = get_method("ctkd").hparams(ml_collections.ConfigDict(dict(logit_standardize=True)))
  assert hparams.kd_weight == float(g["ls_kd_hp_kd_weight"])
  _, parts = jax.jit(lambda a, b, tau: ctkd.ctkd_loss(a, b, y, tau, hparams))(
      s, t, jnp.array([float(g["ls_kd_hp_T"])]))
  np.testing.assert_allclose(hparams.kd_weight * parts["loss_div"], g["ls_kd_loss"], **LOSS_TOL)
  with pytest.raises(UserError, match="ctkd_dkd"):
    get_method("ctkd_dkd").check_hparams(get_method("ctkd_dkd").hparams(
        ml_collections.ConfigDict(dict(logit_standardize=True))))
  assert ls.enabled(hparams) and not ls.enabled(get_method("ctkd").hparams())


def test_hyper_parameters_are_checked():
  method = get_method("ctkd")
  method.check_hparams(method.hparams())
  for bad, match in ((dict(decay="step"), "decay"), (dict(decay_loops=0.0), "decay_loops"),
                     (dict(t_start=0.0), "t_start")):
    with pytest.raises(UserError, match=match):
      method.check_hparams(method.hparams(ml_collections.ConfigDict(bad)))
  assert set(default.get_config("ctkd_dkd").method) == set(ctkd.DKD_DEFAULTS) | {"name"}
  assert set(default.get_config("ctkd").method) == set(ctkd.DEFAULTS) | {
      "name", "logit_standardize"}


# --------------------------------------------------------------- trained with the student


class _Tiny(nn.Module):
  """A stand-in backbone: flatten, BatchNorm, Dense; (logits, feats) as the zoo's."""
  num_classes: int = 5

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.BatchNorm(use_running_average=not train)(x.reshape((x.shape[0], -1)))
    return nn.Dense(self.num_classes)(x), {"pooled": x}


def test_the_temperature_is_trained_by_the_students_step():
  """In the trainer's step (steps.train_step), global_T sits in the student's parameters under
  'bridge' and takes the student's SGD step (momentum, weight decay) on λ(epoch) · ∂L/∂τ ·
  t_end · σ'(θ), λ read at the step's 1-based epoch."""
  method = get_method("ctkd")
  hparams = method.hparams()
  network = Network(backbone=_Tiny(), bridge=method.bridge(16, hparams))
  teacher = Network(backbone=_Tiny())
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(8, 2, 2, 1)).astype(np.float32),
           "label": rng.integers(0, 5, size=8).astype(np.int32)}
  teacher_vars = teacher.init(jax.random.key(1), jnp.zeros((1, 2, 2, 1)))
  teacher_out = teacher.apply(teacher_vars, jnp.asarray(batch["image"]), train=False)
  variables = network.init(jax.random.key(0), jnp.zeros((1, 2, 2, 1)), teacher_out=teacher_out)
  assert variables["params"]["bridge"]["global_T"].tolist() == [1.0]
  config = default.get_config()
  lr = 0.05
  schedule = learning_rate_schedule(config, lr, 3, 1)
  tx = make_optimizer(config, schedule)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                     batch_stats=variables["batch_stats"],
                     opt_state=tx.init(variables["params"]))
  step = jax.jit(functools.partial(
      steps.train_step, network=network, teacher_network=teacher, loss=method.loss,
      hparams=hparams, tx=tx, schedule=schedule, steps_per_epoch=1))

  @jax.jit
  def d_loss_d_tau(params, batch_stats):
    out, _ = network.apply({"params": params, "batch_stats": batch_stats},
                           jnp.asarray(batch["image"]), train=True, teacher_out=teacher_out,
                           batch=batch, mutable=["batch_stats"])
    theta = params["bridge"]["global_T"]
    tau = hparams.t_start + hparams.t_end * jax.nn.sigmoid(theta)
    grad = jax.grad(lambda x: ctkd.ctkd_loss(out["logits"], teacher_out["logits"],
                                             batch["label"], x, hparams)[0])(tau)
    return grad * hparams.t_end * jax.nn.sigmoid(theta) * (1 - jax.nn.sigmoid(theta))

  momentum, weight_decay = config.optimizer.momentum, config.optimizer.weight_decay
  theta, velocity = variables["params"]["bridge"]["global_T"], 0.0
  for epoch in (1, 2):
    lam = np.float32(ctkd.cosine_decay(epoch, 0.0, -1.0, 10.0))
    grad = lam * d_loss_d_tau(state.params, state.batch_stats) + weight_decay * theta
    velocity = momentum * velocity + grad
    theta = theta - lr * velocity
    state, metrics = step(state, teacher_vars, batch)
    assert float(metrics["ctkd_lambda"]) == lam
    np.testing.assert_allclose(state.params["bridge"]["global_T"], theta, rtol=1e-6)
  assert float(state.params["bridge"]["global_T"][0]) != 1.0
