"""Throughput of jaxkd's distillation step: images/s, step time, compile time, peak host memory,
and achieved FLOP/s (XLA's cost analysis) as a fraction of this machine's measured matmul peak.

    # The standard shapes: SSKD, batch 64 x 4 rotated views = 256 rows, CIFAR-100 (2-4 minutes
    # on 2 CPU cores):
    python experiments/benchmark.py --shapes=sskd_cifar
    # Any pairs / methods / batch / precision:
    python experiments/benchmark.py --pairs=resnet32x4:resnet8x4 --methods=sskd,kd --batch=64 \
        --dtype=bfloat16 --teacher_dtype=bfloat16 --steps=5 --out=runs/benchmark.json

Images/s counts original images (the batch), as the reference does: one SSKD step on 64 images
trains on their 4 views (256 rows) and counts 64. The step is the trainer's own `train_step`
(teacher forward in inference mode, student forward and backward, SGD update), jitted with the
state donated, on random CIFAR-shaped inputs; the input pipeline is not part of it.
`--breakdown` also times the teacher forward alone, and the rest of the step by difference;
`--profile=DIR` traces two steps into DIR (TensorBoard/Perfetto) and prints the wall time per
step of each kind of XLA op (fusions of one kind summed; on CPU, convolutions are not timed per
op and make up most of the rest of the step).

    # The input pipeline alone, per views mode, against the step that reads it (3-6 minutes on
    # 2 CPU cores; mock CIFAR-100 and ImageNet datasets are written to a temporary data_dir):
    python experiments/benchmark.py --input --out=runs/input.json

`--input` measures jaxkd's training input pipeline (read by index from ArrayRecord files,
augmented per example, batched by grain) with no step: CIFAR-100 views `none`, `rotations`,
`rotations_of_crop`, `two_crops` (batch 64) and ImageNet's random-resized crop 224 from JPEG
(batch 32). Per views mode: images/s per CPU core (images per CPU-second of the process, one
thread making the batches) and with every core (one input worker process per core, wall clock);
each beside the images/s of the step that reads those views here (KD, SSKD, HSAKD, SimCLR;
KD resnet34 -> resnet18 at 224 px), and their ratio. CIFAR `none` and `rotations` are also read
straight from the files (`in memory: no`) to compare with the in-memory path small splits take.
"""

import collections
import glob
import gzip
import json
import os
import platform
import re
import resource
import statistics
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The standard shapes: teacher -> student, SSKD (4 rotated views) at batch 64.
SSKD_CIFAR_PAIRS = "resnet32x4:resnet8x4,wrn_40_2:wrn_16_2"
# The reference PyTorch SSKD student step on the 2-core CPU this was written on (images/s).
REFERENCE_IMAGES_PER_S = {"resnet32x4:resnet8x4": 11.5, "wrn_40_2:wrn_16_2": 28.8}

_SHAPES = flags.DEFINE_enum("shapes", None, ["sskd_cifar"],
                            f"'sskd_cifar': --pairs={SSKD_CIFAR_PAIRS} --methods=sskd --batch=64.")
