"""The methods of today's papers end to end: one run of the trainer against one teacher on mock
CIFAR-100, each method a student stage (the plan's checks, the tap checks, the bridges' init on
the teacher's shapes, what the method asks of its teacher, the steps, evaluation, the export);
what each stage logs. KD runs with logit standardization switched on."""

import json
import os

import flax
import ml_collections
import numpy as np
import pytest

import helpers
from jaxkd import train
from jaxkd.data import sources

METHODS = ("reviewkd", "ofd", "dist", "nkd", "ickd", "srd", "ctkd", "ctkd_dkd", "kd", "dot",
           "mlkd")
# Per method: the terms its student stage logs (metrics.jsonl), unweighted (DOT's loss_task and
# loss_distill are the weighted summands its optimiser steps apart; MLKD's are weighted, as its
# reference returns them).
TERMS = {"reviewkd": ("loss_ce", "loss_hcl", "loss_reviewkd"),
         "ofd": ("loss_ce", "loss_ofd"),
         "dist": ("loss_ce", "loss_dist", "loss_dist_inter", "loss_dist_intra"),
         "nkd": ("loss_ce", "loss_nkd", "loss_nkd_target", "loss_nkd_non"),
         "ickd": ("loss_ce", "loss_ickd"),
         "srd": ("loss_ce", "loss_srd", "loss_srd_rep", "loss_srd_logit"),
         "ctkd": ("loss_cls", "loss_div", "ctkd_temperature"),
         "ctkd_dkd": ("loss_cls", "loss_div", "ctkd_temperature"),
         "kd": ("loss_ce", "loss_kd"),
         "dot": ("loss_ce", "loss_kd", "loss_task", "loss_distill"),
         "mlkd": ("loss_ce", "loss_kd", "loss_cc", "loss_bc", "mlkd_kept", "mlkd_class_kept")}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """resnet14 (a teacher file of random weights) → resnet8, one epoch of two steps each."""
  root = tmp_path_factory.mktemp("modern")
  config = helpers.mock_cifar_config(root, "resnet14", "resnet8", METHODS[0],
                                     ",".join(METHODS[1:]))
  config.method_overrides = ml_collections.ConfigDict(dict(kd=dict(logit_standardize=True)))
  workdir = str(root / "run")
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(sources, "data_source", helpers.mock_cifar100)
    results = train.train_and_evaluate(config, workdir)
  return workdir, {r["stage"]: r for r in results}


def _last_logged(stage_dir):
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


def test_each_stage_ran_with_what_its_method_asks(run):
  """KD's stage ran with logit standardization's defaults (T 2, weight 9), as its saved
  effective config says."""
  workdir, _ = run
  with open(os.path.join(workdir, "student_kd", "config.json")) as f:
    effective = json.load(f)["effective"]
  assert (effective["method.logit_standardize"], effective["method.T"],
          effective["method.kd_weight"]) == (True, 2.0, 9.0)


@pytest.mark.parametrize("name", ["reviewkd", "ofd", "ickd", "srd", "ctkd"])
def test_the_bridge_is_left_out_of_the_exported_student(run, name):
  """ReviewKD's fusion modules, OFD's connectors, ICKD's embedding, SRD's projector and CTKD's
  temperature train beside the student; the exported student is the zoo network alone."""
  _, results = run
  with open(results[f"student_{name}"]["export"], "rb") as f:
    exported = flax.serialization.msgpack_restore(f.read())
  assert set(exported["params"]) == {"backbone"}
  assert set(exported["batch_stats"]) == {"backbone"}
