"""Relational KD (Park et al., CVPR 2019) on the pooled features, RepDistiller's `rkd`.

L_method = w_d · distance term + w_a · angle term on RepDistiller's feat[-1] (the pooled
vectors), jaxkd.methods.embedding_losses.rkd_loss; weights as RepDistiller's CIFAR script
(`-r 1 -a 0 -b 1`, w_d 25, w_a 50). Used in CRD's, SSKD's and HSAKD's tables.
"""

from jaxkd.methods.base import Method
from jaxkd.methods.embedding_losses import rkd_loss
from jaxkd.methods.objective import POOLED, WEIGHTS, distillation_objective, taps


def rkd_term(student_out, teacher_out, hparams):
  return rkd_loss(taps(student_out)[-1], taps(teacher_out)[-1], hparams.distance_weight,
                  hparams.angle_weight), {}


METHOD = Method(name="rkd", loss=distillation_objective("rkd", rkd_term),
                defaults=dict(WEIGHTS, feat_weight=1.0, distance_weight=25.0, angle_weight=50.0),
                taps=POOLED)
