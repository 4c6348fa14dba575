"""Side by side: jaxkd's training step against each method's reference PyTorch step.

    experiments/fetch_reference.sh            # the reference code, pinned, into reference_code/
    python -m venv /opt/torchvenv && /opt/torchvenv/bin/pip install torch numpy
    python experiments/speed_vs_reference.py --torch-python=/opt/torchvenv/bin/python \\
        --methods=sskd,kd --pairs=wrn_40_2:wrn_16_2 --batch=64 --rounds=3 --steps=3 \\
        --out=runs/speed.json --markdown=runs/speed.md

For each method and teacher -> student pair it measures, in alternation, several rounds of

- the reference's own per-batch training code (experiments/reference_steps.py, run by the
  PyTorch interpreter `--torch-python`: SSKD's student.py loop, HSAKD's train(), RepDistiller's
  and EGA's helper/loops.py train_distill, mdistiller's BaseTrainer.train_iter), and
- jaxkd's trainer step (experiments/benchmark.py's PreparedStep: the method's student stage,
  its state and jitted train step as the loop builds them),

on the same pair, batch, views, precision (`--dtype`; bfloat16: jaxkd's half_precision, the
reference under torch.autocast) and thread count: each side is a subprocess pinned to the same
`--threads` cores (sched_setaffinity, OMP/MKL threads, torch.set_num_threads). Each side is set
up once per case (jaxkd compiles; the reference builds its modules), then the rounds alternate
which side runs first; a round is `--warmup` untimed steps and `--steps` timed ones. Reported per
case: the median images/s of each side over all timed steps, the spread (min-max of the round
medians), the ratio jaxkd / reference (and the range of the per-round ratios), CPU-seconds per
step, peak host memory (and device memory on a GPU), jaxkd's compile time and XLA's FLOPs per
step with the fraction of the measured matmul peak, the load average before and after, and the
input workers needed to feed jaxkd's step (its images/s over what one core of this host makes
of the method's views, jaxkd's own in-memory batch function, timed here).

No reference number is a constant here. Where torch or the reference code is missing, the
reference column says so and no ratio is printed (exit status 1). `--dry`: a tiny run of the
whole path (one small pair, batch 4, nothing timed: jaxkd's step is traced and lowered, not
compiled; the reference, where present, runs one untimed batch), for the test suite.

EGA's teacher is a CLIP tower: its case is clip_vit_b32 -> resnet8x4 whatever `--pairs` says.
"""

import argparse
import functools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
REFERENCE_STEPS = os.path.join(HERE, "reference_steps.py")
DEFAULT_CODE = os.path.join(HERE, "reference_code")

# Every method with a reference step, and the code base it lives in (reference_steps.py).
METHODS = ("sskd", "hsakd", "kd", "fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "ab", "ft",
           "nst", "crd", "dkd", "ega")
REPOSITORY = dict({m: "RepDistiller" for m in METHODS},
                  sskd="SSKD", hsakd="HSAKD", dkd="mdistiller", ega="EGA")
PAIRS = "resnet32x4:resnet8x4,wrn_40_2:wrn_16_2"
EGA_PAIR = ("clip_vit_b32", "resnet8x4")
DRY_PAIR = ("resnet8x4", "resnet8x4")
PROTOCOL = "@@"  # Lines of the workers' replies start with it; anything else is noise.


# ------------------------------------------------------------------------------ the workers


class WorkerFailed(Exception):
  pass


