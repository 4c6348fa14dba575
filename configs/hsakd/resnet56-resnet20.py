"""HSAKD on CIFAR-100, ResNet56 -> ResNet20.

Paper (IJCAI'21 Table 1, top-1 %, mean ±std):
Teacher 73.44, Teacher* 77.20, student alone 69.62 ±0.26;
HSAKD (Ours, frozen "Teacher") 72.58 ±0.33; HSAKD* (Ours*, joint "Teacher*") 73.73 ±0.10.
The paper reports the student's final-head top-1 on unrotated test images: `eval/top1`.
Reference schedule (configs/hsakd/common.py): 240 epochs, batch 64, SGD Nesterov, lr 0.05.

    python -m jaxkd.main --config configs/hsakd/resnet56-resnet20.py --workdir runs/hsakd/resnet56-resnet20
    python -m jaxkd.main --config configs/hsakd/resnet56-resnet20.py:star --workdir runs/hsakd_star/resnet56-resnet20

Frozen variant with a trained teacher: `--config.teacher.checkpoint=<file>` (skips stage
`teacher`; the joint "Teacher*" is always trained from scratch).
"""

import ml_collections

from configs.hsakd import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  return common.get_config(teacher="resnet56", student="resnet20", arg=arg)
