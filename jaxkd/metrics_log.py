"""Every scalar a stage logs, also as JSON lines beside clu's TensorBoard events.

`<stage>/metrics.jsonl` holds one object per write: {"step": s, "train/loss": …, …} or
{"step": s, "eval/top1": …, …}. Reports and plots read it as a plain file, without parsing event
files. A resumed stage first drops the lines after the step it resumes from, so the file holds
each step once, as an uninterrupted run writes it.
"""

import json
import os
from typing import Any, Mapping, Optional

from clu.metric_writers import interface
from etils import epath

from jaxkd.stage import METRICS_FILE as FILE


def read(stage_dir: str) -> list[dict[str, Any]]:
  """The records of `<stage_dir>/metrics.jsonl`, in order; [] when there is none."""
  path = epath.Path(stage_dir) / FILE
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class JsonLinesWriter(interface.MetricWriter):
  """A clu MetricWriter appending scalars to `<stage_dir>/metrics.jsonl` (see the module).

  `resume_step`: the step the stage resumes from; records after it are dropped first.
  Other kinds of summaries are not written (the stages log scalars only).
  """

  def __init__(self, stage_dir: str, resume_step: int = 0):
    self._path = epath.Path(os.path.join(stage_dir, FILE))
    kept = [r for r in read(stage_dir) if r["step"] <= resume_step]
    self._path.write_text("".join(json.dumps(r) + "\n" for r in kept))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    with self._path.open("a") as f:
      f.write(json.dumps(record) + "\n")

  def write_summaries(self, step: int, values: Mapping[str, Any],
                      metadata: Optional[Mapping[str, Any]] = None) -> None:
    del metadata
    self.write_scalars(step, {k: v for k, v in values.items() if getattr(v, "ndim", 0) == 0})

  def write_images(self, step, images):
    del step, images

  def write_videos(self, step, videos):
    del step, videos

  def write_audios(self, step, audios, *, sample_rate):
    del step, audios, sample_rate

  def write_texts(self, step, texts):
    del step, texts

  def write_histograms(self, step, arrays, num_buckets=None):
    del step, arrays, num_buckets

  def write_hparams(self, hparams):
    del hparams

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass
