"""Re-runs a published table with jaxkd, over seeds, and reports it next to the paper.

    python experiments/reproduce.py --table digits --seeds 2 --workdir runs/tables      # minutes
    python experiments/reproduce.py --table hsakd_cifar100 --seeds 3 --workdir runs/tables \
        --rows kd,sskd,hsakd --pairs wrn_40_2-wrn_16_2 \
        --config.dataset.data_dir=/path/to/tensorflow_datasets
    python experiments/reproduce.py --table sskd_cifar100 --seeds 3 --workdir gs://b/tables \
        --print-commands > jobs.txt                        # one command per run, for an array job

Tables: experiments/tables/ (digits, sskd_cifar100, hsakd_cifar100, crd_cifar100,
modern_cifar100). For each pair and seed k it makes ONE jaxkd run in
`<workdir>/<table>/<pair>/seed<k>` with `config.seed=k`: the first selected row's method as
`config.method`, the others as `config.baselines`, so the teacher is trained once per seed and
shared by every row. Rerunning resumes: a finished stage is
skipped, and a run whose rows are all finished is not started. A row jaxkd refuses on a pair (FSP
on unequal widths, as RepDistiller; ReviewKD where the two networks' numbers of stage maps
differ) is left out of that pair's run and reported as refused.
At the end it writes `<workdir>/report.md` (experiments/report.py).

A row that repeats an earlier row's method with other hyper-parameters (KD with logit
standardization after KD) cannot share that run's stage `student_<method>`: it is its own run in
`<seed dir>/<row id>`, after the seed's shared run, and reads that run's teacher file
(`--config.teacher.checkpoint=<seed dir>/teacher/teacher.msgpack`), so every row of a seed still
sees the same teacher. Such a row needs a row of the shared run that trains the teacher (or a
teacher already trained there): selected alone, it is refused with the rows to add.

`--print-commands` prints the same work as `python -m jaxkd.main` commands, one per (pair, seed,
row), in two groups: the first trains each seed's teacher and must finish before the second
starts (every command of a seed writes the same workdir and reads that teacher). Run them from
the repository root, then `python experiments/report.py <workdir>`.

`--config.<field>=<value>` arguments (e.g. `--config.dataset.data_dir=…`,
`--config.half_precision=True`) apply to every run; a method's hyper-parameters are per row and
live in the table file. `--runlocal` shrinks every run to the CPU smoke sizes of
`configs/default.py:runlocal` (what the tests use).

Errors (unknown table, row or pair, a bad override) end with one line `error: …` naming the
valid values, and exit status 2.
"""

import argparse
import ast
import os
import shlex
import sys
import time
from typing import Any, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from etils import epath  # noqa: E402

from experiments import tables  # noqa: E402
from jaxkd.errors import UserError  # noqa: E402
from jaxkd.results import RESULT_FILE  # noqa: E402
from jaxkd.stage import TEACHER_FILE  # noqa: E402

# Set per row in the table files, or by the runs themselves: not from the command line.
RESERVED = ("method", "method_overrides", "baselines", "seed")


class Run:
  """One jaxkd run: a pair and a seed, training `methods` in `workdir`; for a row with a run of
  its own, `row` and the seed's `teacher_file` it reads (None: it reads no plain teacher)."""

  def __init__(self, table: tables.Table, pair: str, seed: int, methods: Sequence[str],
               workdir: str, row: Optional[tables.Row] = None,
               teacher_file: Optional[str] = None):
    self.table, self.pair, self.seed, self.methods = table, pair, seed, list(methods)
    self.workdir, self.row, self.teacher_file = workdir, row, teacher_file

  def config(self, overrides: Sequence[tuple[str, str]], runlocal: bool) -> Any:
    """The run's config: the table's, the seed's teacher file, then `--config.` overrides."""
    config = tables.run_config(self.table, self.pair, self.methods, seed=self.seed,
                               runlocal=runlocal, row=self.row)
    if self.teacher_file and not sets_teacher(overrides):
      config.teacher.checkpoint = self.teacher_file
    for key, value in overrides:
      apply_override(config, key, value)
    return config

  def done(self) -> bool:
    return all((epath.Path(self.workdir) / f"student_{m}" / RESULT_FILE).exists()
               for m in self.methods)


