"""SSKD on CIFAR-100, VGG13 -> MobileNetV2.

SSKD README (cross-architecture table, top-1 %): teacher 75.38, student alone 65.79,
**SSKD 71.53** — the student's top-1 on the original test images, `eval/top1`.
Reference schedule (configs/sskd/common.py): teacher 240 epochs at lr 0.05 (stage `teacher`),
its SS module 60 epochs (stage `teacher_sskd`), student 240 epochs, batch 64, lr 0.01.

    python -m jaxkd.main --config configs/sskd/vgg13-MobileNetV2.py --workdir runs/sskd/vgg13-MobileNetV2

With a teacher trained before (e.g. `runs/sskd/<pair>/teacher/teacher.msgpack`, or an imported
SSKD `best.pth`): `--config.teacher.checkpoint=<file>` skips stage `teacher`.
"""

import ml_collections

from configs.sskd import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  return common.get_config(teacher="vgg13", student="MobileNetV2", arg=arg)
