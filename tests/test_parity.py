"""Step-for-step parity of the trainer's step with the reference trainers (experiments/parity.py).

tests/data/trajectory_{sskd,hsakd}.npz: 12 SGD steps of SSKD's `student.py` and HSAKD's
`train_student_cifar.py` (resnet20 -> resnet8, 8 images x 4 rotations, lr 1e-3 then 1e-4,
weight decay 0.02), with every loss term of every step and the final student. jaxkd's own
jitted train step, from the same weights on the same batches, must give the same losses (rtol
1e-4), the same kept rows for SSKD (exactly), and the same final weights and BatchNorm
statistics (params and running means atol 1e-4, running variances rtol 2e-4): experiments/
parity.py's `TOLERANCES`, at least 3x the spread of the reference's own float32 reruns.
"""

import dataclasses
import os
import pathlib
import subprocess
import sys

import pytest

import helpers

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
parity = helpers.load_module(ROOT / "experiments" / "parity.py", "parity")

FILES = {"sskd": DATA / "trajectory_sskd.npz", "hsakd": DATA / "trajectory_hsakd.npz"}
TERMS = {"sskd": ["ce", "kd", "tf", "ss", "total"],
         "hsakd": ["cls", "div_aux1", "div_aux2", "div_aux3", "div_final", "div", "total"]}


@pytest.fixture(scope="module", params=sorted(FILES))
def report(request):
  return parity.run_parity(str(FILES[request.param]))


def test_trajectory_is_read_in_jaxkd_terms():
  traj = parity.load_trajectory(str(FILES["hsakd"]))
  assert (traj.spec.name, traj.teacher_model, traj.student_model) == ("hsakd", "resnet20",
                                                                       "resnet8")
  assert (traj.num_steps, traj.num_images, traj.num_classes) == (12, 8, 10)
  assert traj.hparams.T == 3.0 and traj.nesterov and traj.weight_decay == 0.02
  batch = parity.batch_of_step(traj, 0)
  assert batch["image"].shape == (8, 4, 32, 32, 3) and batch["label"].shape == (8,)
  traj = parity.load_trajectory(str(FILES["sskd"]))
  assert traj.hparams.ss_T == 0.5 and not traj.nesterov
  assert parity.batch_of_step(traj, 0)["image"].shape == (8, 4, 32, 32, 3)


def test_every_step_matches_the_reference(report):
  assert [s.step for s in report.steps] == list(range(12))
  assert report.labels == TERMS[report.method]
  assert "reproduces the stored lr" in report.schedule_note
  rtol = parity.TOLERANCES["loss_rtol"]
  for step in report.steps:
    for label, (got, want, rel) in step.terms.items():
      assert rel <= rtol, (report.method, step.step, label, got, want)
    assert abs(step.lr_jaxkd - step.lr_reference) <= 1e-6 * step.lr_reference
    if report.method == "sskd":  # kept rows and ranks of both selective terms, exactly
      assert step.discrete == {"tf_rank": 0, "ss_rank": 0, "tf_keep": 0, "ss_keep": 0}


def test_final_weights_and_batchnorm_statistics_match_the_reference(report):
  final = {f.kind: f for f in report.final}
  assert final["params"].value <= parity.TOLERANCES["param_atol"]
  assert final["running_mean"].value <= parity.TOLERANCES["mean_atol"]
  assert final["running_var"].value <= parity.TOLERANCES["var_rtol"]
  # The steps moved every kind far more than the tolerance: the comparison can see them.
  assert all(f.moved > 10 * parity.TOLERANCES[f.tolerance_key] for f in report.final)
  assert report.passed and not report.failures()


def test_divergence_beyond_a_tolerance_is_reported(report):
  tight = dataclasses.replace(report, tolerances={k: 1e-9 for k in report.tolerances})
  failures = tight.failures()
  assert failures and not tight.passed
  assert any(f.startswith("loss ") for f in failures)
  assert any(f.startswith("final params") for f in failures)


def test_bad_input_is_one_error_line_and_status_2(tmp_path, capsys):
  assert parity.main([str(tmp_path / "missing.npz")]) == 2
  bad = tmp_path / "bad.npz"
  bad.write_text("not an npz")
  assert parity.main([str(bad)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == [f"error: no such file: {tmp_path / 'missing.npz'}",
                 f"error: {bad} is not an .npz file"]


def test_command_line_prints_every_step_and_passes():
  proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "parity.py"),
                         str(FILES["sskd"])], env=dict(os.environ, JAX_PLATFORMS="cpu"),
                        capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  steps = [l for l in lines if l.startswith("step ")]
  assert len(steps) == 12
  assert all(f"| {t} " in steps[0] for t in TERMS["sskd"])
  assert all("tf_rank/ss_rank/tf_keep/ss_keep equal" in l for l in steps)
  assert any(l.startswith("final running_var: max rel divergence") for l in lines)
  assert lines[-1].startswith("PASS: sskd resnet20 -> resnet8, 12 steps within tolerance")
