"""HSAKD on CIFAR-100, VGG13 -> MobileNetV2 (HSAKD's stride-1 variant).

Paper (IJCAI'21 Table 1, top-1 %, mean ±std):
Teacher 74.64, Teacher* 78.48, student alone 73.51 ±0.26;
HSAKD (Ours, frozen "Teacher") 77.45 ±0.21; HSAKD* (Ours*, joint "Teacher*") 79.27 ±0.12.
The paper reports the student's final-head top-1 on unrotated test images: `eval/top1`.
Reference schedule (configs/hsakd/common.py): 240 epochs, batch 64, SGD Nesterov, lr 0.01.

    python -m jaxkd.main --config configs/hsakd/vgg13-MobileNetV2_stride1.py --workdir runs/hsakd/vgg13-MobileNetV2_stride1
    python -m jaxkd.main --config configs/hsakd/vgg13-MobileNetV2_stride1.py:star --workdir runs/hsakd_star/vgg13-MobileNetV2_stride1

Frozen variant with a trained teacher: `--config.teacher.checkpoint=<file>` (skips stage
`teacher`; the joint "Teacher*" is always trained from scratch).
"""

import ml_collections

from configs.hsakd import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  return common.get_config(teacher="vgg13", student="MobileNetV2_stride1", arg=arg)
