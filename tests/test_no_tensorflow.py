"""The models, the methods, the train step and the step benchmark need no TensorFlow, TFDS or
clu: a GPU host with jax, flax, optax and orbax only runs `experiments/benchmark.py`."""

import json
import os
import subprocess
import sys

import helpers

# Runs in a fresh interpreter where importing TensorFlow, TFDS, clu or TensorBoard fails, as on
# a machine that does not have them; then the benchmark's command line (sys.argv[1:]).
_BLOCKED_RUN = """
import importlib.abc, runpy, sys

class NotInstalled(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path, target=None):
    if name.split(".")[0] in ("tensorflow", "tensorflow_datasets", "clu", "tensorboard"):
      raise ModuleNotFoundError(f"No module named {name!r}")

sys.meta_path.insert(0, NotInstalled())
import jaxkd, jaxkd.models, jaxkd.methods, jaxkd.networks, jaxkd.steps, jaxkd.optim
import jaxkd.checkpoint, jaxkd.parallel, jaxkd.defaults
from configs import default
default.get_config("sskd")
print("imported without TensorFlow", flush=True)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_step_benchmark_runs_without_tensorflow(tmp_path):
  out = tmp_path / "bench.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(helpers.REPO))
  # Another installation: the session's compilation cache is not its (jax reads it through
  # etils, which would look for TensorFlow's file system).
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  proc = subprocess.run(
      [sys.executable, "-c", _BLOCKED_RUN, str(helpers.REPO / "experiments" / "benchmark.py"),
       "--pairs=resnet8:resnet8", "--methods=sskd", "--batch=4", "--image_size=8",
       "--num_classes=10", "--steps=2", f"--out={out}"],
      env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "imported without TensorFlow" in proc.stdout
  (record,) = json.loads(out.read_text())["results"]
  assert record["method"] == "sskd" and record["images_per_s"] > 0
