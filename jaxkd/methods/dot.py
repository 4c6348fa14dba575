"""DOT, the Distillation-Oriented Trainer (Zhao, Cui, Song and Liang, ICCV 2023), on KD.

As mdistiller does it (megvii-research/mdistiller @ a08d46f, mdistiller/engine/dot.py
`DistillationOrientedTrainer`, driven by engine/trainer.py `DOT.init_optimizer` and
`DOT.train_iter`; configs/cifar100/dot/*.yaml): the objective is KD's (mdistiller's `KD`
distiller), but its two weighted terms are stepped apart, each with its own momentum buffer:

  L_task = ce_weight · CE(z_s, y)                  (mdistiller's `loss_ce`)
  L_kd   = kd_weight · T² / B · Σ_i KL(q_i ‖ p_i)  (`loss_kd`)

with q = softmax(z_t / T), p = softmax(z_s / T). With the task momentum μ_t = μ − Δ and the
distillation momentum μ_k = μ + Δ (μ the config's `optimizer.momentum`, Δ `delta`),
ā = (μ_t + μ_k) / 2, wd the weight decay and lr the schedule's rate. Per step, `dot()` of the reference does, first for every parameter the task
gradient g_t reaches, then for every one the distillation gradient g_k reaches:

  task:  d = g_t + wd·θ;  b_t ← d on first use, else (μ_t if g_k reaches θ else ā)·b_t + d;
         θ ← θ − lr·b_t
  kd:    b_k ← g_k on first use (no weight decay), else μ_k·b_k + g_k if g_t reaches θ,
         else ā·b_k + (g_k + wd·θ);  θ ← θ − lr·b_k

So a parameter both terms reach (every student parameter under KD) takes two steps per
iteration, and only the task step carries weight decay; one reached by the distillation term
alone (a bridge's) skips weight decay on its first step only; one reached by the task term
alone moves with ā, not μ_t. "Reaches" is PyTorch's `p.grad is not None` after that term's
backward (jaxkd.steps.term_gradients), "first use" the optimiser's first step: which terms
reach a parameter does not change within a stage. These details (weight decay on the task step
only, ā for single-term parameters, the first distillation step without weight decay) are the
reference code's, and jaxkd follows them.

Defaults: mdistiller's CIFAR-100 DOT configs (`configs/cifar100/dot/res32x4_res8x4.yaml` etc.):
`DISTILLER.TYPE: KD` with its `CFG.KD` (T 4, CE weight 0.1, KD weight 0.9) and `SOLVER.DOT.DELTA`
0.075; their SGD (momentum 0.9, weight decay 5e-4, lr 0.05, ×0.1 at 150/180/210 of 240 epochs,
batch 64; lr 0.01 for ShuffleV2) is the config's `optimizer` and `schedule`.
"""

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxkd.errors import UserError
from jaxkd.methods.base import Method, Outputs, TermOptimizer
from jaxkd.methods.losses import cross_entropy, distill_kl, topk_correct

DOT_DEFAULTS = dict(T=4.0, ce_weight=0.1, kd_weight=0.9, delta=0.075)
# The loss's metrics whose gradients DOT steps apart: the weighted summands of the objective.
TASK_TERM, DISTILL_TERM = "loss_task", "loss_distill"


def dot_loss(student_out: Outputs, teacher_out: Outputs, labels: jax.Array,
             hparams: ml_collections.ConfigDict) -> tuple[jax.Array, dict[str, jax.Array]]:
  """L = L_task + L_kd, L_task = ce_weight · CE(s, y), L_kd = kd_weight · T² · mean_r
  KL(softmax(t_r/T) ‖ softmax(s_r/T)) (mdistiller's `KD.forward_train`); both summands are
  returned as metrics `loss_task` and `loss_distill`, whose gradients DOT steps apart, beside
  the unweighted `loss_ce` and `loss_kd`."""
  s, t = student_out["logits"], teacher_out["logits"]
  loss_ce = cross_entropy(s, labels)
  loss_kd = distill_kl(s, t, hparams.T)
  task, distill = hparams.ce_weight * loss_ce, hparams.kd_weight * loss_kd
  loss = task + distill
  return loss, {"loss": loss, "loss_ce": loss_ce, "loss_kd": loss_kd, TASK_TERM: task,
                DISTILL_TERM: distill, "top1": topk_correct(s, labels, 1).mean()}


def dot_momenta(momentum: float, delta: float) -> tuple[float, float, float]:
  """(μ_t, μ_k, ā) = (μ − Δ, μ + Δ, (μ_k + μ_t) / 2), in Python floats as the reference."""
  m_task, m_kd = momentum - delta, momentum + delta
  return m_task, m_kd, (m_kd + m_task) / 2.0


