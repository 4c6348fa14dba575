"""HSAKD on CIFAR-100, WRN-40-2 -> ShuffleNetV1.

Paper (IJCAI'21 Table 1, top-1 %, mean ±std):
Teacher 76.45, Teacher* 80.70, student alone 71.74 ±0.35;
HSAKD (Ours, frozen "Teacher") 78.51 ±0.20; HSAKD* (Ours*, joint "Teacher*") 80.11 ±0.32.
The paper reports the student's final-head top-1 on unrotated test images: `eval/top1`.
Reference schedule (configs/hsakd/common.py): 240 epochs, batch 64, SGD Nesterov, lr 0.01.

    python -m jaxkd.main --config configs/hsakd/wrn_40_2-ShuffleV1.py --workdir runs/hsakd/wrn_40_2-ShuffleV1
    python -m jaxkd.main --config configs/hsakd/wrn_40_2-ShuffleV1.py:star --workdir runs/hsakd_star/wrn_40_2-ShuffleV1

Frozen variant with a trained teacher: `--config.teacher.checkpoint=<file>` (skips stage
`teacher`; the joint "Teacher*" is always trained from scratch).
"""

import ml_collections

from configs.hsakd import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  return common.get_config(teacher="wrn_40_2", student="ShuffleV1", arg=arg)