_PAIRS = flags.DEFINE_string("pairs", SSKD_CIFAR_PAIRS, "Comma-separated teacher:student pairs.")
_METHODS = flags.DEFINE_string("methods", "sskd", "Comma-separated registered methods.")
_BATCH = flags.DEFINE_integer("batch", 64, "Images per step (each brings its method's views).")
_IMAGE = flags.DEFINE_integer("image_size", 32, "Square input size (CIFAR: 32).")
_CLASSES = flags.DEFINE_integer("num_classes", 100, "Classes (CIFAR-100: 100).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "Student compute dtype (bfloat16 = config.half_precision).")
_TEACHER_DTYPE = flags.DEFINE_enum(
    "teacher_dtype", "float32", ["float32", "bfloat16"],
    "Teacher compute dtype (the trainer runs the teacher in float32).")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps after the warm-up step.")
_BREAKDOWN = flags.DEFINE_bool("breakdown", False, "Also time the teacher forward alone.")
_PROFILE = flags.DEFINE_string(
    "profile", "", "Directory for a trace of two steps per record; prints the time per op kind.")
_XLA_FLAGS = flags.DEFINE_string("xla_flags", "", "Extra XLA_FLAGS for this run.")
_XLA_DEFAULTS = flags.DEFINE_bool(
    "xla_defaults", False, "Compile the step with XLA's default options instead of the "
    "trainer's (jaxkd.parallel.step_compiler_options), to measure what they change.")
_OUT = flags.DEFINE_string("out", "", "JSON file for the results ('' = print only).")

_INPUT = flags.DEFINE_bool("input", False, "Benchmark the input pipeline per views mode.")
_INPUT_SECONDS = flags.DEFINE_float("input_seconds", 8.0,
                                    "Seconds of input per measurement (after a warm-up).")
_INPUT_DATA_DIR = flags.DEFINE_string(
    "input_data_dir", "", "Where the mock datasets are written ('' = a temporary folder).")


def peak_host_memory_mb() -> float:
  """Peak resident memory of this process so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return rss / (1 << 20) if sys.platform == "darwin" else rss / 1024


def compiled_flops(compiled) -> float:
  """FLOPs of one call of a compiled function, from XLA's cost analysis (0 if unavailable)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", 0.0))


def timed_calls(fn, args, num_calls):
  """Wall seconds of each of `num_calls` blocking calls fn(*args)."""
  import jax  # pylint: disable=g-import-not-at-top
  times = []
  for _ in range(num_calls):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return times


def matmul_peak(dtype, size=4096, repeats=5) -> tuple[float, float]:
  """(FLOP/s, FLOP per CPU-second) of the best of `repeats` [size, size]² products in `dtype`.

  The second figure counts the CPU time of all threads: on a shared machine it stays what one
  core delivers when other processes take the wall clock.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  a = jax.random.normal(jax.random.key(0), (size, size), dtype)
  b = jax.random.normal(jax.random.key(1), (size, size), dtype)
  dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  jax.block_until_ready(dot(a, b))
  flops = 2.0 * size ** 3
  wall, cpu = [], []
  for _ in range(repeats):
    start, cpu_start = time.perf_counter(), time.process_time()
    jax.block_until_ready(dot(a, b))
    wall.append(time.perf_counter() - start)
    cpu.append(time.process_time() - cpu_start)
  return flops / min(wall), flops / min(cpu)


def op_times_per_step(trace_dir, num_steps) -> dict[str, float]:
  """ms per step of each kind of XLA op in a `jax.profiler` trace with a Perfetto file.

  Op names lose their numeric suffix ("transpose_copy_fusion.23" -> "transpose_copy_fusion"), so
  fusions of one kind add up; runtime and Python events are left out.
  """
  files = glob.glob(os.path.join(trace_dir, "**", "*.json.gz"), recursive=True)
  if not files:
    return {}
  with gzip.open(max(files, key=os.path.getmtime)) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  totals = collections.Counter()
  for event in events:
    name = event.get("name", "")
    if event.get("ph") != "X" or name.startswith(("$", "ThunkExecutor", "PjitFunction",
                                                  "CommonPjRt", "ParseArguments")):
      continue
    totals[re.sub(r"\.\d+$", "", name)] += event.get("dur", 0) / 1e3 / num_steps
  return dict(totals.most_common())


def bench_one(method_name, teacher_name, student_name, batch, image_size, num_classes, dtype,
              teacher_dtype, steps, breakdown, xla_defaults=False, profile_dir=""):
  """Compiles and times one distillation step; returns its record."""
  import functools  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top
  from jaxkd import networks, parallel, steps as step_fns  # pylint: disable=g-import-not-at-top
  from jaxkd.methods import get_method  # pylint: disable=g-import-not-at-top
  from jaxkd.optim import make_optimizer  # pylint: disable=g-import-not-at-top
  from jaxkd.state import TrainState  # pylint: disable=g-import-not-at-top

  from jaxkd.data import views as views_lib  # pylint: disable=g-import-not-at-top

  method = get_method(method_name)
  hparams = method.hparams()
  views = views_lib.num_views(method.views)
  mesh = parallel.create_mesh()
  shape = (image_size, image_size, 3)
  teacher_heads = method.teacher.heads if method.teacher else None
  teacher = networks.build_network(teacher_name, num_classes, teacher_heads, hparams,
                                dtype=teacher_dtype)
  student = networks.build_network(student_name, num_classes, method.student_heads, hparams,
                                dtype=dtype)
  teacher_variables = networks.init_variables(teacher, shape, 1, mesh)
  variables = networks.init_variables(student, shape, 0, mesh)
  config = default.get_config()
  schedule = lambda step: config.optimizer.lr  # pylint: disable=unnecessary-lambda-assignment
  tx = make_optimizer(config, schedule)
  state = parallel.replicate(TrainState(
      step=jnp.zeros((), jnp.int32), params=variables["params"],
      batch_stats=variables["batch_stats"], opt_state=tx.init(variables["params"])), mesh)
  rng = np.random.default_rng(0)
  image_shape = (batch, views) + shape if views > 1 else (batch,) + shape
  batch_arrays = parallel.to_global({
      "image": rng.normal(size=image_shape).astype(np.float32),
      "label": rng.integers(0, num_classes, size=batch).astype(np.int32)}, mesh)

  step = jax.jit(functools.partial(
      step_fns.train_step, network=student,
      teacher_network=teacher if method.uses_teacher else None, loss=method.loss,
      hparams=hparams, tx=tx, schedule=schedule, steps_per_epoch=1), donate_argnums=(0,),
      compiler_options=None if xla_defaults else parallel.step_compiler_options())
  start = time.perf_counter()
  compiled = step.lower(state, teacher_variables, batch_arrays).compile()
  compile_s = time.perf_counter() - start
  flops = compiled_flops(compiled)

  def run(state):
    return compiled(state, teacher_variables, batch_arrays)

  state, metrics = run(state)  # Warm-up: first-call allocations.
  jax.block_until_ready(metrics)
  times, cpu_times = [], []
  for _ in range(steps):
    start, cpu_start = time.perf_counter(), time.process_time()
    state, metrics = run(state)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
    cpu_times.append(time.process_time() - cpu_start)
  loss = float(jax.device_get(metrics["loss"]))
  step_s, cpu_s = statistics.median(times), statistics.median(cpu_times)
  record = {
      "method": method_name, "teacher": teacher_name, "student": student_name,
      "dtype": jnp.dtype(dtype).name, "teacher_dtype": jnp.dtype(teacher_dtype).name,
      "batch_images": batch, "rows": batch * views, "image_size": image_size,
      "num_classes": num_classes, "images_per_s": batch / step_s,
      "images_per_s_best": batch / min(times), "step_s": step_s, "step_s_min": min(times),
      "step_s_all": times, "step_cpu_s": cpu_s, "compile_s": compile_s,
      "flops_per_step": flops, "flops_per_s": flops / step_s, "flops_per_cpu_s": flops / cpu_s,
      "loss": loss, "peak_host_memory_mb": peak_host_memory_mb(),
  }
  if profile_dir:
    trace_dir = os.path.join(profile_dir, f"{method_name}_{teacher_name}_{student_name}")
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for _ in range(2):
        state, metrics = run(state)
        jax.block_until_ready((state, metrics))
    record["op_ms_per_step"] = op_times_per_step(trace_dir, 2)
  if breakdown:
    forward = jax.jit(lambda v, x: teacher.apply(v, step_fns.flatten_views(x), train=False),
                      compiler_options=None if xla_defaults else parallel.step_compiler_options())
    fwd = forward.lower(teacher_variables, batch_arrays["image"]).compile()
    jax.block_until_ready(fwd(teacher_variables, batch_arrays["image"]))
    teacher_s = statistics.median(timed_calls(fwd, (teacher_variables, batch_arrays["image"]),
                                              max(steps, 2)))
    record.update(teacher_forward_s=teacher_s, teacher_forward_flops=compiled_flops(fwd),
                  student_s=step_s - teacher_s)
  return record


def main(argv):
  del argv
  if _INPUT.value:
    import input_benchmark  # pylint: disable=g-import-not-at-top
    input_benchmark.run(_INPUT_SECONDS.value, _INPUT_DATA_DIR.value, _OUT.value, bench_one,
                        machine_description)
    return
  pairs, methods, batch = _PAIRS.value, _METHODS.value, _BATCH.value
  if _SHAPES.value == "sskd_cifar":
    pairs, methods, batch = SSKD_CIFAR_PAIRS, "sskd", 64
  extra_flags = _XLA_FLAGS.value
  if _PROFILE.value:
    # Per-op events on CPU; other backends ignore the flag.
    extra_flags += " --xla_cpu_enable_xprof_traceme=true"
  if extra_flags.strip():
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {extra_flags}".strip()
  import jax  # pylint: disable=g-import-not-at-top  (after XLA_FLAGS)
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_default_matmul_precision", "highest")  # as jaxkd.main
  dtype = jnp.bfloat16 if _DTYPE.value == "bfloat16" else jnp.float32
  teacher_dtype = jnp.bfloat16 if _TEACHER_DTYPE.value == "bfloat16" else jnp.float32

  peak, peak_per_cpu_s = matmul_peak(dtype)
  machine = dict(machine_description(), **{
      "step_compiler_options": None if _XLA_DEFAULTS.value else _step_options(),
      "matmul_peak_flops_per_s": peak, "matmul_peak_flops_per_cpu_s": peak_per_cpu_s,
      "matmul_peak_dtype": _DTYPE.value,
  })
  device = jax.devices()[0]
  print(f"{machine['processor']} ({machine['cpu_count']} cores, {device.platform}); "
        f"matmul peak {peak / 1e9:.0f} GFLOP/s, {peak_per_cpu_s / 1e9:.0f} GFLOP per CPU-s "
        f"({_DTYPE.value}); "
        f"load average {machine['load_average_at_start'][0]:.2f}", flush=True)
  results = []
  for method_name in filter(None, methods.split(",")):
    for pair in filter(None, pairs.split(",")):
      teacher_name, student_name = pair.split(":")
      record = bench_one(method_name, teacher_name, student_name, batch, _IMAGE.value,
                         _CLASSES.value, dtype, teacher_dtype, _STEPS.value,
                         _BREAKDOWN.value, _XLA_DEFAULTS.value, _PROFILE.value)
      record["fraction_of_matmul_peak"] = record["flops_per_s"] / peak
      # Per CPU-second: what the step makes of the cores it gets, even on a shared machine.
      record["cpu_fraction_of_matmul_peak"] = record["flops_per_cpu_s"] / peak_per_cpu_s
      reference = REFERENCE_IMAGES_PER_S.get(pair)
      if reference and method_name == "sskd" and batch == 64:
        record["reference_images_per_s"] = reference
        record["speedup_vs_reference"] = record["images_per_s"] / reference
      results.append(record)
      print(_row(record), flush=True)
  machine["load_average_at_end"] = os.getloadavg()
  if _OUT.value:
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    with open(_OUT.value, "w") as f:
      json.dump({"machine": machine, "results": results}, f, indent=2)
    print(f"wrote {_OUT.value}")


def machine_description() -> dict:
  """The machine, its software and its load, for a results file."""
  import jax  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  return {"platform": device.platform, "device_kind": device.device_kind,
          "num_devices": jax.device_count(), "cpu_count": os.cpu_count(),
          "processor": _cpu_name(), "python": platform.python_version(),
          "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "load_average_at_start": os.getloadavg()}


def _row(r):
  dtypes = r["dtype"]
  if r["teacher_dtype"] != r["dtype"]:
    dtypes += f" (teacher {r['teacher_dtype']})"
  text = (f"{r['method']} {r['teacher']} -> {r['student']} {dtypes} "
          f"{r['batch_images']}x{r['rows'] // r['batch_images']} rows | "
          f"{r['images_per_s']:.1f} img/s (best {r['images_per_s_best']:.1f})  "
          f"step {r['step_s']:.3f} s (min {r['step_s_min']:.3f}, {r['step_cpu_s']:.2f} CPU-s)  "
          f"compile {r['compile_s']:.1f} s  {r['flops_per_step'] / 1e9:.0f} GFLOP/step  "
          f"{r['flops_per_s'] / 1e9:.0f} GFLOP/s = {100 * r['fraction_of_matmul_peak']:.0f}% "
          f"of peak ({100 * r['cpu_fraction_of_matmul_peak']:.0f}% per CPU-s)  "
          f"mem {r['peak_host_memory_mb']:.0f} MB")
  if "speedup_vs_reference" in r:
    text += f"  | {r['speedup_vs_reference']:.2f}x the PyTorch reference"
  if "teacher_forward_s" in r:
    text += (f"\n    teacher forward {r['teacher_forward_s']:.3f} s "
             f"({r['teacher_forward_flops'] / 1e9:.0f} GFLOP), rest {r['student_s']:.3f} s")
  if "op_ms_per_step" in r:
    ops = list(r["op_ms_per_step"].items())
    text += f"\n    traced ops {sum(ms for _, ms in ops):.0f} ms/step: " + ", ".join(
        f"{name} {ms:.0f}" for name, ms in ops[:10])
  return text


def _step_options():
  from jaxkd import parallel  # pylint: disable=g-import-not-at-top
  return parallel.step_compiler_options()


def _cpu_name():
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


if __name__ == "__main__":
  app.run(main)
