"""What a distillation method is, as far as the trainer is concerned.

A method is data, not a branch in the trainer: the views it needs from the input pipeline,
whether it reads a teacher, optional heads it adds to the student, and a pure loss

    loss(student_out, teacher_out, labels, hparams) -> (scalar, metrics)

`student_out` / `teacher_out` are dicts with at least 'logits' [R, N] and 'feats' (the named taps
of the backbone) over the R rows of the step (R = B·views, interleaved image-major), plus whatever
the method's heads add. `labels` holds the B class labels of the original images.
"""

import dataclasses
from typing import Any, Callable, Mapping, Optional

import jax
import ml_collections

Outputs = Mapping[str, Any]
LossFn = Callable[[Outputs, Optional[Outputs], jax.Array, ml_collections.ConfigDict],
                  tuple[jax.Array, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class Method:
  """A registered distillation method.

  Attributes:
    name: registry name, used in configs (`--config.method.name=kd`).
    loss: the pure loss function (see module docstring).
    views: input views of the training batch: 'none', 'rotations' or 'two_crops'.
    uses_teacher: whether `teacher_out` is computed (False for plain cross-entropy).
    defaults: default hyper-parameters; `config.method` overrides them.
    student_heads: optional factory `(num_classes, hparams) -> nn.Module` of extra student heads,
      called as `heads(outputs, train=...)` and returning a dict merged into the outputs.
  """
  name: str
  loss: LossFn
  views: str = "none"
  uses_teacher: bool = True
  defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  student_heads: Optional[Callable[..., Any]] = None

  def hparams(self, overrides: Optional[ml_collections.ConfigDict] = None
              ) -> ml_collections.ConfigDict:
    """The method's defaults updated with the matching fields of `overrides`."""
    merged = ml_collections.ConfigDict(dict(self.defaults))
    if overrides is not None:
      for key, value in overrides.items():
        if key != "name":
          merged[key] = value
    return merged
