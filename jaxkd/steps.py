"""The pure, jitted step functions of a stage: one training step, one evaluation step.

Each is a function of arrays and static configuration only (networks, losses, optimiser), so
`jax.jit` compiles it once per stage and runs it data-parallel over the mesh: the batch is
sharded on the data axis, the state replicated, and every in-batch term of a loss sees the
global batch.
"""

import dataclasses
from typing import Any, Callable, Optional, Sequence

import jax
import jax.extend.core as jax_core
import jax.numpy as jnp
import ml_collections
import optax

from jaxkd.methods.base import EvalMetricsFn, LossFn
from jaxkd.methods.losses import topk_correct
from jaxkd.networks import Network
from jaxkd.state import TrainState


def flatten_views(images: jax.Array) -> jax.Array:
  """[B, V, H, W, C] -> [B·V, H, W, C] with row V·i + k = image i, view k; [B, H, W, C] as is."""
  return images.reshape((-1,) + images.shape[-3:]) if images.ndim == 5 else images


def interleave_views(*views: jax.Array) -> jax.Array:
  """V arrays [B, ...] (view k of each image) -> [B·V, ...] with row V·i + k = views[k][i]."""
  return jnp.stack(views, axis=1).reshape((-1,) + views[0].shape[1:])


def student_forward(network: Network, params: Any, batch_stats: Any, batch: dict[str, jax.Array],
                    teacher_out: Optional[Any], views_apart: bool = False
                    ) -> tuple[dict[str, Any], Any]:
  """The student's training forward over the step's rows: (outputs, updated batch_stats).

  One forward over the B·V rows; with `views_apart` (Method.student_views_apart) and a view
  axis, one forward per view k = 0, 1, ... of its B images (BatchNorm statistics per view, the
  running statistics updated view after view), the outputs interleaved back into rows V·i + k.
  """
  images = batch["image"]
  if not views_apart or images.ndim != 5:
    out, updates = network.apply({"params": params, "batch_stats": batch_stats},
                                 flatten_views(images), train=True, teacher_out=teacher_out,
                                 batch=batch, mutable=["batch_stats"])
    return out, updates["batch_stats"]
  outs = []
  for k in range(images.shape[1]):
    out, updates = network.apply({"params": params, "batch_stats": batch_stats}, images[:, k],
                                 train=True, batch=batch, mutable=["batch_stats"])
    batch_stats = updates["batch_stats"]
    outs.append(out)
  return jax.tree.map(interleave_views, *outs), batch_stats


@dataclasses.dataclass(frozen=True)
class TeacherHeadStep:
  """A method's online teacher head as one stage uses it: the module, its loss, its optimiser."""
  module: Any
  loss: LossFn
  tx: optax.GradientTransformation


def teacher_head_step(head: TeacherHeadStep, head_state: dict[str, Any], teacher_out: Any,
                      labels: jax.Array, hparams: ml_collections.ConfigDict
                      ) -> tuple[Any, dict[str, Any], dict[str, jax.Array]]:
  """The head's outputs at its current parameters θ, and one step of its own optimiser:

  out = teacher_out ∪ head_θ(teacher_out);  θ ← θ + update(∇_θ L_head(out, y))

  Returns (out, the head's next {'params', 'opt_state'}, its metrics). `out` is computed with
  the pre-update θ and carries no gradient: the student reads it as a constant, and nothing of
  the student's loss reaches θ.
  """
  def loss_fn(params):
    out = dict(teacher_out)
    out.update(head.module.apply({"params": params}, teacher_out, train=True))
    value, metrics = head.loss(out, None, labels, hparams)
    return value, (out, metrics)

  params, opt_state = head_state["params"], head_state["opt_state"]
  grads, (out, metrics) = jax.grad(loss_fn, has_aux=True)(params)
  updates, opt_state = head.tx.update(grads, opt_state, params)
  next_state = {"params": optax.apply_updates(params, updates), "opt_state": opt_state}
  return jax.lax.stop_gradient(out), next_state, metrics


