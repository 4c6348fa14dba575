"""What is read back is verified, and a workdir can be moved or copied.

Checkpoints carry the sha256 of their arrays: a damaged newest one is reported in one line and
the older one is used. An exported variables file (teacher.msgpack, ...) must have the sha256 its
stage recorded. result.json holds paths relative to the workdir, so a copy reads its own files.
One small digits run (teacher → KD student) is trained once and copied by each test.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import demo
from jaxkd import checkpoint
from jaxkd import results
from jaxkd import train
from jaxkd.errors import UserError
from jaxkd.results import RESULT_FILE

# One epoch of 64 examples, batch 8, per stage; checkpoints every 4 steps, the last 2 kept.
TOTAL_STEPS, OLDER_STEP = 8, 4


def _config(data_dir: str):
  """configs/demo.py:runlocal with one epoch per stage, a resnet8 teacher and no baselines."""
  config = demo.get_config("runlocal")
  config.teacher.name = "resnet8"
  config.teacher.num_epochs = config.num_epochs = 1
  config.baselines = ""
  config.schedule.milestones = ()
  config.checkpoint_every_steps = 4
  config.keep_checkpoints = 2
  config.dataset.data_dir = data_dir
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(config, workdir, results) of an uninterrupted run; tests copy the workdir."""
  config = _config(str(tmp_path_factory.getbasetemp() / "tfds"))
  workdir = str(tmp_path_factory.mktemp("trained") / "run")
  results = train.train_and_evaluate(config, workdir)
  assert [r["stage"] for r in results] == ["teacher", "student_kd"]
  return config, workdir, results


def _copy(workdir, tmp_path, name="copy"):
  target = str(tmp_path / name)
  shutil.copytree(workdir, target)
  return target


def _final_params(workdir, stage="student_kd"):
  mngr = checkpoint.manager(os.path.join(workdir, stage, "checkpoints"), 1, 2)
  assert mngr.latest_step() == TOTAL_STEPS
  return mngr.restore(TOTAL_STEPS)["state"]["params"]


def _assert_same_params(workdir, reference):
  for a, b in zip(jax.tree.leaves(_final_params(workdir)),
                  jax.tree.leaves(_final_params(reference))):
    np.testing.assert_array_equal(a, b)


def _interrupt(workdir, stage="student_kd"):
  """The stage as a run killed after its next-to-last checkpoint leaves it."""
  os.remove(os.path.join(workdir, stage, RESULT_FILE))
  shutil.rmtree(os.path.join(workdir, stage, "checkpoints", str(TOTAL_STEPS)))


def _files(workdir):
  """{path: (size, mtime)} of every file of the stages (the run's lock file aside)."""
  found = {}
  for root, _, names in os.walk(workdir):
    for name in names:
      path = os.path.join(root, name)
      if root != workdir:
        found[os.path.relpath(path, workdir)] = (os.path.getsize(path),
                                                 os.stat(path).st_mtime_ns)
  return found


def _flip_bytes(path, offset):
  with open(path, "r+b") as f:
    f.seek(offset)
    data = f.read(16)
    f.seek(offset)
    f.write(bytes(b ^ 0xFF for b in data))


# ---------------------------------------------------------------------------- checkpoints


