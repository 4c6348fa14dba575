"""DIST, NKD, ICKD and SRD end to end: one run of the trainer against one teacher on mock
CIFAR-100, each method a student stage (the config checks, the tap checks, the bridges' init on
the teacher's shapes, the steps, evaluation); what each stage logs."""

import os

import flax
import numpy as np
import pytest

import helpers
from jaxkd import train
from jaxkd.data import sources

METHODS = ("dist", "nkd", "ickd", "srd")
# Per method: the terms its student stage logs (metrics.jsonl), unweighted.
TERMS = {"dist": ("loss_ce", "loss_dist", "loss_dist_inter", "loss_dist_intra"),
         "nkd": ("loss_ce", "loss_nkd", "loss_nkd_target", "loss_nkd_non"),
         "ickd": ("loss_ce", "loss_ickd"),
         "srd": ("loss_ce", "loss_srd", "loss_srd_rep", "loss_srd_logit")}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """resnet14 (a teacher file of random weights) → resnet8, one epoch of two steps each."""
  root = tmp_path_factory.mktemp("modern")
  config = helpers.mock_cifar_config(root, "resnet14", "resnet8", METHODS[0],
                                     ",".join(METHODS[1:]))
  workdir = str(root / "run")
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(sources, "data_source", helpers.mock_cifar100)
    results = train.train_and_evaluate(config, workdir)
  return workdir, {r["stage"]: r for r in results}


def _last_logged(stage_dir):
  import json  # pylint: disable=g-import-not-at-top
  with open(os.path.join(stage_dir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f if line.strip()]
  return [r for r in records if "train/loss" in r][-1]


def test_every_method_trains_a_student_stage(run):
  workdir, results = run
  assert sorted(results) == sorted(["teacher"] + [f"student_{m}" for m in METHODS])
  for name in METHODS:
    result = results[f"student_{name}"]
    assert result["method"] == name and result["steps"] == 2
    logged = _last_logged(os.path.join(workdir, f"student_{name}"))
    for term in TERMS[name] + ("loss", "grad_norm"):
      assert np.isfinite(logged[f"train/{term}"]), (name, term)


@pytest.mark.parametrize("name", ["ickd", "srd"])
def test_the_bridge_is_left_out_of_the_exported_student(run, name):
  """ICKD's embedding and SRD's projector train beside the student; the exported student is
  the zoo network alone."""
  _, results = run
  with open(results[f"student_{name}"]["export"], "rb") as f:
    exported = flax.serialization.msgpack_restore(f.read())
  assert set(exported["params"]) == {"backbone"}
  assert set(exported["batch_stats"]) == {"backbone"}
