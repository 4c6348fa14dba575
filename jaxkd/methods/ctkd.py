"""Curriculum temperature KD, CTKD (Li, Li, Yang, Zhao, Song, Luo, Li and Yang, AAAI 2023).

As the authors' code computes it (zhengli97/CTKD @ 7d52522: models/temp_global.py `Global_T`,
distiller_zoo/KD.py `DistillKL`, distiller_zoo/DKD.py `DKDloss`, the iteration of
helper/loops.py `train_distill`, `CosineDecay`/`LinearDecay` of train_student.py). The
distillation temperature is learned with the student: one parameter θ (initialised to 1, in
the student's optimiser with its weight decay) gives

  τ = t_start + t_end · σ(GRL_λ(θ))

where the gradient-reversal layer GRL_λ is the identity forward and multiplies the incoming
gradient by λ backward (`grad_reverse`), so θ follows λ · ∂L/∂τ · t_end · σ'(θ). λ follows a
curriculum over the 1-based epoch e (the reference calls the schedule once per epoch):

  cosine: λ(e) = (cos(i · π / loops) + 1) / 2 · (max − min) + min,  i = clip(e, 0, loops)
  linear: λ(e) = −(max − min) / loops · i,                         i = clip(e, 0, loops − 1)

with the reference script's max = 0, min = −1, loops = 10 (scripts/run_cifar_distill.sh): λ
falls from 0 to −1 over the first 10 epochs, so the temperature ascends the distillation loss
more and more (an adversarial, easy-to-hard curriculum). λ depends on the epoch and these
hyper-parameters only, not on the run's number of epochs or steps.

The iteration's loss is

  L = γ · CE(z_s, y) + α · KL_τ(z_s, z_t) + β · L_DKD(z_s, z_t, y; dkd_alpha, dkd_beta, τ)
  KL_τ = τ² / B · Σ_i KL(softmax(z_t,i / τ) ‖ softmax(z_s,i / τ))       (KLDivLoss 'batchmean')

with the teacher's logits constant but τ reached through both sides (γ, α, β are the
script's `-r -a -b`; here `ce_weight`, `kd_weight`, `dkd_weight`). `ctkd` is CTKD on KD
(`-r 0.1 -a 0.9 -b 0`), `ctkd_dkd` on DKD (`-r 1 -a 0 -b 1 --dkd_alpha 1 --dkd_beta 2`, no
warm-up: CTKD's DKDloss has none).

Where the code differs from the paper's text, jaxkd follows the code:
- The paper writes the reversal as −λ with λ rising from 0 to 1; the code multiplies by λ
  and makes λ itself negative (0 → −1). The product is the same.
- LinearDecay is not the linear analogue of CosineDecay: it ignores `max` as an offset and
  stops at −(max − min)(loops − 1)/loops (−0.9 with the script's values).
- DKD's NCKD pushes the target class out with −1000 · 1_g, which makes the teacher's
  probability there exactly 0; torch ≥ 1.13 differentiates p log p there to NaN, the pinned
  torch 1.11 to 0. jaxkd gives 0 (jaxkd.methods.dkd._kl_sum).

With `logit_standardize` (the authors' fork of this code for logit standardization,
sunshangquan/logit-standardization-KD @ f6e5aa5, CTKD/), the KL term reads standardized
logits (`DistillKL_logit_stand`) and α defaults to 9 (its CTKD/scripts/run_cifar_distill.sh
`-a 9`; the temperature is still the learned one). The fork's train_student.py picks the
standardized KL when its `--logit_stand` flag is *absent* (the condition is inverted) and
its script omits the flag: jaxkd's switch means what its name says. Only the KL term is
standardized, so the switch is refused for `ctkd_dkd`, whose KL weight is 0.

The instance-wise variant's loss (`instance_kd_loss`, from the reference README) is here; its
temperature module is not in the repository (a cloud-drive download), so it is not a method.
"""

import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxkd.errors import UserError
from jaxkd.methods import dkd
from jaxkd.methods import logit_standardization
from jaxkd.methods.base import Method, Outputs
from jaxkd.methods.losses import cross_entropy, distill_kl, topk_correct

# The learned temperature in the student's outputs (the bridge's output).
GLOBAL_T = "ctkd_global_T"
# ε the instance-wise loss adds to the teacher's probabilities (the reference's 10 ** (-7)).
INSTANCE_PROB_EPS = 1e-7
DECAYS = ("cosine", "linear")

# scripts/run_cifar_distill.sh: `-r 0.1 -a 0.9 -b 0 --have_mlp 1 --mlp_name global
# --cosine_decay 1 --decay_max 0 --decay_min -1 --decay_loops 10`, t_start / t_end at their
# argparse defaults 1 and 20.
DEFAULTS = dict(ce_weight=0.1, kd_weight=0.9, t_start=1.0, t_end=20.0, decay="cosine",
                decay_max=0.0, decay_min=-1.0, decay_loops=10.0)