def parse_seeds(text: str) -> list[int]:
  """'3' -> [0, 1, 2]; '0,4' -> [0, 4]."""
  try:
    if "," in text:
      seeds = [int(s) for s in text.split(",") if s.strip()]
    else:
      seeds = list(range(int(text)))
  except ValueError:
    raise UserError(f"--seeds {text!r}: give a count (3 = seeds 0, 1, 2) or a list (0,4)") \
        from None
  if not seeds or min(seeds) < 0:
    raise UserError(f"--seeds {text!r}: give a positive count or non-negative seeds")
  return seeds


def parse_overrides(extra: Sequence[str]) -> list[tuple[str, str]]:
  """`--config.a.b=v` arguments as (a.b, v)."""
  overrides = []
  for arg in extra:
    if not arg.startswith("--config.") or "=" not in arg:
      raise UserError(f"unexpected argument {arg!r}; config fields are set with "
                      "--config.<field>=<value>")
    key, value = arg[len("--config."):].split("=", 1)
    if key.split(".")[0] in RESERVED:
      raise UserError(f"--config.{key} is set per row (the table file, "
                      "experiments/tables/) or per run (seed), not for every run; fields "
                      f"{', '.join(RESERVED)} cannot be overridden here")
    overrides.append((key, value))
  return overrides


def apply_override(config: Any, key: str, raw: str) -> None:
  """`--config.<key>=<raw>` on `config`, typed like the field it replaces."""
  *path, last = key.split(".")
  target = config
  try:
    for part in path:
      target = target[part]
    current = target[last]
  except (KeyError, AttributeError, TypeError):
    raise UserError(f"--config.{key}: no such config field") from None
  if isinstance(current, str):
    value = raw
  elif isinstance(current, bool):
    if raw.lower() not in ("true", "false", "1", "0"):
      raise UserError(f"--config.{key}={raw}: expected True or False")
    value = raw.lower() in ("true", "1")
  else:
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      value = raw
    if isinstance(current, tuple) and not isinstance(value, tuple):
      value = (value,)
  try:
    target[last] = value
  except (TypeError, ValueError) as e:
    raise UserError(f"--config.{key}={raw}: {e}") from None


def sets_teacher(overrides: Sequence[tuple[str, str]]) -> bool:
  """Whether `--config.teacher.checkpoint` is given for every run."""
  return any(key == "teacher.checkpoint" for key, _ in overrides)


def teacher_rows(table: tables.Table, pair: str) -> list[str]:
  """The methods of the table's shared run on `pair` that read its stage `teacher`."""
  return [m for m in table.run_methods(table.rows) if tables.reads_stage_teacher(table, pair, m)]


