"""Published tables as data, and the jaxkd configs that re-run them.

One small module per table (`sskd_cifar100`, `hsakd_cifar100`, `crd_cifar100`,
`modern_cifar100`, `digits`) holds a `TABLE`: its rows, its teacher → student pairs, the paper's
number per cell with its source and statistic, and the base config of a pair (e.g. the SSKD
recipe). Each module is also a jaxkd config file, taking the pair, the methods to train and
`runlocal` as its argument:

    python -m jaxkd.main --config experiments/tables/hsakd_cifar100.py:wrn_40_2-wrn_16_2 \
        --workdir runs/tables/hsakd_cifar100/wrn_40_2-wrn_16_2/seed0 --config.seed=0
    # every built row of the pair in one run: the teacher is trained once and shared
    python -m jaxkd.main --config experiments/tables/hsakd_cifar100.py:wrn_40_2-wrn_16_2,kd ...
    # one row (what `experiments/reproduce.py --print-commands` prints, for array jobs)

The row goes into the config argument rather than `--config.method.name=<row>`: a recipe's
`config.method` holds the fields of its own method (SSKD's `ce_weight` 0.1, …), which would
silently apply to another method named on the command line. Here `config.method` holds exactly
the fields of the run's first method, and `config.method_overrides` those of the others.

Row conventions: "Teacher" is the top-1 of stage `teacher`; "Teacher*" that of HSAKD*'s prepared
teacher (stage `teacher_hsakd_star`); "Student" is method `ce` (the student alone); every other
row is stage `student_<method>`. A row whose method is None is not built in jaxkd: it is listed
as such, never dropped.

Rows of one method with other hyper-parameters (e.g. KD, then KD with logit standardization,
`Row("KD+LS", "kd", overrides=dict(logit_standardize=True), key="kd_ls")`): a run has one stage
`student_<method>` per method, so every row that names the method of an earlier row trains in a
run of its own, `<seed dir>/<row id>`, reading the seed's teacher file
(`--config.teacher.checkpoint=<seed dir>/teacher/teacher.msgpack`, which `experiments/
reproduce.py` passes); its number is `<row id>/student_<method>`. The config argument names it by
its row id, alone: `…/<table>.py:<pair>,kd_ls`. A row's hyper-parameters may differ per pair
(`pair_overrides`), as the authors' own per-pair settings do.
"""

import dataclasses
import importlib.util
import os
import re
import sys
from typing import Any, Callable, Mapping, Optional, Sequence

import ml_collections

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from configs import default  # noqa: E402
from jaxkd.errors import UserError  # noqa: E402
from jaxkd.methods import canonical_name, get_method  # noqa: E402

# The table modules of this package, in the order they are listed.
TABLE_NAMES = ("digits", "sskd_cifar100", "hsakd_cifar100", "crd_cifar100", "modern_cifar100")


@dataclasses.dataclass(frozen=True)
class Row:
  """One row of a table.

  name: as the paper prints it. method: the jaxkd method trained for it, None where jaxkd does
  not build it (or, with `stage`, where the row is a teacher and no method of its own).
  overrides: the method's hyper-parameters that differ from its defaults in this table.
  stage: the stage whose result.json is the row's number; default `student_<method>`.
  key: its name for `--rows`; default the method (a row that repeats an earlier row's method
  needs one).
  pair_overrides: pair -> hyper-parameters on that pair only, over `overrides` (the authors'
  per-pair settings).
  """
  name: str
  method: Optional[str]
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  stage: Optional[str] = None
  key: Optional[str] = None
  pair_overrides: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)

  @property
  def id(self) -> str:
    return self.key or self.method or re.sub(r"\W+", "_", self.name.lower()).strip("_")

  @property
  def stage_name(self) -> Optional[str]:
    if self.stage:
      return self.stage
    return f"student_{self.method}" if self.method else None

  @property
  def built(self) -> bool:
    return self.stage_name is not None

  def fields(self, pair: str) -> dict[str, Any]:
    """The row's hyper-parameters on `pair`: `overrides`, then `pair_overrides[pair]`."""
    return {**self.overrides, **self.pair_overrides.get(pair, {})}


