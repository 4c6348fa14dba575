"""Optimiser and learning-rate schedule from the config, built from optax pieces."""

import ml_collections
import optax

from jaxkd.errors import unknown_name

SCHEDULES = ("multistep", "cosine", "constant")


def learning_rate_schedule(config: ml_collections.ConfigDict, base_lr: float,
                           num_epochs: int, steps_per_epoch: int) -> optax.Schedule:
  """The reference step schedule or cosine, optionally after a linear warm-up.

  multistep: lr(t) = base_lr · decay^(number of milestones m with t >= m · steps_per_epoch)
  cosine:    lr(t) = base_lr · ½(1 + cos(π t / T)),  T = num_epochs · steps_per_epoch
  """
  sched = config.schedule
  total = num_epochs * steps_per_epoch
  warmup = int(sched.get("warmup_epochs", 0) * steps_per_epoch)
  if sched.name == "multistep":
    boundaries = {int(m * steps_per_epoch): sched.decay for m in sched.milestones
                  if m * steps_per_epoch < total}
    main = optax.piecewise_constant_schedule(base_lr, boundaries)
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


def make_optimizer(config: ml_collections.ConfigDict, schedule: optax.Schedule
                   ) -> optax.GradientTransformation:
  """SGD with momentum (optionally Nesterov) and coupled L2 weight decay, as torch.optim.SGD:

  g ← g + wd·θ;  v ← μ·v + g;  θ ← θ − lr·(g + μ·v if nesterov else v)
  """
  opt = config.optimizer
  if opt.name != "sgd":
    raise unknown_name("optimizer", opt.name, ("sgd",))
  return optax.chain(
      optax.add_decayed_weights(opt.weight_decay),
      optax.sgd(schedule, momentum=opt.momentum or None, nesterov=opt.nesterov),
  )
