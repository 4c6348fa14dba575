"""The progress line of a training stage (step, epoch, loss, rate and ETA), its wall time, and
the text of the tables a run prints."""

import time
from typing import Optional


def format_seconds(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def percent(value: Optional[float]) -> str:
  """A top-1 / top-5 for printing; '-' where a stage has none (no classifier trained)."""
  return "-" if value is None else f"{value:.2f}"


def columns(rows: list[tuple[str, ...]]) -> list[str]:
  """`rows` (the first one the header) as lines of left-aligned columns two spaces apart, a
  rule of dashes under the header, no trailing spaces."""
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return lines


class Progress:
  """One line per log interval: step, epoch, loss, steps/s, images/s and ETA."""

  def __init__(self, stage: str, total_steps: int, steps_per_epoch: int, batch_size: int,
               start_step: int):
    self.stage, self.total, self.per_epoch = stage, total_steps, steps_per_epoch
    self.batch_size = batch_size
    self.last_step, self.last_time = start_step, time.perf_counter()

  def line(self, step: int, scalars: dict[str, float]) -> str:
    now = time.perf_counter()
    rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    epoch = (step - 1) // self.per_epoch + 1
    eta = (self.total - step) / max(rate, 1e-9)
    return (f"[{self.stage}] step {step}/{self.total} epoch {epoch}/"
            f"{-(-self.total // self.per_epoch)} loss {scalars.get('loss', float('nan')):.4f} | "
            f"{rate:.2f} steps/s {rate * self.batch_size:.0f} img/s | ETA {format_seconds(eta)}")


class Stopwatch:
  """The wall time a stage has taken: the seconds its checkpoint's record holds (the earlier
  runs that trained it, up to that checkpoint) plus this run's, from `started` on."""

  def __init__(self, before: float = 0.0, started: Optional[float] = None):
    self.before = before
    self.started = time.monotonic() if started is None else started

  def seconds(self) -> float:
    return round(self.before + time.monotonic() - self.started, 1)