@dataclasses.dataclass(frozen=True)
class Table:
  """A published table: rows × pairs, the paper's numbers and how to configure a pair.

  pairs: "<teacher>-<student>" zoo names. paper: pair -> row id -> the number as printed
  ("75.23±0.23", "74.92"); a missing cell has no published number. source: where the numbers
  come from; statistic: what a number is, in a few words (one run or mean ± std of n, best or
  last epoch); notes: more on both, for the report; row_notes: row id -> the statistic of a row
  where it differs. base_config: pair -> the
  ConfigDict every row of the pair starts from. recipe_methods: the methods that take the base
  config's `config.method` fields (default: the method it names).
  """
  name: str
  title: str
  rows: tuple[Row, ...]
  pairs: tuple[str, ...]
  paper: Mapping[str, Mapping[str, str]]
  source: str
  statistic: str
  base_config: Callable[[str], ml_collections.ConfigDict]
  notes: str = ""
  row_notes: Mapping[str, str] = dataclasses.field(default_factory=dict)
  recipe_methods: tuple[str, ...] = ()

  def row(self, row_id: str) -> Row:
    for row in self.rows:
      if row.id == row_id:
        return row
    raise KeyError(row_id)

  def own_run_rows(self, rows: Sequence[Row]) -> list[Row]:
    """The rows of `rows` that train in a run of their own: each names the method of an earlier
    row of the table that has no stage of its own (the run's stage `student_<method>` is that
    row's), e.g. KD with logit standardization after KD."""
    seen, own = set(), set()
    for row in self.rows:
      if row.method is None or row.stage is not None:
        continue
      if row.method in seen:
        own.add(row.id)
      seen.add(row.method)
    return [r for r in rows if r.id in own]

  def own_run(self, row: Row) -> bool:
    return bool(self.own_run_rows([row]))

  def run_methods(self, rows: Sequence[Row]) -> list[str]:
    """The methods of the shared run of `rows`, in table order, each once (the rows with a run
    of their own left out)."""
    own = {r.id for r in self.own_run_rows(rows)}
    return list(dict.fromkeys(r.method for r in rows if r.method is not None and r.id not in own))

  def stage_path(self, row: Row) -> Optional[str]:
    """Where the row's result lies under a seed directory: its stage, under `<row id>/` for a
    row with a run of its own."""
    stage = row.stage_name
    return f"{row.id}/{stage}" if stage and self.own_run(row) else stage


# RepDistiller's train_student.py (and mdistiller's yamls) set lr 0.01 for these students.
LOW_LR_STUDENTS = ("MobileNetV2", "ShuffleV1", "ShuffleV2")


def repdistiller_config(pair: str) -> ml_collections.ConfigDict:
  """The CIFAR-100 schedule of RepDistiller and mdistiller for `pair`: 240 epochs, batch 64,
  lr 0.05 (0.01 for LOW_LR_STUDENTS), ×0.1 at 150/180/210, no Nesterov."""
  teacher, student = split_pair(pair)
  return default.cifar100_recipe(teacher, student,
                                 lr=0.01 if student in LOW_LR_STUDENTS else 0.05, nesterov=False)


def split_pair(pair: str) -> tuple[str, str]:
  teacher, student = pair.split("-")
  return teacher, student


def by_pair(pairs: Sequence[str], numbers: Mapping[str, str]) -> dict[str, dict[str, str]]:
  """pair -> row id -> number, from row id -> the row's numbers as the paper prints them, one
  per pair in `pairs` order, separated by spaces ('-': no number in that cell)."""
  paper: dict[str, dict[str, str]] = {pair: {} for pair in pairs}
  for row_id, line in numbers.items():
    cells = line.split()
    if len(cells) != len(pairs):
      raise ValueError(f"row {row_id}: {len(cells)} numbers for {len(pairs)} pairs")
    for pair, cell in zip(pairs, cells):
      if cell != "-":
        paper[pair][row_id] = cell
  return paper


def parse_number(text: Optional[str]) -> tuple[Optional[float], Optional[float]]:
  """'75.23±0.23' -> (75.23, 0.23); '74.92' -> (74.92, None); None -> (None, None)."""
  if text is None:
    return None, None
  mean, _, std = text.replace(" ", "").partition("±")
  return float(mean), (float(std) if std else None)