class Worker:
  """One side's measuring subprocess, pinned to `cpus`: it answers each command with one
  '@@<kind> <json>' line on stdout; its stderr goes to a log file."""

  def __init__(self, argv, cpus, name):
    self.name = name
    self.log = tempfile.NamedTemporaryFile(prefix=f"{name}_", suffix=".log", delete=False)  # pylint: disable=consider-using-with
    env = dict(os.environ, OMP_NUM_THREADS=str(len(cpus)), MKL_NUM_THREADS=str(len(cpus)),
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    self.proc = subprocess.Popen(  # pylint: disable=consider-using-with
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
        env=env, cwd=ROOT, preexec_fn=lambda: os.sched_setaffinity(0, cpus))

  def reply(self):
    for line in self.proc.stdout:
      if line.startswith(PROTOCOL):
        kind, _, body = line[len(PROTOCOL):].partition(" ")
        if kind == "error":
          raise WorkerFailed(f"{self.name}: {json.loads(body)}")
        return json.loads(body)
    raise WorkerFailed(f"{self.name} exited ({self.proc.wait()}): {self.tail()}")

  def ask(self, command):
    self.proc.stdin.write(command + "\n")
    self.proc.stdin.flush()
    return self.reply()

  def tail(self, lines=8):
    with open(self.log.name, encoding="utf-8", errors="replace") as f:
      return " | ".join(f.read().strip().splitlines()[-lines:])

  def close(self):
    if self.proc.poll() is None:
      try:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        self.proc.wait(timeout=60)
      except (OSError, subprocess.TimeoutExpired):
        self.proc.kill()
    os.remove(self.log.name)


def say(kind, body):
  """A worker's reply line (see Worker)."""
  sys.stdout.write(f"{PROTOCOL}{kind} {json.dumps(body)}\n")
  sys.stdout.flush()


def serve(handlers):
  """A worker's command loop: 'name json-args' lines on stdin, one reply each, until 'quit'."""
  for line in sys.stdin:
    name, _, body = line.strip().partition(" ")
    if name == "quit":
      return
    try:
      say("ok", handlers[name](**(json.loads(body) if body else {})))
    except Exception as e:  # pylint: disable=broad-except
      say("error", f"{type(e).__name__}: {e}")
      raise


# ------------------------------------------------------------------------ jaxkd's side (worker)


class JaxkdSide:
  """The handlers of jaxkd's worker: the machine, one case's step at a time."""

  def __init__(self):
    sys.path.insert(0, HERE)
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update("jax_default_matmul_precision", "highest")  # as jaxkd.main
    import benchmark  # pylint: disable=g-import-not-at-top,import-outside-toplevel
    self.benchmark, self.prepared = benchmark, None

  def machine(self, dtypes, peak_size):
    """The machine, and the matmul peak ([size, size]² products) in each dtype."""
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    description = self.benchmark.machine_description()
    peaks = {dtype: self.benchmark.matmul_peak(jnp.dtype(dtype), size=peak_size)
             for dtype in (dtypes if peak_size else ())}
    description.update(
        matmul_peak_flops_per_s={dtype: wall for dtype, (wall, _) in peaks.items()},
        matmul_peak_flops_per_cpu_s={dtype: cpu for dtype, (_, cpu) in peaks.items()},
        matmul_peak_size=peak_size)
    return description

  def prepare(self, method, teacher, student, batch, dtype, lower_only):
    import gc  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    self.prepared = None  # The last case's buffers go before this one's come.
    gc.collect()
    dtype = jnp.dtype(dtype)
    self.prepared = p = self.benchmark.PreparedStep(method, teacher, student, batch, 32, 100,
                                                    dtype, dtype, lower_only=lower_only)
    return {"compile_s": p.compile_s, "flops_per_step": p.flops, "rows": p.rows,
            "views": p.stage.method.views, "lowered_only": lower_only,
            "device_memory_mb": self._memory_analysis_mb()}

  def _memory_analysis_mb(self):
    """XLA's figure for the compiled step's device memory: arguments + outputs + temporaries
    (aliased, donated buffers counted once)."""
    compiled = self.prepared.compiled
    analysis = compiled.memory_analysis() if compiled is not None else None
    if analysis is None:
      return None
    total = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
             + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)
    return total / (1 << 20)

  def run(self, steps, warmup):
    times, cpu, loss = self.prepared.timed(steps, warmup)
    return {"step_s_all": times, "step_cpu_s_all": cpu, "loss": loss,
            "peak_host_memory_mb": self.benchmark.peak_host_memory_mb(),
            "peak_device_memory_mb": self.benchmark.peak_device_memory_mb()}

  def input_rate(self, seconds, batch):
    """Images per CPU-second of this process making the prepared stage's training batches:
    jaxkd's batch function over an in-memory split of random CIFAR-sized images (what a
    small split costs once decoded: the method's views, CRD's negatives, a CLIP teacher's own
    view), one thread."""
    import numpy as np  # pylint: disable=g-import-not-at-top
    from jaxkd.data import negatives, records, stream, teacher_views  # pylint: disable=g-import-not-at-top
    from jaxkd.data import views as views_lib  # pylint: disable=g-import-not-at-top
    from jaxkd.data.info import DatasetInfo  # pylint: disable=g-import-not-at-top
    stage, teacher = self.prepared.stage, self.prepared.inputs.teacher
    n = 4096
    info = DatasetInfo(name="cifar100", tfds_name="cifar100", num_classes=100,
                       image_shape=(32, 32, 3), num_train=n, num_eval=0,
                       mean=(0.5071, 0.4866, 0.4409), std=(0.2675, 0.2565, 0.2761),
                       crop_padding=4, flip=True)
    rng = np.random.default_rng(0)
    split = records.InMemory(rng.integers(0, 256, (n, 32, 32, 3), np.uint8),
                             rng.integers(0, 100, n).astype(np.int32))
    if teacher is not None and teacher.input is not None:
      views_fn = teacher_views.make_views_fn(info, teacher.input, True)
    else:
      views_fn = functools.partial(stream.image_only,
                                   views_lib.make_views_fn(stage.method.views, info, True))
    sampler = (negatives.OtherClassSampler(split.label_of, stage.num_negatives)
               if stage.num_negatives else None)
    batch_fn = stream.TrainBatch(source=split, views_fn=views_fn, seed=0,
                                 global_batch_size=batch, local_batch_size=batch,
                                 process_index=0, per_epoch=n // batch * batch, num_train=n,
                                 label_of=split.label_of if sampler else None, sampler=sampler)
    start, steps = time.process_time(), 0
    while time.process_time() - start < seconds or steps < 2:
      batch_fn(steps)
      steps += 1
    return {"images_per_cpu_s": steps * batch / (time.process_time() - start)}


