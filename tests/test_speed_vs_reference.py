"""experiments/speed_vs_reference.py (jaxkd's step beside each method's reference PyTorch step)
and experiments/device_check.sh, the GPU check built on it, run end to end in their dry mode."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import reference_steps  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import speed_vs_reference as harness  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


def _round(jaxkd_s, reference_s, load=1.0):
  side = lambda steps: {"step_s_all": steps, "step_cpu_s_all": [2 * t for t in steps],  # noqa: E731
                        "peak_host_memory_mb": 100.0, "peak_device_memory_mb": None}
  return {"load_before": load, "jaxkd": side(jaxkd_s), "reference": side(reference_s),
          "load_after": load + 0.5}


def test_summary_is_the_median_of_every_timed_step_and_the_ratio_of_the_medians():
  record = {"batch_images": 64, "jaxkd_setup": {"flops_per_step": 2e9, "compile_s": 3.0},
            "rounds": [_round([1.0, 1.0, 4.0], [2.0, 2.0, 2.0]),
                       _round([2.0, 2.0, 2.0], [8.0, 8.0, 8.0])],
            "jaxkd_input": {"images_per_cpu_s": 20.0}}
  s = harness.summarize(record, peak=4e9)
  assert s["jaxkd"]["images_per_s"] == 64 / 2.0 and s["reference"]["images_per_s"] == 64 / 5.0
  assert s["jaxkd"]["images_per_s_rounds"] == [64.0, 32.0]
  assert s["ratio"] == pytest.approx(2.5) and s["ratio_rounds"] == [2.0, 4.0]
  assert s["jaxkd"]["step_cpu_s"] == 4.0 and s["flops_per_s"] == 1e9
  assert s["fraction_of_peak"] == 0.25 and s["input_workers"] == 2  # ceil(32 / 20)
  record.update(method="kd", teacher="t", student="s", dtype="float32", summary=s)
  row = harness.table_row(record)
  assert "**2.50×** (2.00–4.00)" in row and "| 1.0–1.5 |" in row


def test_no_ratio_without_a_reference():
  record = {"batch_images": 8, "jaxkd_setup": {"flops_per_step": 1e9, "compile_s": 1.0},
            "rounds": [{"load_before": 0.1, "jaxkd": _round([1.0], [1.0])["jaxkd"],
                        "load_after": 0.2}],
            "reference_missing": "torch absent: x cannot import torch and numpy"}
  s = harness.summarize(record, peak=None)
  assert s["reference"] is None and "ratio" not in s
  record.update(method="kd", teacher="t", student="s", dtype="float32", summary=s)
  assert "no ratio: torch absent" in harness.table_row(record)
  assert harness.torch_missing("").startswith("torch absent")
  assert harness.code_missing("/nonexistent", "crd") == (
      "reference code absent: /nonexistent/RepDistiller (run experiments/fetch_reference.sh)")


def test_timed_batches_time_each_request_to_the_next():
  clock = iter(range(100))
  loader = reference_steps.TimedBatches("b", 4, sync=lambda: None)
  reference_steps.time.perf_counter = lambda: next(clock) ** 2  # 0, 1, 4, 9, 16
  try:
    assert [b for b in loader] == ["b"] * 4 and len(loader) == 4
  finally:
    reference_steps.time.perf_counter = __import__("time").perf_counter
  wall, cpu = loader.steps(skip=1)
  assert wall == [3, 5, 7] and len(cpu) == 3


def test_script_pieces_run_as_the_reference_wrote_them(tmp_path):
  path = tmp_path / "train.py"
  path.write_text(textwrap.dedent("""
      import argparse
      import no_such_logger_package
      parser = argparse.ArgumentParser()
      parser.add_argument('--lr', type=float, default=0.05)
      args = parser.parse_args()
      def main():
          a = 1
          data = [a]
          data.append(2)
          if len(data) > 1:
              data.append(3)
          data.append(4)
      """))
  script = reference_steps.Script(str(path))
  assert script.parser(script.tree.body).parse_args([]).lr == 0.05
  namespace = script.imports({})
  assert "argparse" in namespace and "no_such_logger_package" not in namespace
  body = script.definition("main").body
  ran = script.run(reference_steps._between(body, "data = [a]", "if len(data)"), {"a": 7})  # pylint: disable=protected-access
  assert ran["data"] == [7, 2, 3]
  with pytest.raises(reference_steps.MissingReference, match="pinned commit"):
    reference_steps._between(body, "data = [b]", "if")  # pylint: disable=protected-access


def test_device_check_runs_end_to_end_in_its_dry_mode(tmp_path):
  """The GPU script's whole path on this CPU, nothing timed: every case of it is set up (jaxkd's
  step traced and lowered; the reference, where this interpreter has torch, run once), and
  each says why it has no ratio."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", OUT=str(tmp_path), PYTHON=sys.executable,
             TORCH_PYTHON=sys.executable)
  proc = subprocess.run([str(ROOT / "experiments" / "device_check.sh"), "--dry"], env=env,
                        capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads((tmp_path / "speed.json").read_text())
  cases = report["cases"]
  assert [c["method"] for c in cases] == ["sskd", "hsakd", "kd", "crd"]
  assert {c["dtype"] for c in cases} == {"float32", "bfloat16"}
  for case in cases:
    assert case["jaxkd_setup"]["lowered_only"] and case["jaxkd_setup"]["flops_per_step"] > 0
    assert case["summary"]["jaxkd"] is None and "ratio" not in case["summary"]
    if "reference_missing" in case:
      assert case["reference_missing"].startswith(("torch absent", "reference code absent"))
    else:  # torch and the fetched code are here: the reference's loop ran one batch.
      assert case["rounds"][0]["reference"]["step_s_all"] == []
  assert cases[1]["jaxkd_setup"]["rows"] == 4 * 4  # HSAKD: 4 rotations of each image
  table = (tmp_path / "speed.md").read_text()
  assert table.count("| resnet8x4 → resnet8x4 |") == 4 and "no ratio" in table
  assert (tmp_path / "machine.txt").read_text().strip()
