"""The plan: every recipe and table config gives one; `--plan` prints it and writes nothing; the
order and sources of the stages; the workdir's state of each stage."""

import glob
import os
import shutil

import jax
import pytest

import helpers

from experiments import tables
from jaxkd import checkpoint
from jaxkd import main
from jaxkd import plan
from jaxkd.data import sources
from jaxkd.errors import UserError
from jaxkd.stage import ImportStage

MESH = jax.sharding.Mesh(jax.devices()[:1], ("data",))
RECIPES = sorted(p for p in glob.glob(str(helpers.REPO / "configs" / "**" / "*.py"),
                                      recursive=True)
                 if os.path.basename(p) not in ("__init__.py", "common.py"))


@pytest.fixture
def no_data(monkeypatch):
  """The plan opens no split: the recipes' datasets are not prepared here."""
  monkeypatch.setattr(sources, "data_source", lambda *args, **kwargs: None)


def _planned(config, tmp_path):
  """The plan of `config` with its split sizes given in the config (no data is read: see
  `no_data`; a batch of training examples at least), and a stand-in file for a CLIP tower's
  weights."""
  config.dataset.update(num_train_examples=max(64, config.batch_size), num_eval_examples=32)
  if config.teacher.name.startswith("clip"):
    config.teacher.checkpoint = str(tmp_path)
  return plan.make_plan(config, None, MESH, cache=False)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: os.path.relpath(p, helpers.REPO))
def test_every_recipe_has_a_plan(path, tmp_path, no_data):
  config = helpers.load_module(path, "recipe").get_config()
  made = _planned(config, tmp_path)
  names = [s.name for s in made.stages]
  assert names[-1].startswith("student_") or names[-1] == "linear_probe"
  assert len(set(names)) == len(names)
  assert all(made.states[n] in ("to run", "import") for n in names)
  table = plan.describe(made)
  assert all(f"\n{n} " in table for n in names)


@pytest.mark.parametrize("name", [n for n in tables.TABLE_NAMES if n != "digits"])
def test_every_table_run_has_a_plan(name, tmp_path, no_data):
  table = tables.get_table(name)
  pair = table.pairs[0]
  every = table.run_methods(table.rows)
  kept = [m for m in every if m not in tables.refused(table, pair, every)]
  made = _planned(tables.run_config(table, pair, kept), tmp_path)
  assert [s.name for s in made.stages if s.name.startswith("student_") and
          not s.name.endswith("_init")] == [f"student_{m}" for m in kept]
  # A row with a run of its own reads the seed's teacher file (here random variables, which
  # the plan reads against the teacher's network).
  for row in table.own_run_rows(table.rows):
    config = tables.run_config(table, pair, [row.method], row=row)
    config.teacher.checkpoint = str(tmp_path / "teacher.msgpack")
    checkpoint.export_variables(config.teacher.checkpoint,
                                helpers.random_variables(config.teacher.name))
    made = _planned(config, tmp_path)
    names = [s.name for s in made.stages]
    assert names[0] == "teacher" and names[-1] == f"student_{row.method}"
    assert made.states["teacher"] == "import"


def test_stages_in_order_with_their_teachers_and_starts(tmp_path):
  """The demo: the plain teacher once, before the first stage that reads it; each prepared
  teacher starts from it; every student exports its network."""
  config = helpers.load_module(helpers.REPO / "configs" / "demo.py", "demo").get_config(
      "runlocal")
  config.baselines = "sskd,ce,hsakd_star"
  stages = plan.stage_list(config, 10)
  assert [s.name for s in stages] == ["teacher", "student_kd", "teacher_sskd", "student_sskd",
                                      "student_ce", "teacher_hsakd_star",
                                      "student_hsakd_star"]
  by_name = {s.name: s for s in stages}
  assert by_name["student_kd"].teacher.stage == "teacher"
  assert by_name["teacher_sskd"].init_from.stage == "teacher"
  assert by_name["student_sskd"].teacher.stage == "teacher_sskd"
  assert by_name["student_ce"].teacher is None
  # HSAKD* trains its teacher jointly from scratch: it starts from nothing.
  assert by_name["teacher_hsakd_star"].init_from is None
  assert all(s.export_file == "student.msgpack" for s in stages if s.name.startswith("student"))
  config.teacher.checkpoint = "/somewhere/t.msgpack"
  first = plan.stage_list(config, 10)[0]
  assert isinstance(first, ImportStage) and first.source.path == "/somewhere/t.msgpack"


def test_plan_flag_prints_the_stages_and_writes_nothing(tmp_path, capsys):
  workdir = tmp_path / "run"
  status = main.run(["jaxkd.main", "--config", "configs/demo.py:runlocal", "--workdir",
                     str(workdir), "--plan", f"--config.dataset.data_dir={tmp_path / 'tfds'}"])
  out = capsys.readouterr().out
  assert status == 0
  lines = out.splitlines()
  header = next(i for i, line in enumerate(lines) if line.startswith("stage "))
  assert lines[header].split() == ["stage", "model", "method", "epochs", "steps",
                                   "images/step", "lr", "teacher", "starts", "from", "state"]
  rows = {line.split()[0]: line for line in lines[header + 2:]}
  assert list(rows) == ["teacher", "student_kd", "teacher_sskd", "student_sskd",
                        "teacher_hsakd", "student_hsakd", "student_ce"]
  # 64 examples at batch 8: 8 steps an epoch; SSKD's rotations make 4 images of each.
  assert rows["student_sskd"].split()[3:6] == ["2", "16", "32"]
  assert all(line.rstrip().endswith("to run") for line in rows.values())
  assert not workdir.exists()


def test_a_bad_field_is_refused_by_the_plan():
  config = helpers.load_module(helpers.REPO / "configs" / "demo.py", "demo").get_config(
      "runlocal")
  config.keep_checkpoints = 0
  with pytest.raises(UserError, match="keep_checkpoints is 0; it must be an integer >= 1"):
    plan.make_plan(config, None, MESH, cache=False)
