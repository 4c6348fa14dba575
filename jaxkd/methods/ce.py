"""Cross-entropy only: the teacher's own training, the "student alone" baseline, and the linear
probe's classifier on a frozen backbone."""

from typing import Any

import flax.linen as nn
import jax
import ml_collections

from jaxkd.methods.base import Method, Outputs
from jaxkd.methods.losses import cross_entropy, topk_correct
from jaxkd.models import layers


def ce_loss(student_out: Outputs, teacher_out: None, labels: jax.Array,
            hparams: ml_collections.ConfigDict) -> tuple[jax.Array, dict[str, jax.Array]]:
  """L = CE(student logits, labels); the teacher is not used."""
  del teacher_out, hparams
  logits = student_out["logits"]
  loss = cross_entropy(logits, labels)
  return loss, {"loss": loss, "loss_ce": loss, "top1": topk_correct(logits, labels, 1).mean()}


METHOD = Method(name="ce", loss=ce_loss, uses_teacher=False)


class LinearClassifier(nn.Module):
  """logits = Linear(N)(feats[tap]): the linear probe on a frozen backbone's features."""
  num_classes: int
  tap: str = "pooled"

  @nn.compact
  def __call__(self, outputs: Any, train: bool = False) -> dict[str, jax.Array]:
    del train
    return {"logits": layers.Linear(self.num_classes, name="probe")(outputs["feats"][self.tap])}


def linear_probe_heads(num_classes: int, hparams: ml_collections.ConfigDict,
                       backbone: Any = None) -> nn.Module:
  """The heads factory of the linear probe (a HeadsFactory): a LinearClassifier on
  `hparams.tap`."""
  del backbone
  return LinearClassifier(num_classes, hparams.get("tap", "pooled"))
