"""CRD (Tian et al., ICLR 2020) / RepDistiller, CIFAR-100 top-1: 13 teacher → student pairs.

Numbers: the HobbitLong/RepDistiller README at commit 0eb3a95 (the paper's Tables 1 and 2). The
README states neither the number of runs nor the epoch a number is
taken at. Its FSP cell for wrn_40_2 → wrn_40_1 reads 0.00 (FSP cannot run on unequal widths;
jaxkd refuses that pair too) and its cross-architecture table has no FSP row; the README has no
CRD+KD row: the two CRD+KD numbers here are the CRD paper's (Tian et al., ICLR 2020, Table 1;
resnet32x4 → resnet8x4 and wrn_40_2 → wrn_16_2 only). Every row is trained on RepDistiller's
schedule (`configs/default.py` `cifar100_recipe`: 240 epochs, batch 64, lr 0.05, 0.01 for
MobileNetV2 / ShuffleNet students, no Nesterov) with RepDistiller's hyper-parameters (jaxkd's
defaults: `-r -a -b` of `scripts/run_cifar_distill.sh`).

    python experiments/reproduce.py --table crd_cifar100 --seeds 3 --workdir runs/tables \
        --config.dataset.data_dir=/path/to/tensorflow_datasets
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from experiments import tables  # noqa: E402
from experiments.tables import Row, Table  # noqa: E402

PAIRS = ("wrn_40_2-wrn_16_2", "wrn_40_2-wrn_40_1", "resnet56-resnet20", "resnet110-resnet20",
         "resnet110-resnet32", "resnet32x4-resnet8x4", "vgg13-vgg8",
         "vgg13-MobileNetV2", "ResNet50-MobileNetV2", "ResNet50-vgg8", "resnet32x4-ShuffleV1",
         "resnet32x4-ShuffleV2", "wrn_40_2-ShuffleV1")

# One number per pair, in PAIRS order (same-architecture table, then different-architecture).
NUMBERS = {
    "teacher": "75.61 75.61 72.34 74.31 74.31 79.42 74.64   74.64 79.34 79.34 79.42 79.42 75.61",
    "ce":      "73.26 71.98 69.06 69.06 71.14 72.50 70.36   64.60 64.60 70.36 70.50 71.82 70.50",
    "kd":      "74.92 73.54 70.66 70.67 73.08 73.33 72.98   67.37 67.35 73.81 74.07 74.45 74.83",
    "fitnet":  "73.58 72.24 69.21 68.99 71.06 73.50 71.02   64.14 63.16 70.69 73.59 73.54 73.73",
    "at":      "74.08 72.77 70.55 70.22 72.31 73.44 71.43   59.40 58.58 71.84 71.73 72.73 73.32",
    "sp":      "73.83 72.43 69.67 70.04 72.69 72.94 72.68   66.30 68.08 73.34 73.48 74.56 74.52",
    "cc":      "73.56 72.21 69.63 69.48 71.48 72.97 70.71   64.86 65.43 70.25 71.14 71.29 71.38",
    "vid":     "74.11 73.30 70.38 70.16 72.61 73.09 71.23   65.56 67.57 70.30 73.38 73.40 73.61",
    "rkd":     "73.35 72.22 69.61 69.25 71.82 71.90 71.48   64.52 64.43 71.50 72.28 73.21 72.21",
    "pkt":     "74.54 73.45 70.34 70.25 72.61 73.64 72.88   67.13 66.52 73.01 74.10 74.69 73.89",
    "ab":      "72.50 72.38 69.47 69.53 70.98 73.17 70.94   66.06 67.20 70.65 73.55 74.31 73.34",
    "ft":      "73.25 71.59 69.84 70.22 72.37 72.86 70.58   61.78 60.99 70.29 71.75 72.50 72.03",
    "fsp":     "72.91 -     69.95 70.11 71.89 72.62 70.23   -     -     -     -     -     -",
    "nst":     "73.68 72.24 69.60 69.53 71.96 73.30 71.53   58.16 64.96 71.28 74.12 74.68 74.89",
    "crd":     "75.48 74.14 71.16 71.46 73.48 75.51 73.94   69.73 69.11 74.30 75.11 75.65 76.05",
    "crd_kd":  "75.64 -     -     -     -     75.46 -       -     -     -     -     -     -",
}

TABLE = Table(
    name="crd_cifar100",
    title="CRD (ICLR 2020) / RepDistiller, CIFAR-100 top-1 (%)",
    rows=(
        Row("Teacher", None, stage="teacher", key="teacher"),
        Row("Student", "ce"),
        Row("KD", "kd"),
        Row("FitNet", "fitnet"),
        Row("AT", "at"),
        Row("SP", "sp"),
        Row("CC", "cc"),
        Row("VID", "vid"),
        Row("RKD", "rkd"),
        Row("PKT", "pkt"),
        Row("AB", "ab"),
        Row("FT", "ft"),
        Row("FSP", "fsp"),
        Row("NST", "nst"),
        Row("CRD", "crd"),
        Row("CRD+KD", "crd_kd"),
    ),
    pairs=PAIRS,
    paper=tables.by_pair(PAIRS, NUMBERS),
    source="HobbitLong/RepDistiller README @0eb3a95 = CRD paper Tables 1-2",
    statistic="1 number; epoch and runs not stated",
    notes="The README states neither the number of runs nor the epoch a number is taken at. "
          "FSP is N/A (0.00) on wrn_40_2 → wrn_40_1 and absent from the cross-architecture "
          "table; CRD+KD is not in the README: its two numbers are the paper's.",
    row_notes={"crd_kd": "1 number (CRD paper, not in the README)"},
    base_config=tables.repdistiller_config,
)


def get_config(arg: str = ""):
  return tables.get_config(TABLE, arg)
