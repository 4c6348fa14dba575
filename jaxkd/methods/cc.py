"""CC: Correlation Congruence for knowledge distillation (Peng et al., ICCV 2019), as RepDistiller
implements it.

Reference: RepDistiller distiller_zoo/CC.py (`Correlation`) with two `LinearEmbed`s of
models/util.py. Both networks' pooled vectors (the last tap, taps[-1], [B, C]) are embedded by a
Linear layer each into `feat_dim` dimensions (`--feat_dim`, default 128),

  e_s = Linear_s(f_s),  e_t = Linear_t(f_t),  Δ = e_s − e_t,
  loss_cc = 1/(B − 1) Σ_{i=1}^{B−1} Σ_d |Δ_i,d| · |Δ_{i+1},d|,

a product of *consecutive rows* of the batch (so the value depends on the row order). Both
embeddings are trained with the student: the teacher's Linear gets a gradient too, while the
teacher's pooled vector itself is a constant. RepDistiller's weights
(scripts/run_cifar_distill.sh): `-r 1 -a 0 -b 0.02`, i.e. L = CE + 0.02 · loss_cc.

Reproduces the reference's numbers (tests/data/golden_baselines.npz, prefixes cc, ccx).
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd.models import layers
from jaxkd.methods.base import Method
from jaxkd.methods.objective import (POOLED, WEIGHTS, bridge_term, distillation_objective,
                                     paired_taps)

FEAT_DIM = 128


def correlation_loss(es: jax.Array, et: jax.Array) -> jax.Array:
  """RepDistiller's Correlation: mean_{i < B} Σ_d |Δ_i,d| · |Δ_{i+1},d|, Δ = es − et ([B, D]).

  Both arguments carry gradients (both embeddings are trained); stop the teacher's *input*
  before its embedding, not here. Needs B ≥ 2 (one row has no pair: NaN, as in the reference).
  """
  delta = jnp.abs(es.astype(jnp.float32) - et.astype(jnp.float32))
  return jnp.mean(jnp.sum(delta[:-1] * delta[1:], axis=-1))


class CorrelationBridge(nn.Module):
  """CC's two embeddings as a bridge: `bridge(student_out, teacher_out, batch, train)` ->
  {'loss_cc': correlation_loss(embed_s(taps_s[-1]), embed_t(taps_t[-1]))}.

  `embed_s`, `embed_t`: `layers.Linear(feat_dim)` (PyTorch default init), both trained; the
  teacher's tap is a constant. `teacher_out` is required (also at init: it sizes embed_t).
  """
  feat_dim: int = FEAT_DIM

  @nn.compact
  def __call__(self, student_out: Any, teacher_out: Optional[Any], batch: Optional[Any] = None,
               train: bool = False) -> dict[str, jax.Array]:
    del batch, train
    taps_s, taps_t = paired_taps(student_out, teacher_out, "CorrelationBridge")
    f_s, f_t = taps_s[-1], taps_t[-1]
    f_s = f_s.reshape(f_s.shape[0], -1).astype(jnp.float32)
    f_t = f_t.reshape(f_t.shape[0], -1).astype(jnp.float32)
    e_s = layers.Linear(self.feat_dim, name="embed_s")(f_s)
    e_t = layers.Linear(self.feat_dim, name="embed_t")(f_t)
    return {"loss_cc": correlation_loss(e_s, e_t)}


METHOD = Method(name="cc", loss=distillation_objective("cc", bridge_term("loss_cc")),
                defaults=dict(WEIGHTS, feat_weight=0.02, feat_dim=FEAT_DIM),
                bridge=lambda num_data, hparams: CorrelationBridge(feat_dim=hparams.feat_dim),
                taps=POOLED)
