"""Multi-level logit distillation, MLKD (Jin, Wang and Lin, CVPR 2023).

As the authors' code computes it (Jin-Ying/Multi-Level-Logit-Distillation @ 5ee473f,
mdistiller/distillers/KD_ours.py::KD_ours, called by engine/trainer.py::AugTrainer with the
weak and the strong view of every image; mdistiller/dataset/cifar100.py makes the views). The
student and the teacher see both views: rows are interleaved image-major, row 2i = image i's
weak view (the dataset's crop + flip), row 2i + 1 its strong view (its own crop + flip, then
RandAugment; views 'weak_strong', jaxkd.data.views). With P = softmax(z / τ) [B, C] of one
view's B rows, three terms per temperature τ:

  kd(z_s, z_t, τ) = τ² / B · Σ_i KL(P_t,i ‖ P_s,i)                (instance level)
  cc(z_s, z_t, τ) = Σ_{c,c'} (P_tᵀP_t − P_sᵀP_s)²_{cc'} / C         (class level, C × C)
  bc(z_s, z_t, τ) = Σ_{i,j} (P_t P_tᵀ − P_s P_sᵀ)²_{ij} / B         (batch level, B × B)

at the temperatures τ ∈ {T, 3, 5, 2, 6} (the config's T, then four hard-coded ones). The
confidence masks come from the teacher's weak view, q = softmax(z_t^weak):

  m_i = [max_c q_ic ≤ median_i max_c q_ic]       (the less confident half of the batch)
  n_c = [Σ_i q_ic ≤ median_c Σ_i q_ic]           (the less predicted half of the classes)

the medians being np.percentile's 50th (linear interpolation between the two middle values of
an even count). The objective, AugTrainer's sum of the returned losses, with w = kd_weight:

  L_ce = ce_weight · (CE(z_s^weak, y) + CE(z_s^strong, y))
  L_kd = w · mean(m) · Σ_τ kd(weak, τ)
         + w · (kd(strong, T) + kd(strong, 3) + kd(strong, 5) + kd(weak, 2) + kd(weak, 6))
  L_cc = w · mean(n) · Σ_τ cc(weak, τ)
  L_bc = w · mean(m) · Σ_τ bc(weak, τ)
  L = L_ce + L_kd + L_cc + L_bc

Where jaxkd follows the code, not the paper:
  - The masks only scale. kd, cc and bc are called with their default `reduce=True` (the
    `reduce=False` argument is commented out), so each term is a scalar and `(term · mask).mean()`
    is term · mean(mask): the masks do not select samples or classes, they weigh every weak-view
    term by the kept fraction (1/2 of the batch, 1/2 of the classes), and they keep the *less*
    confident half (`≤` the median).
  - The last two terms of the strong view's instance loss (τ = 2 and 6) read the *weak* logits.
  - The strong view has no class- or batch-level term in the objective: the reference computes
    `loss_cc_strong` and `loss_bc_strong` but does not return them (`mlkd_loss` computes them as
    the reference does, for the record: cc unmasked with the same weak-logit quirk at τ = 2 and
    6, bc masked by the weak view's m).
  - Every term is multiplied by the KD weight; the CE weight applies to both views' CE.
  - The reference calls its student on the weak, then on the strong images (one BatchNorm
    forward per view); the method asks the trainer to do so (Method.student_views_apart).

Defaults: the authors' CIFAR-100 configs (configs/cifar100/ours/*.yaml over mdistiller's CFG):
T = 4, kd_weight = 0.9, ce_weight = 0.1 (their SGD: lr 0.025, or 0.01 for ShuffleNet and
MobileNetV2 students, batch 64). With `logit_standardize` (sunshangquan/logit-standardization-KD
@ f6e5aa5, mdistiller/distillers/MLKD.py; jaxkd.methods.logit_standardization) the instance
terms kd read standardized logits of both networks; cc, bc, the masks and the CE read the raw
logits; the defaults become T = 2, kd_weight = 9 (its `--logit-stand` block, as for KD).
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from jaxkd.errors import UserError
from jaxkd.methods import logit_standardization
from jaxkd.methods.base import Method, Outputs
from jaxkd.methods.losses import cross_entropy, distill_kl, topk_correct

# KD_ours's CIFAR-100 settings: mdistiller's CFG.KD, which configs/cifar100/ours/*.yaml keep;
# `percentile` is the reference's hard-coded np.percentile(·, 50) of the confidence masks.
MLKD_DEFAULTS = dict(T=4.0, ce_weight=0.1, kd_weight=0.9, percentile=50.0)
# The temperatures after the config's T, hard-coded in the reference, in its order.
EXTRA_TEMPERATURES = (3.0, 5.0, 2.0, 6.0)
# The views of an MLKD batch (rows 2i, 2i + 1).
NUM_VIEWS = 2


def temperatures(temperature: float) -> tuple[float, ...]:
  """(T, 3, 5, 2, 6): the temperatures of every MLKD loss."""
  return (float(temperature),) + EXTRA_TEMPERATURES


def _probs(logits: jax.Array, temperature: float) -> jax.Array:
  return jax.nn.softmax(logits.astype(jnp.float32) / temperature, axis=-1)


def kd_term(logits_s: jax.Array, logits_t: jax.Array, temperature: float) -> jax.Array:
  """τ² / B · Σ_i KL(softmax(z_t,i / τ) ‖ softmax(z_s,i / τ)) (the reference's `kd_loss`)."""
  return distill_kl(logits_s.astype(jnp.float32), logits_t.astype(jnp.float32), temperature)


def cc_term(logits_s: jax.Array, logits_t: jax.Array, temperature: float) -> jax.Array:
  """Σ (P_tᵀP_t − P_sᵀP_s)² / C over the C × C class correlations (the reference's `cc_loss`)."""
  p_s, p_t = _probs(logits_s, temperature), _probs(logits_t, temperature)
  return jnp.sum((p_t.T @ p_t - p_s.T @ p_s) ** 2) / logits_t.shape[-1]


def bc_term(logits_s: jax.Array, logits_t: jax.Array, temperature: float) -> jax.Array:
  """Σ (P_t P_tᵀ − P_s P_sᵀ)² / B over the B × B sample correlations (the reference's
  `bc_loss`)."""
  p_s, p_t = _probs(logits_s, temperature), _probs(logits_t, temperature)
  return jnp.sum((p_t @ p_t.T - p_s @ p_s.T) ** 2) / logits_t.shape[0]


class ConfidenceMasks(NamedTuple):
  """The teacher's confidences on the weak view and what the reference's masks keep."""
  confidence: jax.Array  # [B] max_c softmax(z_t^weak)
  threshold: jax.Array  # percentile of `confidence`
  mask: jax.Array  # [B] bool, confidence ≤ threshold
  class_confidence: jax.Array  # [C] Σ_i softmax(z_t^weak)
  class_threshold: jax.Array
  class_mask: jax.Array  # [C] bool


def percentile(x: jax.Array, q: float) -> jax.Array:
  """np.percentile(x, q) of a 1-d array, 'linear': the sorted values a ≤ b around position
  k = q / 100 · (n − 1) (computed in float64 on the host: q and n are static), blended as
  numpy's `_lerp` blends them (a + (b − a)·t below t = 1/2, b − (b − a)·(1 − t) from it), so
  q = 0 and 100 give the extremes exactly."""
  n = x.shape[0]
  k = q / 100.0 * (n - 1)
  lo = min(int(math.floor(k)), n - 1)
  hi, t = min(lo + 1, n - 1), k - lo
  ordered = jnp.sort(x)
  a, b = ordered[lo], ordered[hi]
  return a + (b - a) * t if t < 0.5 else b - (b - a) * (1.0 - t)


def confidence_masks(logits_t_weak: jax.Array, q: float = 50.0) -> ConfidenceMasks:
  """The masks of the less confident samples and classes (`≤` their q-th percentile)."""
  probs = jax.nn.softmax(jax.lax.stop_gradient(logits_t_weak).astype(jnp.float32), axis=-1)
  confidence, class_confidence = jnp.max(probs, axis=-1), jnp.sum(probs, axis=0)
  threshold = percentile(confidence, q)
  class_threshold = percentile(class_confidence, q)
  return ConfidenceMasks(confidence, threshold, confidence <= threshold, class_confidence,
                         class_threshold, class_confidence <= class_threshold)


class MLKDTerms(NamedTuple):
  """MLKD's objective and its parts, as KD_ours computes them (weights included)."""
  total: jax.Array  # ce + kd + cc + bc
  ce: jax.Array
  kd: jax.Array  # kd_weak + kd_strong
  cc: jax.Array  # cc_weak
  bc: jax.Array  # bc_weak
  kd_weak: jax.Array
  kd_strong: jax.Array
  cc_weak: jax.Array
  cc_strong: jax.Array  # computed by the reference, not in its objective
  bc_weak: jax.Array
  bc_strong: jax.Array  # computed by the reference, not in its objective
  masks: ConfidenceMasks


def _view_sum(term, s, t, taus) -> jax.Array:
  return sum(term(s, t, tau) for tau in taus)


def _strong_sum(term, weak, strong, taus) -> jax.Array:
  """The reference's strong-view sums: the strong logits at T, 3, 5, the weak ones at 2, 6."""
  return (_view_sum(term, *strong, taus[:3]) + _view_sum(term, *weak, taus[3:]))


def mlkd_loss(s_weak: jax.Array, s_strong: jax.Array, t_weak: jax.Array, t_strong: jax.Array,
              labels: jax.Array, hparams: ml_collections.ConfigDict) -> MLKDTerms:
  """MLKD's terms from each view's logits [B, C] (see the module docstring); the teacher's are
  constants. hparams: T, ce_weight, kd_weight, percentile[, logit_standardize]."""
  t_weak, t_strong = jax.lax.stop_gradient(t_weak), jax.lax.stop_gradient(t_strong)
  taus, w = temperatures(hparams.T), hparams.kd_weight
  masks = confidence_masks(t_weak, hparams.get("percentile", 50.0))
  kept, class_kept = masks.mask.mean(dtype=jnp.float32), masks.class_mask.mean(dtype=jnp.float32)
  std = lambda z: logit_standardization.maybe_standardize(z, hparams)  # noqa: E731
  weak, strong = (s_weak, t_weak), (s_strong, t_strong)
  std_weak, std_strong = (std(s_weak), std(t_weak)), (std(s_strong), std(t_strong))
  ce = hparams.ce_weight * (cross_entropy(s_weak, labels) + cross_entropy(s_strong, labels))
  kd_weak = w * kept * _view_sum(kd_term, *std_weak, taus)
  kd_strong = w * _strong_sum(kd_term, std_weak, std_strong, taus)
  cc_weak = w * class_kept * _view_sum(cc_term, *weak, taus)
  cc_strong = w * _strong_sum(cc_term, weak, strong, taus)
  bc_weak = w * kept * _view_sum(bc_term, *weak, taus)
  bc_strong = w * kept * _view_sum(bc_term, *strong, taus)
  kd = kd_weak + kd_strong
  return MLKDTerms(total=ce + kd + cc_weak + bc_weak, ce=ce, kd=kd, cc=cc_weak, bc=bc_weak,
                   kd_weak=kd_weak, kd_strong=kd_strong, cc_weak=cc_weak, cc_strong=cc_strong,
                   bc_weak=bc_weak, bc_strong=bc_strong, masks=masks)


def split_views(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Rows 2i (weak) and 2i + 1 (strong) of [2B, C] logits, each [B, C]."""
  by_image = logits.reshape((-1, NUM_VIEWS) + logits.shape[1:])
  return by_image[:, 0], by_image[:, 1]


def mlkd_objective(student_out: Outputs, teacher_out: Outputs, labels: jax.Array,
                   hparams: ml_collections.ConfigDict) -> tuple[jax.Array, dict[str, jax.Array]]:
  """L = L_ce + L_kd + L_cc + L_bc on the step's weak/strong rows (AugTrainer's objective).

  Logs the reference's returned losses (weights included) under their names, the two views'
  instance losses, the kept fractions of the masks and the top-1 of the weak rows (the
  predictions the reference's trainer scores).
  """
  s_weak, s_strong = split_views(student_out["logits"])
  t_weak, t_strong = split_views(teacher_out["logits"])
  terms = mlkd_loss(s_weak, s_strong, t_weak, t_strong, labels, hparams)
  return terms.total, {
      "loss": terms.total, "loss_ce": terms.ce, "loss_kd": terms.kd, "loss_cc": terms.cc,
      "loss_bc": terms.bc, "loss_kd_weak": terms.kd_weak, "loss_kd_strong": terms.kd_strong,
      "mlkd_kept": terms.masks.mask.mean(dtype=jnp.float32),
      "mlkd_class_kept": terms.masks.class_mask.mean(dtype=jnp.float32),
      "top1": topk_correct(s_weak, labels, 1).mean()}


def check_hparams(hparams: ml_collections.ConfigDict) -> None:
  """The masks' percentile must lie in [0, 100]."""
  if not 0.0 <= hparams.percentile <= 100.0:
    raise UserError(f"mlkd's percentile is {hparams.percentile!r}; it must be in [0, 100] (the "
                    f"confidence masks' cut): set e.g. --config.method.percentile="
                    f"{MLKD_DEFAULTS['percentile']}")


METHOD = Method(name="mlkd", loss=mlkd_objective, views="weak_strong", defaults=MLKD_DEFAULTS,
                check_hparams=check_hparams, student_views_apart=True,
                switch_defaults=(logit_standardization.switch(logit_standardization.KD_DEFAULTS),))