def plan(table: tables.Table, rows: Sequence[tables.Row], pairs: Sequence[str],
         seeds: Sequence[int], workdir: str, overrides: Sequence[tuple[str, str]] = ()
         ) -> tuple[list[Run], dict[str, dict[str, str]]]:
  """The runs, pair-major then seed (the shared run of a seed, then its rows with a run of
  their own), and per pair the refused methods with the reason."""
  methods = table.run_methods(rows)
  own = table.own_run_rows(rows)
  if not methods and not own:
    raise UserError(f"rows {', '.join(r.id for r in rows)} of table {table.name} train "
                    "nothing by themselves; add a student row (e.g. "
                    f"{', '.join(table.run_methods(table.rows)[:3])})")
  runs, refusals = [], {}
  for pair in pairs:
    refusals[pair] = tables.refused(table, pair, list(dict.fromkeys(
        methods + [r.method for r in own])))
    kept = [m for m in methods if m not in refusals[pair]]
    own_kept = [r for r in own if r.method not in refusals[pair]]
    reading = {r.id for r in own_kept
               if tables.reads_stage_teacher(table, pair, r.method, row=r)}
    trains_teacher = any(tables.reads_stage_teacher(table, pair, m) for m in kept)
    for seed in seeds:
      path = seed_dir(workdir, table.name, pair, seed)
      teacher_file = str(epath.Path(path) / "teacher" / TEACHER_FILE)
      if (reading and not trains_teacher and not sets_teacher(overrides)
          and not epath.Path(teacher_file).exists()):
        raise UserError(
            f"rows {', '.join(sorted(reading))} of table {table.name} read the teacher of "
            f"{pair} seed {seed}, which no selected row trains and no run has trained yet; add "
            "a row of the shared run that reads it (e.g. "
            f"{', '.join(teacher_rows(table, pair)[:3])})")
      if kept:
        runs.append(Run(table, pair, seed, kept, path))
      for row in own_kept:
        runs.append(Run(table, pair, seed, [row.method], str(epath.Path(path) / row.id),
                        row=row, teacher_file=teacher_file if row.id in reading else None))
  return runs, refusals


def seed_dir(workdir: str, table: str, pair: str, seed: int) -> str:
  return str(epath.Path(workdir) / table / pair / f"seed{seed}")


def config_path(table: tables.Table) -> str:
  return f"experiments/tables/{table.name}.py"


def commands(runs: Sequence[Run], refusals: dict[str, dict[str, str]], workdir: str,
             overrides: Sequence[tuple[str, str]], runlocal: bool) -> list[str]:
  """The `python -m jaxkd.main` commands of `runs`, one per (pair, seed, method), in two
  groups (see the module docstring), with comment lines."""
  extra = "".join(f" {shlex.quote(f'--config.{k}={v}')}" for k, v in overrides)
  suffix = ",runlocal" if runlocal else ""

  def command(run: Run, method: str) -> str:
    arg = f"{config_path(run.table)}:{run.pair},{run.row.id if run.row else method}{suffix}"
    teacher = ""
    if run.teacher_file and not sets_teacher(overrides):
      teacher = " " + shlex.quote(f"--config.teacher.checkpoint={run.teacher_file}")
    return (f"python -m jaxkd.main --config {shlex.quote(arg)} "
            f"--workdir {shlex.quote(run.workdir)} --config.seed={run.seed}{teacher}{extra}")

  first, second = [], []
  for run in runs:
    teacher_method = None if run.row else next(
        (m for m in run.methods if tables.reads_stage_teacher(run.table, run.pair, m)), None)
    for method in run.methods:
      (first if method == teacher_method else second).append(command(run, method))
  table = runs[0].table.name if runs else ""
  lines = [f"# experiments/reproduce.py --table {table}: {len(first) + len(second)} runs; "
           "run them from the repository root."]
  lines.append("# Group 1 (MUST FINISH before group 2 starts): trains each seed's teacher "
               "(stage `teacher`, read by every row of its seed) with that seed's first row "
               "that uses it.")
  lines += first
  lines.append("# Group 2 (after group 1; in any order, all at once if you like): every other "
               "row, one run each.")
  lines += second
  for pair, reasons in refusals.items():
    for method, reason in reasons.items():
      lines.append(f"# Not run, refused by jaxkd: {method} on {pair}: {reason}")
  lines.append(f"# When all are done: python experiments/report.py {shlex.quote(workdir)}")
  return lines