def test_damaged_newest_checkpoint_is_reported_and_the_older_one_reaches_the_same_params(
    trained, tmp_path, capfd):
  config, reference, _ = trained
  workdir = _copy(reference, tmp_path)
  os.remove(os.path.join(workdir, "student_kd", RESULT_FILE))
  directory = os.path.join(workdir, "student_kd", "checkpoints")
  # Bytes in the middle of the largest array file: orbax alone restores them without a word.
  state_files = [os.path.join(root, name)
                 for root, _, names in os.walk(os.path.join(directory, str(TOTAL_STEPS), "state"))
                 for name in names]
  biggest = max(state_files, key=os.path.getsize)
  _flip_bytes(biggest, os.path.getsize(biggest) // 2)
  capfd.readouterr()
  results = train.train_and_evaluate(config, workdir)
  out, err = capfd.readouterr()
  assert [line for line in err.splitlines() if line.strip()] == [
      f"warning: checkpoint {directory}/{TOTAL_STEPS} is damaged (its arrays do not match the "
      f"sha256 saved with them); resuming from step {OLDER_STEP} (the damaged one is kept in "
      f"{directory}.damaged/{TOTAL_STEPS})"]
  assert f"[student_kd] resuming from step {OLDER_STEP}" in out
  assert os.listdir(directory + ".damaged") == [str(TOTAL_STEPS)]
  assert results[1]["stage"] == "student_kd"
  _assert_same_params(workdir, reference)


def _small_state(seed):
  rng = np.random.RandomState(seed)
  return {"w": jnp.asarray(rng.normal(size=(64, 64)).astype(np.float32)),
          "step": jnp.asarray(seed, jnp.int32)}


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      state)


def _two_checkpoints(directory):
  mngr = checkpoint.manager(directory, 1, 2)
  for step in (1, 2):
    checkpoint.save(mngr, step, _small_state(step), {"step": step})
  mngr.wait_until_finished()
  return mngr


def _remove_arrays(step_dir):
  shutil.rmtree(os.path.join(step_dir, "state", "ocdbt.process_0"))


def _remove_manifest(step_dir):
  os.remove(os.path.join(step_dir, "state", "manifest.ocdbt"))


def _garble_record(step_dir):
  with open(os.path.join(step_dir, "record", "metadata"), "w") as f:
    f.write('{"step": ')


def _damage_btree(step_dir):
  """A b-tree node of the array store (compressed: reading it fails in tensorstore)."""
  nodes = os.path.join(step_dir, "state", "d")
  _flip_bytes(os.path.join(nodes, sorted(os.listdir(nodes))[0]), 20)


def _empty_step(step_dir):
  shutil.rmtree(step_dir)
  os.mkdir(step_dir)


# A failed orbax restore leaves its other reads unawaited; Python reports them when collected.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage,why", [
    (_remove_arrays, "Exception: Encountered error while reading array index"),
    (_remove_manifest, 'state/" does not exist'),
    (_garble_record, "JSONDecodeError: Expecting value"),
    (_damage_btree, "Error decoding b-tree node: ZSTD_decompressStream() failed"),
    (_empty_step, """KeyError: 'Item "record" was not found in the checkpoint"""),
])
def test_each_kind_of_damage_falls_back_to_the_older_checkpoint(tmp_path, capfd, damage, why):
  directory = str(tmp_path / "checkpoints")
  _two_checkpoints(directory).close()
  damage(os.path.join(directory, "2"))
  capfd.readouterr()
  mngr = checkpoint.manager(directory, 1, 2)
  state, record = checkpoint.restore_latest(mngr, _abstract(_small_state(1)))
  lines = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
  assert len(lines) == 1 and why in lines[0], lines
  assert lines[0].startswith(f"warning: checkpoint {directory}/2 is damaged (")
  assert lines[0].endswith(f"; resuming from step 1 (the damaged one is kept in "
                           f"{directory}.damaged/2)")
  assert record == {"step": 1}  # The digest is checked and not handed on.
  np.testing.assert_array_equal(state["w"], _small_state(1)["w"])
  # Step 2 can be written again, and is then the newest intact one.
  assert mngr.all_steps() == [1]
  checkpoint.save(mngr, 2, _small_state(2), {"step": 2})
  mngr.wait_until_finished()
  assert checkpoint.restore_latest(mngr, _abstract(_small_state(1)))[1] == {"step": 2}


