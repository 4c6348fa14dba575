"""Decoupled knowledge distillation, DKD (Zhao, Cui, Song, Qiu and Liang, CVPR 2022).

As mdistiller's `dkd_loss` computes it (megvii-research/mdistiller, distillers/DKD.py). With
p = softmax(z_s / T), q = softmax(z_t / T) over the N classes and g the label of a row, the
classical KD term splits into a target-class part and a non-target part:

  b = [p_g, Σ_{j≠g} p_j]                       (binary probabilities, summed from the softmax)
  TCKD = T² / B · Σ_i KL(b^t_i ‖ b^s_i)
  p̂ = softmax(z_s / T − 1000 · 1_g),  q̂ = softmax(z_t / T − 1000 · 1_g)
                                                 (the target class pushed out, not set to −∞)
  NCKD = T² / B · Σ_i KL(q̂_i ‖ p̂_i)
  L_DKD = α · TCKD + β · NCKD

The paper shows that, per example, classical KD is TCKD + (1 − q_g) · NCKD: the non-target term is
suppressed where the teacher is confident. DKD decouples the two weights (α, β).

The training objective is `ce_weight · CE(z_s, y) + min(epoch / warmup, 1) · L_DKD`, the
warm-up factor (`dkd_warmup`) applied outside `dkd_loss`. The teacher's logits are constants
(a temperature that is learned, as CTKD's, still gets the gradient through the teacher side).
The reference's numbers are reproduced in tests (tests/data/golden_baselines.npz).

With `logit_standardize` (jaxkd.methods.logit_standardization; the authors' fork
sunshangquan/logit-standardization-KD @ f6e5aa5, mdistiller/distillers/DKD.py) both sides'
logits are standardized before /T and the −1000 · 1_g, and the defaults become α = 9 · α,
β = 9 · β (of the pair), T = 2 (the fork's `--logit-stand` block); CE reads the raw logits.
"""

from typing import Union

import jax
import jax.numpy as jnp
import ml_collections

from jaxkd.methods import logit_standardization
from jaxkd.methods.base import Method, Outputs
from jaxkd.methods.losses import cross_entropy, topk_correct

# mdistiller's CIFAR-100 defaults (engine/cfg.py, CFG.DKD): none of its configs/cifar100/dkd
# yamls overrides CE_WEIGHT, ALPHA, T or WARMUP; some override BETA (see DKD_CIFAR100_BETA).
DKD_DEFAULTS = dict(ce_weight=1.0, alpha=1.0, beta=8.0, T=4.0, warmup=20)

# β of every (teacher, student) pair of mdistiller's configs/cifar100/dkd/*.yaml, under the
# jaxkd zoo's model names (the yamls' TEACHER/STUDENT fields use the same names). Pairs whose
# yaml leaves BETA at the default 8.0 are listed too. wrn_40_2 → ShuffleV1 keeps 8.0, unlike
# the other wrn_40_2 pairs.
DKD_CIFAR100_BETA: dict[tuple[str, str], float] = {
    ("resnet32x4", "resnet8x4"): 8.0,
    ("resnet32x4", "ShuffleV1"): 8.0,
    ("resnet32x4", "ShuffleV2"): 8.0,
    ("ResNet50", "MobileNetV2"): 8.0,
    ("wrn_40_2", "ShuffleV1"): 8.0,
    ("resnet56", "resnet20"): 2.0,
    ("resnet110", "resnet32"): 2.0,
    ("vgg13", "vgg8"): 6.0,
    ("vgg13", "MobileNetV2"): 6.0,
    ("wrn_40_2", "wrn_16_2"): 6.0,
    ("wrn_40_2", "wrn_40_1"): 6.0,
}

# 1000 · 1_g subtracted from the scaled logits of the target class in NCKD.
TARGET_OFFSET = 1000.0


def dkd_beta(teacher_name: str, student_name: str) -> float:
  """mdistiller's CIFAR-100 β for the pair (zoo names), the default 8.0 for pairs it has no
  config for."""
  return DKD_CIFAR100_BETA.get((teacher_name, student_name), DKD_DEFAULTS["beta"])


def dkd_warmup(epoch: Union[int, jax.Array], warmup: Union[int, float]) -> jax.Array:
  """min(epoch / warmup, 1), with `epoch` 1-based as mdistiller's trainer counts it (the first
  epoch is scaled by 1/warmup, full weight from epoch `warmup` on)."""
  return jnp.minimum(jnp.asarray(epoch, jnp.float32) / warmup, 1.0)


def target_mask(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """1_g: 1.0 at (i, labels_i), 0.0 elsewhere, shape of `logits` (the reference's scatter)."""
  return jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)


