"""Faults a long run meets: preemption signals, divergence (a non-finite final state too), a
second run on the workdir, an unwritable stage directory or checkpoints/, a full disk, a changed
config on resume, a damaged or missing config.json or result.json.

Each checks the exit status (or the exception that `jaxkd.main` turns into it), the one line
that says what happened, and that nothing already written is lost or changed. Damaged
checkpoints and exported files are in test_corruption.py, bad config values and special files
in test_bad_inputs.py.
"""

import json
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import helpers

from configs import demo
from jaxkd import checkpoint
from jaxkd import divergence
from jaxkd import interrupts
from jaxkd import loop
from jaxkd import paths
from jaxkd import plan
from jaxkd import results
from jaxkd import stage_config
from jaxkd import train
from jaxkd import workdir_lock
from jaxkd.data import pipeline
from jaxkd.errors import Diverged, UserError

REPO = str(helpers.REPO)
ENV = helpers.device_env(4)


def tiny_config(data_dir, **overrides):
  """The demo at runlocal size with a resnet8 teacher and the KD student only (16 steps each)."""
  config = demo.get_config("runlocal")
  config.baselines = ""
  config.teacher.name = "resnet8"
  config.checkpoint_every_steps = 4
  config.dataset.data_dir = data_dir
  return helpers.set_fields(config, overrides)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted run: (its config, workdir, results)."""
  data_dir = str(tmp_path_factory.getbasetemp() / "tfds")
  workdir = str(tmp_path_factory.mktemp("reference"))
  config = tiny_config(data_dir)
  return config, workdir, train.train_and_evaluate(config, workdir)


def student_config(reference, **overrides):
  """The reference's KD student alone, from the reference's exported teacher."""
  config, workdir, _ = reference
  return tiny_config(config.dataset.data_dir, **{
      "teacher.checkpoint": os.path.join(workdir, "teacher", "teacher.msgpack"), **overrides})


def snapshot(directory):
  """{relative path: (size, mtime)} of every file under `directory`."""
  found = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      found[os.path.relpath(path, directory)] = (os.path.getsize(path), os.path.getmtime(path))
  return found


def signal_at(monkeypatch, stage_name, step, signum):
  """Sends `signum` to this process while `stage_name` runs its `step`-th step."""
  add = divergence.Unchecked.add

  def add_and_signal(self, at, metrics):
    if self.stage_name == stage_name and at == step:
      os.kill(os.getpid(), signum)
    add(self, at, metrics)
  monkeypatch.setattr(divergence.Unchecked, "add", add_and_signal)


# ---------------------------------------------------------------------------- preemption


def test_sigterm_saves_then_resumes_to_the_uninterrupted_result(reference, tmp_path,
                                                                 monkeypatch, capsys):
  workdir = str(tmp_path / "w")
  before = signal.getsignal(signal.SIGTERM)
  signal_at(monkeypatch, "student_kd", 6, signal.SIGTERM)
  with pytest.raises(interrupts.Interrupted) as stopped:
    train.train_and_evaluate(student_config(reference), workdir)
  message = str(stopped.value)
  assert stopped.value.exit_status == 143 and "\n" not in message
  assert message.startswith("[student_kd] SIGTERM at step 6/16: checkpoint written to ")
  assert signal.getsignal(signal.SIGTERM) == before  # Handlers are given back.
  ckpt_dir = os.path.join(workdir, "student_kd", "checkpoints")
  assert "6" in os.listdir(ckpt_dir)
  assert not os.path.exists(os.path.join(workdir, "student_kd", "result.json"))
  # The stopped run's wall time, in the checkpoint's record: made long, so that the finished
  # record shows it was carried over.
  record_file = os.path.join(ckpt_dir, "6", "record", "metadata")
  with open(record_file) as f:
    record = json.load(f)
  assert 0 < record["wall_seconds"] < 600
  with open(record_file, "w") as f:
    json.dump(dict(record, wall_seconds=1000.0), f)

  monkeypatch.undo()
  capsys.readouterr()
  started = time.monotonic()
  results = train.train_and_evaluate(student_config(reference), workdir)
  resumed = time.monotonic() - started
  assert "[student_kd] resuming from step 6" in capsys.readouterr().out
  got, want = results[-1], reference[2][-1]
  assert got["stage"] == want["stage"] == "student_kd"
  assert got["top1_last"] == want["top1_last"]
  assert got["export_sha256"] == want["export_sha256"]  # The same variables, bit for bit.
  # The stage's wall time: the stopped run's and the resumed one's.
  assert 1000.0 < got["wall_seconds"] <= 1000.0 + resumed


def test_sigint_on_the_command_line_is_one_line_and_status_130(reference, tmp_path):
  """Ctrl-C of a real run: the checkpoint of the step in flight, one line, exit 130."""
  workdir = str(tmp_path / "w")
  teacher = os.path.join(reference[1], "teacher", "teacher.msgpack")
  cmd = [sys.executable, "-m", "jaxkd.main", "--config", "configs/demo.py:runlocal",
         "--workdir", workdir, f"--config.dataset.data_dir={reference[0].dataset.data_dir}",
         "--config.teacher.name=resnet8", f"--config.teacher.checkpoint={teacher}",
         "--config.baselines=", "--config.num_epochs=400"]
  proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  metrics_file = os.path.join(workdir, "student_kd", "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None and not (
      os.path.exists(metrics_file) and os.path.getsize(metrics_file)):
    time.sleep(0.2)
  assert proc.poll() is None, proc.communicate()
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, err[-2000:]
  assert "Traceback" not in err
  errors = [line for line in err.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "SIGINT at step" in errors[0], err[-2000:]
  assert "run the same command again to resume" in errors[0]
  step = int(errors[0].split("at step ")[1].split("/")[0])
  assert str(step) in os.listdir(os.path.join(workdir, "student_kd", "checkpoints"))


def _caught(pid):
  """The signals among SIGINT and SIGTERM that process `pid` has a handler for (/proc)."""
  try:
    with open(f"/proc/{pid}/status") as f:
      mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
  except (OSError, StopIteration):
    return set()
  return {s for s in (signal.SIGINT, signal.SIGTERM) if mask >> (s - 1) & 1}


def test_a_signal_at_any_moment_of_start_up_is_one_line(reference, tmp_path):
  """SIGINT or SIGTERM while a command starts (flags, imports, the plan): exit status 130 or 143
  and one line, never a traceback, never exit 0. The command is started with SIGINT ignored, as
  a shell starts a background job: it takes the signal anyway, first of all (/proc shows it
  caught, which Python alone would not), and the moments count from there."""
  teacher = os.path.join(reference[1], "teacher", "teacher.msgpack")
  for n, (signum, delay) in enumerate([(signal.SIGINT, 0.0), (signal.SIGTERM, 1.0),
                                       (signal.SIGINT, 3.0)]):
    workdir = str(tmp_path / f"w{n}")
    # `trap "" INT`: SIGINT ignored from the start, as in a background job.
    cmd = ["sh", "-c", 'trap "" INT; exec "$0" "$@"', sys.executable, "-m", "jaxkd.main",
           "--config", "configs/demo.py:runlocal", "--workdir", workdir,
           f"--config.dataset.data_dir={reference[0].dataset.data_dir}",
           "--config.teacher.name=resnet8", f"--config.teacher.checkpoint={teacher}",
           "--config.baselines="]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while proc.poll() is None and time.time() < deadline and len(_caught(proc.pid)) < 2:
      time.sleep(0.005)
    time.sleep(delay)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    name = signal.Signals(signum).name
    lines = [line for line in err.splitlines() if not re.match(r"[IWEF]\d{4} ", line)]
    assert proc.returncode == 128 + signum, (name, delay, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: ") and name in lines[0], err[-2000:]
    if lines[0].endswith("before training started; nothing was written"):
      assert not os.path.exists(workdir)


def test_a_second_signal_while_stopping_ends_at_once_naming_what_is_on_disk(tmp_path):
  """The first signal is a flag; a second one while the stop writes its checkpoint ends the
  process at once, its line naming the newest complete checkpoint (the one half-written is
  not)."""
  ckpts = tmp_path / "checkpoints"
  for name in ("4", "8", "12.orbax-checkpoint-tmp-1765000000"):
    (ckpts / name).mkdir(parents=True)
  script = textwrap.dedent(f"""
      import os, signal, time
      from jaxkd import checkpoint, interrupts
      interrupts.install()
      directory = {str(ckpts)!r}
      kept = lambda: checkpoint.stays(checkpoint.saved_steps(directory), directory)
      with interrupts.catch_signals(), interrupts.training_stage("student_kd", kept):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)
        print("flag", interrupts.pending_signal(), flush=True)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(30)
      print("not ended", flush=True)
      """)
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                        text=True, timeout=120)
  assert (proc.returncode, proc.stdout) == (130, "flag 15\n"), proc.stderr[-2000:]
  assert proc.stderr == (
      "error: interrupted (SIGINT) again while stopping: ended at once; in stage student_kd: "
      f"the newest complete checkpoint (step 8) stays in {ckpts}; run the same command again "
      "to go on\n")


def test_a_signal_as_the_run_ends_is_not_exit_status_0(capsys):
  """A signal after the stages (while the closing table is printed): 128 + the signal and a
  line; a run that failed keeps its own status."""
  with interrupts.catch_signals():
    os.kill(os.getpid(), signal.SIGTERM)
  assert interrupts.exit_status(0) == 143
  assert capsys.readouterr().err == ("error: interrupted (SIGTERM) as the run ended: every "
                                     "stage had finished and written its result\n")
  with interrupts.catch_signals():
    os.kill(os.getpid(), signal.SIGINT)
  assert interrupts.exit_status(3) == 3
  assert not capsys.readouterr().err


# ---------------------------------------------------------------------------- divergence


def test_divergence_stops_before_anything_nan_is_saved(reference, tmp_path):
  workdir = str(tmp_path / "w")
  config = tiny_config(reference[0].dataset.data_dir, **{"optimizer.lr": 1e5})
  with pytest.raises(Diverged) as stopped:
    train.train_and_evaluate(config, workdir)
  message = str(stopped.value)
  assert stopped.value.exit_status == 3 and "\n" not in message
  assert message.startswith("[teacher] diverged at step ")
  assert "nan" in message and "--config.optimizer.lr" in message
  stage_dir = os.path.join(workdir, "teacher")
  assert not os.path.exists(os.path.join(stage_dir, "teacher.msgpack"))
  assert not os.path.exists(os.path.join(stage_dir, "result.json"))
  assert_names_a_complete_checkpoint(message, os.path.join(stage_dir, "checkpoints"))
  mngr = checkpoint.manager(os.path.join(stage_dir, "checkpoints"), 1, 2)
  for step in mngr.all_steps():  # Whatever was checkpointed is finite.
    state = mngr.restore(step)["state"]
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state["params"]))


def assert_names_a_complete_checkpoint(message, ckpt_dir):
  """The divergence line names the newest checkpoint on disk, complete (the one being written
  was waited for: no half-written one is left), or says there is none."""
  on_disk = os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []
  assert all(name.isdigit() for name in on_disk), on_disk
  named = re.search(r"the last good checkpoint \(step (\d+)\) stays in ", message)
  if on_disk:
    assert named and named.group(1) == str(max(map(int, on_disk))), (message, on_disk)
  else:
    assert not named and "no checkpoint was written" in message


def test_divergence_ends_with_its_line_alone(reference, tmp_path):
  """Runs that diverge, as commands: at once, with a learning rate of 1e39 (inf in float32)
  with the input workers and the prefetch on, and with a weight decay of 1e30; a KD student
  with a learning rate of 1e8, a few steps after its checkpoint of step 1. Whatever is in
  flight (the prefetched batches, the input workers, the checkpoint being written) is shut down
  before the process exits: stderr is the divergence line alone, the checkpoint it names is
  complete on disk, and nothing non-finite is kept."""
  runs = {}
  teacher = os.path.join(reference[1], "teacher", "teacher.msgpack")
  for name, args in (("lr", ["--config.optimizer.lr=1e39", "--config.input_workers=1"]),
                     ("weight_decay", ["--config.optimizer.weight_decay=1e30"]),
                     ("student", ["--config.optimizer.lr=1e8",
                                  f"--config.teacher.checkpoint={teacher}"])):
    workdir = str(tmp_path / name)
    cmd = [sys.executable, "-m", "jaxkd.main", "--config", "configs/demo.py:runlocal",
           "--workdir", workdir, f"--config.dataset.data_dir={reference[0].dataset.data_dir}",
           "--config.teacher.name=resnet8", "--config.baselines=", *args]
    runs[name] = (workdir, subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, text=True))
  lines = {}
  for name, (workdir, proc) in runs.items():
    _, err = proc.communicate(timeout=300)
    lines[name] = err
    assert proc.returncode == 3, err[-3000:]
    assert len(err.splitlines()) == 1, err[-3000:]
    stage = "student_kd" if name == "student" else "teacher"
    assert err.startswith(f"error: [{stage}] diverged at step "), err
    stage_dir = os.path.join(workdir, stage)
    assert not {"teacher.msgpack", "result.json"} & set(os.listdir(stage_dir))
    assert_names_a_complete_checkpoint(err, os.path.join(stage_dir, "checkpoints"))
    mngr = checkpoint.manager(os.path.join(stage_dir, "checkpoints"), 1, 2)
    for step in mngr.all_steps():
      state = mngr.restore(step)["state"]
      assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state["params"]))
  # The update of step 1 overflowed: caught before its state was checkpointed.
  assert lines["lr"].startswith("error: [teacher] diverged at step 1: its update made the "
                                "variables non-finite (")
  assert "(lr inf); no checkpoint was written" in lines["lr"]


@pytest.mark.parametrize("where,signum,workers,stop", [
    ("compile_steps", signal.SIGINT, 0, "before step 1/16 (no checkpoint of it is complete in "),
    ("prefetch_to_mesh", signal.SIGTERM, 1, "at step 1/16: checkpoint written to ")],
    ids=["compile_steps", "prefetch_to_mesh"])
def test_a_signal_before_the_first_step_stops_in_one_line(reference, tmp_path, monkeypatch,
                                                          where, signum, workers, stop):
  """A signal while the stage's steps are set up stops it before step 1, nothing of it
  checkpointed; one while the first batches are sent ahead (input workers on) lands in step 1,
  which runs (its compile included) and is checkpointed. One line each; no worker is left."""
  workdir = str(tmp_path / "w")
  module = loop if where == "compile_steps" else loop.parallel
  original = getattr(module, where)

  def signal_then(*args, **kwargs):
    os.kill(os.getpid(), signum)
    return original(*args, **kwargs)
  monkeypatch.setattr(module, where, signal_then)
  with pytest.raises(interrupts.Interrupted) as stopped:
    train.train_and_evaluate(student_config(reference, input_workers=workers), workdir)
  message = str(stopped.value)
  assert stopped.value.exit_status == 128 + signum and "\n" not in message
  assert message.startswith(f"[student_kd] {signal.Signals(signum).name} {stop}"), message
  ckpt_dir = os.path.join(workdir, "student_kd", "checkpoints")
  written = os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []
  assert written == ([] if where == "compile_steps" else ["1"])
  assert not multiprocessing.active_children()


def test_an_error_in_an_input_worker_is_one_line(reference, tmp_path, monkeypatch):
  """A batch that cannot be made in an input worker (a damaged image file) stops the stage in
  one line naming the step; the workers are stopped, the checkpoint before it is kept."""
  workdir = str(tmp_path / "w")
  make = pipeline.train_batch_fn
  monkeypatch.setattr(pipeline, "train_batch_fn",
                      lambda *args, **kwargs: helpers.FailingBatch(make(*args, **kwargs), 6))
  with pytest.raises(UserError) as stopped:
    train.train_and_evaluate(student_config(reference, input_workers=1), workdir)
  message = str(stopped.value)
  assert stopped.value.exit_status == 2 and "\n" not in message
  assert message.startswith("[student_kd] the input pipeline failed making the batch of step 7: "
                            "OSError: image file of batch 6 is damaged; the last checkpoint "
                            "stays")
  assert "4" in os.listdir(os.path.join(workdir, "student_kd", "checkpoints"))
  assert not os.path.exists(os.path.join(workdir, "student_kd", "result.json"))
  assert not multiprocessing.active_children()


def _poison_final_checkpoint(stage_dir):
  """The stage's newest checkpoint rewritten with a NaN parameter, as a version that did not
  check the state before checkpointing it could leave it (no digest: restored unchecked)."""
  directory = os.path.join(stage_dir, "checkpoints")
  mngr = checkpoint.manager(directory, 1, 2)
  step = mngr.latest_step()
  restored = mngr.restore(step)
  state, record = restored["state"], dict(restored["record"])
  del record[checkpoint.DIGEST_KEY]
  first = jax.tree_util.tree_leaves_with_path(state["params"])[0][0]
  state["params"] = jax.tree_util.tree_map_with_path(
      lambda path, x: np.full_like(x, np.nan) if path == first else x, state["params"])
  mngr.close()
  shutil.rmtree(os.path.join(directory, str(step)))
  mngr = checkpoint.manager(directory, 1, 2)
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          record=ocp.args.JsonSave(record)), force=True)
  mngr.wait_until_finished()
  return step


def test_a_final_state_that_is_not_finite_is_never_exported(reference, tmp_path):
  """The teacher resumed from a final checkpoint that holds a NaN: stopped with one line
  before its export and result are written, so no later stage reads it."""
  workdir = str(tmp_path / "w")
  shutil.copytree(reference[1], workdir)
  shutil.rmtree(os.path.join(workdir, "student_kd"))
  stage_dir = os.path.join(workdir, "teacher")
  for name in ("result.json", "teacher.msgpack"):
    os.remove(os.path.join(stage_dir, name))
  step = _poison_final_checkpoint(stage_dir)
  with pytest.raises(Diverged) as stopped:
    train.train_and_evaluate(tiny_config(reference[0].dataset.data_dir), workdir)
  message = str(stopped.value)
  assert stopped.value.exit_status == 3 and "\n" not in message
  assert message.startswith(f"[teacher] the variables of its last step {step} are not finite "
                            "(['params']['backbone']")
  assert f"nothing was exported; they come from the checkpoint {stage_dir}/checkpoints/{step}" \
      in message
  assert not {"teacher.msgpack", "result.json"} & set(os.listdir(stage_dir))
  assert not os.path.exists(os.path.join(workdir, "student_kd"))
  with pytest.raises(Diverged, match="is not finite|are not finite"):  # The function alone.
    divergence.check_final("s", {"params": {"w": np.array([1.0, np.inf], np.float32)}}, 3, "d")
  divergence.check_final("s", {"params": {"w": np.ones(2, np.float32)}}, 3, "d")


# ------------------------------------------------------------------------------ workdirs


def test_second_run_on_a_workdir_is_refused(reference, tmp_path):
  workdir = str(tmp_path / "w")
  os.makedirs(workdir)
  with workdir_lock.hold(workdir):
    with pytest.raises(UserError, match=f"workdir '{workdir}' is in use by another run "
                                        rf"\(pid {os.getpid()} on "):
      train.train_and_evaluate(student_config(reference), workdir)
  assert os.listdir(workdir) == [".lock"]


def test_a_killed_run_leaves_no_stuck_lock(tmp_path):
  workdir = str(tmp_path / "w")
  os.makedirs(workdir)
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from jaxkd import workdir_lock\n"
       f"with workdir_lock.hold({workdir!r}):\n print('held', flush=True); time.sleep(600)"],
      cwd=REPO, stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == "held"
  with pytest.raises(UserError, match="in use by another run"):
    with workdir_lock.hold(workdir):
      pass
  holder.kill()
  holder.wait()
  with workdir_lock.hold(workdir):  # Free again.
    pass


def test_unwritable_stage_directory_is_reported_before_training(reference, tmp_path):
  workdir = str(tmp_path / "w")
  os.makedirs(workdir)
  with open(os.path.join(workdir, "student_kd"), "w") as f:  # Where the stage directory goes.
    f.write("in the way")
  with pytest.raises(UserError, match=f"stage directory '{workdir}/student_kd' is not "
                                      "writable .*; make it writable, or pass another"):
    train.train_and_evaluate(student_config(reference), workdir)
  assert open(os.path.join(workdir, "student_kd")).read() == "in the way"


def test_every_folder_a_stage_writes_is_probed_by_the_plan(reference, tmp_path):
  """An unwritable checkpoints/ (a file in its way; orbax would retry for minutes), or a
  folder where an export goes, is one line from the plan; nothing is created or left."""
  workdir = tmp_path / "w"
  (workdir / "teacher").mkdir(parents=True)
  (workdir / "teacher" / "checkpoints").write_text("in the way")
  before = snapshot(workdir)
  config = tiny_config(reference[0].dataset.data_dir)
  with pytest.raises(UserError) as refused:
    train.train_and_evaluate(config, str(workdir))
  assert str(refused.value) == (
      f"checkpoint folder '{workdir}/teacher/checkpoints' is not writable ({workdir}/teacher/"
      "checkpoints is a file, not a folder); make it writable, or pass another --workdir")
  assert snapshot(workdir) == before and sorted(os.listdir(workdir)) == ["teacher"]
  os.remove(workdir / "teacher" / "checkpoints")
  (workdir / "teacher" / "teacher.msgpack").mkdir()
  with pytest.raises(UserError, match=f"^{workdir}/teacher/teacher.msgpack is a directory, "
                                      "where stage teacher writes its teacher.msgpack; remove"):
    train.train_and_evaluate(config, str(workdir))
  # The probe itself: a folder that does not exist yet is probed where it would be made,
  # and a folder that cannot be made (under /sys, even for root) is refused.
  paths.check_writable_ahead(str(tmp_path / "new" / "a" / "checkpoints"), "folder", "fix")
  assert not os.path.exists(tmp_path / "new") and sorted(os.listdir(tmp_path)) == ["w"]
  with pytest.raises(UserError, match="^checkpoint folder '/sys/jaxkd/checkpoints' is not "
                                      r"writable \(.+\); fix$"):
    paths.check_writable_ahead("/sys/jaxkd/checkpoints", "checkpoint folder", "fix")


def test_full_disk_is_one_line_and_keeps_what_was_finished(reference, tmp_path, monkeypatch):
  """A disk that fills up during the student stage: it stops before writing a checkpoint
  that could not be completed; the finished teacher stage is untouched."""
  workdir = str(tmp_path / "w")
  shutil.copytree(reference[1], workdir)
  shutil.rmtree(os.path.join(workdir, "student_kd"))
  before = snapshot(os.path.join(workdir, "teacher"))
  usage = shutil.disk_usage(workdir)
  monkeypatch.setattr(paths.shutil, "disk_usage", lambda _: usage._replace(free=4096))
  with pytest.raises(UserError) as stopped:
    train.train_and_evaluate(tiny_config(reference[0].dataset.data_dir), workdir)
  message = str(stopped.value)
  assert "\n" not in message
  assert message.startswith(f"not enough free space in '{workdir}/student_kd': 0.0 MiB free, ")
  assert message.endswith("free some and run the same command again to resume from step 0")
  assert snapshot(os.path.join(workdir, "teacher")) == before


# ------------------------------------------------------------------------ changed config


def test_resuming_with_another_config_is_refused_naming_the_fields(reference, tmp_path, capsys):
  workdir = str(tmp_path / "w")
  shutil.copytree(reference[1], workdir)
  os.remove(os.path.join(workdir, "student_kd", "result.json"))  # Started, not finished.
  before = snapshot(workdir)
  config = tiny_config(reference[0].dataset.data_dir,
                       **{"batch_size": 16, "method.T": 2.0, "log_every_steps": 7})
  with pytest.raises(UserError) as refused:
    train.train_and_evaluate(config, workdir)
  message = str(refused.value)
  assert "\n" not in message
  # The teacher's own values did not change except the batch; the student's T did too.
  assert message.startswith(f"{workdir}/teacher was trained with another config "
                            "(batch_size 8 -> 16)")
  assert snapshot(workdir) == dict(before, **{".lock": snapshot(workdir)[".lock"]})
  config.batch_size = 8
  with pytest.raises(UserError, match="student_kd was trained with another config "
                                      r"\(method.T 4.0 -> 2.0\)"):
    train.train_and_evaluate(config, workdir)
  # With the flag, the stage goes on (here: from its last step) under the new values, and its
  # config.json keeps the old ones.
  config.allow_changed_config = True
  train.train_and_evaluate(config, workdir)
  saved = json.loads(open(os.path.join(workdir, "student_kd", "config.json")).read())
  assert saved["effective"]["method.T"] == 2.0
  assert saved["history"][-1]["method.T"] == 4.0


@pytest.mark.parametrize("content,why", [
    ('{"effective": {"model": "res', "Unterminated string"), ("{}", "no 'effective' fields"),
    ("null", "no 'effective' fields"), (None, "it is a directory"), ("fifo", "it is a FIFO"),
    ("missing", "is missing, so the work in")])
def test_a_damaged_or_missing_stage_config_is_one_line(tmp_path, content, why):
  """config.json beside a stage's work: read for what it is, never opened as a FIFO."""
  config = tiny_config(str(tmp_path / "tfds"))
  stage = plan.stage_list(config, 10)[0]
  stage_dir = tmp_path / "teacher"
  stage_dir.mkdir()
  path = stage_dir / "config.json"
  if content is None:
    path.mkdir()
  elif content == "fifo":
    os.mkfifo(path)
  elif content != "missing":
    path.write_text(content)
  with pytest.raises(UserError) as refused:
    stage_config.check(stage, str(stage_dir))
  message = str(refused.value)
  assert "\n" not in message and message.startswith(f"{path} ")
  assert why in message, message
  assert message.endswith("or --config.allow_changed_config=True to go on with this run's "
                          "values (the file is then written anew)")
  config.allow_changed_config = True
  stage_config.check(stage, str(stage_dir))  # Let through; the run rewrites it.


@pytest.mark.parametrize("content,why", [
    ("null", "not a JSON object with stage and logdir and top1_last"),
    ("[1]", "not a JSON object with stage"), ('{"stage": "teacher", "top1_', "Unterminated"),
    (None, "it is a directory"), ("fifo", "it is a FIFO")])
def test_a_damaged_result_record_is_one_line(tmp_path, content, why):
  path = tmp_path / "teacher" / "result.json"
  path.parent.mkdir()
  if content is None:
    path.mkdir()
  elif content == "fifo":
    os.mkfifo(path)
  else:
    path.write_text(content)
  with pytest.raises(UserError) as refused:
    results.read_result(str(tmp_path), "teacher")
  assert str(refused.value).startswith(f"{path} is not a result record (")
  assert why in str(refused.value)
  assert str(refused.value).endswith("); remove it and rerun (stage teacher is finished again "
                                     "from its last checkpoint)")


def test_a_failed_resume_with_allow_changed_config_keeps_the_saved_config(reference, tmp_path):
  """config.json is rewritten only once the stage has work under the new values: a resume that
  fails first (here: no checkpoint can be restored) leaves it, and the original command gets
  the same answer as before, not a changed-config refusal."""
  workdir = str(tmp_path / "w")
  shutil.copytree(reference[1], workdir)
  stage_dir = os.path.join(workdir, "student_kd")
  os.remove(os.path.join(stage_dir, "result.json"))
  for step in os.listdir(os.path.join(stage_dir, "checkpoints")):
    with open(os.path.join(stage_dir, "checkpoints", step, "record", "metadata"), "w") as f:
      f.write('{"step": ')
  with open(os.path.join(stage_dir, "config.json"), "rb") as f:
    saved = f.read()
  config = tiny_config(reference[0].dataset.data_dir,
                       **{"method.T": 2.0, "allow_changed_config": True})
  for run_config in (config, tiny_config(reference[0].dataset.data_dir)):
    with pytest.raises(UserError, match=f"^no checkpoint in {stage_dir}/checkpoints can be "
                                        "restored"):
      train.train_and_evaluate(run_config, workdir)
    with open(os.path.join(stage_dir, "config.json"), "rb") as f:
      assert f.read() == saved


def test_teacher_keep_best_on_a_finished_teacher_is_refused_as_a_changed_field(reference):
  """keep=best would hand on another epoch than the finished teacher's last: refused like any
  other changed field of a stage, naming it (a teacher saved without the field kept 'last')."""
  config, workdir, _ = reference
  with open(os.path.join(workdir, "teacher", "config.json")) as f:
    assert "teacher.keep" not in json.load(f)["effective"]
  mesh = jax.sharding.Mesh(jax.devices(), ("data",))
  assert plan.make_plan(config, workdir, mesh).states["teacher"] == "done"
  best = tiny_config(config.dataset.data_dir, **{"teacher.keep": "best"})
  with pytest.raises(UserError, match=f"^{workdir}/teacher was trained with another config "
                                      r"\(teacher.keep \(absent\) -> 'best'\); use a new "
                                      "--workdir"):
    plan.make_plan(best, workdir, mesh)