# ----------------------------------------------------------------------- the cases to measure


def cases(methods, pairs, dtypes, dry):
  """(dtype, (method, teacher, student)) of each measurement; with `dry`, each method once on
  DRY_PAIR, the dtypes taken in turn."""
  out = []
  for method in methods:
    if method == "ega":
      out.append(("ega",) + EGA_PAIR)
    else:
      out += [(method,) + pair for pair in ([DRY_PAIR] if dry else pairs)]
  if dry:
    return [(dtypes[i % len(dtypes)], case) for i, case in enumerate(out)]
  return [(dtype, case) for dtype in dtypes for case in out]


def torch_missing(torch_python):
  """Why the reference side cannot run with this interpreter, or None."""
  if not torch_python:
    return "torch absent: no --torch-python given (an interpreter with PyTorch and NumPy)"
  try:
    proc = subprocess.run([torch_python, "-c", "import torch, numpy"], capture_output=True,
                          text=True, timeout=600, check=False)
  except OSError as e:
    return f"torch absent: {torch_python} does not run ({e.strerror})"
  if proc.returncode:
    return f"torch absent: {torch_python} cannot import torch and numpy"
  return None


def code_missing(code, method):
  """Why `method`'s reference code is not there, or None."""
  for repository in (REPOSITORY[method],) + (("CLIP",) if method == "ega" else ()):
    folder = os.path.join(code, repository)
    if not os.path.isfile(os.path.join(folder, "COMMIT")):
      return f"reference code absent: {folder} (run experiments/fetch_reference.sh)"
  return None


def jaxkd_worker(cpus):
  return Worker([sys.executable, os.path.abspath(__file__), "--serve-jaxkd"], cpus, "jaxkd")


def reference_worker(args, case, dtype, device, cpus):
  method, teacher, student = case
  return Worker([args.torch_python, REFERENCE_STEPS, "--serve", "--method", method,
                 "--teacher", teacher, "--student", student, "--batch", str(args.batch),
                 "--dtype", dtype, "--device", device, "--threads", str(len(cpus)),
                 "--code", args.code], cpus, f"reference_{method}")


# ------------------------------------------------------------------------------ measuring


def run_rounds(args, sides):
  """Alternating rounds: even rounds jaxkd first, odd rounds the reference first."""
  rounds = []
  command = "run " + json.dumps({"steps": args.steps, "warmup": args.warmup})
  for r in range(args.rounds):
    one = {"load_before": os.getloadavg()[0]}
    for name, worker in (sides if r % 2 == 0 else sides[::-1]):
      one[name] = worker.ask(command)
    one["load_after"] = os.getloadavg()[0]
    rounds.append(one)
  return rounds


