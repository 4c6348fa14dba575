"""A workdir on a bucket: results, exported variables and TensorBoard logs go through etils.epath,
so a URL reaches tf.io.gfile intact, while local paths behave as they always did.

No bucket is reachable here; TensorFlow's in-memory file system (`ram://`) stands in for one. epath
knows only its own schemes (gs://, s3://, ...), so the `ram_bucket` fixture teaches it `ram://`,
served by the tf.io.gfile backend that serves gs:// (TensorFlow being installed). Each test runs
in an empty folder: a URL mangled into a local path (`ram:/...`) would land there.
"""

import hashlib
import json
import os
import uuid

import jax
import numpy as np
import pytest
import tensorflow as tf
from etils.epath import backend, gpath, register

from configs import demo
from jaxkd import checkpoint
from jaxkd import evaluate
from jaxkd import loop
from jaxkd import parallel
from jaxkd import paths
from jaxkd import plan
from jaxkd import results
from jaxkd import stage as stage_lib
from jaxkd import train
from jaxkd.errors import UserError
from jaxkd.methods import get_method


@pytest.fixture
def ram_bucket(monkeypatch, tmp_path):
  """A fresh `ram://<name>` root, readable and writable through epath; the test runs in the
  empty folder returned beside it."""
  monkeypatch.setitem(register._URI_PREFIXES_TO_CLS, "ram://", gpath.PosixGPath)
  monkeypatch.setattr(gpath, "_URI_PREFIXES", gpath._URI_PREFIXES + ("ram://",))
  monkeypatch.setattr(gpath, "_URI_SCHEMES", gpath._URI_SCHEMES | {"ram"})
  monkeypatch.setitem(gpath._URI_MAP_ROOT, "ram://", "/ram/")
  monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "ram", backend.tf_backend)
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  # The in-memory file system lives as long as the process: a new root per test.
  root = f"ram://{uuid.uuid4().hex}"
  yield root, cwd
  if tf.io.gfile.exists(root):
    tf.io.gfile.rmtree(root)


def _variables(offset: float) -> dict:
  return {"params": {"dense": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3) + offset}},
          "batch_stats": {"bn": {"mean": np.full(3, offset, np.float32)}}}


def test_variables_file_round_trip_on_a_url(ram_bucket):
  root, cwd = ram_bucket
  folder = f"{root}/run/teacher"
  tf.io.gfile.makedirs(folder)
  path = f"{folder}/teacher.msgpack"
  for offset in (0.0, 1.0):  # The second export replaces the first.
    sha = checkpoint.export_variables(path, _variables(offset))
    with tf.io.gfile.GFile(path, "rb") as f:
      assert hashlib.sha256(f.read()).hexdigest() == sha == checkpoint.file_sha256(path)
    loaded = checkpoint.import_variables(path, _variables(0.0))
    jax.tree.map(np.testing.assert_array_equal, loaded, _variables(offset))
  # The temporary file was renamed over the export, not left beside it.
  assert tf.io.gfile.listdir(folder) == ["teacher.msgpack"]
  with pytest.raises(UserError, match=f"'{root}/run/nope.msgpack' does not exist"):
    checkpoint.import_variables(f"{root}/run/nope.msgpack", _variables(0.0))
  assert not os.listdir(cwd)


def _stage(config, num_epochs: int = 1) -> stage_lib.Stage:
  ce = get_method("ce")
  return stage_lib.Stage(name="teacher", config=config, model_name="resnet8", method=ce,
                         hparams=ce.hparams(), num_epochs=num_epochs, base_lr=0.1)


def _finished_result(stage: stage_lib.Stage, dataset: str) -> dict:
  """What run_stage records for a finished `stage` (its description and some scores)."""
  return {"model": stage.model_name, "method": stage.method.name,
          "num_epochs": stage.num_epochs, "dataset": dataset, "teacher_sha256": None,
          "backbone_sha256": None, "stage": stage.name, "top1_last": 12.5, "top5_last": 50.0,
          "top1_best": 25.0}


