"""The report of `experiments/reproduce.py` runs: jaxkd's numbers next to the paper's.

    python experiments/report.py runs/tables          # writes runs/tables/report.md and plots/

Reads `<dir>/<table>/<pair>/seed<k>/<stage>/result.json` (top1_best, top1_last, wall_seconds; a
row with a run of its own: `seed<k>/<row id>/<stage>/`) and
`metrics.jsonl` (eval/top1 per evaluation) — plain files, no TensorBoard — of every table
directory under `<dir>`, and writes `<dir>/report.md`: per pair, a table with each row's paper
number and its statistic, jaxkd's mean ± std over seeds of the best-epoch and of the last-epoch
top-1, the number of seeds, jaxkd − paper for both and the stage's wall time per seed; a table
of every seed; and two PNG plots per pair, one panel per row, so that a row far from the others
squeezes none of them (`<dir>/plots/<table>/<pair>_seeds.png`: every seed's top-1 against the
paper's number, each panel on its own scale; `<pair>_curves.png`: eval top-1
during training, each seed and their mean, the teacher's mean in every panel). Rows jaxkd does
not build, refuses on a pair, has not run or is still running are shown as such; partial
results are fine (it can run while the runs do).
"""

import dataclasses
import datetime
import io
import json
import math
import os
import re
import sys
from typing import Any, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from jaxkd import cli  # noqa: E402

if __name__ == "__main__":
  cli.quiet_environment(sys.argv)  # Before the tables import TensorFlow (jaxkd.cli).

from etils import epath  # noqa: E402

from experiments import tables  # noqa: E402
from jaxkd import metrics_log  # noqa: E402
from jaxkd.progress import format_seconds  # noqa: E402
from jaxkd.results import RESULT_FILE, WALL_SECONDS  # noqa: E402

REPORT_FILE = "report.md"
PLOTS_DIR = "plots"


@dataclasses.dataclass
class Cell:
  """jaxkd's results of one row on one pair: per finished seed (its wall time None where its
  record has none), and the seeds still running."""
  seeds: list[int] = dataclasses.field(default_factory=list)
  best: list[float] = dataclasses.field(default_factory=list)
  last: list[float] = dataclasses.field(default_factory=list)
  seconds: list[Optional[float]] = dataclasses.field(default_factory=list)
  running: list[int] = dataclasses.field(default_factory=list)
  curves: dict[int, list[tuple[int, float]]] = dataclasses.field(default_factory=dict)


def mean_std(values: Sequence[float]) -> tuple[Optional[float], Optional[float]]:
  """Mean and sample standard deviation (n − 1); std None below two values."""
  if not values:
    return None, None
  mean = sum(values) / len(values)
  if len(values) < 2:
    return mean, None
  return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def seed_dirs(pair_dir: epath.Path) -> list[tuple[int, epath.Path]]:
  found = []
  for path in pair_dir.iterdir():
    match = re.fullmatch(r"seed(\d+)", path.name)
    if match and path.is_dir():
      found.append((int(match.group(1)), path))
  return sorted(found)


def read_cell(pair_dir: epath.Path, stage: str) -> Cell:
  cell = Cell()
  for seed, path in seed_dirs(pair_dir):
    stage_dir = path / stage
    if not stage_dir.exists():
      continue
    curve = [(r["step"], r["eval/top1"]) for r in metrics_log.read(str(stage_dir))
             if "eval/top1" in r]
    if curve:
      cell.curves[seed] = curve
    result_path = stage_dir / RESULT_FILE
    if not result_path.exists():
      cell.running.append(seed)
      continue
    result = json.loads(result_path.read_text())
    if result.get("top1_last") is None:
      continue
    cell.seeds.append(seed)
    cell.best.append(float(result["top1_best"]))
    cell.last.append(float(result["top1_last"]))
    cell.seconds.append(result.get(WALL_SECONDS))
  return cell


def _num(value: Optional[float], std: Optional[float] = None) -> str:
  if value is None:
    return "—"
  return f"{value:.2f}" if std is None else f"{value:.2f} ± {std:.2f}"


def _diff(ours: Optional[float], paper: Optional[float]) -> str:
  return "—" if ours is None or paper is None else f"{ours - paper:+.2f}"


def _time(seconds: Sequence[Optional[float]]) -> str:
  """The mean of the recorded wall times, '—' where none is recorded."""
  known = [s for s in seconds if s is not None]
  return format_seconds(sum(known) / len(known)) if known else "—"


