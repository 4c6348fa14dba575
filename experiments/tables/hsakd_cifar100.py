"""HSAKD (Yang et al., IJCAI 2021), CIFAR-100 top-1: 8 teacher → student pairs, mean ± std.

Numbers: the paper's Table 1, as the poster and slide 22 of winycg/HSAKD's
`poster/765_IJCAI_poster.pdf` and `poster/765_IJCAI_slides.pdf` carry it. Mean ± std over runs; the
number of runs could not be read. The reference selects the student's best test epoch (`_best`).
"HSAKD" is taught by the frozen teacher with trained auxiliary classifiers; "HSAKD*" by "Teacher*",
backbone and classifiers trained jointly from scratch (the Teacher* row is that teacher's own
top-1). The MobileNetV2 columns use HSAKD's stronger stride-1 variant (`MobileNetV2_stride1`; the
authors re-ran the baselines on it, winycg/HSAKD issue #11). Every row is trained on the HSAKD
recipe of the pair (`configs/hsakd/<pair>.py`: 240 epochs, batch 64, SGD Nesterov, lr 0.05, 0.01 for
MobileNetV2 / ShuffleNet students); the baselines take RepDistiller's hyper-parameters (jaxkd's
defaults).

    python experiments/reproduce.py --table hsakd_cifar100 --seeds 3 --workdir runs/tables \
        --config.dataset.data_dir=/path/to/tensorflow_datasets
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from experiments import tables  # noqa: E402
from experiments.tables import Row, Table  # noqa: E402

PAIRS = ("wrn_40_2-wrn_16_2", "wrn_40_2-wrn_40_1", "resnet56-resnet20", "resnet32x4-resnet8x4",
         "vgg13-MobileNetV2_stride1", "ResNet50-MobileNetV2_stride1", "wrn_40_2-ShuffleV1",
         "resnet32x4-ShuffleV2")

# One number per pair, in PAIRS order.
NUMBERS = {
    "teacher":      "76.45 76.45 73.44 79.63 74.64 79.34 76.45 79.63",
    "teacher_star": "80.70 80.70 77.20 83.73 78.48 83.85 80.70 83.73",
    "ce":         ("73.57±0.23 71.95±0.59 69.62±0.26 72.95±0.24 "
                   "73.51±0.26 73.51±0.26 71.74±0.35 72.96±0.33"),
    "kd":         ("75.23±0.23 73.90±0.44 70.91±0.10 73.54±0.26 "
                   "75.21±0.24 75.80±0.46 75.83±0.18 75.43±0.33"),
    "fitnet":     ("75.30±0.42 74.30±0.42 71.21±0.16 75.37±0.12 "
                   "75.42±0.34 75.41±0.07 76.27±0.18 76.91±0.06"),
    "at":         ("75.64±0.31 74.32±0.23 71.35±0.09 75.06±0.19 "
                   "74.08±0.21 76.57±0.20 76.51±0.44 76.32±0.12"),
    "ab":         ("71.26±1.32 74.55±0.46 71.56±0.19 74.31±0.09 "
                   "74.98±0.44 75.87±0.39 76.43±0.09 76.40±0.29"),
    "vid":        ("75.31±0.22 74.23±0.28 71.35±0.09 75.07±0.35 "
                   "75.67±0.13 75.97±0.08 76.24±0.44 75.98±0.41"),
    "rkd":        ("75.33±0.14 73.90±0.26 71.67±0.08 74.17±0.22 "
                   "75.54±0.36 76.20±0.06 75.74±0.32 75.42±0.25"),
    "sp":         ("74.35±0.59 72.91±0.24 71.45±0.38 75.44±0.11 "
                   "75.68±0.35 76.35±0.14 76.40±0.37 76.43±0.21"),
    "cc":         ("75.30±0.03 74.46±0.05 71.44±0.10 74.40±0.24 "
                   "75.66±0.33 76.05±0.25 75.63±0.30 75.74±0.18"),
    "crd":        ("75.81±0.33 74.76±0.25 71.83±0.42 75.77±0.24 "
                   "76.13±0.16 76.89±0.27 76.37±0.23 76.51±0.09"),
    "sskd":       ("76.16±0.17 75.84±0.04 70.80±0.02 75.83±0.29 "
                   "76.21±0.16 78.21±0.16 76.71±0.31 77.64±0.24"),
    "hsakd":      ("77.20±0.17 77.00±0.21 72.58±0.33 77.26±0.14 "
                   "77.45±0.21 78.79±0.11 78.51±0.20 79.93±0.11"),
    "hsakd_star": ("78.67±0.20 78.12±0.25 73.73±0.10 77.69±0.05 "
                   "79.27±0.12 79.43±0.24 80.11±0.32 80.86±0.15"),
}


def base_config(pair: str):
  return tables.load_recipe(f"configs/hsakd/{pair}.py")


TABLE = Table(
    name="hsakd_cifar100",
    title="HSAKD (IJCAI 2021), CIFAR-100 top-1 (%)",
    rows=(
        Row("Teacher", None, stage="teacher", key="teacher"),
        Row("Teacher*", "hsakd_star", stage="teacher_hsakd_star", key="teacher_star"),
        Row("Student", "ce"),
        Row("KD", "kd"),
        Row("FitNet", "fitnet"),
        Row("AT", "at"),
        Row("AB", "ab"),
        Row("VID", "vid"),
        Row("RKD", "rkd"),
        Row("SP", "sp"),
        Row("CC", "cc"),
        Row("CRD", "crd"),
        Row("SSKD", "sskd"),
        Row("HSAKD", "hsakd"),
        Row("HSAKD*", "hsakd_star"),
    ),
    pairs=PAIRS,
    paper=tables.by_pair(PAIRS, NUMBERS),
    source="HSAKD IJCAI'21 Table 1, from winycg/HSAKD poster/765_IJCAI_{poster,slides}.pdf",
    statistic="mean±std; best epoch (code), runs not stated",
    notes="Mean ± std over runs; the number of runs could not be read. The reference code keeps "
          "the student's best test epoch (`_best`). The MobileNetV2 columns are HSAKD's stride-1 "
          "variant, on which the authors re-ran the baselines.",
    row_notes={"teacher": "1 number (the CRD/SSKD teacher)",
               "teacher_star": "1 number (the joint teacher)"},
    recipe_methods=("hsakd", "hsakd_star"),
    base_config=base_config,
)


def get_config(arg: str = ""):
  return tables.get_config(TABLE, arg)