def test_no_intact_checkpoint_is_refused_and_nothing_is_moved(tmp_path):
  directory = str(tmp_path / "checkpoints")
  _two_checkpoints(directory).close()
  _garble_record(os.path.join(directory, "2"))
  _remove_manifest(os.path.join(directory, "1"))
  mngr = checkpoint.manager(directory, 1, 2)
  with pytest.raises(UserError, match=rf"no checkpoint in {directory} can be restored \(step 2: "
                                      r"JSONDecodeError.*; step 1: ValueError.*\); "
                                      rf"remove {directory} to train the stage from step 0"):
    checkpoint.restore_latest(mngr, _abstract(_small_state(1)))
  assert sorted(os.listdir(directory)) == ["1", "2"]
  assert not os.path.exists(directory + ".damaged")


def test_checkpoint_without_a_digest_is_restored_unchecked(tmp_path):
  """A checkpoint written before digests were saved (no `state_sha256` in its record)."""
  mngr = checkpoint.manager(str(tmp_path / "checkpoints"), 1, 2)
  mngr.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(_small_state(3)),
                                       record=ocp.args.JsonSave({"step": 3})))
  mngr.wait_until_finished()
  state, record = checkpoint.restore_latest(mngr, _abstract(_small_state(1)))
  assert record == {"step": 3} and int(state["step"]) == 3


def test_digest_covers_every_array_byte_and_its_place():
  state = _small_state(1)
  digest = checkpoint.state_digest(state)
  assert digest == checkpoint.state_digest(jax.tree.map(np.asarray, state))
  changed = dict(state, w=state["w"].at[63, 63].add(1e-7))
  assert checkpoint.state_digest(changed) != digest
  # The same bytes under another name, or with another shape, are another state.
  assert checkpoint.state_digest({"v": state["w"], "step": state["step"]}) != digest
  assert checkpoint.state_digest(dict(state, w=state["w"].reshape(32, 128))) != digest


# --------------------------------------------------------------------------- exported files


