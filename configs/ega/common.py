"""What every EGA recipe shares: the reference schedule and all EGA hyper-parameters.

Reference (yccm/EGA @ 0963f8e: `train_student.py`, `scripts/run_vit32.sh`, `scripts/ega_seq.sh`;
the loss is in docs/methods.md), CIFAR-100, one stage after loading the teacher:
  teacher      a CLIP image tower, frozen, never trained: its weights come from disk
               (`--config.teacher.checkpoint`, a Hugging Face folder with config.json +
               model.safetensors, or OpenAI's .pt file); nothing is downloaded. It sees its own
               view of each image: crop (padding 4) → bicubic resize to 224 → flip → CLIP
               statistics, drawn independently of the student's view.
  student_ega  240 epochs, batch 64, SGD momentum 0.9, wd 5e-4, lr 0.05 (0.01 for ShuffleV1)
               ×0.1 at 150/180/210; the student's 32-px crop + flip normalised with CLIP's
               statistics (`dataset.normalization = 'clip'`), as the reference does.
               Objective γ·CE + β·(0.8·L_node + 0.24·L_edge) + α·KD, γ = β = 1, α = 0 (edge
               0.3 with RN101, the reference's `ega_seq.sh`); the teacher head trains beside
               the student on CE alone with its own SGD (lr 0.01, momentum 0.9, wd 5e-4,
               constant).
The reference reports the student's best test top-1 through its head: `top1_best` in
result.json (`eval/top1` per epoch).

Arguments (comma-separated, after the colon of `--config <recipe>.py:`):
  <student>  one of resnet8x4 (default), resnet32x4, vgg13, ResNet50, ShuffleV1;
  <distill>  the term β weighs, on the same joint embeddings: ega (default), or the reference's
             comparison methods kd (α = 1 instead), hint, rkd, pkt, crd, nce, ccl; the method
             is then `ega_<distill>` (stage student_ega_<distill>);
  compare    after the method, the comparison rows kd, hint, rkd, pkt and crd as baselines
             (one student stage each, same teacher, same schedule);
  runlocal   a few steps on the first examples, for a smoke run on a CPU (still needs the
             CLIP weights).

Evaluation as the paper adds it: `--config.linear_probe.dataset=cifar100` (or stl10, or
tinyimagenet, prepared for tfds) trains a linear classifier on the frozen student's pooled
features after distillation (stage `linear_probe`, `--config.linear_probe.num_epochs/lr`).
"""

from typing import Optional

import ml_collections

from configs import default
from jaxkd.methods import ega

STUDENTS = ("resnet8x4", "resnet32x4", "vgg13", "ResNet50", "ShuffleV1")
LOW_LR_STUDENTS = ("ShuffleV1",)   # lr 0.01 in the reference
COMPARISON = ("kd", "hint", "rkd", "pkt", "crd")   # the reference's comparison rows
ARGS = STUDENTS + ega.DISTILL_NAMES + ("compare", "runlocal")


def get_config(teacher: str, arg: str = "", edge_weight: Optional[float] = None
               ) -> ml_collections.ConfigDict:
  """The CIFAR-100 EGA recipe for CLIP tower `teacher`, the student and `runlocal` from `arg`;
  `edge_weight` where the teacher's reference script changes the method's default."""
  tokens = default.recipe_tokens(arg, ARGS)
  students = [t for t in tokens if t in STUDENTS]
  distills = [t for t in tokens if t in ega.DISTILL_NAMES]
  for kind, chosen in (("student", students), ("distillation term", distills)):
    if len(chosen) > 1:
      raise ValueError(f"one {kind} per run, got {', '.join(chosen)}")
  student = students[0] if students else "resnet8x4"
  distill = distills[0] if distills else "ega"

  config = default.cifar100_recipe(
      teacher, student, lr=0.01 if student in LOW_LR_STUDENTS else 0.05, nesterov=False)
  config.dataset.normalization = "clip"
  config.teacher.checkpoint = ""        # the CLIP weights on disk: see the recipe's docstring
  config.teacher.lr = -1.0              # a zoo teacher pretrained here: the student's lr

  name = "ega" if distill == "ega" else f"ega_{distill}"
  config.method = default.method_fields(name, teacher, student)
  if edge_weight is not None:
    config.method.edge_weight = edge_weight
  # e.g. "ce" adds the student trained alone
  config.baselines = (",".join(f"ega_{d}" for d in COMPARISON if d != distill)
                      if "compare" in tokens else "")

  # The graph terms are not normalised by the batch: keep the reference's batch of 64.
  if "runlocal" in tokens:
    default.apply_arg(config, "runlocal")
  return config
