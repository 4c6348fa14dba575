"""Throughput of jaxkd's distillation step: images/s, step time, compile time, peak host memory,
and achieved FLOP/s (XLA's cost analysis) as a fraction of this machine's measured matmul peak.

    # The standard shapes: SSKD, batch 64 x 4 rotated views = 256 rows, CIFAR-100 (2-4 minutes
    # on 2 CPU cores):
    python experiments/benchmark.py --shapes=sskd_cifar
    # Any pairs / methods / batch / precision:
    python experiments/benchmark.py --pairs=resnet32x4:resnet8x4 --methods=sskd,kd --batch=64 \
        --dtype=bfloat16 --teacher_dtype=bfloat16 --steps=5 --out=runs/benchmark.json

Images/s counts original images (the batch), as the reference does: one SSKD step on 64 images
trains on their 4 views (256 rows) and counts 64. The step is the trainer's own: the method's
student stage as `jaxkd.plan` makes it (CIFAR-100 recipe), its first state, optimiser and jitted
`train_step` as the loop builds them (`jaxkd.stage_step`: teacher forward in inference mode,
student forward and backward with the method's bridge and heads, SGD update, state donated),
beside a teacher of random weights, on one random batch as the pipeline would give it (views,
CRD's negatives, a CLIP teacher's own 224-px view); the input pipeline is not part of it.
The teacher computes in --dtype unless --teacher_dtype says otherwise, as the trainer does.
A side-by-side comparison with each method's reference PyTorch step is
`experiments/speed_vs_reference.py`.
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
from typing import Optional

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The standard shapes: teacher -> student, SSKD (4 rotated views) at batch 64.
SSKD_CIFAR_PAIRS = "resnet32x4:resnet8x4,wrn_40_2:wrn_16_2"

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
    "teacher_dtype", None, ["float32", "bfloat16"],
    "Teacher compute dtype (default: --dtype, as the trainer runs the teacher in the run's "
    "precision).")
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


def peak_device_memory_mb() -> Optional[float]:
  """Peak memory in use on the first device so far (None where the backend does not say: CPU)."""
  import jax  # pylint: disable=g-import-not-at-top
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return peak / (1 << 20) if peak is not None else None


def compiled_flops(compiled) -> float:
  """FLOPs of one call of a compiled (or lowered) function, from XLA's cost analysis (0 if
  unavailable)."""
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


def student_stage(method_name, teacher_name, student_name, num_classes, dtype):
  """The trainer's student stage of `method_name` on the pair (jaxkd.plan.stage_list of the
  CIFAR-100 recipe config, lr 0.05), in the precision `dtype` (bfloat16: half_precision)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top
  from jaxkd import plan  # pylint: disable=g-import-not-at-top
  from jaxkd.methods import canonical_name  # pylint: disable=g-import-not-at-top
  config = default.cifar100_recipe(teacher_name, student_name, lr=0.05, nesterov=False)
  config.method.name = method_name
  config.half_precision = jnp.dtype(dtype) == jnp.bfloat16
  name = f"student_{canonical_name(method_name)}"
  (stage,) = [s for s in plan.stage_list(config, num_classes) if s.name == name]
  return stage


def _made(fn, abstract):
  """fn(), or with `abstract` its shapes and dtypes only (jax.eval_shape: nothing compiled).

  Traced, the initialisations take no compiler options (jax refuses them below the top level,
  and there is nothing to compile), so their run-once options are left out meanwhile.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from unittest import mock  # pylint: disable=g-import-not-at-top
  from jaxkd import networks, stage_step  # pylint: disable=g-import-not-at-top
  if not abstract:
    return fn()
  with mock.patch.object(networks, "run_once_options", lambda mesh: None), \
       mock.patch.object(stage_step, "run_once_options", lambda mesh: None):
    return jax.eval_shape(fn)


def random_teacher(stage, info, teacher_dtype, mesh, abstract=False):
  """The stage's frozen teacher with random variables (None when the stage reads none): a zoo
  network with the method's heads, or a CLIP tower. `abstract`: variables as shapes only."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jaxkd import networks, parallel, teachers  # pylint: disable=g-import-not-at-top
  from jaxkd.data import teacher_views  # pylint: disable=g-import-not-at-top
  from jaxkd.models import clip  # pylint: disable=g-import-not-at-top
  source = stage.teacher
  if source is None:
    return None
  if source.clip:
    tower = clip.get_clip_model(source.model_name, teacher_dtype)
    size = tower.config.image_size
    variables = _made(lambda: jax.jit(lambda k: tower.init(
        k, jnp.zeros((1, size, size, 3)), train=False))(jax.random.key(1)), abstract)
    return teachers.Teacher(
        network=networks.Network(backbone=tower), path="", sha256="",
        variables=({c: {"backbone": t} for c, t in variables.items()} if abstract else
                   parallel.replicate({c: {"backbone": t} for c, t in variables.items()}, mesh)),
        input=teachers.clip_input(tower))
  network = networks.build_network(source.model_name, info.num_classes, source.heads,
                                   source.hparams, teacher_dtype)
  variables = _made(lambda: networks.init_variables(network, info.image_shape, 1, mesh),
                    abstract)
  teacher = teachers.Teacher(network=network, path="", sha256="", variables=variables)
  if source.own_view:  # As jaxkd.teachers.Teachers.get: a view of its own, the dataset's.
    teacher = dataclasses.replace(teacher, input=teacher_views.DATASET_INPUT)
  return teacher


