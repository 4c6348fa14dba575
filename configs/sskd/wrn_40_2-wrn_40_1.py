"""SSKD on CIFAR-100, WRN-40-2 -> WRN-40-1.

SSKD README (similar-architecture table, top-1 %): teacher 76.46, student alone 72.24,
**SSKD 76.13** — the student's top-1 on the original test images, `eval/top1`.
Reference schedule (configs/sskd/common.py): teacher 240 epochs at lr 0.05 (stage `teacher`),
its SS module 60 epochs (stage `teacher_sskd`), student 240 epochs, batch 64, lr 0.05.

    python -m jaxkd.main --config configs/sskd/wrn_40_2-wrn_40_1.py --workdir runs/sskd/wrn_40_2-wrn_40_1

With a teacher trained before (e.g. `runs/sskd/<pair>/teacher/teacher.msgpack`, or an imported
SSKD `best.pth`): `--config.teacher.checkpoint=<file>` skips stage `teacher`.
"""

import ml_collections

from configs.sskd import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  return common.get_config(teacher="wrn_40_2", student="wrn_40_1", arg=arg)