def measure_case(args, case, dtype, device, cpus, missing, shared):
  """One case: both sides set up, the rounds, the input rate; its record."""
  method, teacher, student = case
  record = {"method": method, "teacher": teacher, "student": student, "dtype": dtype,
            "batch_images": args.batch, "threads": len(cpus)}
  jx = shared or jaxkd_worker(cpus)
  ref = None
  try:
    record["jaxkd_setup"] = jx.ask("prepare " + json.dumps(dict(
        method=method, teacher=teacher, student=student, batch=args.batch, dtype=dtype,
        lower_only=args.dry)))
    if missing:
      record["reference_missing"] = missing
    else:
      try:
        ref = reference_worker(args, case, dtype, device, cpus)
        record["reference_setup"] = ref.reply()
      except WorkerFailed as e:
        record["reference_missing"] = f"reference failed: {e}"
        ref = None
    sides = ([] if args.dry else [("jaxkd", jx)]) + ([("reference", ref)] if ref else [])
    record["rounds"] = run_rounds(args, sides)
    if args.input_seconds and not args.dry:
      record["jaxkd_input"] = jx.ask("input_rate " + json.dumps(
          {"seconds": args.input_seconds, "batch": args.batch}))
  finally:
    for worker in (ref, None if shared else jx):
      if worker is not None:
        worker.close()
  return record


# ------------------------------------------------------------------------------ summaries


def side_summary(rounds, side, batch):
  """Median images/s over every timed step of a side, the round medians, CPU-s and memory."""
  runs = [r[side] for r in rounds if r.get(side) and r[side]["step_s_all"]]
  if not runs:
    return None
  steps = [t for run in runs for t in run["step_s_all"]]
  cpu = [t for run in runs for t in run["step_cpu_s_all"]]
  devices = [run.get("peak_device_memory_mb") for run in runs]
  return {"images_per_s": batch / statistics.median(steps),
          "images_per_s_rounds": [batch / statistics.median(run["step_s_all"]) for run in runs],
          "step_s": statistics.median(steps), "step_cpu_s": statistics.median(cpu),
          "timed_steps": len(steps),
          "peak_host_memory_mb": max(run["peak_host_memory_mb"] for run in runs),
          "peak_device_memory_mb": max(devices) if None not in devices else None}


def summarize(record, peak, shared=False, peak_per_cpu_s=None):
  """The case's figures: each side, the ratio and its per-round range, FLOP/s and workers.
  `peak`, `peak_per_cpu_s`: the matmul peak per wall second and per CPU-second (the second
  holds on a shared machine, where the wall clock is shared too). `shared`: jaxkd's process
  ran other cases too, so its device memory is XLA's analysis of this step rather than the
  process's peak."""
  batch = record["batch_images"]
  jx = side_summary(record["rounds"], "jaxkd", batch)
  ref = side_summary(record["rounds"], "reference", batch)
  if jx and shared:
    jx["peak_device_memory_mb"] = record["jaxkd_setup"]["device_memory_mb"]
  out = {"jaxkd": jx, "reference": ref}
  if jx and ref:
    per_round = [a / b for a, b in zip(jx["images_per_s_rounds"], ref["images_per_s_rounds"])]
    out.update(ratio=jx["images_per_s"] / ref["images_per_s"],
               ratio_rounds=per_round)
  flops = record["jaxkd_setup"]["flops_per_step"]
  if jx and flops:
    out["flops_per_s"] = flops / jx["step_s"]
    if peak:
      out["fraction_of_peak"] = out["flops_per_s"] / peak
    if peak_per_cpu_s:
      out["fraction_of_peak_per_cpu_s"] = flops / jx["step_cpu_s"] / peak_per_cpu_s
  if jx and record.get("jaxkd_input"):
    rate = record["jaxkd_input"]["images_per_cpu_s"]
    out["input_workers"] = math.ceil(jx["images_per_s"] / rate)
  return out


def _spread(values, digits=1):
  return f"{min(values):.{digits}f}–{max(values):.{digits}f}" if len(values) > 1 else ""