def paper_statistic(table: Table, row: Row, text: Optional[str]) -> str:
  """What the paper's number of a cell is, in a few words."""
  if text is None:
    return ""
  note = table.row_notes.get(row.id)
  if note:
    return note
  return table.statistic


def load_recipe(path: str, arg: str = "") -> ml_collections.ConfigDict:
  """`get_config(arg)` of the config file at `path` (relative to the repository), as --config
  loads it (recipe file names hold '-', so they are not importable as modules)."""
  full = os.path.join(REPO, path)
  spec = importlib.util.spec_from_file_location("_recipe_" + re.sub(r"\W", "_", path), full)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


# --- tables -----------------------------------------------------------------------------------

def get_table(name: str) -> Table:
  """The table `name`; a UserError lists the valid names."""
  if name not in TABLE_NAMES:
    raise UserError(f"unknown table {name!r}; valid tables: {', '.join(TABLE_NAMES)}")
  module = importlib.import_module(f"experiments.tables.{name}")
  return module.TABLE


def select_rows(table: Table, names: str) -> list[Row]:
  """The rows named in the comma-separated `names` (row ids or display names, any case), in
  table order; '' = every row. A UserError names the valid ones."""
  if not names:
    return list(table.rows)
  wanted = [n.strip() for n in names.split(",") if n.strip()]
  chosen = set()
  for name in wanted:
    key = name.lower()
    match = [r for r in table.rows
             if key in (r.id.lower(), r.name.lower())
             or (r.method is not None and canonical_name(key) == r.method
                 and not table.own_run(r))]
    if not match:
      raise UserError(f"unknown row {name!r} of table {table.name}; valid rows: "
                      f"{', '.join(r.id for r in table.rows)}")
    chosen.update(r.id for r in match)
  return [r for r in table.rows if r.id in chosen]


def select_pairs(table: Table, names: str) -> list[str]:
  """The pairs named in the comma-separated `names`, in table order; '' = every pair."""
  if not names:
    return list(table.pairs)
  wanted = [n.strip() for n in names.split(",") if n.strip()]
  for name in wanted:
    if name not in table.pairs:
      raise UserError(f"unknown pair {name!r} of table {table.name}; valid pairs: "
                      f"{', '.join(table.pairs)}")
  return [p for p in table.pairs if p in wanted]


def num_classes(config: ml_collections.ConfigDict) -> int:
  from jaxkd.data import sources  # pylint: disable=g-import-not-at-top
  entry = sources._registry_entry(config.dataset.name)  # pylint: disable=protected-access
  return entry.num_classes


def refused(table: Table, pair: str, methods: Sequence[str]) -> dict[str, str]:
  """method -> why jaxkd refuses it on `pair`: the method's own check of the pair (e.g. FSP on
  unequal widths, as RepDistiller) or the plan's check of the taps it reads and pairs (e.g.
  ReviewKD on networks with unequal numbers of stage maps), which would otherwise stop the run
  of every row of the pair."""
  teacher, student = split_pair(pair)
  classes = num_classes(table.base_config(pair))
  reasons = {}
  for name in methods:
    method = get_method(name)
    try:
      if method.check_pair is not None:
        method.check_pair(teacher, student, classes)
      if method.taps is not None:
        _check_taps(table, pair, name)
    except UserError as e:
      reasons[name] = str(e)
  return reasons


def _check_taps(table: Table, pair: str, name: str) -> None:
  """The plan's check of the taps method `name` reads on `pair` (no data is read)."""
  from jaxkd import plan  # pylint: disable=g-import-not-at-top
  from jaxkd.data import sources  # pylint: disable=g-import-not-at-top
  from jaxkd.models import clip  # pylint: disable=g-import-not-at-top
  config = run_config(table, pair, [name])
  info = sources._registry_entry(config.dataset.name)  # pylint: disable=protected-access
  plan.check_taps(config, get_method(name), info, config.teacher.name in clip.CLIP_MODELS)


def reads_stage_teacher(table: "Table", pair: str, name: str, row: Optional[Row] = None) -> bool:
  """Whether the run of method `name` on `pair` (of `row`, for a row with a run of its own) has
  stage `teacher` (its plan says; HSAKD* trains its own teacher from scratch instead)."""
  from jaxkd import plan  # pylint: disable=g-import-not-at-top
  config = run_config(table, pair, [name], row=row)
  stages = plan.stage_list(config, num_classes(config))
  return any(stage.name == "teacher" for stage in stages)


