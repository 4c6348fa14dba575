"""What every HSAKD recipe shares: the reference schedule and all HSAKD hyper-parameters.

Reference (winycg/HSAKD @ 28c8dc2: `train_teacher_cifar.py`, `train_student_cifar.py` and their
`.sh` scripts; the loss is in docs/methods.md), CIFAR-100:
  student (and "Teacher*"): SGD Nesterov 0.9, wd 5e-4 on every parameter, batch 64, 240 epochs,
    lr 0.05 (0.01 for MobileNetV2 / ShuffleNet students) ×0.1 at epochs 150/180/210;
  "Teacher" classifiers on the frozen teacher: 100 epochs, lr 0.05 ×0.1 at 30/60/90;
  KL temperature T = 3.
The reference imports CRD/SSKD-released teachers (convert one with `python -m
jaxkd.import_teacher`); here stage `teacher` trains one with cross-entropy (RepDistiller schedule,
lr 0.05, but with the recipe's Nesterov momentum, which the CRD/SSKD teachers were trained
without) unless `--config.teacher.checkpoint` names a file: import the released teacher to
follow the reference exactly.
Metrics: `eval/top1` is the student's final head on unrotated test images, the number of the
paper's tables; `eval/aux{l}_joint_acc` / `eval/aux{l}_class_acc` monitor the classifiers.

Arguments (comma-separated, after the colon of `--config <recipe>.py:`):
  star      HSAKD* ("Ours*"): the teacher and its classifiers are trained jointly from scratch
            (method `hsakd_star`, 240 epochs) instead of classifiers on a frozen teacher; the
            same as `--config.method.name=hsakd_star` (both schedules are in `config.method`).
  runlocal  a few steps on the first examples, for a smoke run on a CPU.
"""

import ml_collections

from configs import default

# Students trained at lr 0.01 in the reference scripts (`--init-lr 0.01`).
LOW_LR_STUDENTS = ("MobileNetV2", "MobileNetV2_stride1", "ShuffleV1", "ShuffleV2")
ARGS = ("star", "runlocal")


def get_config(teacher: str, student: str, arg: str = "") -> ml_collections.ConfigDict:
  """The CIFAR-100 HSAKD recipe for `teacher` -> `student` (zoo names), `arg` applied."""
  return apply_arg(base_config(teacher, student), arg)


def base_config(teacher: str, student: str) -> ml_collections.ConfigDict:
  """The CIFAR-100 recipe before the arguments: recipes for other datasets change it first."""
  config = default.cifar100_recipe(
      teacher, student, lr=0.01 if student in LOW_LR_STUDENTS else 0.05, nesterov=True)

  # Every HSAKD hyper-parameter at the method's default (the reference's T = 3 and the two
  # teacher schedules), listed so that each one can be set on the command line.
  config.method = default.method_fields("hsakd", teacher, student)
  # The prepared teacher the student gets: 'last', the last epoch, is what the reference's
  # CIFAR student scripts load (`<arch>.pth.tar`, rewritten every epoch); the method's default
  # 'best' is the epoch with the highest aux joint-label accuracy (`_best`, what its ImageNet
  # scripts load).
  config.method.teacher_checkpoint = "last"
  config.baselines = ""                        # e.g. "ce" adds the student trained alone

  return config


def apply_arg(config: ml_collections.ConfigDict, arg: str) -> ml_collections.ConfigDict:
  """Applies the recipe arguments `star` and `runlocal` (see the module docstring)."""
  tokens = default.recipe_tokens(arg, ARGS)
  if "star" in tokens:
    config.method.name = "hsakd_star"
  if "runlocal" in tokens:
    default.apply_arg(config, "runlocal")
    config.method.teacher_epochs = 1
    config.method.teacher_milestones = (1,)
    config.method.joint_teacher_epochs = 2
    config.method.joint_teacher_milestones = (1,)
  return config
