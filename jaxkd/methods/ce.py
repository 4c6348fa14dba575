"""Cross-entropy only: the teacher's own training and the "student alone" baseline."""

import jax
import ml_collections

from jaxkd.methods.base import Method, Outputs
from jaxkd.methods.losses import cross_entropy, topk_correct


def ce_loss(student_out: Outputs, teacher_out: None, labels: jax.Array,
            hparams: ml_collections.ConfigDict) -> tuple[jax.Array, dict[str, jax.Array]]:
  """L = CE(student logits, labels); the teacher is not used."""
  del teacher_out, hparams
  logits = student_out["logits"]
  loss = cross_entropy(logits, labels)
  return loss, {"loss": loss, "loss_ce": loss, "top1": topk_correct(logits, labels, 1).mean()}


METHOD = Method(name="ce", loss=ce_loss, uses_teacher=False)
