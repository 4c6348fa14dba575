"""The embedded demo: teacher → students on the handwritten digits scikit-learn ships.

Trains a resnet20 teacher, then a resnet8 student distilled with KD, with SSKD (after training
the SS module on the frozen teacher), with HSAKD (after training the auxiliary classifiers on the
frozen teacher), and alone with CE, and prints a table of held-out top-1. Offline; a few minutes
on 2 CPU cores.

    python -m jaxkd.main --config configs/demo.py --workdir runs/demo

`configs/demo.py:runlocal` shrinks it further (a smoke run of a few seconds of training).
"""

import ml_collections

from configs import default


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  config = default.get_config()
  config.dataset.name = "digits"
  config.teacher.name = "resnet20"
  config.teacher.num_epochs = 20
  config.student.name = "resnet8"
  config.baselines = "sskd,hsakd,ce"
  # The digits are small: the teachers' heads need 6 epochs, not the reference's 60 / 100.
  config.method_overrides = ml_collections.ConfigDict(dict(
      sskd=dict(teacher_epochs=6, teacher_lr=0.05, teacher_milestones=(3, 5)),
      hsakd=dict(teacher_epochs=6, teacher_lr=0.1, teacher_milestones=(3, 5))))
  config.num_epochs = 20
  config.batch_size = 64
  config.eval_batch_size = 120
  config.optimizer.lr = 0.05
  config.schedule.milestones = (12, 15, 18)   # the reference 150/180/210 of 240, scaled
  config.log_every_steps = 50
  config.eval_every_epochs = 5
  config.checkpoint_every_steps = 200
  if arg:
    default.apply_arg(config, arg)
    if "runlocal" in arg.split(","):
      for hparams in config.method_overrides.values():
        hparams.teacher_epochs = 1
  return config