def _depends_on_input(jaxpr: Any) -> list[bool]:
  """For each output of `jaxpr`, whether it is computed from one of its inputs (an equation
  with such an operand makes all its outputs depend on it: conservative inside nested calls)."""
  live = set(jaxpr.invars)
  for eqn in jaxpr.eqns:
    if any(not isinstance(v, jax_core.Literal) and v in live for v in eqn.invars):
      live.update(eqn.outvars)
  return [not isinstance(v, jax_core.Literal) and v in live for v in jaxpr.outvars]


def term_gradients(fn: Callable[[Any], tuple[jax.Array, tuple[dict[str, jax.Array], Any]]],
                   params: Any, terms: Sequence[str]
                   ) -> tuple[dict[str, Any], dict[str, Any], tuple[dict[str, jax.Array], Any]]:
  """The gradients of named loss terms, from one forward and one backward pass per term.

  `fn(params) -> (loss, (metrics, aux))`; each of `terms` is a scalar of `metrics`. Returns
  ({term: ∇_params metrics[term]}, {term: pytree of bool}, (metrics, aux)). The booleans say
  which parameters a term's gradient reaches at all (PyTorch's `p.grad is not None` after that
  term's backward): read from the backward pass's computation, a leaf whose gradient does not
  depend on the term's cotangent is an instantiated zero, never reached. Static for a given
  `fn`: decided when the step is traced.
  """
  def values(p):
    _, (metrics, aux) = fn(p)
    missing = [term for term in terms if term not in metrics]
    if missing:
      raise ValueError(f"the loss returns no term {missing} (its metrics: {sorted(metrics)})")
    return tuple(metrics[term] for term in terms), (metrics, aux)

  outs, vjp_fn, aux = jax.vjp(values, params, has_aux=True)
  grads, reached = {}, {}
  for i, term in enumerate(terms):
    def pull(seed, i=i):
      return vjp_fn(tuple(seed if j == i else jnp.zeros_like(o) for j, o in enumerate(outs)))[0]
    grads[term] = pull(jnp.ones_like(outs[i]))
    closed = jax.make_jaxpr(pull, return_shape=True)(jnp.ones_like(outs[i]))
    reached[term] = jax.tree.unflatten(jax.tree.structure(closed[1]),
                                       _depends_on_input(closed[0].jaxpr))
  return grads, reached, aux


def _gradients_and_updates(loss_fn: Callable, state: TrainState,
                           tx: optax.GradientTransformation, gradient_terms: Sequence[str]
                           ) -> tuple[Any, Any, Any, tuple[dict[str, jax.Array], Any]]:
  """(gradient of the loss, the optimiser's updates, its next state, the loss's aux). With
  `gradient_terms` the optimiser takes each term's gradient (see term_gradients) as
  `tx.update({term: grads}, opt_state, params, reached={term: pytree of bool})`, and the
  gradient returned is their sum."""
  if not gradient_terms:
    grads, aux = jax.grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return grads, updates, opt_state, aux
  term_grads, reached, aux = term_gradients(loss_fn, state.params, gradient_terms)
  updates, opt_state = tx.update(term_grads, state.opt_state, state.params, reached=reached)
  grads = jax.tree.map(lambda *g: sum(g[1:], g[0]), *term_grads.values())
  return grads, updates, opt_state, aux


def train_step(state: TrainState, teacher_variables: Any, batch: dict[str, jax.Array], *,
               network: Network, teacher_network: Optional[Network], loss: LossFn,
               hparams: ml_collections.ConfigDict, tx: optax.GradientTransformation,
               schedule: optax.Schedule, steps_per_epoch: int,
               teacher_head: Optional[TeacherHeadStep] = None,
               teacher_train_mode: bool = False, teacher_constants: Optional[Any] = None,
               gradient_terms: Sequence[str] = (), student_views_apart: bool = False
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One SGD step of the student on a global batch; the teacher runs in inference mode.

  The loss also reads `student_out['epoch']`, the 1-based epoch of the step (for weights that
  follow the schedule, such as DKD's warm-up).

  The teacher reads `batch['teacher_image']` when the pipeline gives it its own view, else the
  student's images. With `teacher_head`, the head on the frozen teacher gives the teacher
  outputs and takes its own step (see teacher_head_step), in the same step as the student.

  A method's needs of its teacher (jaxkd.methods.base.Method): `teacher_train_mode` runs the
  teacher's BatchNorms on the batch's statistics, discarding their running-statistics update
  (Method.teacher_train_mode); `teacher_constants`, a pytree of arrays computed once from the
  teacher's variables (Method.teacher_constants), reaches the bridge and the loss as
  `teacher_out['constants']`. `student_views_apart` runs the student once per view
  (Method.student_views_apart, see student_forward); the teacher always sees all rows at once.

  With `gradient_terms` (Method.optimizer) the optimiser steps the gradient of each named term
  of the loss apart (see _gradients_and_updates); `train/grad_norm` is the norm of their sum.
  """
  teacher_out = None
  head_state, head_metrics = state.teacher_head, {}
  if teacher_network is not None:
    teacher_images = flatten_views(batch.get("teacher_image", batch["image"]))
    if teacher_train_mode:
      teacher_out, _ = teacher_network.apply(teacher_variables, teacher_images, train=True,
                                             mutable=["batch_stats"])
    else:
      teacher_out = teacher_network.apply(teacher_variables, teacher_images, train=False)
    teacher_out = jax.lax.stop_gradient(teacher_out)
    if teacher_head is not None:
      teacher_out, head_state, head_metrics = teacher_head_step(
          teacher_head, state.teacher_head, teacher_out, batch["label"], hparams)
    if teacher_constants is not None:
      teacher_out = dict(teacher_out, constants=jax.tree.map(jnp.asarray, teacher_constants))

  def loss_fn(params):
    out, batch_stats = student_forward(network, params, state.batch_stats, batch, teacher_out,
                                       student_views_apart)
    out = dict(out, epoch=state.step // steps_per_epoch + 1)
    value, metrics = loss(out, teacher_out, batch["label"], hparams)
    return value, (metrics, batch_stats)

  grads, updates, opt_state, (metrics, batch_stats) = _gradients_and_updates(
      loss_fn, state, tx, gradient_terms)
  params = optax.apply_updates(state.params, updates)
  # The gradient norm is also what the loop checks for divergence (with the loss terms).
  metrics = dict(metrics, **head_metrics, lr=schedule(state.step),
                 grad_norm=optax.global_norm(grads))
  return TrainState(step=state.step + 1, params=params, batch_stats=batch_stats,
                    opt_state=opt_state, teacher_head=head_state), metrics


def eval_step(variables: Any, batch: dict[str, jax.Array], *, network: Network
              ) -> dict[str, jax.Array]:
  """Counts of top-1 / top-5 hits over the real (mask = 1) rows of an eval batch."""
  logits = network.apply(variables, batch["image"], train=False)["logits"]
  mask = batch["mask"]
  k5 = min(5, logits.shape[-1])
  return {"top1": jnp.sum(topk_correct(logits, batch["label"], 1) * mask),
          "top5": jnp.sum(topk_correct(logits, batch["label"], k5) * mask),
          "count": jnp.sum(mask)}


def method_eval_step(variables: Any, batch: dict[str, jax.Array], *, network: Network,
                     metrics_fn: EvalMetricsFn, hparams: ml_collections.ConfigDict
                     ) -> dict[str, jax.Array]:
  """Sums of a method's per-image eval metrics over the real rows, on the method's views."""
  out = network.apply(variables, flatten_views(batch["image"]), train=False)
  scores = metrics_fn(out, batch["label"], hparams, batch["mask"])
  sums = {name: jnp.sum(value * batch["mask"]) for name, value in scores.items()}
  return dict(sums, count=jnp.sum(batch["mask"]))
