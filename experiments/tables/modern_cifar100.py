"""Later distillation methods on CIFAR-100, top-1: DKD, DIST, ICKD, CTKD, logit
standardization, OFD, ReviewKD, DOT, MLKD and SimKD on 16 teacher → student pairs, as the
READMEs named here print them.

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
- KD+DOT (`dot`): megvii-research/mdistiller README @ a08d46f, its DOT table (resnet32x4 →
  resnet8x4, vgg13 → vgg8, resnet32x4 → ShuffleNet-V2; its KD row there is the KD row here).
- MLKD and MLKD+LS (`mlkd`, and `mlkd` with `logit_standardize`): the LS README @ f6e5aa5 (its
  rows "MLKD" and "MLKD+Ours", 14 pairs). The LS README names no source for its MLKD row; the
  MLKD repository's own README (Jin-Ying/Multi-Level-Logit-Distillation @ 5ee473f) prints no
  number. MLKD+LS uses the authors' setting of each pair, the LS log names
  `mlkd,TEACHER,STUDENT,BASE_TEMPERATURE,KD_WEIGHT` (logs/MLKD/): T = base temperature,
  kd_weight = KD weight (tools/train.py's `--logit-stand` block sets both for MLKD). Two pairs
  have no log (their README links are empty): resnet56 → resnet20 and wrn_40_2 → MobileNetV2;
  they take the switch's defaults T 2, kd_weight 9, the README's own MLKD+Ours command.
- SimKD (`simkd`, f = 2, its default): DefangChen/SimKD README @ 2b389c3, "Some results on
  CIFAR-100", the column ResNet-8x4 under the teacher ResNet-32x4 (79.42, as here). That
  README's other columns are VGG-8 and ShuffleNetV2x1.5 students of ResNet-32x4, pairs not in
  this table, and its Student/KD numbers (73.09, 74.42) are the SimKD authors' own runs, not the
  Student/KD rows here; it also prints f = 4 (77.88) and f = 8 (76.73), not rows here.
- ReviewKD, OFD (`reviewkd`, `ofd`): as printed in the CIFAR-100 table of the README of
  WangYZ1608/Knowledge-Distillation-via-ND (the "KD++" paper's repository, arXiv 2305.17007), on
  six pairs (resnet56 → resnet20, wrn_40_2 → wrn_40_1, resnet32x4 → resnet8x4, ResNet50 →
  MobileNetV2, resnet32x4 → ShuffleNet-V1, resnet32x4 → ShuffleNet-V2). ReviewKD: README @
  fc6f3f9 (the newest). OFD: README @ 9e63f46; the row was removed at d0b6e91 (with its
  FitNet, RKD, PKT and CRD rows). That README names no paper for these rows; its note marks
  with '*' only the numbers it reproduced itself (DKD on resnet32x4 → resnet8x4), so the
  unmarked ReviewKD and OFD rows are not its own runs. The same table's KD on ResNet50 →
  MobileNetV2 reads 67.65 where mdistiller's README reads 67.35, so its copies are not
  checked against their papers here.

Left out, no number could be read: CAT-KD (GzyAftermath/CAT-KD's README @ 4467073, and every
earlier commit of it, prints no number); NKD (yzd-v/cls_KD @ 1e5d48f: README and nkd.md give
ImageNet only); SRD (roymiles/Simple-Recipe-Distillation @ 31e8477: README gives ImageNet and
DeiT only); CTKD on DKD (the CTKD README gives it on ImageNet only). ReviewKD and OFD are not in
the mdistiller README at any commit, and dvlab-research/ReviewKD's README and
CIFAR-100/README.md (@ cede6ea) print no CIFAR-100 number. MLKD on the two ShuffleV1 pairs: the
LS README has no such column. The papers' own tables could not be opened here.

Statistics: mdistiller (DKD, DOT), CTKD, ICKD and SimKD state neither the number of runs nor
the epoch (their trainers keep the best test accuracy); DIST prints mean ± std, runs not
stated; the LS README's numbers come from an "average operation" over runs (number not
stated), and the single-run logs it links end with their best_acc; the ND README's ReviewKD and
OFD rows and the LS README's MLKD row say nothing of how they were obtained.

Schedule: every row is trained on mdistiller's (`configs/default.py` `cifar100_recipe`: 240
epochs, batch 64, SGD momentum 0.9 without Nesterov, weight decay 5e-4, lr 0.05, 0.01 for
MobileNetV2 / ShuffleV1 / ShuffleV2 students, ×0.1 at epochs 150, 180, 210). The authors of
each row but MLKD and MLKD+LS (below) use the same: LS is mdistiller's code and configs; CTKD
and ICKD use RepDistiller's train_student.py (CTKD's script sets batch 64, lr 0.05); DIST's
configs/strategies/distill/dist_cifar.yaml (hunto/image_classification_sota @ d9662f7) is 240
epochs of batch 64 at lr 0.05 held for a 120-epoch "warm-up" (warmup_lr = lr), then ×0.1 every
30 epochs, i.e. at 150, 180, 210, SGD without Nesterov, weight decay 5e-4, 0.01 for
MobileNetV2 / ShuffleNet students.
DOT's configs/cifar100/dot/*.yaml (mdistiller) are the same schedule (lr 0.01 for ShuffleV2),
and SimKD's train_student.py defaults too (240 epochs, batch 64, lr 0.05, steps at 150, 180,
210). mdistiller's reviewkd.yaml and ofd.yaml (resnet32x4 → resnet8x4) are the same schedule;
the ND README does not say how its ReviewKD and OFD numbers were trained.

MLKD's authors use another schedule, which this table does not follow. The MLKD configs
(Jin-Ying/Multi-Level-Logit-Distillation @ 5ee473f, configs/cifar100/ours/*.yaml, mdistiller's
11 pairs, trainer "ours": both views) run 240 epochs at lr 0.025 on the same-architecture
pairs, and at lr 0.01 480 epochs for MobileNetV2 students and wrn_40_2 → ShuffleV1, 960 for
resnet32x4 → ShuffleV1 / ShuffleV2, the ×0.1 steps staying at epochs 150, 180, 210. The LS
repository's configs/cifar100/mlkd/*.yaml, with which MLKD+LS was trained, run 480 epochs (960
for resnet32x4 → ShuffleV1 / ShuffleV2; its logs end at epoch 480, 960 for resnet32x4 →
ShuffleV2) at lr 0.025 (0.01 for vgg8, MobileNetV2 and ShuffleNet students, 0.005 for
wrn_40_2 → MobileNetV2). The epochs and the learning rate are config fields
(`config.num_epochs`, `config.optimizer.lr`), shared by a pair's run, not method
hyper-parameters: a Row cannot set them, so MLKD and MLKD+LS train here on the table's
schedule. To train a row on its authors' schedule, give it an invocation of its own with
`--config.num_epochs=… --config.optimizer.lr=…` (they apply to every run of that invocation;
see experiments/reproduce.py).

Hyper-parameters: each method's jaxkd defaults (its authors' CIFAR-100 settings; DKD's β per
pair as mdistiller's configs), and for KD+LS and DKD+LS the authors' setting of each pair, which
the LS README's log files name as `KD_TYPE,TEACHER,STUDENT,BASE_TEMPERATURE,KD_WEIGHT[,BETA]`:
KD+LS sets T = base temperature and kd_weight = KD weight; DKD+LS sets T = base temperature,
α = KD weight (× the config's ALPHA, 1) and β = KD weight × BETA (the `--logit-stand` block of
tools/train.py multiplies the config's ALPHA and BETA by the KD weight; BETA is the log name's
third value, else the pair's config, 8). CTKD+LS: every log is `2,9` (its temperature is
learned; the KD weight 9 is the switch's default). MLKD+LS: see above. KD+LS, DKD+LS, CTKD+LS
and MLKD+LS repeat a method of an earlier row, so each trains in a run of its own reading the
seed's teacher (see experiments/tables/__init__.py).

    python experiments/reproduce.py --table modern_cifar100 --seeds 3 --workdir runs/tables \
        --pairs resnet32x4-resnet8x4 --config.dataset.data_dir=/path/to/tensorflow_datasets
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

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
    "ofd":     ("70.98 -     74.95 -     74.33 -     -       "
                "75.98 -     -     69.04 76.82 -     -     -     -"),
    "reviewkd": ("71.89 -     75.63 -     75.09 -     -       "
                 "77.45 -     -     69.89 77.78 -     -     -     -"),
    "dot":     ("-     -     75.12 -     -     73.77 -       "
                "-     -     -     -     75.55 -     -     -     -"),
    "mlkd":    ("72.19 74.11 77.08 76.63 75.35 75.18 71.89   "
                "-     -     70.57 71.04 78.44 76.52 79.26 77.33 70.78"),
    "mlkd_ls": ("72.33 74.32 78.28 76.95 75.56 75.22 72.27   "
                "-     -     70.94 71.19 78.76 77.53 79.66 77.68 71.61"),
    "simkd":   ("-     -     78.08 -     -     -     -       "
                "-     -     -     -     -     -     -     -     -"),
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
# The LS README's MLKD+Ours log names per pair: (base temperature, KD weight). The two pairs
# without a log (resnet56-resnet20, wrn_40_2-MobileNetV2) keep the switch's defaults (2, 9).
MLKD_LS_LOGS = {
    "resnet110-resnet32": (2, 9), "resnet32x4-resnet8x4": (2, 9), "wrn_40_2-wrn_16_2": (2, 9),
    "wrn_40_2-wrn_40_1": (2, 9), "vgg13-vgg8": (2, 6), "resnet110-resnet20": (2, 9),
    "vgg13-MobileNetV2": (2, 6), "ResNet50-MobileNetV2": (2, 9), "resnet32x4-ShuffleV2": (2, 6),
    "resnet32x4-wrn_16_2": (2, 9), "resnet32x4-wrn_40_2": (2, 9), "wrn_40_2-resnet8x4": (2, 9),
}
KD_LS_FIELDS = {pair: dict(T=float(t), kd_weight=float(w)) for pair, (t, w) in KD_LS_LOGS.items()}
DKD_LS_FIELDS = {pair: dict(T=float(t), alpha=float(w), beta=float(w * beta))
                 for pair, (t, w, beta) in DKD_LS_LOGS.items()}
MLKD_LS_FIELDS = {pair: dict(T=float(t), kd_weight=float(w))
                  for pair, (t, w) in MLKD_LS_LOGS.items()}

TABLE = Table(
    name="modern_cifar100",
    title="DKD, DIST, ICKD, CTKD, logit standardization, OFD, ReviewKD, DOT, MLKD and SimKD, "
          "CIFAR-100 top-1 (%)",
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
        Row("OFD", "ofd"),
        Row("ReviewKD", "reviewkd"),
        Row("KD+DOT", "dot"),
        Row("MLKD", "mlkd"),
        Row("MLKD+LS", "mlkd", overrides=dict(logit_standardize=True), key="mlkd_ls",
            pair_overrides=MLKD_LS_FIELDS),
        Row("SimKD (f=2)", "simkd"),
    ),
    pairs=PAIRS,
    paper=tables.by_pair(PAIRS, NUMBERS),
    source="READMEs: megvii-research/mdistiller @a08d46f (KD, DKD, KD+DOT), "
           "sunshangquan/logit-standardization-KD @f6e5aa5 (+LS rows, MLKD; KD, DKD, CTKD "
           "elsewhere), zhengli97/CTKD @7d52522, hunto/DIST_KD @2418f18, ADLab-AutoDrive/ICKD "
           "@403b8d3 (ICKD; Teacher, Student), DIST_KD (ResNet50, MobileNetV2, ShuffleNet "
           "numbers), DefangChen/SimKD @2b389c3, WangYZ1608/Knowledge-Distillation-via-ND "
           "@fc6f3f9 (ReviewKD) and @9e63f46 (OFD)",
    statistic="1 number; runs and epoch not stated",
    notes="Rows not in this table, no number could be read: CAT-KD (no number in its README), "
          "NKD and SRD (ImageNet only in their READMEs), CTKD on DKD (ImageNet only). ReviewKD "
          "and OFD are as the KD++ (ND) README prints them, which names no paper for them. "
          "The mdistiller README's 'ResNet32x4 / MobileNet-V2' column is resnet32x4 → "
          "ShuffleV2 (its config res32x4_shuv2.yaml). KD+LS, DKD+LS and MLKD+LS use the "
          "authors' per-pair temperature and weights (the LS README's log names). MLKD and "
          "MLKD+LS train on this table's schedule (240 epochs, lr 0.05 / 0.01), not their "
          "authors' (lr 0.025, 480 or 960 epochs on some pairs): the schedule is a config "
          "field, not a row's.",
    row_notes={
        "teacher": "1 number (RepDistiller's teacher)",
        "ce": "1 number (RepDistiller's student alone)",
        "dist": "mean±std; runs and epoch not stated",
        "kd_ls": "1 number, averaged over runs (number not stated)",
        "dkd_ls": "1 number, averaged over runs (number not stated)",
        "ctkd_ls": "1 number, averaged over runs (number not stated)",
        "mlkd_ls": "1 number, averaged over runs (number not stated)",
        "ofd": "1 number as the ND README copies it (source not named)",
        "reviewkd": "1 number as the ND README copies it (source not named)",
        "mlkd": "1 number as the LS README prints it (source not named)",
    },
    base_config=tables.repdistiller_config,
)


def get_config(arg: str = ""):
  return tables.get_config(TABLE, arg)
