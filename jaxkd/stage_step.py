"""A stage's first train state and its jitted train step, without the loop's I/O.

What `jaxkd.loop` trains with, and what the step benchmarks (`experiments/benchmark.py`,
`experiments/speed_vs_reference.py`) time: built from a `jaxkd.stage.Stage`, the frozen teacher
and initial variables the executor loaded for it (`Inputs`), and the dataset's `DatasetInfo`.
Nothing here reads the data pipeline, writes logs or checkpoints, or needs TensorFlow or clu.
"""

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxkd import data
from jaxkd import parallel
from jaxkd import steps
from jaxkd.methods.base import OnlineTeacherHead
from jaxkd.networks import (Network, backbone_only, feature_parameters, init_variables,
                            run_once_options, teacher_output_shapes)
from jaxkd.optim import make_optimizer
from jaxkd.stage import Stage
from jaxkd.state import TrainState
from jaxkd.steps import TeacherHeadStep
from jaxkd.teachers import Teacher, teacher_image_shape


@dataclasses.dataclass(frozen=True)
class Inputs:
  """What a stage reads, loaded by the executor: the frozen teacher beside it, and the
  variables its backbone starts from (`Stage.init_from`) with their checksum."""
  teacher: Optional[Teacher] = None
  init_backbone: Optional[Any] = None
  init_backbone_sha256: Optional[str] = None


def teacher_network(stage: Stage, inputs: Inputs) -> Optional[Network]:
  """The frozen teacher's network as this stage runs it (its taps pre-activation with
  `teacher_preact`, its class activation maps with `class_maps`)."""
  if inputs.teacher is None:
    return None
  asked = {}
  if stage.method.teacher_taps_preact:
    asked["preact"] = True
  if stage.method.class_maps:
    asked["class_maps"] = True
  return inputs.teacher.network.clone(**asked) if asked else inputs.teacher.network


def teacher_constants(stage: Stage, inputs: Inputs) -> Optional[Any]:
  """The constants the method reads from its frozen teacher's variables, computed once."""
  if stage.method.teacher_constants is None or inputs.teacher is None:
    return None
  return stage.method.teacher_constants(stage.teacher.model_name, inputs.teacher.variables,
                                        stage.hparams)


def init_teacher_head(head: OnlineTeacherHead, teacher: Teacher,
                      hparams: ml_collections.ConfigDict, info: data.DatasetInfo, seed: int,
                      mesh: jax.sharding.Mesh) -> tuple[TeacherHeadStep, dict[str, Any]]:
  """The head's step and its initial {'params', 'opt_state'}, replicated over the mesh."""
  step = TeacherHeadStep(module=head.heads(info.num_classes, hparams, teacher.network.backbone),
                         loss=head.loss, tx=head.optimizer(hparams))
  shape = (1,) + teacher_image_shape(teacher, info)
  teacher_out = jax.eval_shape(
      lambda v: teacher.network.apply(v, jnp.zeros(shape, jnp.float32), train=False),
      teacher.variables)

  @functools.partial(jax.jit, out_shardings=parallel.replicated(mesh),
                     compiler_options=run_once_options(mesh))
  def init(rng):
    sample = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), teacher_out)
    params = step.module.init(rng, sample, train=False)["params"]
    return {"params": params, "opt_state": step.tx.init(params)}

  # Its own stream of the run's seed, so the student's initialisation does not change.
  return step, dict(init(jax.random.fold_in(jax.random.key(seed), 1)))


def frozen_parameters(stage: Stage, network: Network, variables: Any,
                      info: data.DatasetInfo) -> Optional[Any]:
  """A prefix of the params with True where they must not change in this stage, or None."""
  if stage.features_only:
    backbone = {col: tree["backbone"] for col, tree in variables.items()}
    used = feature_parameters(network.backbone, backbone, info.image_shape)
    frozen = {name: False for name in variables["params"]}
    frozen["backbone"] = jax.tree.map(lambda u: not u, used)
    return frozen
  if stage.init_from is not None and stage.freeze_backbone:
    return {name: name == "backbone" for name in variables["params"]}
  return None


def initial_state(stage: Stage, inputs: Inputs, network: Network, schedule: optax.Schedule,
                  mesh: jax.sharding.Mesh, info: data.DatasetInfo
                  ) -> tuple[TrainState, optax.GradientTransformation, Optional[TeacherHeadStep]]:
  """The stage's first train state (replicated), its optimiser (the method's own, else the
  config's SGD) and its online teacher head."""
  config, teacher, method = stage.config, inputs.teacher, stage.method
  teacher_out = None
  if method.bridge is not None and teacher is not None and not method.online_teacher_head:
    teacher_out = teacher_output_shapes(teacher_network(stage, inputs), teacher.variables,
                                        teacher_image_shape(teacher, info))
  variables = init_variables(network, info.image_shape, config.seed, mesh, teacher_out)
  if inputs.init_backbone is not None:
    # Copies: the train step donates the state, and the frozen teacher is used again later.
    loaded = jax.tree.map(jnp.copy, backbone_only(inputs.init_backbone))
    variables = {col: dict(tree, backbone=loaded[col]["backbone"])
                 for col, tree in variables.items()}
  frozen = frozen_parameters(stage, network, variables, info)
  tx = (method.optimizer.make(config, stage.hparams, schedule, frozen) if method.optimizer
        else make_optimizer(config, schedule, frozen))
  params, batch_stats = variables["params"], variables.get("batch_stats", {})
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                     opt_state=jax.jit(tx.init, out_shardings=parallel.replicated(mesh))(params))
  head = None
  if method.online_teacher_head is not None:
    head, head_state = init_teacher_head(method.online_teacher_head, teacher, stage.hparams,
                                         info, config.seed, mesh)
    state = state.replace(teacher_head=head_state)
  return parallel.replicate(state, mesh), tx, head


def jit_train_step(stage: Stage, inputs: Inputs, network: Network,
                   tx: optax.GradientTransformation, schedule: optax.Schedule,
                   head: Optional[TeacherHeadStep], steps_per_epoch: int,
                   xla_defaults: bool = False) -> Callable:
  """The stage's train step `(state, teacher_variables, batch) -> (state, metrics)`, jitted
  with the state donated and the trainer's compiler options (XLA's own with `xla_defaults`,
  for benchmarks that measure what the options change)."""
  return jax.jit(
      functools.partial(steps.train_step, network=network,
                        teacher_network=teacher_network(stage, inputs), loss=stage.method.loss,
                        hparams=stage.hparams, tx=tx, schedule=schedule,
                        steps_per_epoch=steps_per_epoch, teacher_head=head,
                        teacher_train_mode=stage.method.teacher_train_mode,
                        teacher_constants=teacher_constants(stage, inputs),
                        gradient_terms=(stage.method.optimizer.terms if stage.method.optimizer
                                        else ()),
                        student_views_apart=stage.method.student_views_apart),
      donate_argnums=(0,),
      compiler_options=None if xla_defaults else parallel.step_compiler_options())