def random_batch(stage, teacher, info, batch, seed=0):
  """A batch as the pipeline gives it to the stage's step, of random values: 'image' (with the
  method's views), 'label', the teacher's own view, CRD's 'index' and 'contrast_index'."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jaxkd.data import teacher_views, views as views_lib  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  views = views_lib.num_views(stage.method.views)
  shape = (batch, views) + info.image_shape if views > 1 else (batch,) + info.image_shape
  arrays = {"image": rng.normal(size=shape).astype(np.float32),
            "label": rng.integers(0, info.num_classes, size=batch).astype(np.int32)}
  if teacher is not None and teacher.input is not None:
    arrays["teacher_image"] = rng.normal(size=(batch,) + teacher_views.teacher_view_shape(
        info, teacher.input)).astype(np.float32)
  if stage.num_negatives:
    arrays["index"] = rng.integers(0, info.num_train, size=batch).astype(np.int32)
    arrays["contrast_index"] = rng.integers(
        0, info.num_train, size=(batch, stage.num_negatives + 1)).astype(np.int32)
  return arrays


def build_step(method_name, teacher_name, student_name, batch, image_size, num_classes, dtype,
               teacher_dtype, xla_defaults=False, num_train=50_000, abstract=False):
  """(step, state, teacher variables, batch, stage, inputs) of the trainer's student stage:
  its network, first state, optimiser and jitted train step (jaxkd.stage_step, as the loop
  builds them), a random teacher and a random batch on the devices. `abstract`: the state and
  the teacher's variables as shapes only, enough to lower the step (nothing is compiled)."""
  from jaxkd import optim, parallel, stage_step  # pylint: disable=g-import-not-at-top
  from jaxkd.data.info import DatasetInfo  # pylint: disable=g-import-not-at-top
  info = DatasetInfo(name="benchmark", tfds_name="", num_classes=num_classes,
                     image_shape=(image_size, image_size, 3), num_train=num_train, num_eval=0,
                     mean=(0.5,) * 3, std=(0.25,) * 3, crop_padding=4, flip=True)
  mesh = parallel.create_mesh()
  stage = student_stage(method_name, teacher_name, student_name, num_classes, dtype)
  inputs = stage_step.Inputs(teacher=random_teacher(stage, info, teacher_dtype, mesh,
                                                    abstract and not stage.method.teacher_constants))
  network = stage.network(num_classes, dtype, num_train)
  steps_per_epoch = max(num_train // batch, 1)
  schedule = optim.learning_rate_schedule(stage.config, stage.base_lr, stage.num_epochs,
                                          steps_per_epoch, stage.milestones)
  made = {}

  def first_state():
    state, made["tx"], made["head"] = stage_step.initial_state(stage, inputs, network, schedule,
                                                               mesh, info)
    return state
  state = _made(first_state, abstract)
  tx, head = made["tx"], made["head"]
  step = stage_step.jit_train_step(stage, inputs, network, tx, schedule, head, steps_per_epoch,
                                   xla_defaults)
  arrays = parallel.to_global(random_batch(stage, inputs.teacher, info, batch), mesh)
  teacher_variables = inputs.teacher.variables if inputs.teacher else None
  return step, state, teacher_variables, arrays, stage, inputs


class PreparedStep:
  """The trainer's compiled step of one method on one pair, its state and batch.

  `lower_only`: the step is traced and lowered but not compiled (`run` is None); `flops` is
  then the lowered module's cost analysis.
  """

  def __init__(self, method_name, teacher_name, student_name, batch, image_size, num_classes,
               dtype, teacher_dtype, xla_defaults=False, num_train=50_000, lower_only=False):
    from jaxkd.data import views as views_lib  # pylint: disable=g-import-not-at-top
    step, self.state, self.teacher_variables, self.batch, self.stage, self.inputs = build_step(
        method_name, teacher_name, student_name, batch, image_size, num_classes, dtype,
        teacher_dtype, xla_defaults, num_train, abstract=lower_only)
    self.rows = batch * views_lib.num_views(self.stage.method.views)
    self.image_size, self.num_classes = image_size, num_classes
    start = time.perf_counter()
    lowered = step.lower(self.state, self.teacher_variables, self.batch)
    self.compiled = None if lower_only else lowered.compile()
    self.compile_s = time.perf_counter() - start
    self.flops = compiled_flops(lowered if lower_only else self.compiled)

  def run(self):
    """One step; returns its metrics (the state moves on)."""
    self.state, metrics = self.compiled(self.state, self.teacher_variables, self.batch)
    return metrics

  def timed(self, steps, warmup=1):
    """(wall seconds, CPU seconds) of each of `steps` steps after `warmup` untimed ones, and
    the last step's loss."""
    import jax  # pylint: disable=g-import-not-at-top
    for _ in range(warmup):  # First-call allocations; caches after another process ran.
      metrics = self.run()
      jax.block_until_ready((self.state, metrics))
    times, cpu_times, metrics = [], [], None
    for _ in range(steps):
      start, cpu_start = time.perf_counter(), time.process_time()
      metrics = self.run()
      jax.block_until_ready((self.state, metrics))
      times.append(time.perf_counter() - start)
      cpu_times.append(time.process_time() - cpu_start)
    loss = float(jax.device_get(metrics["loss"])) if metrics is not None else None
    return times, cpu_times, loss


def step_record(prepared, method_name, teacher_name, student_name, dtype, teacher_dtype,
                times, cpu_times, loss):
  """The benchmark's record of timed steps of a PreparedStep."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  batch = prepared.batch["image"].shape[0]
  step_s, cpu_s = statistics.median(times), statistics.median(cpu_times)
  return {
      "method": method_name, "teacher": teacher_name, "student": student_name,
      "dtype": jnp.dtype(dtype).name, "teacher_dtype": jnp.dtype(teacher_dtype).name,
      "batch_images": batch, "rows": prepared.rows,
      "image_size": prepared.image_size, "num_classes": prepared.num_classes,
      "images_per_s": batch / step_s, "images_per_s_best": batch / min(times),
      "step_s": step_s, "step_s_min": min(times), "step_s_all": times, "step_cpu_s": cpu_s,
      "step_cpu_s_all": cpu_times, "compile_s": prepared.compile_s,
      "flops_per_step": prepared.flops, "flops_per_s": prepared.flops / step_s,
      "flops_per_cpu_s": prepared.flops / cpu_s, "loss": loss,
      "peak_host_memory_mb": peak_host_memory_mb(),
      "peak_device_memory_mb": peak_device_memory_mb(),
  }


def bench_one(method_name, teacher_name, student_name, batch, image_size, num_classes, dtype,
              teacher_dtype, steps, breakdown, xla_defaults=False, profile_dir="", warmup=1,
              num_train=50_000):
  """Compiles and times the trainer's step of one method on one pair; returns its record."""
  import jax  # pylint: disable=g-import-not-at-top
  from jaxkd import parallel, stage_step  # pylint: disable=g-import-not-at-top
  from jaxkd import steps as step_fns  # pylint: disable=g-import-not-at-top

  prepared = PreparedStep(method_name, teacher_name, student_name, batch, image_size,
                          num_classes, dtype, teacher_dtype, xla_defaults, num_train)
  times, cpu_times, loss = prepared.timed(steps, warmup)
  record = step_record(prepared, method_name, teacher_name, student_name, dtype, teacher_dtype,
                       times, cpu_times, loss)
  if profile_dir:
    trace_dir = os.path.join(profile_dir, f"{method_name}_{teacher_name}_{student_name}")
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for _ in range(2):
        metrics = prepared.run()
        jax.block_until_ready((prepared.state, metrics))
    record["op_ms_per_step"] = op_times_per_step(trace_dir, 2)
  if breakdown and prepared.inputs.teacher is not None:
    teacher = stage_step.teacher_network(prepared.stage, prepared.inputs)
    images = prepared.batch.get("teacher_image", prepared.batch["image"])
    variables = prepared.teacher_variables
    forward = jax.jit(lambda v, x: teacher.apply(v, step_fns.flatten_views(x), train=False),
                      compiler_options=None if xla_defaults else parallel.step_compiler_options())
    fwd = forward.lower(variables, images).compile()
    jax.block_until_ready(fwd(variables, images))
    teacher_s = statistics.median(timed_calls(fwd, (variables, images), max(steps, 2)))
    record.update(teacher_forward_s=teacher_s, teacher_forward_flops=compiled_flops(fwd),
                  student_s=record["step_s"] - teacher_s)
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
  teacher_dtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, None: dtype}[
      _TEACHER_DTYPE.value]

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