# The script's DKD line: `-r 1 -a 0 -b 1 --dkd_alpha 1 --dkd_beta 2` (the DKD term is part of
# the loss exactly when `dkd_weight` is a hyper-parameter).
DKD_DEFAULTS = dict(DEFAULTS, ce_weight=1.0, kd_weight=0.0, dkd_weight=1.0, dkd_alpha=1.0,
                    dkd_beta=2.0)


# ------------------------------------------------------------------ gradient reversal


@jax.custom_vjp
def grad_reverse(x: jax.Array, lambda_: jax.Array) -> jax.Array:
  """The identity forward; backward the incoming gradient times `lambda_` (Global_T's
  GradientReversal: λ is not negated here, the schedule makes it ≤ 0). No gradient reaches
  `lambda_`."""
  return x


def _grad_reverse_fwd(x, lambda_):
  return x, lambda_


def _grad_reverse_bwd(lambda_, g):
  lambda_ = jnp.asarray(lambda_)
  return (g * lambda_.astype(g.dtype), jnp.zeros_like(lambda_))


grad_reverse.defvjp(_grad_reverse_fwd, _grad_reverse_bwd)


# --------------------------------------------------------------------------- schedule


def cosine_decay(epoch: float, max_value: float, min_value: float, num_loops: float) -> float:
  """λ of CosineDecay.get_value(epoch): (cos(i·π/loops) + 1)/2 · (max − min) + min, i the
  epoch clamped to [0, loops] (Python floats, float64 as in the reference)."""
  i = min(max(epoch, 0), num_loops)
  value = (math.cos(i * math.pi / num_loops) + 1.0) * 0.5
  return value * (max_value - min_value) + min_value


def linear_decay(epoch: float, max_value: float, min_value: float, num_loops: float) -> float:
  """λ of LinearDecay.get_value(epoch): −(max − min)/loops · i, i the epoch clamped to
  [0, loops − 1] (not an offset by `max`; it never reaches `min`)."""
  i = max(epoch, 0)
  if i >= num_loops:
    i = num_loops - 1
  return i * -((max_value - min_value) / num_loops)


def decay_value(epoch: float, hparams: ml_collections.ConfigDict) -> float:
  """λ at `epoch` (1-based, as train_student.py counts) for the schedule of `hparams`."""
  schedule = cosine_decay if hparams.decay == "cosine" else linear_decay
  return schedule(epoch, hparams.decay_max, hparams.decay_min, hparams.decay_loops)


def decay_table(hparams: ml_collections.ConfigDict) -> np.ndarray:
  """λ at the integer epochs 0, 1, …, ceil(loops) (float64); λ is constant from then on."""
  last = int(math.ceil(hparams.decay_loops))
  return np.array([decay_value(e, hparams) for e in range(last + 1)], np.float64)


def grl_lambda(epoch: jax.Array, hparams: ml_collections.ConfigDict) -> jax.Array:
  """λ at a (traced) integer epoch: the float64 schedule looked up and rounded to float32, as
  the reference's `grads.new_tensor(lambda_)` does."""
  table = decay_table(hparams)
  index = jnp.clip(jnp.asarray(epoch, jnp.int32), 0, table.shape[0] - 1)
  return jnp.asarray(table, jnp.float32)[index]


# --------------------------------------------------------------------------- modules


class GlobalTemperature(nn.Module):
  """Global_T: the one learned parameter θ [1] (initialised to 1), trained with the student.

  A bridge (Method.bridge): called as `bridge(student_out, teacher_out, batch, train=...)`,
  it returns {'ctkd_global_T': θ}; the loss applies the reversal with the epoch's λ and maps
  θ to the temperature (`temperature`).
  """

  @nn.compact
  def __call__(self, student_out: Any, teacher_out: Optional[Any], batch: Optional[Any],
               train: bool = False) -> dict[str, jax.Array]:
    theta = self.param("global_T", nn.initializers.ones, (1,), jnp.float32)
    return {GLOBAL_T: theta}


def temperature(theta: jax.Array, lambda_: jax.Array, t_start: float, t_end: float
                ) -> jax.Array:
  """τ = t_start + t_end · σ(GRL_λ(θ)), shape of θ."""
  return t_start + t_end * jax.nn.sigmoid(grad_reverse(theta, lambda_))


# ----------------------------------------------------------------------------- losses


def instance_kd_loss(logits_s: jax.Array, logits_t: jax.Array, temperatures: jax.Array,
                     eps: float = INSTANCE_PROB_EPS) -> jax.Array:
  """Instance-wise CTKD's KD (the reference README's `KL_Loss`), per-row temperatures T [B]:

  q_i = softmax(z_t,i / T_i) + eps   (eps inside the weight and the log)
  L = 1/B Σ_i T_i² Σ_c q_ic (log q_ic − log_softmax(z_s,i / T_i)_c)

  The teacher's logits are constants; T reaches both sides.
  """
  temps = temperatures.astype(jnp.float32)[:, None]
  z_t = jax.lax.stop_gradient(logits_t.astype(jnp.float32))
  q = jax.nn.softmax(z_t / temps, axis=-1) + eps
  log_p_s = jax.nn.log_softmax(logits_s.astype(jnp.float32) / temps, axis=-1)
  per_row = jnp.sum(q * (jnp.log(q) - log_p_s), axis=-1) * temps[:, 0] ** 2
  return jnp.mean(per_row)


