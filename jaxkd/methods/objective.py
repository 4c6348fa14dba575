"""The objective the feature-based baselines share, and how they read the networks' taps.

RepDistiller trains every baseline on one objective (its `-r -a -b` weights):

  L = ce_weight · CE(s, y) + kd_weight · DistillKL_T(s, t) + feat_weight · L_method

where L_method is the method's own term on the feature taps (or computed by its bridge), and
DistillKL_T is Hinton's KD term of jaxkd.methods.losses.distill_kl.
"""

from typing import Callable

import jax
import ml_collections

from jaxkd.methods.base import LossFn, Outputs
from jaxkd.methods.losses import cross_entropy, distill_kl, topk_correct

# term(student_out, teacher_out, hparams) -> (L_method, {metric name: scalar})
TermFn = Callable[[Outputs, Outputs, ml_collections.ConfigDict],
                  tuple[jax.Array, dict[str, jax.Array]]]

# ce_weight, kd_weight (RepDistiller's -r, -a) and T of the objective; each method adds its
# feat_weight (-b) and its own hyper-parameters.
WEIGHTS = dict(ce_weight=1.0, kd_weight=0.0, T=4.0)


def taps(out: Outputs) -> list[jax.Array]:
  """The network's taps as RepDistiller's `feat` list: [f0 (stem), stage maps…, pooled]."""
  return list(out["feats"].values())


def bridge_term(key: str) -> TermFn:
  """A method term its bridge has already computed into the student outputs (`key`)."""
  def term(student_out, teacher_out, hparams):
    del teacher_out, hparams
    return student_out[key], {}
  return term


def distillation_objective(name: str, term: TermFn) -> LossFn:
  """The baseline's student loss: ce_weight·CE + kd_weight·KD + feat_weight·term (see above).

  Metrics: loss, loss_ce, loss_kd (where kd_weight ≠ 0), loss_<name> (unweighted) and what
  the term adds, top1.
  """
  def loss(student_out, teacher_out, labels, hparams):
    logits = student_out["logits"]
    loss_ce = cross_entropy(logits, labels)
    value, metrics = term(student_out, teacher_out, hparams)
    total = hparams.ce_weight * loss_ce + hparams.feat_weight * value
    metrics = dict(metrics, loss_ce=loss_ce, top1=topk_correct(logits, labels, 1).mean())
    metrics[f"loss_{name}"] = value
    if hparams.kd_weight:
      metrics["loss_kd"] = distill_kl(logits, teacher_out["logits"], hparams.T)
      total = total + hparams.kd_weight * metrics["loss_kd"]
    metrics["loss"] = total
    return total, metrics
  return loss


def preparation_objective(name: str, term: TermFn) -> LossFn:
  """A student preparation stage's loss: the method's term alone, unweighted (RepDistiller's
  `init`)."""
  def loss(student_out, teacher_out, labels, hparams):
    del labels
    value, metrics = term(student_out, teacher_out, hparams)
    return value, dict(metrics, loss=value, **{f"loss_{name}": value})
  return loss
