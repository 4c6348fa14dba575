"""experiments/reproduce.py and experiments/report.py: a shrunk digits table end to end (one
teacher per seed shared by the rows, resume), a row that repeats a method with other
hyper-parameters (its own run, reading the seed's teacher), the report's numbers against the
result files, the array-job commands, the errors, and every table file (loads as a config, its
rows are methods jaxkd registers, a row alone gets the same config as in the shared run)."""

import dataclasses
import hashlib
import json
import math
import re
import shutil

import pytest

import helpers

from experiments import report
from experiments import reproduce
from experiments import tables
from jaxkd import methods
from jaxkd import progress
from jaxkd import recipe

ROWS = ("kd", "ce")
SEEDS = (0, 1)
PAIR = "resnet20-resnet8"
# configs/default.py:runlocal (64 training examples, batch 8), one epoch per stage.
SHRINK = ["--runlocal", "--config.num_epochs=1", "--config.teacher.num_epochs=1"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("repro")
  argv = ["--table", "digits", "--seeds", str(len(SEEDS)), "--workdir", str(workdir),
          "--rows", ",".join(ROWS)] + SHRINK
  assert reproduce.main(argv) == 0
  return workdir, argv


def _results(workdir, stage):
  out = {}
  for seed in SEEDS:
    path = workdir / "digits" / PAIR / f"seed{seed}" / stage / "result.json"
    out[seed] = json.loads(path.read_text())
  return out


def test_one_teacher_per_seed_shared_by_the_rows(digits_run):
  workdir, _ = digits_run
  pair_dir = workdir / "digits" / PAIR
  assert sorted(p.name for p in pair_dir.iterdir()) == ["seed0", "seed1"]
  teachers = _results(workdir, "teacher")
  for seed in SEEDS:
    seed_dir = pair_dir / f"seed{seed}"
    assert sorted(p.name for p in seed_dir.iterdir() if p.is_dir()) == [
        "student_ce", "student_kd", "teacher"]
    # The teacher stage trained once: one record per logged step, one evaluation.
    records = [json.loads(line) for line in
               (seed_dir / "teacher" / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in records if "eval/top1" in r]) == 1
    steps = [r["step"] for r in records if "train/loss" in r]
    assert steps == sorted(set(steps))
    # The KD student read that very teacher.
    exported = (seed_dir / "teacher" / "teacher.msgpack").read_bytes()
    kd = json.loads((seed_dir / "student_kd" / "result.json").read_text())
    assert kd["teacher_sha256"] == hashlib.sha256(exported).hexdigest()
  # config.seed reached the runs: the seeds' teachers differ.
  assert teachers[0]["export_sha256"] != teachers[1]["export_sha256"]


def _fmt(values):
  mean = sum(values) / len(values)
  std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
  return f"{mean:.2f} ± {std:.2f}"


def test_report_numbers_come_from_the_result_files(digits_run):
  workdir, _ = digits_run
  text = (workdir / "report.md").read_text()
  main_table = text.split("<details>")[0]                 # above the table of every seed
  lines = {line.split(" | ")[0].lstrip("| "): line for line in main_table.splitlines()
           if line.startswith("| ") and not line.startswith("| row")}
  for name, stage in (("Teacher", "teacher"), ("KD", "student_kd"), ("Student", "student_ce")):
    results = _results(workdir, stage)
    cells = [c.strip() for c in lines[name].strip("|").split("|")]
    best = _fmt([results[s]["top1_best"] for s in SEEDS])
    last = _fmt([results[s]["top1_last"] for s in SEEDS])
    seconds = [results[s]["wall_seconds"] for s in SEEDS]
    assert cells[4:7] == [best, last, "2"], cells
    assert cells[2] == "—" and cells[7:9] == ["—", "—"]       # the digits have no paper
    assert cells[9] == progress.format_seconds(sum(seconds) / len(seconds)) and min(seconds) > 0
    for seed in SEEDS:                                        # the table of every seed
      r = results[seed]
      assert (f"| {name} | {seed} | {r['top1_best']:.2f} | {r['top1_last']:.2f} | "
              f"{progress.format_seconds(r['wall_seconds'])} |") in text
  for name in ("FitNet", "AT", "CRD", "DKD"):
    assert "not run" in lines[name]
  for kind in ("seeds", "curves"):
    png = workdir / "plots" / "digits" / f"{PAIR}_{kind}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"(plots/digits/{PAIR}_{kind}.png)" in text


def _outlier_cells(table):
  """Two seeds of every row within 97–100 %, AT's at 83 %: one panel per row keeps the others
  legible."""
  cells = {}
  for i, row in enumerate(r for r in table.rows if r.built):
    top1 = 83.0 if row.id == "at" else 97.0 + 0.4 * i
    curve = lambda end: [(10, end - 20.0), (20, end - 1.0), (30, end)]  # noqa: E731
    cells[row.id] = report.Cell(seeds=[0, 1], best=[top1 + 0.3, top1 + 0.5],
                                last=[top1, top1 + 0.2], seconds=[60.0, None],
                                curves={0: curve(top1), 1: curve(top1 + 0.2)})
  return cells


def test_report_plots_one_panel_per_row_and_the_teacher_in_each(tmp_path):
  table = tables.get_table("digits")
  cells = _outlier_cells(table)
  figure = report.seed_figure(table, PAIR, cells)
  panels = [ax for ax in figure.axes if ax.get_visible()]
  assert [ax.get_title().split(":")[0] for ax in panels] == [r.name for r in table.rows]
  for ax, row in zip(panels, table.rows):
    low, high = ax.get_ylim()
    cell = cells[row.id]
    assert low < min(cell.last) and max(cell.best) < high <= 100.5
    assert high - low < 2.0                  # the outlier row moves its own panel only
  figure = report.curve_figure(table, PAIR, cells)
  panels = [ax for ax in figure.axes if ax.get_visible()]
  teacher = [v for _, v in report.average_curve(cells["teacher"].curves)]
  for ax, row in zip(panels, table.rows):
    dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    if row.id == "teacher":
      assert not dashed
    else:                     # the teacher's mean, drawn over the row's own lines
      (line,) = dashed
      assert list(line.get_ydata()) == teacher
      assert line.get_zorder() > max(x.get_zorder() for x in ax.get_lines() if x is not line)
  assert report.seed_table(table, cells)[-3] == "| Student | 1 | 99.90 | 99.60 | — |"


def test_rerun_skips_finished_runs(digits_run, capsys):
  workdir, argv = digits_run
  before = (workdir / "digits" / PAIR / "seed0" / "teacher" / "result.json").stat().st_mtime_ns
  capsys.readouterr()
  assert reproduce.main(argv) == 0
  out = capsys.readouterr().out
  assert out.count("done already") == len(SEEDS)
  assert "[teacher]" not in out and "[student_" not in out
  after = (workdir / "digits" / PAIR / "seed0" / "teacher" / "result.json").stat().st_mtime_ns
  assert before == after


def test_report_shows_rows_not_built_and_in_progress(digits_run):
  workdir, _ = digits_run
  table = tables.get_table("digits")
  extended = dataclasses.replace(table, rows=table.rows + (tables.Row("ReviewKD", None),))
  pair_dir = workdir / "digits" / PAIR
  cells = {r.id: report.read_cell(pair_dir, r.stage_name) for r in extended.rows if r.built}
  (pair_dir / "seed0" / "student_at").mkdir()          # started, no result.json yet
  try:
    cells["at"] = report.read_cell(pair_dir, "student_at")
    lines = report.pair_table(extended, PAIR, cells, {"dkd": "why not"})
  finally:
    (pair_dir / "seed0" / "student_at").rmdir()
  by_row = {line.split(" | ")[0].lstrip("| "): line for line in lines[2:]}
  assert "not built" in by_row["ReviewKD"]
  assert "in progress (seed 0)" in by_row["AT"]
  assert "refused by jaxkd: why not" in by_row["DKD"]
  assert "not run" in by_row["FitNet"]


def test_print_commands_teacher_group_first(tmp_path, capsys):
  workdir = "gs://bucket/tables"
  assert reproduce.main(["--table", "digits", "--seeds", "3", "--workdir", workdir,
                         "--rows", "ce,kd,at", "--print-commands",
                         "--config.dataset.data_dir=/data"]) == 0
  lines = capsys.readouterr().out.splitlines()
  commands = [line for line in lines if not line.startswith("#")]
  assert len(commands) == 3 * 3                        # one per (pair, seed, row)
  first = lines.index(next(line for line in lines if line.startswith("# Group 2")))
  assert lines[1].startswith("# Group 1") and "MUST FINISH" in lines[1]
  group1 = [line for line in lines[2:first]]
  assert len(group1) == 3 and all(",kd " in line for line in group1)
  for seed, line in enumerate(group1):
    assert f"--workdir {workdir}/digits/{PAIR}/seed{seed} --config.seed={seed}" in line
  group2 = [line for line in lines[first + 1:] if not line.startswith("#")]
  rows = sorted(re.search(r",(\w+) ", line).group(1) for line in group2)
  assert rows == ["at"] * 3 + ["ce"] * 3
  for line in commands:
    assert line.startswith("python -m jaxkd.main --config experiments/tables/digits.py:")
    assert line.endswith(" --config.dataset.data_dir=/data")
  assert lines[-1] == f"# When all are done: python experiments/report.py {workdir}"
  assert not (tmp_path / "digits").exists()


def test_print_commands_leaves_out_refused_rows(capsys):
  assert reproduce.main(["--table", "crd_cifar100", "--workdir", "/nowhere", "--print-commands",
                         "--pairs", "wrn_40_2-wrn_40_1,wrn_40_2-wrn_16_2",
                         "--rows", "fsp,crd_kd"]) == 0
  lines = capsys.readouterr().out.splitlines()
  commands = [line for line in lines if not line.startswith("#")]
  assert [c.split()[4].split(":")[1] for c in commands] == [
      "wrn_40_2-wrn_16_2,fsp", "wrn_40_2-wrn_40_1,crd_kd", "wrn_40_2-wrn_16_2,crd_kd"]
  assert any(line.startswith("# Not run, refused by jaxkd: fsp on wrn_40_2-wrn_40_1")
             for line in lines)


def test_pair_whose_taps_a_method_cannot_pair_is_refused():
  """ReviewKD pairs the stage maps one to one: wrn_40_2 (3) → MobileNetV2 (4) is refused before
  any run, and the pair's shared run leaves it out; the same method on another pair is kept."""
  table = tables.get_table("modern_cifar100")
  reasons = tables.refused(table, "wrn_40_2-MobileNetV2", ["reviewkd", "ofd", "kd"])
  assert list(reasons) == ["reviewkd"]
  assert "student 'MobileNetV2' gives 4 and teacher 'wrn_40_2' 3" in reasons["reviewkd"]
  shared = tables.get_config(table, "wrn_40_2-MobileNetV2")
  assert "reviewkd" not in [shared.method.name] + shared.baselines.split(",")
  assert tables.refused(table, "vgg13-MobileNetV2", ["reviewkd"]) == {}


def _variant_table():
  """The digits table with KD once more, at T = 2 (kd_weight 0.5 on the digits pair only)."""
  table = tables.get_table("digits")
  variant = tables.Row("KD (T = 2)", "kd", overrides=dict(T=2.0), key="kd_t2",
                       pair_overrides={PAIR: dict(kd_weight=0.5)})
  return dataclasses.replace(table, rows=table.rows + (variant,))


def test_row_repeating_a_method_has_a_run_of_its_own(tmp_path, capsys):
  table = _variant_table()
  row = table.row("kd_t2")
  assert [r.id for r in table.own_run_rows(table.rows)] == ["kd_t2"]
  assert "kd" in table.run_methods(table.rows) and table.stage_path(row) == "kd_t2/student_kd"
  assert table.stage_path(table.row("kd")) == "student_kd"
  # --rows kd is the KD row only; the variant is named by its id or name.
  assert [r.id for r in tables.select_rows(table, "kd")] == ["kd"]
  assert [r.id for r in tables.select_rows(table, "KD (T = 2)")] == ["kd_t2"]
  # Its config: KD alone with the row's fields on the pair; the shared run keeps KD's own.
  alone = tables.get_config(table, f"{PAIR},kd_t2")
  shared = tables.get_config(table, PAIR)
  kd = methods.get_method("kd")
  assert alone.method.name == "kd" and alone.baselines == ""
  hp_alone = recipe.method_hparams(alone, kd)
  hp_shared = recipe.method_hparams(shared, kd)
  assert (hp_alone.T, hp_alone.kd_weight) == (2.0, 0.5)
  assert (hp_shared.T, hp_shared.kd_weight) == (kd.defaults["T"], kd.defaults["kd_weight"])
  with pytest.raises(ValueError, match="name it alone"):
    tables.get_config(table, f"{PAIR},kd_t2,kd")
  # One run per seed for the shared rows, then the variant's in <seed dir>/kd_t2, reading the
  # seed's teacher file.
  runs, _ = reproduce.plan(table, tables.select_rows(table, "kd,kd_t2"), [PAIR], [0, 1],
                           str(tmp_path))
  assert [(r.seed, r.methods, r.row and r.row.id) for r in runs] == [
      (0, ["kd"], None), (0, ["kd"], "kd_t2"), (1, ["kd"], None), (1, ["kd"], "kd_t2")]
  seed0 = tmp_path / "digits" / PAIR / "seed0"
  assert runs[1].workdir == str(seed0 / "kd_t2")
  assert runs[1].teacher_file == str(seed0 / "teacher" / "teacher.msgpack")
  config = runs[1].config([("dataset.data_dir", "/data")], runlocal=False)
  assert config.teacher.checkpoint == runs[1].teacher_file and config.dataset.data_dir == "/data"
  assert runs[0].config([], runlocal=False).teacher.checkpoint == ""
  lines = reproduce.commands(runs, {PAIR: {}}, str(tmp_path), [], runlocal=False)
  group2 = lines[lines.index(next(x for x in lines if x.startswith("# Group 2"))) + 1:]
  variant = [line for line in group2 if ",kd_t2 " in line]
  assert len(variant) == 2 and all("--config.teacher.checkpoint=" in x for x in variant)
  assert f"--workdir {seed0 / 'kd_t2'} --config.seed=0" in variant[0]
  # A --config.teacher.checkpoint given for every run wins.
  assert runs[1].config([("teacher.checkpoint", "/t.msgpack")], False).teacher.checkpoint == \
      "/t.msgpack"
  # The report names where its number lies.
  lines = report.pair_table(table, PAIR, {r.id: report.Cell() for r in table.rows if r.built}, {})
  assert "| KD (T = 2) | `kd` (stage `kd_t2/student_kd`) |" in "\n".join(lines)
  # Alone, with no teacher trained for the seed: refused, naming rows that train it.
  with pytest.raises(reproduce.UserError, match="kd_t2 of table digits read the teacher"):
    reproduce.plan(table, [row], [PAIR], [0], str(tmp_path))


def test_row_with_a_run_of_its_own_reads_the_seed_teacher(digits_run, tmp_path, monkeypatch):
  workdir, _ = digits_run
  table = _variant_table()
  monkeypatch.setattr(tables, "get_table", lambda name: table)
  # The seed's teacher is trained already (a copy of digits_run's): the row runs alone.
  seed0 = tmp_path / "digits" / PAIR / "seed0"
  shutil.copytree(workdir / "digits" / PAIR / "seed0" / "teacher", seed0 / "teacher")
  argv = ["--table", "digits", "--seeds", "1", "--workdir", str(tmp_path), "--rows", "kd_t2",
          "--no-report"] + SHRINK
  assert reproduce.main(argv) == 0
  assert sorted(p.name for p in seed0.iterdir()) == ["kd_t2", "teacher"]
  teacher = seed0 / "teacher" / "teacher.msgpack"
  result = json.loads((seed0 / "kd_t2" / "student_kd" / "result.json").read_text())
  assert result["teacher_sha256"] == hashlib.sha256(teacher.read_bytes()).hexdigest()
  assert result["teacher_path"] == str(teacher)
  assert not (seed0 / "student_kd").exists()
  cell = report.read_cell(seed0.parent, table.stage_path(table.row("kd_t2")))
  assert cell.seeds == [0] and cell.last == [result["top1_last"]]


@pytest.mark.parametrize("argv, message", [
    (["--table", "nope"], "error: unknown table 'nope'; valid tables: digits, sskd_cifar100, "
                          "hsakd_cifar100, crd_cifar100"),
    (["--table", "digits", "--rows", "kd,nope"],
     "error: unknown row 'nope' of table digits; valid rows: teacher, kd, fitnet, at, crd, dkd, "
     "ce"),
    (["--table", "sskd_cifar100", "--pairs", "a-b"], "error: unknown pair 'a-b' of table "
                                                     "sskd_cifar100; valid pairs: wrn_40_2-"),
])
def test_errors_name_the_valid_values(tmp_path, capsys, argv, message):
  assert reproduce.main(argv + ["--workdir", str(tmp_path / "w")]) == 2
  captured = capsys.readouterr()
  assert captured.err.startswith(message) and captured.err.count("\n") == 1
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("name", tables.TABLE_NAMES)
def test_table_files(name):
  table = tables.get_table(name)
  module = helpers.load_module(helpers.REPO / "experiments" / "tables" / f"{name}.py",
                               f"table_{name}")            # as --config loads it
  assert module.TABLE.name == name and [r.id for r in module.TABLE.rows] == [
      r.id for r in table.rows]
  ids = [row.id for row in table.rows]
  assert len(set(ids)) == len(ids)
  stages = [table.stage_path(row) for row in table.rows if row.built]
  assert len(set(stages)) == len(stages)
  for row in table.rows:
    assert row.method is None or row.method in methods.METHOD_NAMES, row
    assert row.built or row.method is None
    assert set(row.pair_overrides) <= set(table.pairs), row
  for pair, cells in table.paper.items():
    assert pair in table.pairs
    for row_id, text in cells.items():
      assert row_id in ids
      mean, std = tables.parse_number(text)
      assert 0 < mean < 100 and (std is None or 0 <= std < 5)
  assert (len(table.paper) == len(table.pairs)) == bool(table.paper)
  # One row alone (a --print-commands line) gets the hyper-parameters and config it has in the
  # shared run of all rows.
  pair = table.pairs[0]
  every = [m for m in table.run_methods(table.rows)
           if m not in tables.refused(table, pair, table.run_methods(table.rows))]
  shared = tables.run_config(table, pair, every, seed=0)
  assert module.get_config(pair).to_dict() == shared.to_dict()
  for method in every:
    alone = module.get_config(f"{pair},{method}")
    assert alone.method.name == method and alone.baselines == ""
    spec = methods.get_method(method)
    assert (recipe.method_hparams(alone, spec).to_dict()
            == recipe.method_hparams(shared, spec).to_dict()), method
    for field in ("dataset", "teacher", "student", "optimizer", "schedule", "num_epochs",
                  "batch_size"):
      assert alone[field] == shared[field], field
  # A row with a run of its own: its method alone, with the row's fields on every pair.
  for row in table.own_run_rows(table.rows):
    assert row.id not in methods.METHOD_NAMES
    for pair in table.pairs:
      alone = module.get_config(f"{pair},{row.id}")
      assert alone.method.name == row.method and alone.baselines == ""
      hparams = recipe.method_hparams(alone, methods.get_method(row.method))
      for key, value in row.fields(pair).items():
        assert hparams[key] == value, (row.id, pair, key)
