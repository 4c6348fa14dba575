"""Optimiser and learning-rate schedule from the config, built from optax pieces."""

from typing import Any, Optional, Sequence

import jax
import ml_collections
import optax

from jaxkd.errors import unknown_name

SCHEDULES = ("multistep", "cosine", "constant")


def learning_rate_schedule(config: ml_collections.ConfigDict, base_lr: float,
                           num_epochs: int, steps_per_epoch: int,
                           milestones: Optional[Sequence[float]] = None) -> optax.Schedule:
  """The reference step schedule or cosine, optionally after a linear warm-up.

  `milestones` (epochs) replaces `config.schedule.milestones`, for stages with their own.

  multistep: lr(t) = base_lr · decay^(number of milestones m with t >= m · steps_per_epoch)
  cosine:    lr(t) = base_lr · ½(1 + cos(π t / T)),  T = num_epochs · steps_per_epoch
  """
  sched = config.schedule
  total = num_epochs * steps_per_epoch
  warmup = int(sched.get("warmup_epochs", 0) * steps_per_epoch)
  if sched.name == "multistep":
    milestones = sched.milestones if milestones is None else milestones
    boundaries = sorted({int(m * steps_per_epoch) for m in milestones
                         if m * steps_per_epoch < total})
    # Each level is computed in float64 and rounded once, as the reference's Python floats are
    # (optax's piecewise_constant_schedule multiplies in float32: 1 ulp off after a decay).
    main = optax.join_schedules(
        [optax.constant_schedule(base_lr * sched.decay ** k) for k in range(len(boundaries) + 1)],
        boundaries)
  elif sched.name == "cosine":
    main = optax.cosine_decay_schedule(base_lr, max(total - warmup, 1))
  elif sched.name == "constant":
    main = optax.constant_schedule(base_lr)
  else:
    raise unknown_name("schedule", sched.name, SCHEDULES)
  if warmup <= 0:
    return main
  if sched.name == "multistep":
    # Milestones count from step 0, as in the reference, so the warm-up overlays them.
    return lambda t: main(t) * optax.linear_schedule(0.0, 1.0, warmup)(t)
  return optax.join_schedules([optax.linear_schedule(0.0, base_lr, warmup), main], [warmup])


def make_optimizer(config: ml_collections.ConfigDict, schedule: optax.Schedule,
                   frozen: Optional[Any] = None) -> optax.GradientTransformation:
  """SGD with momentum (optionally Nesterov) and coupled L2 weight decay, as torch.optim.SGD:

  g ← g + wd·θ;  v ← μ·v + g;  θ ← θ − lr·(g + μ·v if nesterov else v)

  `frozen`: a pytree prefix of the params with True on subtrees that must never change (no
  update, no weight decay), e.g. {'backbone': True, 'heads': False}.
  """
  opt = config.optimizer
  if opt.name != "sgd":
    raise unknown_name("optimizer", opt.name, ("sgd",))
  sgd = optax.chain(
      optax.add_decayed_weights(opt.weight_decay),
      optax.sgd(schedule, momentum=opt.momentum or None, nesterov=opt.nesterov),
  )
  if frozen is None:
    return sgd
  labels = lambda params: jax.tree.map(  # noqa: E731
      lambda is_frozen, subtree: jax.tree.map(lambda _: "frozen" if is_frozen else "train",
                                              subtree), frozen, params)
  return optax.multi_transform({"train": sgd, "frozen": optax.set_to_zero()}, labels)
