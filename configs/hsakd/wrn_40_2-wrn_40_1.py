"""HSAKD on CIFAR-100, WRN-40-2 -> WRN-40-1.

Paper (IJCAI'21 Table 1, top-1 %, mean ±std):
Teacher 76.45, Teacher* 80.70, student alone 71.95 ±0.59;
HSAKD (Ours, frozen "Teacher") 77.00 ±0.21; HSAKD* (Ours*, joint "Teacher*") 78.12 ±0.25.
The paper reports the student's final-head top-1 on unrotated test images: `eval/top1`.
Reference schedule (configs/hsakd/common.py): 240 epochs, batch 64, SGD Nesterov, lr 0.05.

    python -m jaxkd.main --config configs/hsakd/wrn_40_2-wrn_40_1.py --workdir runs/hsakd/wrn_40_2-wrn_40_1
    python -m jaxkd.main --config configs/hsakd/wrn_40_2-wrn_40_1.py:star --workdir runs/hsakd_star/wrn_40_2-wrn_40_1

Frozen variant with a trained teacher: `--config.teacher.checkpoint=<file>` (skips stage
`teacher`; the joint "Teacher*" is always trained from scratch).
"""

import ml_collections

from configs.hsakd import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  return common.get_config(teacher="wrn_40_2", student="wrn_40_1", arg=arg)