def _clock(seconds: Optional[float]) -> str:
  if seconds is None:
    return "-"
  seconds = int(round(seconds))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def run_all(runs: Sequence[Run], overrides: Sequence[tuple[str, str]], runlocal: bool) -> None:
  """Each run in this process, in order, with a progress line before and after each."""
  import jax  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  from jaxkd import cli  # pylint: disable=g-import-not-at-top
  from jaxkd import train  # pylint: disable=g-import-not-at-top
  # As `python -m jaxkd.main` does: the same numerics, the same quiet libraries.
  jax.config.update("jax_default_matmul_precision", "highest")
  logging.set_verbosity(logging.WARNING)
  cli.quiet_libraries(verbose_logs=False)

  # Every config first: a bad override fails before any training.
  configs = [run.config(overrides, runlocal) for run in runs]
  pending = [not run.done() for run in runs]
  start = time.time()
  trained_time, trained = 0.0, 0
  for k, (run, config) in enumerate(zip(runs, configs)):
    left = sum(pending[k:])
    eta = trained_time / trained * left if trained else None
    head = f"[reproduce {k + 1}/{len(runs)}] {run.table.name} {run.pair} seed {run.seed}"
    if not pending[k]:
      print(f"{head}: done already ({run.workdir}) | elapsed {_clock(time.time() - start)}",
            flush=True)
      continue
    print(f"{head}: {','.join(run.methods)} -> {run.workdir} | elapsed "
          f"{_clock(time.time() - start)} | ETA {_clock(eta)}", flush=True)
    t0 = time.time()
    train.train_and_evaluate(config, run.workdir)
    trained_time += time.time() - t0
    trained += 1
    left = sum(pending[k + 1:])
    print(f"{head}: finished in {_clock(time.time() - t0)} | elapsed "
          f"{_clock(time.time() - start)} | ETA {_clock(trained_time / trained * left)}",
          flush=True)


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
  parser = argparse.ArgumentParser(
      prog="experiments/reproduce.py", description=__doc__.split("\n\n")[0],
      epilog="Extra --config.<field>=<value> arguments apply to every run.")
  parser.add_argument("--table", required=True, help=f"one of {', '.join(tables.TABLE_NAMES)}")
  parser.add_argument("--seeds", default="1",
                      help="number of seeds (3 = seeds 0, 1, 2) or a list (0,4); default 1")
  parser.add_argument("--workdir", required=True,
                      help="root of every run (<workdir>/<table>/<pair>/seed<k>); gs:// works")
  parser.add_argument("--rows", default="", help="comma-separated rows (default: all)")
  parser.add_argument("--pairs", default="", help="comma-separated pairs (default: all)")
  parser.add_argument("--print-commands", action="store_true",
                      help="print the jaxkd commands instead of running them")
  parser.add_argument("--runlocal", action="store_true",
                      help="CPU smoke sizes (configs/default.py:runlocal)")
  parser.add_argument("--no-report", action="store_true", help="do not write the report")
  return parser.parse_known_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
  args, extra = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    overrides = parse_overrides(extra)
    table = tables.get_table(args.table)
    rows = tables.select_rows(table, args.rows)
    pairs = tables.select_pairs(table, args.pairs)
    seeds = parse_seeds(args.seeds)
    runs, refusals = plan(table, rows, pairs, seeds, args.workdir, overrides)
    if args.print_commands:
      print("\n".join(commands(runs, refusals, args.workdir, overrides, args.runlocal)))
      return 0
    for pair, reasons in refusals.items():
      for method, reason in reasons.items():
        print(f"[reproduce] not run, refused by jaxkd: {method} on {pair}: {reason}")
    print(f"[reproduce] table {table.name}: {len(pairs)} pair(s) x {len(seeds)} seed(s): "
          f"{len(runs)} run(s) of {len(rows)} row(s), in {args.workdir}", flush=True)
    start = time.time()
    run_all(runs, overrides, args.runlocal)
    print(f"[reproduce] all {len(runs)} run(s) done in {_clock(time.time() - start)}",
          flush=True)
    if not args.no_report:
      from experiments import report  # pylint: disable=g-import-not-at-top
      print(f"[reproduce] report: {report.write_report(args.workdir)}", flush=True)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  from jaxkd import cli  # pylint: disable=g-import-not-at-top
  cli.quiet_environment(sys.argv)  # Before TensorFlow is imported (jaxkd.cli).
  sys.exit(main())