# --- configs ----------------------------------------------------------------------------------

SHRUNK_FIELDS = dict(teacher_epochs=1, teacher_milestones=(1,), init_epochs=1,
                     joint_teacher_epochs=2, joint_teacher_milestones=(1,))


def run_config(table: Table, pair: str, methods: Sequence[str], seed: Optional[int] = None,
               runlocal: bool = False, row: Optional[Row] = None) -> ml_collections.ConfigDict:
  """The config of one jaxkd run of `pair` training `methods` (the first as `config.method`,
  the others as `config.baselines`), each with the table's hyper-parameters: the base config's
  method fields for its recipe methods, the base config's `method_overrides`, then the row's on
  the pair (the first row of the method; `row`'s for the run of a row with a run of its own,
  whose method is then the only one). `runlocal`: the CPU smoke sizes of
  `configs/default.py:runlocal`, preparations of 1 epoch."""
  if not methods:
    raise UserError(f"no method to train for pair {pair} of table {table.name}")
  if row is not None and list(methods) != [row.method]:
    raise UserError(f"row {row.id} of table {table.name} trains {row.method} alone, not "
                    f"{', '.join(methods)}")
  config = table.base_config(pair)
  recipe_method = canonical_name(config.method.name)
  recipe_fields = {k: v for k, v in config.method.items() if k != "name" and v is not None}
  base_overrides = {canonical_name(k): dict(v) for k, v in config.method_overrides.items()}
  row_overrides = {}
  for r in (row,) if row is not None else table.rows:
    if r.method is not None:
      row_overrides.setdefault(r.method, r.fields(pair))
  fields = {}
  for name in methods:
    get_method(name)
    f = {}
    if name == recipe_method or name in table.recipe_methods:
      f.update(recipe_fields)
    f.update(base_overrides.get(name, {}))
    f.update(row_overrides.get(name, {}))
    if runlocal:
      f.update({k: v for k, v in SHRUNK_FIELDS.items() if k in get_method(name).defaults})
    fields[name] = f
  if runlocal:
    default.apply_arg(config, "runlocal")
  first, others = methods[0], list(methods[1:])
  config.method = ml_collections.ConfigDict(dict(fields[first], name=first))
  config.method_overrides = ml_collections.ConfigDict(
      {name: fields[name] for name in others if fields[name]})
  config.baselines = ",".join(others)
  config.linear_probe.dataset = ""
  if seed is not None:
    config.seed = seed
  return config


def get_config(table: Table, arg: str = "") -> ml_collections.ConfigDict:
  """The config-file entry of a table module: `arg` = '<pair>[,<method>…][,runlocal]'; no
  method = every built row not refused on the pair (the shared run of the table's rows);
  '<pair>,<row id>' = the run of a row with a run of its own."""
  tokens = [t.strip() for t in arg.split(",") if t.strip()]
  runlocal = "runlocal" in tokens
  tokens = [t for t in tokens if t != "runlocal"]
  pairs = [t for t in tokens if t in table.pairs]
  if len(pairs) > 1:
    raise ValueError(f"one pair per run, got {pairs}")
  if not pairs and len(table.pairs) > 1:
    raise ValueError(f"name a pair of table {table.name}: {', '.join(table.pairs)}")
  pair = pairs[0] if pairs else table.pairs[0]
  names = [t for t in tokens if t not in table.pairs]
  own = {r.id: r for r in table.own_run_rows(table.rows)}
  rows = [own[n] for n in names if n in own]
  if rows:
    if len(names) > 1:
      raise ValueError(f"row {rows[0].id} of table {table.name} has a run of its own: name it "
                       f"alone, got {names}")
    return run_config(table, pair, [rows[0].method], runlocal=runlocal, row=rows[0])
  names = [canonical_name(n) for n in names]
  for name in names:
    get_method(name)
  if not names:
    names = table.run_methods(table.rows)
    reasons = refused(table, pair, names)
    names = [n for n in names if n not in reasons]
  return run_config(table, pair, names, runlocal=runlocal)
