"""AB: knowledge transfer via distillation of activation boundaries formed by hidden neurons
(Heo et al., AAAI 2019), as RepDistiller implements it.

Reference: RepDistiller distiller_zoo/AB.py (`ABLoss`), the `Connector` of models/util.py and
helper/pretrain.py (`init`). AB reads the *pre-activation* stage maps (RepDistiller's
`preact=True`: each stage's residual sum before its last ReLU), taps[1:-1] of both networks.
Each student map passes a connector (identity when channels and height already match the
teacher's, else a `ConvReg` without ReLU: conv + BN), and with margin m = 1, n taps and batch B

  ℓ_i = Σ [ (s + m)² · 1(s > −m ∧ t ≤ 0) + (s − m)² · 1(s ≤ m ∧ t > 0) ]   (all entries)
  loss_i = 2^(i − n + 1) · ℓ_i / B / 1000 · 3,   loss_ab = Σ_i loss_i

(weights 1/4, 1/2, 1 for n = 3): a hinge that pushes each student neuron to the teacher's side of
its activation boundary with a margin. The loss is used only in a student preparation stage:
for `--init_epochs` = 30 epochs SGD (lr `--learning_rate`, momentum 0.9, weight decay 5e-4)
trains the connector and the student's feature modules (`get_feat_modules()`: everything but
the classifier, in train mode, so their BNs use batch statistics; the teacher in eval mode) on
loss_ab alone, unweighted. The distillation stage that follows has no AB term (loss_kd = 0):
with RepDistiller's `-r 1 -a 0 -b 1` it is plain CE (+ a·KD with a = 0), and the connector is
not used again.

Reproduces the reference's numbers (tests/data/golden_baselines.npz, prefixes ab, abx).
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd.methods.connectors import ConvReg
from jaxkd.methods.base import Method, StudentPreparation
from jaxkd.methods.objective import (STAGE_MAPS, WEIGHTS, bridge_term, distillation_objective,
                                     paired_taps, preparation_objective)

MARGIN = 1.0


def ab_loss(source: jax.Array, target: jax.Array, margin: float = MARGIN) -> jax.Array:
  """One tap's alternative L2 of ABLoss: Σ over all entries of
  (s + m)² · 1(s > −m ∧ t ≤ 0) + (s − m)² · 1(s ≤ m ∧ t > 0); the target is a constant."""
  s = source.astype(jnp.float32)
  t = jax.lax.stop_gradient(target.astype(jnp.float32))
  below = ((s > -margin) & (t <= 0)).astype(jnp.float32)
  above = ((s <= margin) & (t > 0)).astype(jnp.float32)
  return jnp.sum(jnp.square(s + margin) * below + jnp.square(s - margin) * above)


def ab_loss_group(sources: Sequence[jax.Array], targets: Sequence[jax.Array],
                  margin: float = MARGIN) -> list[jax.Array]:
  """ABLoss's list: loss_i = 2^(i − n + 1) · ab_loss(s_i, t_i) / B / 1000 · 3 over the n taps,
  B the batch size."""
  if len(sources) != len(targets):
    raise ValueError(f"{len(sources)} student taps but {len(targets)} teacher taps")
  n = len(sources)
  batch = sources[0].shape[0]
  return [2.0 ** (i - n + 1) * ab_loss(s, t, margin) / batch / 1000 * 3
          for i, (s, t) in enumerate(zip(sources, targets))]


class Connector(nn.Module):
  """RepDistiller's Connector: `connector(g_s, target_shapes, train)` -> list of maps.

  Tap i is passed unchanged when its channels and height equal the teacher's
  (`target_shapes[i]`, NHWC), else through `ConvReg(use_relu=False)` named `connectors_<i>`
  (conv + BN; BN with batch statistics when `train`).
  """

  @nn.compact
  def __call__(self, g_s: Sequence[jax.Array], target_shapes: Sequence[Sequence[int]],
               train: bool = False) -> list[jax.Array]:
    out = []
    for i, (s, t_shape) in enumerate(zip(g_s, target_shapes)):
      if s.shape[-1] == t_shape[-1] and s.shape[1] == t_shape[1]:
        out.append(s)
      else:
        out.append(ConvReg(use_relu=False, name=f"connectors_{i}")(s, t_shape, train))
    return out


class ABBridge(nn.Module):
  """AB's connector and loss as a bridge: `bridge(student_out, teacher_out, batch, train)` ->
  {'loss_ab': Σ_i loss_i, 'loss_ab_<i>': loss_i} over the stage taps taps[1:-1].

  The caller gives pre-activation taps for both networks. Submodule `connector` (`Connector`;
  it has no parameters when every shape matches). `teacher_out` is required (also at init:
  the teacher's shapes size the connectors).
  """
  margin: float = MARGIN

  @nn.compact
  def __call__(self, student_out: Any, teacher_out: Optional[Any], batch: Optional[Any] = None,
               train: bool = False) -> dict[str, jax.Array]:
    del batch
    taps_s, taps_t = paired_taps(student_out, teacher_out, "ABBridge")
    g_s, g_t = taps_s[1:-1], taps_t[1:-1]
    connected = Connector(name="connector")(g_s, [t.shape for t in g_t], train)
    losses = ab_loss_group(connected, g_t, self.margin)
    out = {f"loss_ab_{i}": loss for i, loss in enumerate(losses)}
    out["loss_ab"] = sum(losses)
    return out


# AB trains the student's feature layers and the connector on its term, on pre-activation taps,
# for init_epochs (stage student_ab_init, lr −1: the student's), then distils with CE alone
# (RepDistiller: `-r 1 -a 0`, loss_kd = 0).
METHOD = Method(
    name="ab", loss=distillation_objective("ab", None), preact=True, taps=STAGE_MAPS,
    defaults=dict(WEIGHTS, margin=MARGIN, init_epochs=30, init_lr=-1.0),
    student_preparation=StudentPreparation(
        loss=preparation_objective("ab", bridge_term("loss_ab")),
        bridge=lambda num_data, hparams: ABBridge(margin=hparams.margin)))
