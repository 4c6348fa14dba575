"""HSAKD on CIFAR-100, ResNet50 -> MobileNetV2 (HSAKD's stride-1 variant).

Paper (IJCAI'21 Table 1, top-1 %, mean ±std):
Teacher 79.34, Teacher* 83.85, student alone 73.51 ±0.26;
HSAKD (Ours, frozen "Teacher") 78.79 ±0.11; HSAKD* (Ours*, joint "Teacher*") 79.43 ±0.24.
The paper reports the student's final-head top-1 on unrotated test images: `eval/top1`.
Reference schedule (configs/hsakd/common.py): 240 epochs, batch 64, SGD Nesterov, lr 0.01.

    python -m jaxkd.main --config configs/hsakd/ResNet50-MobileNetV2_stride1.py --workdir runs/hsakd/ResNet50-MobileNetV2_stride1
    python -m jaxkd.main --config configs/hsakd/ResNet50-MobileNetV2_stride1.py:star --workdir runs/hsakd_star/ResNet50-MobileNetV2_stride1

Frozen variant with a trained teacher: `--config.teacher.checkpoint=<file>` (skips stage
`teacher`; the joint "Teacher*" is always trained from scratch).
"""

import ml_collections

from configs.hsakd import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  return common.get_config(teacher="ResNet50", student="MobileNetV2_stride1", arg=arg)
