"""Hinton et al.'s knowledge distillation with the reference (RepDistiller) weighting."""

import jax
import ml_collections

from jaxkd.methods import logit_standardization
from jaxkd.methods.base import Method, Outputs
from jaxkd.methods.losses import cross_entropy, distill_kl, topk_correct

# RepDistiller's `-r 0.1 -a 0.9` with T = 4 (logit standardization off unless set).
KD_DEFAULTS = dict(T=4.0, ce_weight=0.1, kd_weight=0.9)


def kd_loss(student_out: Outputs, teacher_out: Outputs, labels: jax.Array,
            hparams: ml_collections.ConfigDict) -> tuple[jax.Array, dict[str, jax.Array]]:
  """L = ce_weight · CE(s, y) + kd_weight · T² · mean_r KL(softmax(t_r/T) ‖ softmax(s_r/T)).

  Defaults T = 4, ce_weight = 0.1, kd_weight = 0.9 (RepDistiller's `-r 0.1 -a 0.9`). With
  `logit_standardize` the KL term reads standardize(s), standardize(t) (jaxkd.methods.
  logit_standardization; mdistiller's KD `kd_loss` in the authors' fork), and the defaults
  become T = 2, kd_weight = 9 (their `--logit-stand` block); the CE reads the raw logits.
  """
  s, t = student_out["logits"], teacher_out["logits"]
  loss_ce = cross_entropy(s, labels)
  loss_kd = distill_kl(logit_standardization.maybe_standardize(s, hparams),
                       logit_standardization.maybe_standardize(t, hparams), hparams.T)
  loss = hparams.ce_weight * loss_ce + hparams.kd_weight * loss_kd
  return loss, {"loss": loss, "loss_ce": loss_ce, "loss_kd": loss_kd,
                "top1": topk_correct(s, labels, 1).mean()}


METHOD = Method(name="kd", loss=kd_loss, defaults=KD_DEFAULTS,
                switch_defaults=(logit_standardization.switch(logit_standardization.KD_DEFAULTS),))
