"""EGA on CIFAR-100 with the frozen CLIP RN101 image tower as teacher.

The student is the recipe argument: resnet8x4 (default), resnet32x4, vgg13, ResNet50 or
ShuffleV1; reference schedule and hyper-parameters in configs/ega/common.py.
Graph weights node 0.8 / edge 0.3: the reference's RN101 script (`scripts/ega_seq.sh`).

The CLIP weights are read from disk, never downloaded. Put OpenAI's `RN101.pt` (the `clip`
package's release, e.g. ~/.cache/clip/RN101.pt; it is read without running any code from it), and
pass its path:

    python -m jaxkd.main --config configs/ega/clip_rn101.py \
        --workdir runs/ega/clip_rn101-resnet8x4 \
        --config.teacher.checkpoint=/path/to/RN101.pt

Another student: `--config configs/ega/clip_rn101.py:vgg13`. A linear probe of the distilled
student afterwards: `--config.linear_probe.dataset=cifar100`.
"""

import ml_collections

from configs.ega import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  return common.get_config(teacher="clip_rn101", arg=arg, edge_weight=0.3)
