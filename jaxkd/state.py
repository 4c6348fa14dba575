"""The student's train state.

The frozen teacher is not part of the state: its variables travel beside it as a separate,
never-differentiated argument of the train step, and are never written into the student's
checkpoint (its path and checksum are recorded instead).
"""

import dataclasses
from typing import Any

import flax
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


def variables_of(state: TrainState) -> dict[str, Any]:
  """The Flax variable dict of the network the state trains."""
  return {"params": state.params, "batch_stats": state.batch_stats}
