"""experiments/benchmark.py runs end to end on tiny shapes and reports what its README promises."""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_benchmark_reports_throughput_flops_and_op_profile(tmp_path):
  out = tmp_path / "bench.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, str(ROOT / "experiments" / "benchmark.py"), "--pairs=resnet8:resnet8",
       "--methods=sskd", "--batch=4", "--image_size=8", "--num_classes=10", "--steps=2",
       "--breakdown", f"--profile={tmp_path / 'trace'}", f"--out={out}"],
      env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report["machine"]["matmul_peak_flops_per_s"] > 0
  (record,) = report["results"]
  assert record["rows"] == 16 and record["batch_images"] == 4  # 4 rotated views per image
  assert record["images_per_s"] == 4 / record["step_s"] > 0
  assert record["flops_per_step"] > record["teacher_forward_flops"] > 0
  assert 0 < record["teacher_forward_s"]
  assert record["op_ms_per_step"] and all(ms >= 0 for ms in record["op_ms_per_step"].values())
  assert "img/s" in proc.stdout and "traced ops" in proc.stdout


def test_input_benchmark_measures_the_pipeline_alone(tmp_path):
  """benchmark.py --input's measurement, on the digits: images/s on one core (per CPU-second)
  and with worker processes, the in-memory and the file path."""
  sys.path.insert(0, str(ROOT / "experiments"))
  import input_benchmark  # pylint: disable=g-import-not-at-top
  from jaxkd.data import sources  # pylint: disable=g-import-not-at-top
  from jaxkd import defaults  # pylint: disable=g-import-not-at-top
  config = defaults.dataset_config("digits")
  config.data_dir = str(tmp_path)
  sources.get_builder(config)
  both = input_benchmark.input_record("digits", "rotations", 32, str(tmp_path), 0.5)
  assert both["in_memory"] and both["workers"] == (os.cpu_count() or 1)
  assert both["one_core_images_per_s"] > 0 and both["all_cores_images_per_s"] > 0
  files = input_benchmark.input_record("digits", "rotations", 32, str(tmp_path), 0.5,
                                       in_memory=False)
  assert not files["in_memory"] and files["one_core_images_per_s"] > 0
  assert "all_cores_images_per_s" not in files