def _kl_sum(p_t: jax.Array, log_p_s: jax.Array) -> jax.Array:
  """Σ p_t (log p_t − log p_s) over all entries, an entry with p_t = 0 counting 0 (kl_div's
  `size_average=False`).

  Where p_t = 0 the gradient with respect to p_t is 0, as torch ≤ 1.12's `kl_div` gave it
  (pytorch/pytorch#89558): the derivative of p log p is not taken there (it is NaN in torch ≥
  1.13). It matters only when p_t depends on a learned parameter, as CTKD's temperature.
  """
  positive = p_t > 0
  log_p_t = jnp.log(jnp.where(positive, p_t, 1.0))
  return jnp.sum(jnp.where(positive, p_t * (log_p_t - log_p_s), 0.0))


def tckd(logits_s: jax.Array, logits_t: jax.Array, labels: jax.Array, temperature: float
         ) -> jax.Array:
  """TCKD = T² / B · Σ_i KL(b^t_i ‖ b^s_i), b = [p_g, Σ_{j≠g} p_j] of softmax(z / T).

  Both bins are sums over the masked softmax (the non-target bin is not 1 − p_g), and the
  student's log is taken of those sums.
  """
  mask = target_mask(logits_s, labels)

  def bins(logits):
    p = jax.nn.softmax(logits.astype(jnp.float32) / temperature, axis=-1)
    return jnp.stack([jnp.sum(p * mask, axis=-1), jnp.sum(p * (1.0 - mask), axis=-1)], axis=-1)

  b_s = bins(logits_s)
  b_t = bins(jax.lax.stop_gradient(logits_t))
  return _kl_sum(b_t, jnp.log(b_s)) * temperature ** 2 / labels.shape[0]


def nckd(logits_s: jax.Array, logits_t: jax.Array, labels: jax.Array, temperature: float
         ) -> jax.Array:
  """NCKD = T² / B · Σ_i KL(q̂_i ‖ p̂_i), p̂ = softmax(z_s / T − 1000 · 1_g), q̂ likewise."""
  offset = TARGET_OFFSET * target_mask(logits_s, labels)
  log_p_s = jax.nn.log_softmax(logits_s.astype(jnp.float32) / temperature - offset, axis=-1)
  z_t = jax.lax.stop_gradient(logits_t.astype(jnp.float32)) / temperature - offset
  p_t = jax.nn.softmax(z_t, axis=-1)
  return _kl_sum(p_t, log_p_s) * temperature ** 2 / labels.shape[0]


def dkd_loss(logits_s: jax.Array, logits_t: jax.Array, labels: jax.Array, alpha: float,
             beta: float, temperature: float) -> jax.Array:
  """L_DKD = α · TCKD + β · NCKD (mdistiller's `dkd_loss`, without the warm-up factor)."""
  return (alpha * tckd(logits_s, logits_t, labels, temperature)
          + beta * nckd(logits_s, logits_t, labels, temperature))


def dkd_objective(student_out: Outputs, teacher_out: Outputs, labels: jax.Array,
                  hparams: ml_collections.ConfigDict) -> tuple[jax.Array, dict[str, jax.Array]]:
  """L = ce_weight · CE(z_s, y) + min(epoch / warmup, 1) · L_DKD (mdistiller's DKD distiller),
  with the 1-based epoch of the step; L_DKD on standardized logits with `logit_standardize`."""
  s, t = student_out["logits"], teacher_out["logits"]
  loss_ce = cross_entropy(s, labels)
  z_s = logit_standardization.maybe_standardize(s, hparams)
  z_t = logit_standardization.maybe_standardize(t, hparams)
  loss_tckd = tckd(z_s, z_t, labels, hparams.T)
  loss_nckd = nckd(z_s, z_t, labels, hparams.T)
  loss_dkd = hparams.alpha * loss_tckd + hparams.beta * loss_nckd
  ramp = dkd_warmup(student_out["epoch"], hparams.warmup)
  loss = hparams.ce_weight * loss_ce + ramp * loss_dkd
  return loss, {"loss": loss, "loss_ce": loss_ce, "loss_dkd": loss_dkd,
                "loss_tckd": loss_tckd, "loss_nckd": loss_nckd, "dkd_warmup": ramp,
                "top1": topk_correct(s, labels, 1).mean()}


def standardized_defaults(hparams: ml_collections.ConfigDict) -> dict[str, float]:
  """The defaults under logit standardization: α and β (the pair's) ×9, T = 2 (the
  `--logit-stand` block of the authors' tools/train.py with `--base-temp 2 --kd-weight 9`)."""
  weight = logit_standardization.KD_WEIGHT
  return {"alpha": hparams.alpha * weight, "beta": hparams.beta * weight,
          "T": logit_standardization.BASE_TEMPERATURE}


METHOD = Method(name="dkd", loss=dkd_objective, defaults=DKD_DEFAULTS,
                pair_defaults=lambda teacher, student: {"beta": dkd_beta(teacher, student)},
                switch_defaults=(logit_standardization.switch(standardized_defaults),))
