"""The SSKD recipes: one per pair of the SSKD README table, one run end to end on mock CIFAR-100."""

import glob
import os

import numpy as np
import pytest
import tensorflow as tf

import helpers

from jaxkd import checkpoint
from jaxkd import models
from jaxkd import train
from jaxkd.data import sources
from jaxkd.methods import sskd

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAIRS = {  # teacher-student: SSKD's number in the SSKD README table
    "wrn_40_2-wrn_16_2": "76.04", "wrn_40_2-wrn_40_1": "76.13", "resnet56-resnet20": "71.49",
    "resnet32x4-resnet8x4": "76.20", "vgg13-vgg8": "75.33", "vgg13-MobileNetV2": "71.53",
    "ResNet50-MobileNetV2": "72.57", "ResNet50-vgg8": "75.76", "resnet32x4-ShuffleV1": "78.44",
    "resnet32x4-ShuffleV2": "78.61", "wrn_40_2-ShuffleV1": "77.40",
}


def _load(name, arg=""):
  """The recipe module and its config, loaded from its path as `--config` does."""
  module = helpers.load_module(os.path.join(REPO, "configs", "sskd", f"{name}.py"),
                               f"sskd_recipe_{name.replace('-', '_')}")
  return module, module.get_config(arg)


def test_one_recipe_per_pair_with_the_reference_schedule():
  files = {os.path.basename(f)[:-3] for f in glob.glob(os.path.join(REPO, "configs/sskd/*.py"))}
  assert files - {"__init__", "common"} == set(PAIRS)
  for name, paper in PAIRS.items():
    module, config = _load(name)
    teacher, student = name.split("-")
    assert (config.teacher.name, config.student.name) == (teacher, student)
    assert f"SSKD {paper}" in module.__doc__
    assert f"python -m jaxkd.main --config configs/sskd/{name}.py --workdir" in module.__doc__
    assert config.optimizer.lr == (0.01 if student in ("MobileNetV2", "ShuffleV1", "ShuffleV2")
                                   else 0.05)
    assert (config.num_epochs, config.batch_size, config.teacher.num_epochs) == (240, 64, 240)
    assert (config.teacher.lr, config.optimizer.weight_decay) == (0.05, 5e-4)
    assert tuple(config.schedule.milestones) == (150, 180, 210) and config.schedule.decay == 0.1
    assert config.method.name == "sskd"
    # Every hyper-parameter is in the config (so the command line can set it), at its default.
    method_fields = {k: v for k, v in config.method.items() if k != "name"}
    assert set(method_fields) == set(sskd.METHOD.defaults)
    for key, value in sskd.METHOD.defaults.items():
      assert np.all(np.asarray(method_fields[key]) == np.asarray(value)), key
    for model in (teacher, student):
      models.get_model(model, 100)  # A pair whose network is missing fails here, by name.


def test_locked_recipe_takes_command_line_hyper_parameters():
  _, config = _load("wrn_40_2-wrn_16_2")
  config.lock()
  config.method.ratio_ss = 0.5
  config.dataset.train_fraction = 0.25
  with pytest.raises(AttributeError):
    config.method.ratio_nope = 1.0
  with pytest.raises(ValueError, match="unknown config argument 'tiny'"):
    _load("wrn_40_2-wrn_16_2", "tiny")


@pytest.fixture(scope="module")
def sskd_run(tmp_path_factory):
  """configs/sskd/resnet32x4-resnet8x4.py:runlocal on mock CIFAR-100: both SSKD stages.

  Shrunk further through config fields only, for time: one epoch of two steps per stage, and
  a teacher file (random weights) in place of stage `teacher`, which test_train covers.
  """
  _, config = _load("resnet32x4-resnet8x4", "runlocal")
  config.dataset.update(num_train_examples=16, num_eval_examples=8)
  config.update(batch_size=8, eval_batch_size=8, num_epochs=1)
  config.teacher.checkpoint = str(tmp_path_factory.mktemp("teacher") / "resnet32x4.msgpack")
  checkpoint.export_variables(config.teacher.checkpoint, helpers.random_variables("resnet32x4"))
  workdir = str(tmp_path_factory.mktemp("sskd"))
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(sources, "data_source", helpers.mock_cifar100)
    results = train.train_and_evaluate(config, workdir)
  return config, workdir, results


def test_recipe_runs_teacher_ss_module_and_student_stages(sskd_run):
  config, workdir, results = sskd_run
  assert [r["stage"] for r in results] == ["teacher", "teacher_sskd", "student_sskd"]
  assert results[0]["method"] == "imported"
  student = results[-1]
  assert student["model"] == "resnet8x4" and student["method"] == "sskd"
  assert 0.0 <= student["top1_last"] <= 100.0
  assert 0.0 <= student["eval_last"]["ss_acc"] <= 100.0
  assert os.path.isfile(os.path.join(workdir, "teacher_sskd", "teacher.msgpack"))
  # The student's teacher is the one with its trained SS module.
  assert student["teacher_sha256"] == results[1]["export_sha256"]
  summaries = {}
  for event_file in glob.glob(os.path.join(workdir, "student_sskd", "events.out*")):
    for event in tf.compat.v1.train.summary_iterator(event_file):
      for value in event.summary.value:
        summaries[value.tag] = value
  for name in ("loss_ce", "loss_kd", "loss_tf", "loss_ss", "top1", "ss_acc", "teacher_ss_acc",
               "kept_tf", "kept_ss"):
    assert f"train/{name}" in summaries, sorted(summaries)
  assert "eval/ss_acc" in summaries
