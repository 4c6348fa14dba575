"""The embedded default table: classic baselines on the handwritten digits, resnet20 → resnet8.

No paper has this table: it shows the machinery (one teacher per seed shared by every row,
mean ± std over seeds, the report and its plots) on data that ships with scikit-learn, in a few
minutes on a CPU. The schedule is `configs/demo.py`'s (15 epochs, eval every 5); CRD draws 1,024
negatives and DKD warms up for 1 epoch, as in `configs/demo.py:baselines`.

    python experiments/reproduce.py --table digits --seeds 2 --workdir runs/tables
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import ml_collections  # noqa: E402

from configs import demo  # noqa: E402
from experiments import tables  # noqa: E402
from experiments.tables import Row, Table  # noqa: E402


def base_config(pair: str):
  teacher, student = tables.split_pair(pair)
  config = demo.get_config()
  config.teacher.name, config.student.name = teacher, student
  # The demo's SSKD and HSAKD teacher schedules: no such row here.
  config.method_overrides = ml_collections.ConfigDict()
  return config


TABLE = Table(
    name="digits",
    title="Classic baselines on the digits, resnet20 → resnet8, no paper numbers",
    rows=(
        Row("Teacher", None, stage="teacher", key="teacher"),
        Row("KD", "kd"),
        Row("FitNet", "fitnet"),
        Row("AT", "at"),
        Row("CRD", "crd", overrides=dict(nce_k=1024)),
        Row("DKD", "dkd", overrides=dict(warmup=1)),
        Row("Student", "ce"),
    ),
    pairs=("resnet20-resnet8",),
    paper={},
    source="none: no paper reports the digits",
    statistic="",
    base_config=base_config,
)


def get_config(arg: str = ""):
  return tables.get_config(TABLE, arg)