def _side_cell(side):
  if side is None:
    return "–"
  spread = _spread(side["images_per_s_rounds"])
  return f"{side['images_per_s']:.1f}" + (f" ({spread})" if spread else "")


def table_row(record):
  """One markdown row of a case."""
  s, setup = record["summary"], record["jaxkd_setup"]
  jx, ref = s["jaxkd"], s["reference"]
  if "ratio" in s:
    spread = _spread(s["ratio_rounds"], 2)
    ratio = f"**{s['ratio']:.2f}×**" + (f" ({spread})" if spread else "")
  else:
    ratio = "no ratio: " + record.get("reference_missing", "nothing timed")
  cpu = " / ".join(f"{x['step_cpu_s']:.2f}" if x else "–" for x in (jx, ref))
  memory = " / ".join(f"{x['peak_host_memory_mb']:.0f}" if x else "–" for x in (jx, ref))
  device = " / ".join(f"{x['peak_device_memory_mb']:.0f}" if x and x["peak_device_memory_mb"]
                      else "–" for x in (jx, ref))
  peak = f"{100 * s['fraction_of_peak']:.0f} %" if "fraction_of_peak" in s else "–"
  if "fraction_of_peak_per_cpu_s" in s:
    peak += f" ({100 * s['fraction_of_peak_per_cpu_s']:.0f} %)"
  tflops = f"{s['flops_per_s'] / 1e12:.3g}" if "flops_per_s" in s else "–"
  loads = [r["load_before"] for r in record["rounds"]] + [r["load_after"] for r in record["rounds"]]
  load = f"{min(loads):.1f}–{max(loads):.1f}" if loads else "–"
  return (f"| {record['method']} | {record['teacher']} → {record['student']} | "
          f"{record['dtype']} | {_side_cell(jx)} | {_side_cell(ref)} | {ratio} | {cpu} | "
          f"{memory} | {device} | {setup['compile_s']:.1f} | "
          f"{setup['flops_per_step'] / 1e9:.0f} | {tflops} | {peak} | "
          f"{s.get('input_workers', '–')} | {load} |")


TABLE_HEAD = (
    "| method | teacher → student | dtype | jaxkd img/s (rounds) | reference img/s (rounds) | "
    "ratio (rounds) | CPU-s/step jaxkd / ref | peak host MB jaxkd / ref | "
    "peak device MB jaxkd / ref | compile s | GFLOP/step | TFLOP/s | of peak (per CPU-s) | "
    "input workers | load |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def markdown(report):
  m = report["machine"]
  peaks = ", ".join(f"{d} {p / 1e12:.2f} TFLOP/s"
                    for d, p in m.get("matmul_peak_flops_per_s", {}).items())
  settings = report["settings"]
  lines = [f"{m.get('device_kind', '')} ({m.get('platform', '')}); {m.get('processor', '')}, "
           f"{settings['threads']} threads per side; jax {m.get('jax', '')}; matmul peak "
           f"{peaks or 'not measured'}; batch {settings['batch']}, {settings['rounds']} rounds "
           f"× ({settings['warmup']} warm-up + {settings['steps']} timed steps) per side", "",
           TABLE_HEAD]
  lines += [table_row(r) for r in report["cases"]]
  lines += [f"| {c[1]} | {c[2]} → {c[3]} | {c[0]} | not measured: --deadline-s |"
            for c in report.get("not_measured", [])]
  return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------- main


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
  parser.add_argument("--methods", default=",".join(METHODS),
                      help=f"comma-separated, of: {','.join(METHODS)}")
  parser.add_argument("--pairs", default=PAIRS, help="comma-separated teacher:student")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--steps", type=int, default=3, help="timed steps per round and side")
  parser.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--threads", type=int, default=0,
                      help="cores per side (0: every core this process may use)")
  parser.add_argument("--dtypes", default="float32", help="float32 and/or bfloat16")
  parser.add_argument("--torch-python", default=os.environ.get("TORCH_PYTHON", ""),
                      help="an interpreter with PyTorch and NumPy (default: $TORCH_PYTHON)")
  parser.add_argument("--code", default=DEFAULT_CODE, help="the fetched reference code")
  parser.add_argument("--input-seconds", type=float, default=2.0,
                      help="CPU-seconds of input timed per case (0: skip)")
  parser.add_argument("--peak-size", type=int, default=4096, help="matmul of the peak")
  parser.add_argument("--out", default="", help="JSON results (rewritten after each case)")
  parser.add_argument("--markdown", default="", help="the table as markdown")
  parser.add_argument("--deadline-s", type=float, default=0,
                      help="start no case after this many seconds (0: none); the rest are "
                      "listed as not measured")
  parser.add_argument("--dry", action="store_true", help="tiny, nothing timed (tests)")
  parser.add_argument("--serve-jaxkd", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
  bad = ([m for m in args.methods if m not in METHODS]
         + [d for d in args.dtypes if d not in ("float32", "bfloat16")])
  if bad:
    parser.error(f"unknown {bad[0]!r}: methods are {', '.join(METHODS)}; dtypes float32, "
                 "bfloat16")
  try:
    args.pairs = [tuple(p.split(":")) for p in args.pairs.split(",") if p.strip()]
    assert all(len(p) == 2 for p in args.pairs)
  except AssertionError:
    parser.error(f"--pairs={args.pairs!r}: write teacher:student[,teacher:student]")
  if args.dry:
    args.batch, args.steps, args.warmup, args.rounds = 4, 0, 1, 1  # 4: any 1, 2, 4 devices
  return args


def write(report, args):
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2)
  if args.markdown:
    os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
    with open(args.markdown, "w", encoding="utf-8") as f:
      f.write(markdown(report))


