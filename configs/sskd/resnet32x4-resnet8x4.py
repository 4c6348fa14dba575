"""SSKD on CIFAR-100, ResNet32x4 -> ResNet8x4.

SSKD README (similar-architecture table, top-1 %): teacher 79.63, student alone 72.51,
**SSKD 76.20** — the student's top-1 on the original test images, `eval/top1`.
Reference schedule (configs/sskd/common.py): teacher 240 epochs at lr 0.05 (stage `teacher`),
its SS module 60 epochs (stage `teacher_sskd`), student 240 epochs, batch 64, lr 0.05.

    python -m jaxkd.main --config configs/sskd/resnet32x4-resnet8x4.py --workdir runs/sskd/resnet32x4-resnet8x4

With a teacher trained before (e.g. `runs/sskd/<pair>/teacher/teacher.msgpack`, or an imported
SSKD `best.pth`): `--config.teacher.checkpoint=<file>` skips stage `teacher`.
"""

import ml_collections

from configs.sskd import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  return common.get_config(teacher="resnet32x4", student="resnet8x4", arg=arg)
