"""The embedded demo: teacher → KD student on the handwritten digits scikit-learn ships.

Trains a resnet20 teacher, then a resnet8 student twice — distilled with KD and alone with CE —
and prints a table of held-out top-1. Offline; about 2-3 minutes on 2 CPU cores.

    python -m jaxkd.main --config configs/demo.py --workdir runs/demo

`configs/demo.py:runlocal` shrinks it further (a smoke run of a few seconds of training).
"""

import ml_collections

from configs import default


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  config = default.get_config()
  config.dataset.name = "digits"
  config.teacher.name = "resnet20"
  config.teacher.num_epochs = 30
  config.student.name = "resnet8"
  config.baselines = "ce"
  config.num_epochs = 30
  config.batch_size = 64
  config.eval_batch_size = 120
  config.optimizer.lr = 0.05
  config.schedule.milestones = (15, 22, 27)   # the reference 150/180/210 of 240, scaled
  config.log_every_steps = 50
  config.eval_every_epochs = 5
  config.checkpoint_every_steps = 200
  if arg:
    default.apply_arg(config, arg)
  return config
