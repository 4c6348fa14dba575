"""What every SSKD recipe shares: the reference schedule and all SSKD hyper-parameters.

Reference (xuguodong03/SSKD @ 661b972: `student.py`, `teacher.py`, `command.sh`; the loss is in
docs/methods.md), CIFAR-100, three stages:
  teacher       cross-entropy, 240 epochs, batch 64, SGD momentum 0.9, wd 5e-4, lr 0.05 ×0.1 at
                150/180/210 (the reference `teacher.py`); skipped with `--config.teacher.checkpoint`
                (a jaxkd teacher file, e.g. from `python -m jaxkd.import_teacher` of an SSKD
                `ckpt/best.pth`, or `<workdir>/teacher/teacher.msgpack` of an earlier run);
  teacher_sskd  the SS module on the frozen teacher: 60 epochs, lr 0.05 ×0.1 at 30/45
                (`method.teacher_epochs`, `teacher_lr`, `teacher_milestones`), rotations;
  student_sskd  240 epochs, batch 64 images (256 rows), SGD momentum 0.9 (no Nesterov), wd 5e-4,
                lr 0.05 (0.01 for MobileNetV2 / ShuffleV1 / ShuffleV2 students) ×0.1 at
                150/180/210, loss weights ce/kd/tf/ss 0.1/0.9/2.7/10, temperatures kd/tf/ss
                4/4/0.5, selection ratios tf 1.0 and ss 0.75 (the defaults of
                jaxkd/methods/sskd.py).
The SSKD README reports the student's top-1 on the original test images: `eval/top1` (its
`student_best.pth` is the best test epoch: `top1_best` in result.json).

Arguments (comma-separated, after the colon of `--config <recipe>.py:`):
  runlocal  a few steps on the first examples, for a smoke run on a CPU.

The paper's other settings are fields: `--config.dataset.train_fraction=0.25` (few-shot: a
class-balanced quarter of the training set) and `--config.dataset.label_noise=0.2` (symmetric
label noise); they apply to every stage the run trains, teacher included, so pass a
full-data teacher with `--config.teacher.checkpoint` to distil from a clean teacher.
"""

import ml_collections

from configs import default

# Students trained at lr 0.01 in the reference `command.sh`.
LOW_LR_STUDENTS = ("MobileNetV2", "ShuffleV1", "ShuffleV2")
ARGS = ("runlocal",)


def get_config(teacher: str, student: str, arg: str = "") -> ml_collections.ConfigDict:
  """The CIFAR-100 SSKD recipe for `teacher` -> `student` (zoo names), `arg` applied."""
  config = default.cifar100_recipe(
      teacher, student, lr=0.01 if student in LOW_LR_STUDENTS else 0.05, nesterov=False)

  # Every SSKD hyper-parameter at the method's default, which is the reference's (the loss
  # weights, temperatures and selection ratios, and the SS module's schedule on the frozen
  # teacher, stage teacher_sskd): listed so that each one can be set on the command line.
  config.method = default.method_fields("sskd", teacher, student)
  config.baselines = ""                 # e.g. "ce,kd" adds the student alone and with KD
  # The reference's student loads the teacher's best.pth: its best test epoch.
  config.teacher.keep = "best"

  # The SS accuracy ranks each view among the originals of its eval batch: 64 as the reference.
  config.eval_batch_size = 64
  return apply_arg(config, arg)


def apply_arg(config: ml_collections.ConfigDict, arg: str) -> ml_collections.ConfigDict:
  """Applies the recipe argument `runlocal` (see the module docstring)."""
  tokens = default.recipe_tokens(arg, ARGS)
  if "runlocal" in tokens:
    default.apply_arg(config, "runlocal")
    config.method.teacher_epochs = 1
    config.method.teacher_milestones = (1,)
  return config