def _refused_damaged_export(trained, tmp_path, stage: str, file: str, index: int) -> tuple:
  """A copy of the trained workdir with `stage`'s export damaged: the run is refused naming it
  and the fix, and changes nothing. Returns (config, workdir, export file, result file)."""
  config, reference, results = trained
  workdir = _copy(reference, tmp_path)
  export = os.path.join(workdir, stage, file)
  _flip_bytes(export, os.path.getsize(export) // 2)
  before = _files(workdir)
  with pytest.raises(UserError) as refused:
    train.train_and_evaluate(config, workdir)
  result_file = os.path.join(workdir, stage, "result.json")
  assert str(refused.value) == (
      f"stage {stage}'s export {export!r} is damaged: its sha256 differs from the one "
      f"recorded when it was written ({results[index]['export_sha256'][:12]}...); remove "
      f"{result_file} and rerun (stage {stage} is finished again from its last checkpoint)")
  assert _files(workdir) == before
  return config, workdir, export, result_file


def test_damaged_teacher_file_is_refused_naming_the_stage_and_nothing_is_written(
    trained, tmp_path, capsys):
  config, workdir, teacher_file, result_file = _refused_damaged_export(
      trained, tmp_path, "teacher", "teacher.msgpack", 0)
  # The remedy it names: the teacher is exported again from its final checkpoint, as it was.
  os.remove(result_file)
  capsys.readouterr()
  again = train.train_and_evaluate(config, workdir)
  assert "[student_kd] already done" in capsys.readouterr().out
  expected = trained[2][0]["export_sha256"]
  assert again[0]["export_sha256"] == expected
  assert checkpoint.file_sha256(teacher_file) == expected


def test_damaged_final_student_file_is_not_already_done(trained, tmp_path, capsys):
  """A finished stage's export that no later stage reads (the student's) is verified when the
  stage is reused, as a teacher's is when it is read."""
  _refused_damaged_export(trained, tmp_path, "student_kd", "student.msgpack", 1)
  assert "[student_kd] already done" not in capsys.readouterr().out


# ----------------------------------------------------------------------- moved and copied


def test_result_paths_are_relative_to_the_workdir(trained):
  _, workdir, records = trained
  with open(os.path.join(workdir, "student_kd", RESULT_FILE)) as f:
    recorded = json.load(f)
  assert {k: recorded[k] for k in results.PATH_FIELDS} == {
      "checkpoints": "student_kd/checkpoints", "logdir": "student_kd",
      "export": "student_kd/student.msgpack", "teacher_path": "teacher/teacher.msgpack"}
  # What the run returns holds the paths as it reaches them.
  assert records[1]["export"] == os.path.join(workdir, "student_kd", "student.msgpack")
  assert records[1]["teacher_path"] == records[0]["export"]


@pytest.mark.parametrize("recorded,workdir,expected", [
    ("student_kd/student.msgpack", "/new", "/new/student_kd/student.msgpack"),
    ("/teachers/t.msgpack", "/new", "/teachers/t.msgpack"),  # --config.teacher.checkpoint
    ("gs://b/teachers/t.msgpack", "gs://b/new", "gs://b/teachers/t.msgpack"),
    ("student_kd/student.msgpack", "gs://b/new", "gs://b/new/student_kd/student.msgpack"),
])
def test_recorded_paths_resolve_in_the_current_workdir(recorded, workdir, expected):
  result = {"stage": "student_kd", "logdir": "student_kd", "export": recorded}
  assert results.resolve_paths(result, workdir)["export"] == expected
  assert results.resolve_paths(result, workdir)["checkpoints"] == f"{workdir}/student_kd/checkpoints"


@pytest.mark.parametrize("old_workdir", ["/old/run", "runs/old", "./run", "gs://b/old"])
def test_older_records_resolve_their_workdir_paths_in_the_current_one(old_workdir):
  """Records written with the paths of their own workdir, absolute or as it was given."""
  result = {"stage": "student_kd", "logdir": f"{old_workdir}/student_kd",
            "export": f"{old_workdir}/student_kd/student.msgpack",
            "teacher_path": "/teachers/t.msgpack"}
  resolved = results.resolve_paths(result, "/new")
  assert resolved["export"] == "/new/student_kd/student.msgpack"
  assert resolved["teacher_path"] == "/teachers/t.msgpack"
  assert resolved["logdir"] == "/new/student_kd"


def _as_older_version_wrote_it(workdir, original):
  """Rewrites each result.json with absolute paths into `original`, as records were written
  before paths were relative to the workdir."""
  for stage in ("teacher", "student_kd"):
    path = os.path.join(workdir, stage, RESULT_FILE)
    with open(path) as f:
      result = json.load(f)
    for key in results.PATH_FIELDS:
      if key in result:
        result[key] = os.path.join(original, result[key])
    with open(path, "w") as f:
      json.dump(result, f)


@pytest.mark.parametrize("older_records", [False, True])
def test_copied_workdir_reads_its_own_files_with_the_original_removed(
    trained, tmp_path, capsys, older_records):
  """A copy is reused as it is; the original is gone, so any path into it would fail."""
  config, reference, results = trained
  original = _copy(reference, tmp_path, "original")
  if older_records:
    _as_older_version_wrote_it(original, original)
  workdir = _copy(original, tmp_path, "copy")
  shutil.rmtree(original)
  capsys.readouterr()
  again = train.train_and_evaluate(config, workdir)
  assert capsys.readouterr().out.count("already done") == 2
  assert again[1]["export"] == os.path.join(workdir, "student_kd", "student.msgpack")
  assert again[1]["teacher_path"] == os.path.join(workdir, "teacher", "teacher.msgpack")
  assert [r["top1_last"] for r in again] == [r["top1_last"] for r in results]
  if older_records:
    return
  # Interrupted, then moved: the copy resumes where it is now and ends where the
  # uninterrupted run did.
  _interrupt(workdir)
  moved = str(tmp_path / "moved")
  os.rename(workdir, moved)
  train.train_and_evaluate(config, moved)
  out = capsys.readouterr().out
  assert "[teacher] already done" in out
  assert f"[student_kd] resuming from step {OLDER_STEP}" in out
  _assert_same_params(moved, reference)
