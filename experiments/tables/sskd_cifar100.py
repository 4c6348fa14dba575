"""SSKD (Xu et al., ECCV 2020), CIFAR-100 top-1: 11 teacher → student pairs.

Numbers: the xuguodong03/SSKD README at 661b972 (the paper's Tables 1 and 2). The README does not
say whether a number is one run or a mean; the reference code keeps the best test epoch
(`student_best.pth`). SSKD's teachers and plain students are its own, and its baseline rows (except
KD, copied from CRD) differ from RepDistiller's: compare a jaxkd row with this column only. Every
row is trained on the SSKD recipe of the pair (`configs/sskd/<pair>.py`: 240 epochs, batch 64, lr
0.05, 0.01 for MobileNetV2 / ShuffleNet students); the baselines take RepDistiller's
hyper-parameters (jaxkd's defaults).

    python experiments/reproduce.py --table sskd_cifar100 --seeds 3 --workdir runs/tables \
        --config.dataset.data_dir=/path/to/tensorflow_datasets
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from experiments import tables  # noqa: E402
from experiments.tables import Row, Table  # noqa: E402

PAIRS = ("wrn_40_2-wrn_16_2", "wrn_40_2-wrn_40_1", "resnet56-resnet20", "resnet32x4-resnet8x4",
         "vgg13-vgg8",
         "vgg13-MobileNetV2", "ResNet50-MobileNetV2", "ResNet50-vgg8", "resnet32x4-ShuffleV1",
         "resnet32x4-ShuffleV2", "wrn_40_2-ShuffleV1")

# One number per pair, in PAIRS order (similar-architecture table, then cross-architecture).
NUMBERS = {
    "teacher": "76.46 76.46 73.44 79.63 75.38   75.38 79.10 79.10 79.63 79.63 76.46",
    "ce":      "73.64 72.24 69.63 72.51 70.68   65.79 65.79 70.68 70.77 73.12 70.77",
    "kd":      "74.92 73.54 70.66 73.33 72.98   67.37 67.35 73.81 74.07 74.45 74.83",
    "fitnet":  "75.75 74.12 71.60 74.31 73.54   68.58 68.54 73.84 74.82 75.11 75.55",
    "at":      "75.28 74.45 71.78 74.26 73.62   69.34 69.28 73.45 74.76 75.30 75.61",
    "sp":      "75.34 73.15 71.48 74.74 73.44   66.89 68.99 73.86 73.80 75.15 75.56",
    "vid":     "74.79 74.20 71.71 74.82 73.96   66.91 68.88 73.75 74.28 75.78 75.36",
    "rkd":     "75.40 73.87 71.48 74.47 73.72   68.50 68.46 73.73 74.20 75.74 75.45",
    "pkt":     "76.01 74.40 71.44 74.17 73.37   67.89 68.44 73.53 74.06 75.18 75.51",
    "ab":      "68.89 75.06 71.49 74.45 74.27   68.86 69.32 74.20 76.24 75.66 76.58",
    "ft":      "75.15 74.37 71.52 75.02 73.42   69.19 69.01 73.58 74.31 74.95 75.18",
    "crd":     "76.04 75.52 71.68 75.90 74.06   68.49 70.32 74.42 75.46 75.72 75.96",
    "sskd":    "76.04 76.13 71.49 76.20 75.33   71.53 72.57 75.76 78.44 78.61 77.40",
}


def base_config(pair: str):
  return tables.load_recipe(f"configs/sskd/{pair}.py")


TABLE = Table(
    name="sskd_cifar100",
    title="SSKD (ECCV 2020), CIFAR-100 top-1 (%)",
    rows=(
        Row("Teacher", None, stage="teacher", key="teacher"),
        Row("Student", "ce"),
        Row("KD", "kd"),
        Row("FitNet", "fitnet"),
        Row("AT", "at"),
        Row("SP", "sp"),
        Row("VID", "vid"),
        Row("RKD", "rkd"),
        Row("PKT", "pkt"),
        Row("AB", "ab"),
        Row("FT", "ft"),
        Row("CRD", "crd"),
        Row("SSKD", "sskd"),
    ),
    pairs=PAIRS,
    paper=tables.by_pair(PAIRS, NUMBERS),
    source="xuguodong03/SSKD README @661b972 = paper Tables 1-2",
    statistic="1 number; best epoch (code), runs not stated",
    notes="The README does not say whether a number is one run or a mean; the reference code "
          "keeps the best test epoch (student_best.pth). Teachers and plain students are SSKD's "
          "own; the KD row is CRD's, copied.",
    row_notes={"kd": "1 number (CRD's KD row, copied)"},
    base_config=base_config,
)


def get_config(arg: str = ""):
  return tables.get_config(TABLE, arg)
