"""HSAKD on CIFAR-100, ResNet32x4 -> ResNet8x4.

Paper (IJCAI'21 Table 1, top-1 %, mean ±std):
Teacher 79.63, Teacher* 83.73, student alone 72.95 ±0.24;
HSAKD (Ours, frozen "Teacher") 77.26 ±0.14; HSAKD* (Ours*, joint "Teacher*") 77.69 ±0.05.
The paper reports the student's final-head top-1 on unrotated test images: `eval/top1`.
Reference schedule (configs/hsakd/common.py): 240 epochs, batch 64, SGD Nesterov, lr 0.05.

    python -m jaxkd.main --config configs/hsakd/resnet32x4-resnet8x4.py --workdir runs/hsakd/resnet32x4-resnet8x4
    python -m jaxkd.main --config configs/hsakd/resnet32x4-resnet8x4.py:star --workdir runs/hsakd_star/resnet32x4-resnet8x4

Frozen variant with a trained teacher: `--config.teacher.checkpoint=<file>` (skips stage
`teacher`; the joint "Teacher*" is always trained from scratch).
"""

import ml_collections

from configs.hsakd import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  return common.get_config(teacher="resnet32x4", student="resnet8x4", arg=arg)
