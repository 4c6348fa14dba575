"""Later distillation methods on CIFAR-100, top-1: DKD, DIST, ICKD, CTKD and logit
standardization on 16 teacher → student pairs, as their authors' READMEs print them.

Every number is copied from a README read at the commit named here; '-' where it has none:

- KD, DKD: megvii-research/mdistiller README @ a08d46f (its two CIFAR-100 tables: the six
  same-architecture pairs and five cross-architecture ones). The column the README heads
  "ResNet32x4 / MobileNet-V2" is resnet32x4 → ShuffleV2 here: the repository's config for it is
  configs/cifar100/dkd/res32x4_shuv2.yaml (there is no resnet32x4/MobileNetV2 config), its KD
  number 74.45 is RepDistiller's resnet32x4 → ShuffleV2, and the LS README below prints the same
  DKD 77.07 under "ResNet32x4 / SHN-V2". On the pairs mdistiller does not have (resnet110 →
  resnet20, resnet32x4 → wrn_16_2, resnet32x4 → wrn_40_2, wrn_40_2 → resnet8x4, wrn_40_2 →
  MobileNetV2) KD and DKD are the LS README's. Where both print a pair, they agree except DKD
  wrn_40_2 → wrn_16_2 (mdistiller 76.23, LS 76.24; 76.23 here).
- KD+LS, DKD+LS, CTKD+LS (logit standardization): sunshangquan/logit-standardization-KD README
  @ f6e5aa5 (its two tables, "KD+Ours", "DKD+Ours", "CTKD+Ours"). Its CTKD row gives the CTKD
  numbers of resnet32x4 → resnet8x4 and of the cross-architecture pairs.
- CTKD: zhengli97/CTKD README @ 7d52522 (six same-architecture pairs; the LS README prints the
  same six). Its KD row reads 70.66 for resnet110 → resnet20, where the LS and ICKD READMEs
  (and RepDistiller) read 70.67; the KD row here has 70.67.
- DIST: hunto/DIST_KD README @ 2418f18 (its CIFAR-100 table, six pairs, mean ± std).
- ICKD-C (w/o KL) = `ickd` (`-a 0 -b 2.5`), ICKD-C = `ickd_kd` (`-a 1 -b 2.5`):
  ADLab-AutoDrive/ICKD Cifar100/README.md @ 403b8d3 (seven same-architecture pairs).
- Teacher, Student: RepDistiller's teachers and students trained alone, which mdistiller, LS
  (mdistiller's cifar_teachers.tar), CTKD, DIST and ICKD distil from: the ICKD README's "Teacher"
  and "Vanilla" rows (resnet56, resnet110, resnet32x4, wrn_40_2, vgg13; resnet20, resnet32,
  resnet8x4, wrn_16_2, wrn_40_1, vgg8) and the DIST README's numbers in brackets (ResNet50;
  MobileNetV2, ShuffleV1, ShuffleV2). A model's number is the same in every pair it is in; no
  source gives wrn_40_2 trained alone as a student.

Left out, no number could be read: ReviewKD and OFD (the mdistiller README has only KD and DKD
at every commit; dvlab-research/ReviewKD's README and CIFAR-100/README.md have no numbers; the
DKD and ReviewKD papers' tables could not be opened here); NKD (yzd-v/cls_KD's README and
nkd.md give ImageNet only); SRD (roymiles/Simple-Recipe-Distillation's README gives ImageNet
and DeiT only); CTKD on DKD (the CTKD README gives it on ImageNet only).

Statistics: mdistiller, CTKD and ICKD state neither the number of runs nor the epoch (their
trainers keep the best test accuracy); DIST prints mean ± std, runs not stated; the LS README's
numbers come from an "average operation" over runs (number not stated), and the single-run
logs it links end with their best_acc.

Schedule: every row is trained on mdistiller's (`configs/default.py` `cifar100_recipe`: 240
epochs, batch 64, SGD momentum 0.9 without Nesterov, weight decay 5e-4, lr 0.05, 0.01 for
MobileNetV2 / ShuffleV1 / ShuffleV2 students, ×0.1 at epochs 150, 180, 210). The authors of
each row use the same: LS is mdistiller's code and configs; CTKD and ICKD use RepDistiller's
train_student.py (CTKD's script sets batch 64, lr 0.05); DIST's configs/strategies/distill/
dist_cifar.yaml (hunto/image_classification_sota @ d9662f7) is 240 epochs of batch 64 at lr
0.05 held for a 120-epoch "warm-up" (warmup_lr = lr), then ×0.1 every 30 epochs, i.e. at 150,
180, 210, SGD without Nesterov, weight decay 5e-4, 0.01 for MobileNetV2 / ShuffleNet students.

Hyper-parameters: each method's jaxkd defaults (its authors' CIFAR-100 settings; DKD's β per
pair as mdistiller's configs), and for KD+LS and DKD+LS the authors' setting of each pair, which
the LS README's log files name as `KD_TYPE,TEACHER,STUDENT,BASE_TEMPERATURE,KD_WEIGHT[,BETA]`:
KD+LS sets T = base temperature and kd_weight = KD weight; DKD+LS sets T = base temperature,
α = KD weight (× the config's ALPHA, 1) and β = KD weight × BETA (the `--logit-stand` block of
tools/train.py multiplies the config's ALPHA and BETA by the KD weight; BETA is the log name's
third value, else the pair's config, 8). CTKD+LS: every log is `2,9` (its temperature is
learned; the KD weight 9 is the switch's default). KD+LS, DKD+LS and CTKD+LS repeat a method of
an earlier row, so each trains in a run of its own reading the seed's teacher (see
experiments/tables/__init__.py).

    python experiments/reproduce.py --table modern_cifar100 --seeds 3 --workdir runs/tables \
        --pairs resnet32x4-resnet8x4 --config.dataset.data_dir=/path/to/tensorflow_datasets
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from configs import default  # noqa: E402
from experiments import tables  # noqa: E402
from experiments.tables import Row, Table  # noqa: E402

PAIRS = ("resnet56-resnet20", "resnet110-resnet32", "resnet32x4-resnet8x4", "wrn_40_2-wrn_16_2",
         "wrn_40_2-wrn_40_1", "vgg13-vgg8", "resnet110-resnet20",
         "resnet32x4-ShuffleV1", "wrn_40_2-ShuffleV1", "vgg13-MobileNetV2",
         "ResNet50-MobileNetV2", "resnet32x4-ShuffleV2", "resnet32x4-wrn_16_2",
         "resnet32x4-wrn_40_2", "wrn_40_2-resnet8x4", "wrn_40_2-MobileNetV2")

# One number per pair, in PAIRS order (seven same-architecture pairs, then nine others).
NUMBERS = {
    "teacher": ("72.34 74.31 79.42 75.61 75.61 74.64 74.31   "
                "79.42 75.61 74.64 79.34 79.42 79.42 79.42 75.61 75.61"),
    "ce":      ("69.06 71.14 72.50 73.26 71.98 70.36 69.06   "
                "70.50 70.50 64.60 64.60 71.82 73.26 -     72.50 64.60"),
    "kd":      ("70.66 73.08 73.33 74.92 73.54 72.98 70.67   "
                "74.07 74.83 67.37 67.35 74.45 74.90 77.70 73.97 68.36"),
    "dkd":     ("71.97 74.11 76.32 76.23 74.81 74.68 71.06   "
                "76.45 76.70 69.71 70.35 77.07 75.70 78.46 75.56 69.28"),
    "dist":    ("71.75±0.30 - 76.31±0.19 - 74.43±0.24 - -   "
                "76.34±0.18 - - 68.66±0.23 77.35±0.25 - - - -"),
    "ickd":    ("71.76 73.89 75.25 75.64 74.33 73.42 71.68   "
                "-     -     -     -     -     -     -     -     -"),
    "ickd_kd": ("71.69 74.11 75.48 75.57 74.63 73.88 71.91   "
                "-     -     -     -     -     -     -     -     -"),
    "ctkd":    ("71.19 73.52 73.39 75.45 73.93 73.52 70.99   "
                "-     -     68.50 68.67 75.37 74.57 77.66 74.61 68.34"),
    "kd_ls":   ("71.43 74.17 76.62 76.11 74.37 74.36 71.48   "
                "-     -     68.61 69.02 75.56 75.26 77.92 77.11 69.23"),
    "dkd_ls":  ("72.32 74.29 77.01 76.39 74.89 74.81 71.85   "
                "-     -     69.98 70.45 77.37 76.19 78.95 76.75 70.01"),
    "ctkd_ls": ("71.34 74.01 76.67 76.08 74.58 74.47 71.39   "
                "-     -     68.98 69.36 76.18 75.16 77.99 77.03 69.53"),
}

# The LS README's log names per pair: (base temperature, KD weight) for KD+LS; (base
# temperature, KD weight, BETA) for DKD+LS (BETA from the pair's config where the name has none).
KD_LS_LOGS = {
    "resnet56-resnet20": (2, 9), "resnet110-resnet32": (2, 9), "resnet32x4-resnet8x4": (2, 9),
    "wrn_40_2-wrn_16_2": (2, 9), "wrn_40_2-wrn_40_1": (2, 9), "vgg13-vgg8": (3, 9),
    "resnet110-resnet20": (4, 12), "vgg13-MobileNetV2": (3, 9), "ResNet50-MobileNetV2": (3, 1),
    "resnet32x4-ShuffleV2": (2, 9), "resnet32x4-wrn_16_2": (3, 9), "resnet32x4-wrn_40_2": (3, 9),
    "wrn_40_2-resnet8x4": (2, 9), "wrn_40_2-MobileNetV2": (3, 9),
}
DKD_LS_LOGS = {
    "resnet56-resnet20": (3, 18, 2.0), "resnet110-resnet32": (2, 15, 2.0),
    "resnet32x4-resnet8x4": (2, 9, 8.0), "wrn_40_2-wrn_16_2": (2, 12, 2.0),
    "wrn_40_2-wrn_40_1": (2, 12, 2.0), "vgg13-vgg8": (2, 15, 2.0),
    "resnet110-resnet20": (2, 15, 2.0), "vgg13-MobileNetV2": (3, 9, 2.0),
    "ResNet50-MobileNetV2": (2, 15, 2.0), "resnet32x4-ShuffleV2": (2, 9, 8.0),
    "resnet32x4-wrn_16_2": (2, 9, 2.0), "resnet32x4-wrn_40_2": (2, 9, 8.0),
    "wrn_40_2-resnet8x4": (2, 18, 2.0), "wrn_40_2-MobileNetV2": (2, 15, 2.0),
}
KD_LS_FIELDS = {pair: dict(T=float(t), kd_weight=float(w)) for pair, (t, w) in KD_LS_LOGS.items()}
DKD_LS_FIELDS = {pair: dict(T=float(t), alpha=float(w), beta=float(w * beta))
                 for pair, (t, w, beta) in DKD_LS_LOGS.items()}

# mdistiller's (and RepDistiller's) yamls set lr 0.01 for these students.
LOW_LR_STUDENTS = ("MobileNetV2", "ShuffleV1", "ShuffleV2")


def base_config(pair: str):
  teacher, student = tables.split_pair(pair)
  return default.cifar100_recipe(teacher, student,
                                 lr=0.01 if student in LOW_LR_STUDENTS else 0.05, nesterov=False)


TABLE = Table(
    name="modern_cifar100",
    title="DKD, DIST, ICKD, CTKD and logit standardization, CIFAR-100 top-1 (%)",
    rows=(
        Row("Teacher", None, stage="teacher", key="teacher"),
        Row("Student", "ce"),
        Row("KD", "kd"),
        Row("DKD", "dkd"),
        Row("DIST", "dist"),
        Row("ICKD-C (w/o KL)", "ickd"),
        Row("ICKD-C", "ickd_kd"),
        Row("CTKD", "ctkd"),
        Row("KD+LS", "kd", overrides=dict(logit_standardize=True), key="kd_ls",
            pair_overrides=KD_LS_FIELDS),
        Row("DKD+LS", "dkd", overrides=dict(logit_standardize=True), key="dkd_ls",
            pair_overrides=DKD_LS_FIELDS),
        Row("CTKD+LS", "ctkd", overrides=dict(logit_standardize=True), key="ctkd_ls"),
    ),
    pairs=PAIRS,
    paper=tables.by_pair(PAIRS, NUMBERS),
    source="READMEs: megvii-research/mdistiller @a08d46f (KD, DKD), "
           "sunshangquan/logit-standardization-KD @f6e5aa5 (+LS rows; KD, DKD, CTKD elsewhere), "
           "zhengli97/CTKD @7d52522, hunto/DIST_KD @2418f18, ADLab-AutoDrive/ICKD @403b8d3 "
           "(ICKD; Teacher, Student), DIST_KD (ResNet50, MobileNetV2, ShuffleNet numbers)",
    statistic="1 number; runs and epoch not stated",
    notes="Rows not in this table, no number could be read: ReviewKD and OFD (not in the "
          "mdistiller README, no CIFAR number in ReviewKD's README), NKD and SRD (ImageNet "
          "only in their READMEs), CTKD on DKD (ImageNet only). The mdistiller README's "
          "'ResNet32x4 / MobileNet-V2' column is resnet32x4 → ShuffleV2 (its config "
          "res32x4_shuv2.yaml). KD+LS and DKD+LS use the authors' per-pair temperature and "
          "weights (the LS README's log names).",
    row_notes={
        "teacher": "1 number (RepDistiller's teacher)",
        "ce": "1 number (RepDistiller's student alone)",
        "dist": "mean±std; runs and epoch not stated",
        "kd_ls": "1 number, averaged over runs (number not stated)",
        "dkd_ls": "1 number, averaged over runs (number not stated)",
        "ctkd_ls": "1 number, averaged over runs (number not stated)",
    },
    base_config=base_config,
)


def get_config(arg: str = ""):
  return tables.get_config(TABLE, arg)