def ctkd_loss(logits_s: jax.Array, logits_t: jax.Array, labels: jax.Array,
              temp: jax.Array, hparams: ml_collections.ConfigDict
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The iteration's loss at temperature `temp` (a scalar, or the reference's shape [1]):

  L = ce_weight · CE + kd_weight · KL_temp [+ dkd_weight · L_DKD(dkd_alpha, dkd_beta, temp)]

  Returns (L, parts): 'loss_cls' (CE), 'loss_div' (KL_temp) and, when `hparams` has a
  `dkd_weight` (ctkd_dkd), 'loss_kd' (L_DKD), all unweighted. With `logit_standardize` the KL
  term reads standardized logits.
  """
  temp = jnp.reshape(temp, ())
  loss_cls = cross_entropy(logits_s, labels)
  loss_div = distill_kl(logit_standardization.maybe_standardize(logits_s, hparams),
                        logit_standardization.maybe_standardize(logits_t, hparams), temp)
  loss = hparams.ce_weight * loss_cls + hparams.kd_weight * loss_div
  parts = {"loss_cls": loss_cls, "loss_div": loss_div}
  if "dkd_weight" in hparams:
    parts["loss_kd"] = dkd.dkd_loss(logits_s, logits_t, labels, hparams.dkd_alpha,
                                    hparams.dkd_beta, temp)
    loss = loss + hparams.dkd_weight * parts["loss_kd"]
  return loss, parts


def ctkd_objective(student_out: Outputs, teacher_out: Outputs, labels: jax.Array,
                   hparams: ml_collections.ConfigDict) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`ctkd_loss` at τ = t_start + t_end · σ(GRL_λ(θ)), θ the bridge's parameter and λ the
  schedule at the step's 1-based epoch."""
  lambda_ = grl_lambda(student_out["epoch"], hparams)
  temp = temperature(student_out[GLOBAL_T], lambda_, hparams.t_start, hparams.t_end)
  s = student_out["logits"]
  loss, parts = ctkd_loss(s, teacher_out["logits"], labels, temp, hparams)
  return loss, dict(parts, loss=loss, ctkd_temperature=jnp.reshape(temp, ()),
                    ctkd_lambda=lambda_, top1=topk_correct(s, labels, 1).mean())


def global_temperature(num_data: int, hparams: ml_collections.ConfigDict) -> nn.Module:
  """The bridge: Global_T (the training set's size is not needed)."""
  del num_data, hparams
  return GlobalTemperature()


def check_hparams(hparams: ml_collections.ConfigDict) -> None:
  """The schedule's name and loops, and a temperature that stays positive."""
  if hparams.decay not in DECAYS:
    raise UserError(f"method.decay={hparams.decay!r} is not a CTKD schedule; valid: "
                    f"{', '.join(DECAYS)} (set e.g. --config.method.decay=cosine)")
  if not hparams.decay_loops > 0:
    raise UserError(f"method.decay_loops={hparams.decay_loops} must be > 0 (epochs over which "
                    "λ decays; set e.g. --config.method.decay_loops=10)")
  if not (hparams.t_start > 0 and hparams.t_end >= 0):
    raise UserError(f"method.t_start={hparams.t_start}, method.t_end={hparams.t_end}: the "
                    "temperature t_start + t_end·σ(θ) needs t_start > 0 and t_end >= 0 (set "
                    "e.g. --config.method.t_start=1 --config.method.t_end=20)")


def check_dkd_hparams(hparams: ml_collections.ConfigDict) -> None:
  """check_hparams, and no logit standardization (the reference standardizes only the KL
  term, whose weight is 0 here)."""
  check_hparams(hparams)
  if logit_standardization.enabled(hparams):
    raise UserError("method.logit_standardize=True does not apply to ctkd_dkd: the "
                    "reference standardizes only CTKD's KL term, not DKD's (use ctkd, or "
                    "leave --config.method.logit_standardize unset)")


METHOD = Method(name="ctkd", loss=ctkd_objective, defaults=DEFAULTS, bridge=global_temperature,
                check_hparams=check_hparams,
                switch_defaults=(logit_standardization.switch(
                    {"kd_weight": logit_standardization.KD_WEIGHT}),))
METHODS = {"ctkd": METHOD,
           "ctkd_dkd": dataclasses.replace(METHOD, name="ctkd_dkd", defaults=DKD_DEFAULTS,
                                           check_hparams=check_dkd_hparams, switch_defaults=())}
