"""HSAKD end to end on mock CIFAR-100: both teachers ("Teacher" on a frozen backbone, "Teacher*"
trained jointly) and their students, through `jaxkd.train.train_and_evaluate`, with a recipe
shrunk to tiny networks and one step per stage.
"""

import glob
import os

import flax
import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import helpers

from jaxkd import checkpoint
from jaxkd import networks
from jaxkd import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(arg):
  """configs/hsakd/resnet56-resnet20.py with `arg`, shrunk: resnet8 pair, one epoch per stage."""
  module = helpers.load_module(os.path.join(REPO, "configs", "hsakd", "resnet56-resnet20.py"),
                               "hsakd_recipe_e2e")
  config = module.get_config(arg)
  config.teacher.name = config.student.name = "resnet8"
  # One step of 8 images (32 rotated rows) per stage. Also keeps the (asynchronous) checkpoint
  # saves apart from the data reads, which mock_data redirects to a temporary file system.
  config.dataset.num_train_examples = 8
  config.dataset.num_eval_examples = 8
  config.eval_batch_size = 8
  config.teacher.num_epochs = config.num_epochs = 1
  config.method.teacher_epochs = config.method.joint_teacher_epochs = 1
  config.log_every_steps = 1
  return config


def _run(tmp_path_factory, arg, teacher_checkpoint=""):
  config = _config(arg)
  config.dataset.data_dir = str(tmp_path_factory.mktemp("tfds"))
  config.teacher.checkpoint = teacher_checkpoint
  workdir = str(tmp_path_factory.mktemp(arg.replace(",", "_")))
  with tfds.testing.mock_data(num_examples=8):
    results = train.train_and_evaluate(config, workdir)
  return workdir, results


def _pretrained_teacher(path):
  """A resnet8 teacher file with random weights, as `jaxkd.import_teacher` writes one."""
  network = networks.build_network("resnet8", 100)
  shapes = jax.eval_shape(network.init, jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
  rng = np.random.RandomState(0)

  def fill(key_path, leaf):
    name = key_path[-1].key
    if name in ("var", "scale"):
      return (1 + 0.1 * rng.rand(*leaf.shape)).astype(np.float32)
    return (0.1 * rng.randn(*leaf.shape)).astype(np.float32)

  checkpoint.export_variables(path, jax.tree_util.tree_map_with_path(fill, shapes))
  return path


@pytest.fixture(scope="module")
def frozen_run(tmp_path_factory):
  """"Teacher": classifiers trained on a pretrained (imported) teacher, then the student."""
  teacher = _pretrained_teacher(str(tmp_path_factory.mktemp("teacher") / "resnet8.msgpack"))
  return _run(tmp_path_factory, "runlocal", teacher_checkpoint=teacher)


@pytest.fixture(scope="module")
def joint_run(tmp_path_factory):
  return _run(tmp_path_factory, "star,runlocal")


def _variables(path):
  with open(path, "rb") as f:
    return flax.serialization.msgpack_restore(f.read())


def _summaries(stage_dir):
  tags = set()
  for event_file in glob.glob(os.path.join(stage_dir, "events.out*")):
    for event in tf.compat.v1.train.summary_iterator(event_file):
      tags.update(value.tag for value in event.summary.value)
  return tags


AUX_METRICS = [f"aux{l}_{kind}_acc" for l in (1, 2, 3) for kind in ("joint", "class")]


def _check_student(workdir, student, teacher):
  assert student["model"] == "resnet8"
  assert 0.0 <= student["top1_last"] <= 100.0
  for name in AUX_METRICS:
    assert 0.0 <= student["eval_last"][name] <= 100.0, name
  # The student learns from the teacher with trained classifiers.
  assert student["teacher_sha256"] == teacher["export_sha256"]
  tags = _summaries(os.path.join(workdir, student["stage"]))
  for name in ["loss", "loss_cls", "loss_div", "loss_div_final", "top1"] + [
      f"loss_div_aux{l}" for l in (1, 2, 3)] + AUX_METRICS:
    assert f"train/{name}" in tags, (name, sorted(tags))
  for name in ["top1"] + AUX_METRICS:
    assert f"eval/{name}" in tags, (name, sorted(tags))


def test_frozen_teacher_learns_only_its_classifiers(frozen_run):
  workdir, results = frozen_run
  assert [r["stage"] for r in results] == ["teacher", "teacher_hsakd", "student_hsakd"]
  plain, prepared, student = results
  assert plain["method"] == "imported"
  before, after = _variables(plain["checkpoint"]), _variables(prepared["export"])
  assert set(after["params"]) == {"backbone", "heads"}
  # The backbone, its BN statistics included, is exactly the pretrained teacher's ...
  for col in ("params", "batch_stats"):
    for a, b in zip(jax.tree_util.tree_leaves(before[col]["backbone"]),
                    jax.tree_util.tree_leaves(after[col]["backbone"])):
      np.testing.assert_array_equal(a, b)
  # ... so its accuracy is the pretrained teacher's ("Teacher" in the paper's tables).
  assert prepared["top1_last"] == pytest.approx(plain["top1_last"], abs=1e-6)
  assert np.asarray(after["params"]["heads"]["fc1"]["kernel"]).shape == (64, 400)
  # The classifiers ran in training mode (their BN statistics moved from their initial 0).
  assert np.any(after["batch_stats"]["heads"]["block_extractor3_0_0"]["bn1"]["mean"])
  for name in AUX_METRICS:
    assert 0.0 <= prepared["eval_last"][name] <= 100.0
  tags = _summaries(os.path.join(workdir, "teacher_hsakd"))
  assert {"train/loss_cls", "train/loss_ce_aux1", "train/aux3_joint_acc"} <= tags
  _check_student(workdir, student, prepared)


def test_joint_teacher_is_trained_from_scratch(joint_run):
  workdir, results = joint_run
  assert [r["stage"] for r in results] == ["teacher_hsakd_star", "student_hsakd_star"]
  prepared, student = results
  assert prepared["method"] == "hsakd_star"
  variables = _variables(prepared["export"])
  assert set(variables["params"]) == {"backbone", "heads"}
  # The backbone trained too, in training mode (BN statistics moved from their initial 0).
  assert np.any(variables["batch_stats"]["backbone"]["bn1"]["mean"])
  _check_student(workdir, student, prepared)
