"""HSAKD on CIFAR-100, ResNet32x4 -> ShuffleNetV2.

Paper (IJCAI'21 Table 1, top-1 %, mean ±std):
Teacher 79.63, Teacher* 83.73, student alone 72.96 ±0.33;
HSAKD (Ours, frozen "Teacher") 79.93 ±0.11; HSAKD* (Ours*, joint "Teacher*") 80.86 ±0.15.
The paper reports the student's final-head top-1 on unrotated test images: `eval/top1`.
Reference schedule (configs/hsakd/common.py): 240 epochs, batch 64, SGD Nesterov, lr 0.01.

    python -m jaxkd.main --config configs/hsakd/resnet32x4-ShuffleV2.py --workdir runs/hsakd/resnet32x4-ShuffleV2
    python -m jaxkd.main --config configs/hsakd/resnet32x4-ShuffleV2.py:star --workdir runs/hsakd_star/resnet32x4-ShuffleV2

Frozen variant with a trained teacher: `--config.teacher.checkpoint=<file>` (skips stage
`teacher`; the joint "Teacher*" is always trained from scratch).
"""

import ml_collections

from configs.hsakd import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  return common.get_config(teacher="resnet32x4", student="ShuffleV2", arg=arg)