def compare(args):
  """Every case in every dtype; returns the report."""
  cpus = sorted(os.sched_getaffinity(0))
  cpus = set(cpus[:args.threads] if args.threads else cpus)
  absent_torch = torch_missing(args.torch_python)
  shared = jaxkd_worker(cpus)  # the machine; in --dry and on a GPU, every case too
  machine = shared.ask("machine " + json.dumps(
      {"dtypes": args.dtypes, "peak_size": 0 if args.dry else args.peak_size}))
  device = "cuda" if machine["platform"] == "gpu" else "cpu"
  # One jaxkd process for every case on a GPU (its device memory: XLA's analysis of the step)
  # and in --dry; on a CPU a process per case, for its peak host memory.
  share = args.dry or device == "cuda"
  if not share:
    shared.close()
  report = {"machine": machine, "settings": dict(
      batch=args.batch, steps=args.steps, warmup=args.warmup, rounds=args.rounds,
      threads=len(cpus), dry=args.dry, torch_python=args.torch_python,
      shared_jaxkd_process=share), "cases": []}
  print(f"{machine['device_kind']} ({machine['platform']}), {len(cpus)} threads per side; "
        f"reference: {absent_torch or args.torch_python}", flush=True)
  start = time.perf_counter()
  try:
    for dtype, case in cases(args.methods, args.pairs, args.dtypes, args.dry):
      if args.deadline_s and time.perf_counter() - start > args.deadline_s:
        report["not_measured"] = report.get("not_measured", []) + [[dtype] + list(case)]
        continue
      missing = absent_torch or code_missing(args.code, case[0])
      record = measure_case(args, case, dtype, device, cpus, missing,
                            shared if share else None)
      record["summary"] = summarize(
          record, machine["matmul_peak_flops_per_s"].get(dtype), shared=share,
          peak_per_cpu_s=machine["matmul_peak_flops_per_cpu_s"].get(dtype))
      report["cases"].append(record)
      print(table_row(record), flush=True)
      write(report, args)
  finally:
    if share:
      shared.close()
  report["machine"]["load_average_at_end"] = os.getloadavg()
  write(report, args)
  return report


def main(argv=None):
  args = parse_args(argv)
  if args.serve_jaxkd:
    side = JaxkdSide()
    serve({"machine": side.machine, "prepare": side.prepare, "run": side.run,
           "input_rate": side.input_rate})
    return 0
  report = compare(args)
  compared = all("ratio" in r["summary"] for r in report["cases"])
  if not compared and not args.dry:
    print("not every case has a reference measurement: see the 'no ratio' rows", flush=True)
  return 0 if compared or args.dry else 1


if __name__ == "__main__":
  sys.exit(main())
