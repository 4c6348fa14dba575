"""FitNet: hints for thin deep nets (Romero et al., ICLR 2015), as RepDistiller runs it.

Reference: RepDistiller distiller_zoo/FitNet.py (`HintLoss` = torch MSELoss) with the regressor
`ConvReg` of models/util.py (see `jaxkd.methods.connectors`), called in helper/loops.py as

  loss_kd = MSE(ConvReg(f_s[h]), f_t[h])

on the tap h = `--hint_layer` (default 2: the second stage's output, taps[2]) of both networks;
the regressor (conv + BN + ReLU, BN in train mode) is trained with the student. The teacher map
is a constant. RepDistiller's weights (scripts/run_cifar_distill.sh): `-r 1 -a 0 -b 100`, i.e.
L = CE + 100 · loss_fitnet.

Reproduces the reference's numbers (tests/data/golden_baselines.npz, prefixes fitnet*).
"""

from typing import Any, Optional

import flax.linen as nn
import jax

from jaxkd.methods.connectors import ConvReg
from jaxkd.methods.embedding_losses import hint_loss
from jaxkd.methods.base import Method, TapNeed
from jaxkd.methods.objective import WEIGHTS, bridge_term, distillation_objective, paired_taps

HINT_LAYER = 2


class HintBridge(nn.Module):
  """FitNet's regressor as a bridge: `bridge(student_out, teacher_out, batch, train)` ->
  {'loss_fitnet': MSE(regress_s(taps_s[h]), taps_t[h])}, h = `hint_layer`.

  `regress_s` is a `ConvReg` (conv + BN + ReLU) from the student map to the teacher map's shape;
  its BN uses batch statistics when `train`. `teacher_out` is required (also at init: the
  regressor's output shape is the teacher's).
  """
  hint_layer: int = HINT_LAYER

  @nn.compact
  def __call__(self, student_out: Any, teacher_out: Optional[Any], batch: Optional[Any] = None,
               train: bool = False) -> dict[str, jax.Array]:
    del batch
    taps_s, taps_t = paired_taps(student_out, teacher_out, "HintBridge")
    f_s, f_t = taps_s[self.hint_layer], taps_t[self.hint_layer]
    regressed = ConvReg(name="regress_s")(f_s, f_t.shape, train)
    return {"loss_fitnet": hint_loss(regressed, f_t)}


METHOD = Method(name="fitnet", loss=distillation_objective("fitnet", bridge_term("loss_fitnet")),
                defaults=dict(WEIGHTS, feat_weight=100.0, hint_layer=HINT_LAYER),
                bridge=lambda num_data, hparams: HintBridge(hint_layer=hparams.hint_layer),
                taps=TapNeed("the hint tap taps[hint_layer]",
                             lambda taps, h: taps[h.hint_layer:h.hint_layer + 1]))
