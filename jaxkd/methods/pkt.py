"""Probabilistic Knowledge Transfer (Passalis and Tefas, ECCV 2018), RepDistiller's `pkt`.

L_method = KL between the cosine-affinity distributions of the pooled features (RepDistiller's
feat[-1]), jaxkd.methods.embedding_losses.pkt_loss; weights as RepDistiller's CIFAR script
(`-r 1 -a 0 -b 30000`). Used in CRD's and SSKD's tables.
"""

from jaxkd.methods.base import Method
from jaxkd.methods.embedding_losses import pkt_loss
from jaxkd.methods.objective import POOLED, WEIGHTS, distillation_objective, taps


def pkt_term(student_out, teacher_out, hparams):
  del hparams
  return pkt_loss(taps(student_out)[-1], taps(teacher_out)[-1]), {}


METHOD = Method(name="pkt", loss=distillation_objective("pkt", pkt_term),
                defaults=dict(WEIGHTS, feat_weight=30000.0),
                taps=POOLED)