def pair_table(table: tables.Table, pair: str, cells: dict[str, Cell],
               refusals: dict[str, str]) -> list[str]:
  """The markdown table of one pair."""
  lines = ["| row | jaxkd method | paper | paper statistic | jaxkd best epoch | "
           "jaxkd last epoch | seeds | last − paper | best − paper | time per seed |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for row in table.rows:
    text = table.paper.get(pair, {}).get(row.id)
    paper_mean, paper_std = tables.parse_number(text)
    paper = _num(paper_mean, paper_std)
    statistic = tables.paper_statistic(table, row, text)
    method = f"`{row.method}`" if row.method else ("—" if row.built else "not built")
    if row.stage or table.own_run(row):
      method += f" (stage `{table.stage_path(row)}`)"
    cell = cells.get(row.id)
    if not row.built:
      status = ["not built in jaxkd", "", "0", "", "", ""]
    elif row.method in refusals:
      status = [f"refused by jaxkd: {refusals[row.method]}", "", "0", "", "", ""]
    elif not cell.seeds:
      what = (f"in progress (seed {', '.join(map(str, cell.running))})" if cell.running
              else "not run")
      status = [what, "", "0", "", "", ""]
    else:
      best_mean, best_std = mean_std(cell.best)
      last_mean, last_std = mean_std(cell.last)
      seeds = str(len(cell.seeds))
      if cell.running:
        seeds += f" (+{len(cell.running)} running)"
      status = [_num(best_mean, best_std), _num(last_mean, last_std), seeds,
                _diff(last_mean, paper_mean), _diff(best_mean, paper_mean), _time(cell.seconds)]
    lines.append("| " + " | ".join([row.name, method, paper, statistic] + status) + " |")
  return lines


def seed_table(table: tables.Table, cells: dict[str, Cell]) -> list[str]:
  """Every seed of every row: its best- and last-epoch top-1 and its wall time (folded)."""
  lines = []
  for row in table.rows:
    cell = cells.get(row.id)
    if not cell:
      continue
    for seed, best, last, seconds in zip(cell.seeds, cell.best, cell.last, cell.seconds):
      lines.append(f"| {row.name} | {seed} | {best:.2f} | {last:.2f} | {_time([seconds])} |")
    lines += [f"| {row.name} | {seed} | running | | |" for seed in cell.running]
  if not lines:
    return []
  return (["<details><summary>Every seed</summary>", "",
           "| row | seed | jaxkd best epoch | jaxkd last epoch | wall time |",
           "|---|---|---|---|---|"] + lines + ["", "</details>"])


def _save(figure: Any, path: epath.Path) -> None:
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(buffer.getvalue())


def _pyplot() -> Any:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _panels(plt: Any, count: int, **kwargs: Any) -> tuple[Any, list[Any]]:
  """A figure of `count` panels, at most four a line; the unused ones hidden."""
  columns = min(4, max(count, 1))
  lines = -(-max(count, 1) // columns)
  figure, axes = plt.subplots(lines, columns, figsize=(3.2 * columns, 2.7 * lines),
                              squeeze=False, **kwargs)
  axes = list(axes.flat)
  for ax in axes[count:]:
    ax.set_visible(False)
  return figure, axes[:count]


def seed_limits(values: Sequence[float]) -> tuple[float, float]:
  """A panel's y-range: its own values with a margin, at least one point tall, at most half a
  point above 100 %; a row far from the others, or a seed far from its row's others, moves only
  its own panel."""
  half = max(0.6 * (max(values) - min(values)), 0.5)
  centre = min((max(values) + min(values)) / 2, 100.5 - half)
  return centre - half, centre + half


def _paper(table: tables.Table, pair: str, row: tables.Row
           ) -> tuple[Optional[float], Optional[float]]:
  return tables.parse_number(table.paper.get(pair, {}).get(row.id))


def seed_figure(table: tables.Table, pair: str, cells: dict[str, Cell]) -> Any:
  """One panel per row with results or a paper number, each on its own scale (its title: the
  last-epoch mean ± std): every seed's best- (o) and last-epoch (^) top-1, and the paper's
  number (± its std, shaded)."""
  plt = _pyplot()
  rows = [r for r in table.rows
          if (r.id in cells and cells[r.id].seeds) or _paper(table, pair, r)[0] is not None]
  figure, axes = _panels(plt, len(rows))
  for ax, row in zip(axes, rows):
    cell, (mean, std) = cells.get(row.id) or Cell(), _paper(table, pair, row)
    offsets = [0.1 * (i - (len(cell.seeds) - 1) / 2) for i in range(len(cell.seeds))]
    ax.scatter(offsets, cell.best, marker="o", color="tab:blue", s=22, zorder=3,
               label="jaxkd seed, best epoch")
    ax.scatter([1 + o for o in offsets], cell.last, marker="^", color="tab:orange", s=22,
               zorder=3, label="jaxkd seed, last epoch")
    if mean is not None:
      ax.axhline(mean, color="black", lw=1.5, label="paper (± its std)", zorder=2)
      if std:
        ax.axhspan(mean - std, mean + std, color="black", alpha=0.12, lw=0)
    paper = [] if mean is None else [mean - (std or 0.0), mean + (std or 0.0)]
    ax.set_ylim(*seed_limits(cell.best + cell.last + paper))
    ax.set_xlim(-0.5, 1.5)
    ax.set_xticks([0, 1], ["best", "last"])
    title = row.name if not cell.seeds else f"{row.name}: last {_num(*mean_std(cell.last))}"
    ax.set_title(title, fontsize=9, fontweight="bold" if _is_teacher(table, row) else None)
    ax.grid(axis="y", alpha=0.3)
  if axes:
    axes[0].set_ylabel("top-1 (%)")
    key = {}
    for ax in axes:
      for handle, text in zip(*ax.get_legend_handles_labels()):
        key.setdefault(text, handle)
    figure.legend(list(key.values()), list(key), fontsize=7, loc="upper center", ncol=3,
                  bbox_to_anchor=(0.5, 0.0))
  figure.suptitle(f"{table.name}: {pair} — top-1 per seed, each panel on its own scale",
                  fontsize=10)
  if not rows:
    figure.text(0.5, 0.5, "no results yet", ha="center", va="center")
  figure.tight_layout()
  return figure


def plot_seeds(table: tables.Table, pair: str, cells: dict[str, Cell], path: epath.Path) -> None:
  figure = seed_figure(table, pair, cells)
  _save(figure, path)
  _pyplot().close(figure)


def average_curve(curves: dict[int, list[tuple[int, float]]]) -> list[tuple[int, float]]:
  """eval/top1 per step, averaged over the seeds that reached the step."""
  by_step: dict[int, list[float]] = {}
  for curve in curves.values():
    for step, value in curve:
      by_step.setdefault(step, []).append(value)
  return [(step, sum(v) / len(v)) for step, v in sorted(by_step.items())]


def _is_teacher(table: tables.Table, row: tables.Row) -> bool:
  return (table.stage_path(row) or "").startswith("teacher")


def _line(ax: Any, curve: list[tuple[int, float]], **kwargs: Any) -> None:
  ax.plot([s for s, _ in curve], [v for _, v in curve],
          marker="." if len(curve) < 30 else "", **kwargs)


def curve_figure(table: tables.Table, pair: str, cells: dict[str, Cell]) -> Any:
  """One panel per row that has evaluations, each with its own y-range: each seed's eval top-1
  (thin) and their mean (thick) against the stage's step; the teacher's mean (dashed, drawn
  last) in every other panel, so that it is never hidden."""
  plt = _pyplot()
  from matplotlib import lines  # pylint: disable=g-import-not-at-top
  rows = [r for r in table.rows if r.id in cells and cells[r.id].curves]
  teacher = next((r for r in rows if table.stage_path(r) == "teacher"), None)
  reference = average_curve(cells[teacher.id].curves) if teacher else None
  figure, axes = _panels(plt, len(rows))
  for ax, row in zip(axes, rows):
    curves = cells[row.id].curves
    for curve in curves.values():
      _line(ax, curve, color="tab:blue", lw=0.8, alpha=0.35)
    _line(ax, average_curve(curves), color="tab:blue", lw=2)
    if reference and row is not teacher:
      _line(ax, reference, color="black", lw=1.5, ls="--", zorder=5)
    ax.set_title(f"{row.name} ({len(curves)} seed{'s' if len(curves) > 1 else ''})", fontsize=9,
                 fontweight="bold" if _is_teacher(table, row) else None)
    ax.grid(alpha=0.3)
    ax.set_xlabel("step", fontsize=8)
  if axes:
    axes[0].set_ylabel("eval top-1 (%)")
    key = [(dict(color="tab:blue", lw=2), "the row's mean over seeds"),
           (dict(color="tab:blue", lw=0.8, alpha=0.35), "one seed")]
    if reference:
      key.append((dict(color="black", lw=1.5, ls="--"), "the teacher's mean"))
    figure.legend([lines.Line2D([], [], **style) for style, _ in key], [text for _, text in key],
                  fontsize=7, loc="upper center", ncol=3, bbox_to_anchor=(0.5, 0.0))
  else:
    figure.text(0.5, 0.5, "no evaluations yet", ha="center", va="center")
  figure.suptitle(f"{table.name}: {pair}", fontsize=10)
  figure.tight_layout()
  return figure


def plot_curves(table: tables.Table, pair: str, cells: dict[str, Cell], path: epath.Path) -> None:
  figure = curve_figure(table, pair, cells)
  _save(figure, path)
  _pyplot().close(figure)


def table_section(table: tables.Table, table_dir: epath.Path, root: epath.Path) -> list[str]:
  lines = [f"## {table.title} (`{table.name}`)", ""]
  if table.paper:
    lines.append(f"Paper numbers: {table.source}. {table.notes}".rstrip())
  else:
    lines.append("No paper numbers: this table is jaxkd's own.")
  lines.append("")
  pairs = [p for p in table.pairs if (table_dir / p).exists()]
  if not pairs:
    lines += ["No pair has been run yet.", ""]
  for pair in pairs:
    pair_dir = table_dir / pair
    seeds = [s for s, _ in seed_dirs(pair_dir)]
    teacher, student = tables.split_pair(pair)
    lines += [f"### {teacher} → {student}", "",
              f"Seeds found: {', '.join(map(str, seeds)) or 'none'} (`{pair_dir}`).", ""]
    cells = {row.id: read_cell(pair_dir, table.stage_path(row)) for row in table.rows
             if row.built}
    refusals = tables.refused(table, pair, table.run_methods(table.rows))
    lines += pair_table(table, pair, cells, refusals)
    lines += [""] + seed_table(table, cells)
    plots = epath.Path(PLOTS_DIR) / table.name
    seeds_png, curves_png = plots / f"{pair}_seeds.png", plots / f"{pair}_curves.png"
    plot_seeds(table, pair, cells, root / seeds_png)
    plot_curves(table, pair, cells, root / curves_png)
    lines += ["", f"![{pair}: top-1 per seed against the paper]({seeds_png})",
              f"![{pair}: eval top-1 during training]({curves_png})", ""]
  return lines


def write_report(workdir: str) -> str:
  """Writes `<workdir>/report.md` (and its plots) from whatever results exist; returns its path."""
  root = epath.Path(workdir)
  now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  lines = [
      "# jaxkd re-runs of published tables", "",
      f"Written {now} by `experiments/report.py` from `{workdir}` (each stage's `result.json` "
      "and `metrics.jsonl`).", "",
      "- **jaxkd best epoch**: `top1_best`, the highest held-out top-1 over the stage's "
      "evaluations (every `eval_every_epochs` epochs and the last step) — chosen on the test "
      "set, as SSKD's and HSAKD's reference code does. **jaxkd last epoch**: `top1_last`, the "
      "top-1 of the final model.",
      "- Both are the mean ± sample standard deviation (n − 1) over the finished seeds; one "
      "seed has no std. **seeds**: how many finished (and how many are still running). "
      "**time per seed**: the mean over the seeds of the row's stage's wall time "
      "(`wall_seconds`: compilation, training, evaluations and checkpoints, over every run "
      "that resumed it; the teacher and any preparation stage, such as SSKD's `teacher_sskd`, "
      "are not in a student's time; — where the record predates it). Every seed is listed "
      "under each table.",
      "- **last − paper**, **best − paper**: jaxkd's mean minus the paper's number (its mean "
      "where it is mean ± std). Teachers and plain students are trained here, not the papers': "
      "compare a row with the paper's column of its own table only.",
      "- **Teacher** is stage `teacher` (cross-entropy), **Teacher\\*** HSAKD*'s jointly trained "
      "teacher (stage `teacher_hsakd_star`), **Student** method `ce` (the student alone).",
      ""]
  found = False
  for name in tables.TABLE_NAMES:
    table_dir = root / name
    if table_dir.exists():
      found = True
      lines += table_section(tables.get_table(name), table_dir, root)
  if not found:
    lines += [f"No table directory ({', '.join(tables.TABLE_NAMES)}) under `{workdir}` yet.", ""]
  path = root / REPORT_FILE
  root.mkdir(parents=True, exist_ok=True)
  path.write_text("\n".join(lines))
  return str(path)


def main(argv: Sequence[str]) -> int:
  if len(argv) != 1 or argv[0].startswith("-"):
    print("usage: python experiments/report.py DIR   (the --workdir of experiments/reproduce.py)",
          file=sys.stderr)
    return 2
  if not epath.Path(argv[0]).exists():
    print(f"error: {argv[0]!r} does not exist; pass the --workdir of experiments/reproduce.py",
          file=sys.stderr)
    return 2
  print(write_report(argv[0]))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
