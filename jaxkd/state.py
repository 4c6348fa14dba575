"""The student's train state, and the network a method trains (backbone + optional heads).

The frozen teacher is not part of the state: its variables travel beside it as a separate,
never-differentiated argument of the train step, and are never written into the student's
checkpoint (its path and checksum are recorded instead).
"""

import dataclasses
from typing import Any, Optional

import flax
import flax.linen as nn
import jax


@flax.struct.dataclass
class TrainState:
  """step, the trained variables (`params`, `batch_stats`) and the optimiser state.

  `teacher_head`: {'params', 'opt_state'} of a head trained on the frozen teacher beside the
  student (a method's `online_teacher_head`), else empty. It is part of the state, so it is
  checkpointed with the student and a resumed run continues it exactly.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  teacher_head: Any = dataclasses.field(default_factory=dict)


class Network(nn.Module):
  """A zoo backbone plus a method's heads, returning one dict of outputs.

  {'logits': [R, N], 'feats': {tap: array}, ...whatever the heads add}. The backbone's
  variables live under 'backbone', so a reference checkpoint maps onto them unchanged.
  With `frozen_backbone` the backbone always runs in inference mode and passes no gradient, as
  when only a method's heads are trained on a finished teacher.
  A method's `bridge` (variables under 'bridge') runs after the heads when the training step
  passes the teacher's outputs and the batch, and at initialisation to create its variables.
  With `preact` the backbone's stage taps are taken before their last ReLU.
  """
  backbone: nn.Module
  heads: Optional[nn.Module] = None
  frozen_backbone: bool = False
  bridge: Optional[nn.Module] = None
  preact: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, teacher_out: Optional[Any] = None,
               batch: Optional[Any] = None) -> dict[str, Any]:
    # Only asked for when needed: a CLIP tower has no pre-activation taps.
    preact = {"preact": True} if self.preact else {}
    logits, feats = self.backbone(x, train=train and not self.frozen_backbone, **preact)
    if self.frozen_backbone:
      logits, feats = jax.lax.stop_gradient((logits, feats))
    out = {"logits": logits, "feats": feats}
    if self.heads is not None:
      out.update(self.heads(out, train=train))
    if self.bridge is not None and (teacher_out is not None or self.is_initializing()):
      out.update(self.bridge(out, teacher_out, batch, train=train))
    return out


def variables_of(state: TrainState) -> dict[str, Any]:
  """The Flax variable dict of the network the state trains."""
  return {"params": state.params, "batch_stats": state.batch_stats}
