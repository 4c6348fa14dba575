"""The executor: walks a plan's stages in order, loads what each one reads (its teacher, the
export it starts from), runs it and returns the result records, one per stage, in order.

What a stage is and which stages a run has were decided by `jaxkd.plan`; how one stage trains
is `jaxkd.loop`. The only choice here is between the two kinds of stage: a teacher imported
(loaded and, where it has a classifier, evaluated) and a stage trained.
"""

import functools
from typing import Any

import jax

from jaxkd import interrupts
from jaxkd import loop
from jaxkd import steps
from jaxkd import teachers
from jaxkd.evaluation import evaluate
from jaxkd.plan import Plan
from jaxkd.stage import NO_CLASSIFIER_NOTE, ImportStage, Stage

Results = dict[str, dict[str, Any]]


def import_teacher(stage: ImportStage, plan: Plan, mesh: jax.sharding.Mesh,
                   loaded: teachers.Teachers, done: Results) -> dict[str, Any]:
  """Stage `teacher` when it is imported: the teacher loaded once (the students read it from
  `loaded`) and, where it has a classifier, evaluated on the eval split."""
  interrupts.stop_if_requested(stage.name, f"before stage {stage.name} started")
  source = stage.source
  teacher = loaded.get(source, done)
  result = {"stage": stage.name, "model": source.model_name, "method": "imported",
            "checkpoint": source.path}
  if source.clip:
    result["teacher_sha256"] = teacher.sha256
  if not stage.scores_top1:
    return dict(result, top1_last=None, top5_last=None, top1_best=None,
                note=NO_CLASSIFIER_NOTE)
  network = teacher.network
  scores = evaluate(network, teacher.variables, stage.config, mesh,
                    jax.jit(functools.partial(steps.eval_step, network=network)))
  return dict(result, top1_last=scores["top1"], top5_last=scores["top5"],
              top1_best=scores["top1"])


def stage_inputs(stage: Stage, plan: Plan, loaded: teachers.Teachers, done: Results,
                 mesh: jax.sharding.Mesh) -> loop.Inputs:
  """The teacher and initial variables `stage` reads, loaded from the stages before it."""
  teacher = loaded.get(stage.teacher, done) if stage.teacher else None
  init = stage.init_from
  if init is None:
    return loop.Inputs(teacher=teacher)
  if isinstance(init, str):
    # A finished stage's export, checked against the sha256 it recorded.
    source = plan.stage(init)
    info = plan.infos[init]
    start = teachers.load_export(source.network(info.num_classes), done[init], info, mesh)
  else:
    start = loaded.get(init, done)
  return loop.Inputs(teacher=teacher, init_backbone=start.variables,
                     init_backbone_sha256=start.sha256)


def execute(plan: Plan, mesh: jax.sharding.Mesh) -> list[dict[str, Any]]:
  """Runs every stage of `plan` in order; their result records, in the same order."""
  loaded = teachers.Teachers(plan.config, plan.info, mesh)
  done: Results = {}
  for stage in plan.stages:
    if isinstance(stage, ImportStage):
      done[stage.name] = import_teacher(stage, plan, mesh, loaded, done)
    else:
      inputs = stage_inputs(stage, plan, loaded, done, mesh)
      done[stage.name] = loop.run_stage(stage, inputs, plan.workdir, mesh,
                                        plan.infos[stage.name])
  return list(done.values())