def test_stage_result_round_trip_on_a_url(ram_bucket):
  root, cwd = ram_bucket
  workdir = f"{root}/run"
  train.check_workdir(workdir)
  assert not tf.io.gfile.listdir(workdir)  # The write probe is gone.
  config = demo.get_config("runlocal")
  stage = _stage(config)
  result = dict(_finished_result(stage, config.dataset.name), logdir=f"{workdir}/teacher",
                checkpoints=f"{workdir}/teacher/checkpoints")
  tf.io.gfile.makedirs(f"{workdir}/teacher")
  results.write_result(f"{workdir}/teacher", result)
  assert tf.io.gfile.listdir(f"{workdir}/teacher") == ["result.json"]
  # A finished stage is read back instead of trained again (no mesh or data needed).
  assert loop.run_stage(stage, loop.Inputs(), workdir, mesh=None, info=None) == result
  with pytest.raises(UserError, match="already holds a finished stage with num_epochs=1"):
    loop.run_stage(_stage(config, num_epochs=2), loop.Inputs(), workdir, mesh=None, info=None)
  assert not os.listdir(cwd)


def test_unwritable_url_workdir_gives_one_clear_error(ram_bucket, monkeypatch):
  root, _ = ram_bucket

  def forbidden(*args, **kwargs):
    raise tf.errors.PermissionDeniedError(None, None, "403 no storage.objects.create access")

  monkeypatch.setattr(tf.io.gfile, "GFile", forbidden)
  with pytest.raises(UserError, match=f"workdir '{root}/run' is not writable "
                                      r"\(403 no storage.objects.create access\)"):
    train.check_workdir(f"{root}/run")


def test_local_paths_are_resolved_and_written_as_before(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  cwd = os.getcwd()
  assert paths.absolute(os.path.join("teachers", "t.msgpack")) == os.path.join(
      cwd, "teachers", "t.msgpack")
  assert paths.absolute("gs://bucket/teachers/t.msgpack") == "gs://bucket/teachers/t.msgpack"
  # A relative workdir: checkpoints under its absolute path, result.json where it says.
  mngr = checkpoint.manager(os.path.join("run", "teacher", "checkpoints"), 1, 1)
  assert str(mngr.directory) == os.path.join(cwd, "run", "teacher", "checkpoints")
  mngr.close()
  train.check_workdir("run")
  result = _finished_result(_stage(demo.get_config("runlocal")), "digits")
  results.write_result(os.path.join("run", "teacher"), result)
  with open(os.path.join(cwd, "run", "teacher", "result.json")) as f:
    assert f.read() == json.dumps(result, indent=2)
  assert sorted(os.listdir(os.path.join(cwd, "run", "teacher"))) == ["checkpoints", "result.json"]


def test_a_run_into_a_url_workdir(ram_bucket, tmp_path, monkeypatch):
  """Every file of a run but the orbax checkpoints goes to the URL, and a second run reads the
  finished stage back from there. The checkpoints are redirected to a local folder: tensorstore,
  which writes their arrays, knows gs:// but not TensorFlow's ram://."""
  root, cwd = ram_bucket
  workdir = f"{root}/run"
  local = tmp_path / "checkpoints"
  make_manager = checkpoint.manager
  monkeypatch.setattr(checkpoint, "manager", lambda directory, *args: make_manager(
      str(local / directory.removeprefix(workdir + "/")), *args))
  # One stage, a student trained alone (CE) and exported as the run's main student.
  config = demo.get_config("runlocal")
  config.method.name, config.baselines, config.num_epochs = "ce", "", 1
  config.dataset.data_dir = str(tmp_path / "tfds")
  records = train.train_and_evaluate(config, workdir)
  assert [r["stage"] for r in records] == ["student_ce"]
  stage_dir = f"{workdir}/student_ce"
  files = tf.io.gfile.listdir(stage_dir)
  assert "result.json" in files and any(f.startswith("events.out.tfevents") for f in files)
  with tf.io.gfile.GFile(f"{stage_dir}/result.json") as f:
    recorded = json.load(f)  # Its paths are relative to the workdir.
  assert recorded["export"] == "student_ce/student.msgpack"
  assert results.resolve_paths(recorded, workdir) == records[0]
  assert records[0]["logdir"] == stage_dir
  assert records[0]["export"] == f"{stage_dir}/student.msgpack"
  assert records[0]["export_sha256"] == checkpoint.file_sha256(records[0]["export"])
  assert os.listdir(local) == ["student_ce"]
  assert not os.listdir(cwd)
  # `jaxkd.evaluate` finds the stage's config beside the export on the URL.
  assert evaluate.saved_stage_config(records[0]["export"])["effective"]["model"] == "resnet8"
  # The second run's plan sees the finished stage there, and the run reads it back.
  second = plan.make_plan(config, workdir, parallel.create_mesh(), cache=False)
  assert second.states == {"student_ce": plan.DONE}
  assert train.train_and_evaluate(config, workdir) == records
