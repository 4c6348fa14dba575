"""What a method's student loss reads, found by tracing it (nothing is computed).

A method that reads no teacher and whose loss does not depend on the labels learns no classes
from anything: it is a self-supervised objective (SimCLR), a way to pretrain a backbone
(`teacher.pretrain`), not a method to distil a student with. `reads_labels` tells, from the
loss's jaxpr on the outputs the student network and the method's heads give: it follows the
loss back to its inputs and looks for the labels among them.
"""

from typing import Any

import jax
import jax.extend.core as jax_core
import jax.numpy as jnp
import ml_collections

from jaxkd import models
from jaxkd.data.views import num_views
from jaxkd.methods import objective
from jaxkd.methods.base import Method

# Images in the traced batch (rows: these times the method's views).
_IMAGES = 2


def _depends_on(jaxpr: jax_core.Jaxpr, var: jax_core.Var) -> bool:
  """Whether an output of `jaxpr` is computed from its input `var` (an equation whose outputs
  are needed needs all of its inputs)."""
  needed = {v for v in jaxpr.outvars if isinstance(v, jax_core.Var)}
  for eqn in reversed(jaxpr.eqns):
    if any(v in needed for v in eqn.outvars):
      needed.update(v for v in eqn.invars if isinstance(v, jax_core.Var))
  return var in needed


def student_outputs(model_name: str, num_classes: int, image_shape: tuple[int, ...],
                    rows: int) -> dict[str, Any]:
  """The shapes of a zoo network's outputs ('logits', 'feats') for `rows` rows."""
  taps = objective.tap_shapes(model_name, num_classes, tuple(image_shape))
  return {"logits": jax.ShapeDtypeStruct((rows, num_classes), jnp.float32),
          "feats": {name: jax.ShapeDtypeStruct((rows,) + tuple(shape[1:]), jnp.float32)
                    for name, shape in taps}}


def reads_labels(method: Method, hparams: ml_collections.ConfigDict, model_name: str,
                 num_classes: int, image_shape: tuple[int, ...]) -> bool:
  """Whether `method`'s student loss (without a teacher) depends on the labels, on the outputs
  of student `model_name` and the method's heads."""
  rows = _IMAGES * num_views(method.views)
  outputs = student_outputs(model_name, num_classes, image_shape, rows)
  heads = None
  if method.student_heads is not None:
    heads = method.student_heads(num_classes, hparams, models.get_model(model_name, num_classes))

  def loss(labels: jax.Array, out: dict[str, Any], epoch: jax.Array) -> jax.Array:
    if heads is not None:
      out = dict(out, **heads.init_with_output(jax.random.key(0), out, train=True)[0])
    return method.loss(dict(out, epoch=epoch), None, labels, hparams)[0]

  closed = jax.make_jaxpr(loss)(jax.ShapeDtypeStruct((_IMAGES,), jnp.int32), outputs,
                                jax.ShapeDtypeStruct((), jnp.int32))
  return _depends_on(closed.jaxpr, closed.jaxpr.invars[0])