class DotState(NamedTuple):
  """The optimiser's step count and its two buffers, per parameter (zeros where unused):
  `task` is the reference's `momentum_buffer`, `distill` its `momentum_kd_buffer`."""
  count: jax.Array
  task: Any
  distill: Any


def _leaf_step(p, g_t, g_k, b_t, b_k, reach_t: bool, reach_k: bool, first, lr, *,
               momenta: tuple[float, float, float], weight_decay: float, dampening: float):
  """One parameter's update θ' − θ and next buffers (the module docstring's rules)."""
  m_task, m_kd, m_avg = momenta
  new = p
  if reach_t:
    d = g_t + weight_decay * p if weight_decay != 0 else g_t
    if m_task != 0:
      m = m_task if reach_k else m_avg
      b_t = jnp.where(first, d, m * b_t + ((1 - dampening) * d if dampening else d))
      d = b_t
    new = new - lr * d
  if reach_k:
    d, m = (g_k, m_kd) if reach_t else (
        g_k + weight_decay * p if weight_decay != 0 else g_k, m_avg)
    b_k = jnp.where(first, g_k, m * b_k + ((1 - dampening) * d if dampening else d))
    new = new - lr * b_k
  return new - p, b_t, b_k


def dot_optimizer(schedule: optax.Schedule, momentum: float, delta: float,
                  weight_decay: float, frozen: Optional[Any] = None, dampening: float = 0.0,
                  task: str = TASK_TERM, distill: str = DISTILL_TERM
                  ) -> optax.GradientTransformationExtraArgs:
  """The reference `DistillationOrientedTrainer` (one parameter group) as an optax
  transformation of the two terms' gradients (see the module docstring):

    update({task: g_t, distill: g_k}, state, params, reached={task: mask, distill: mask})

  `schedule(count)` gives lr at the optimiser's step count; `frozen`, a pytree prefix of the
  params with True on subtrees that never change (no update, no weight decay).
  """
  momenta = dot_momenta(momentum, delta)

  def init(params):
    zeros = jax.tree.map(jnp.zeros_like, params)
    return DotState(jnp.zeros([], jnp.int32), zeros, jax.tree.map(jnp.zeros_like, params))

  def update(grads, state, params=None, *, reached, **extra):
    del extra
    fixed = jax.tree.map(lambda _: False, params) if frozen is None else jax.tree.map(
        lambda f, sub: jax.tree.map(lambda _: bool(f), sub), frozen, params)
    lr, first = schedule(state.count), state.count == 0
    leaves, treedef = jax.tree.flatten(params)
    parts = [treedef.flatten_up_to(tree) for tree in (
        grads[task], grads[distill], state.task, state.distill, reached[task],
        reached[distill], fixed)]
    out = [_leaf_step(p, g_t, g_k, b_t, b_k, bool(r_t) and not f, bool(r_k) and not f, first,
                      lr, momenta=momenta, weight_decay=weight_decay, dampening=dampening)
           for p, g_t, g_k, b_t, b_k, r_t, r_k, f in zip(leaves, *parts)]
    updates, b_task, b_distill = (treedef.unflatten(column) for column in zip(*out))
    return updates, DotState(optax.safe_increment(state.count), b_task, b_distill)

  return optax.GradientTransformationExtraArgs(init, update)


def make_dot(config: ml_collections.ConfigDict, hparams: ml_collections.ConfigDict,
             schedule: optax.Schedule, frozen: Optional[Any]
             ) -> optax.GradientTransformationExtraArgs:
  """`DOT.init_optimizer`: μ = `optimizer.momentum`, Δ = `delta`, the config's weight decay."""
  return dot_optimizer(schedule, config.optimizer.momentum, hparams.delta,
                       config.optimizer.weight_decay, frozen)


def check_dot(config: ml_collections.ConfigDict, hparams: ml_collections.ConfigDict) -> None:
  """Both momenta in [0, 1) (the reference refuses a negative one); no Nesterov (it has none)."""
  if config.optimizer.get("nesterov", False):
    raise UserError("method 'dot' steps plain SGD momentum (mdistiller's DOT has no Nesterov "
                    "variant); set --config.optimizer.nesterov=False")
  momentum = config.optimizer.momentum
  m_task, m_kd, _ = dot_momenta(momentum, hparams.delta)
  if not (0.0 <= m_task < 1.0 and 0.0 <= m_kd < 1.0):
    raise UserError(
        f"method 'dot': delta={hparams.delta} with optimizer.momentum={momentum} gives the "
        f"momenta {m_task:g} (task) and {m_kd:g} (distillation); both must lie in [0, 1): "
        f"choose a delta that keeps momentum ± delta in [0, 1) (the reference's: 0.075 with "
        f"0.9)")


METHOD = Method(name="dot", loss=dot_loss, defaults=DOT_DEFAULTS,
                optimizer=TermOptimizer(terms=(TASK_TERM, DISTILL_TERM), make=make_dot,
                                        check=check_dot))
