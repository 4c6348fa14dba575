"""EGA on CIFAR-100 with the frozen CLIP ViT-B/32 image tower as teacher.

The student is the recipe argument: resnet8x4 (default), resnet32x4, vgg13, ResNet50 or
ShuffleV1; reference schedule and hyper-parameters in configs/ega/common.py.
Graph weights node 0.8 / edge 0.24: the reference's ViT-B/32 script and defaults.

The CLIP weights are read from disk, never downloaded. Put OpenAI's `ViT-B-32.pt` (the `clip`
package's release, e.g. ~/.cache/clip/ViT-B-32.pt) or the Hugging Face folder
`openai/clip-vit-base-patch32` (config.json + model.safetensors; a `pytorch_model.bin` must first
be saved as safetensors), and pass its path:

    python -m jaxkd.main --config configs/ega/clip_vit_b32.py \
        --workdir runs/ega/clip_vit_b32-resnet8x4 \
        --config.teacher.checkpoint=/path/to/clip-vit-base-patch32

Another student: `--config configs/ega/clip_vit_b32.py:vgg13`. A linear probe of the distilled
student afterwards: `--config.linear_probe.dataset=cifar100`.
"""

import ml_collections

from configs.ega import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  return common.get_config(teacher="clip_vit_b32", arg=arg, edge_weight=0.24)
