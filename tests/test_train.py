"""The engine: KD loss, device-count equivalence, the demo end to end, resume, bad input."""

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import helpers

from configs import demo
from jaxkd import checkpoint
from jaxkd import data
from jaxkd import networks
from jaxkd import metrics_log
from jaxkd import parallel
from jaxkd import plan
from jaxkd import steps
from jaxkd import teachers
from jaxkd import train
from jaxkd.errors import UserError
from jaxkd.methods import get_method
from jaxkd.methods.losses import distill_kl
from jaxkd.optim import learning_rate_schedule, make_optimizer
from jaxkd.state import TrainState

DATA = os.path.join(os.path.dirname(__file__), "data")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------- the KD loss


def test_distill_kl_matches_reference_golden():
  """The reference DistillKL on the original rows of the SSKD golden batch (kd_T = 4)."""
  g = np.load(os.path.join(DATA, "golden_sskd.npz"))
  originals = np.arange(g["s_logits"].shape[0]) % 4 == 0
  s, t = g["s_logits"][originals], g["t_logits"][originals]
  np.testing.assert_allclose(distill_kl(s, t, float(g["hp_kd_T"])), g["loss_kd_f64"], rtol=1e-5)
  np.testing.assert_allclose(distill_kl(s, t, float(g["alt_hp_kd_T"])), g["alt_loss_kd_f64"],
                             rtol=1e-5)


def test_distill_kl_by_hand_and_its_gradient():
  s = np.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], np.float32)
  t = np.array([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]], np.float32)
  temp = 2.0

  def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

  p_t, p_s = softmax(t / temp), softmax(s / temp)
  expected = temp ** 2 * np.mean(np.sum(p_t * (np.log(p_t) - np.log(p_s)), -1))
  np.testing.assert_allclose(distill_kl(s, t, temp), expected, rtol=1e-6)
  # d/ds of T²/R Σ KL = T/R (p_s − p_t); the teacher gets no gradient.
  grad_s, grad_t = jax.grad(lambda a, b: distill_kl(a, b, temp), argnums=(0, 1))(s, t)
  np.testing.assert_allclose(grad_s, temp / 2 * (p_s - p_t), atol=1e-6)
  np.testing.assert_array_equal(grad_t, 0.0)


def test_kd_method_weights_its_terms():
  method = get_method("kd")
  hp = method.hparams(ml_collections.ConfigDict(dict(name="kd", T=4.0, ce_weight=0.3)))
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(6, 10)).astype(np.float32), rng.normal(size=(6, 10)).astype(np.float32)
  labels = np.arange(6) % 10
  loss, metrics = method.loss({"logits": s}, {"logits": t}, labels, hp)
  np.testing.assert_allclose(loss, 0.3 * metrics["loss_ce"] + 0.9 * metrics["loss_kd"], rtol=1e-6)
  np.testing.assert_allclose(metrics["loss_kd"], distill_kl(s, t, 4.0), rtol=1e-6)


def test_multistep_schedule_and_sgd_match_torch_rules():
  config = demo.get_config()
  config.schedule.milestones = (2, 3)
  sched = learning_rate_schedule(config, 0.1, num_epochs=4, steps_per_epoch=10)
  np.testing.assert_allclose([sched(0), sched(19), sched(20), sched(29), sched(30)],
                             [0.1, 0.1, 0.01, 0.01, 0.001], rtol=1e-6)
  # torch.optim.SGD(lr, momentum=0.9, weight_decay=wd), two steps by hand.
  config.optimizer.weight_decay = 0.5
  tx = make_optimizer(config, lambda _: 0.1)
  p, g = jnp.array([1.0]), jnp.array([0.2])
  state = tx.init(p)
  buf, q = 0.0, 1.0
  for _ in range(2):
    d = 0.2 + 0.5 * q
    buf = 0.9 * buf + d
    q = q - 0.1 * buf
    upd, state = tx.update(g, state, p)
    p = p + upd
  np.testing.assert_allclose(p, [q], rtol=1e-6)


# ------------------------------------------------------------------- devices 1 vs 4


def _three_steps(mesh, batches):
  config = demo.get_config()
  network = networks.build_network("resnet8", 10)
  teacher_net = networks.build_network("resnet8", 10)
  method = get_method("kd")
  schedule = learning_rate_schedule(config, 0.1, 1, 3)
  tx = make_optimizer(config, schedule)
  variables = networks.init_variables(network, (8, 8, 1), 0, mesh)
  teacher_vars = networks.init_variables(teacher_net, (8, 8, 1), 1, mesh)
  state = parallel.replicate(TrainState(
      step=jnp.zeros((), jnp.int32), params=variables["params"],
      batch_stats=variables["batch_stats"], opt_state=tx.init(variables["params"])), mesh)
  step = jax.jit(functools.partial(
      steps.train_step, network=network, teacher_network=teacher_net, loss=method.loss,
      hparams=method.hparams(), tx=tx, schedule=schedule, steps_per_epoch=1),
      donate_argnums=(0,))
  for b in batches:
    state, _ = step(state, teacher_vars, parallel.to_global(b, mesh))
  return jax.device_get(state)


def test_one_global_batch_on_1_and_4_devices_gives_the_same_params():
  assert len(jax.devices()) >= 4
  rng = np.random.default_rng(0)
  batches = [{"image": rng.normal(size=(8, 8, 8, 1)).astype(np.float32),
              "label": rng.integers(0, 10, size=8).astype(np.int32)} for _ in range(3)]
  one = _three_steps(parallel.create_mesh(jax.devices()[:1]), batches)
  four = _three_steps(parallel.create_mesh(jax.devices()[:4]), batches)
  assert int(one.step) == int(four.step) == 3
  for a, b in zip(jax.tree.leaves((one.params, one.batch_stats)),
                  jax.tree.leaves((four.params, four.batch_stats))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ the demo, end to end


def smoke_config(**overrides):
  """The demo at runlocal size, with KD and CE students only (the SSKD and HSAKD rows have
  end-to-end tests of their own)."""
  config = demo.get_config("runlocal")
  config.baselines = "ce"
  return helpers.set_fields(config, overrides)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("demo"))
  config = smoke_config()
  config.dataset.data_dir = str(tmp_path_factory.getbasetemp() / "tfds")
  results = train.train_and_evaluate(config, workdir)
  return config, workdir, results


def test_demo_trains_teacher_then_kd_and_ce_students(demo_run, capsys):
  config, workdir, results = demo_run
  assert [r["stage"] for r in results] == ["teacher", "student_kd", "student_ce"]
  for r in results:
    assert 0.0 <= r["top1_last"] <= 100.0
    assert r["top1_best"] >= r["top1_last"]
    with open(os.path.join(workdir, r["stage"], "result.json")) as f:
      assert json.load(f)["top1_last"] == r["top1_last"]
  assert os.path.isfile(os.path.join(workdir, "teacher", "teacher.msgpack"))
  # TensorBoard event files from clu's writer.
  assert any(f.startswith("events.out") for f in os.listdir(os.path.join(workdir, "student_kd")))
  # The same scalars as JSON lines, for reports that read plain files.
  records = metrics_log.read(os.path.join(workdir, "student_kd"))
  assert [r["step"] for r in records if "eval/top1" in r] == [r["steps"] for r in results[1:2]]
  assert records[-1]["eval/top1"] == pytest.approx(results[1]["top1_last"])
  assert any("train/loss_kd" in r for r in records)
  # The student's checkpoint records the teacher but does not contain it.
  kd = results[1]
  assert kd["teacher_sha256"] == checkpoint.file_sha256(results[0]["export"])
  table = train.results_table(results, workdir).splitlines()
  assert table[0].split("  ")[0] == "stage" and table[0].endswith("top-5 last")
  assert set(table[1]) == {"-", " "} and len(table[1]) == len(table[0])
  assert [line.split()[0] for line in table[2:2 + len(results)]] == [r["stage"] for r in results]
  assert not any(line != line.rstrip() for line in table)  # Copied into issues and READMEs.


def test_finished_stages_are_skipped(demo_run, capsys):
  config, workdir, results = demo_run
  again = train.train_and_evaluate(config, workdir)
  assert [r["top1_last"] for r in again] == [r["top1_last"] for r in results]
  assert capsys.readouterr().out.count("already done") == 3


def test_the_plan_reads_each_stage_state_in_the_workdir(demo_run, tmp_path):
  """Finished stages are 'done'; a stage with checkpoints but no result resumes from the last;
  a stage trained under another config is refused by the plan, before anything runs."""
  config, workdir, _ = demo_run
  mesh = parallel.create_mesh()
  made = plan.make_plan(config, workdir, mesh, cache=False)
  assert made.states == {"teacher": "done", "student_kd": "done", "student_ce": "done"}
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  os.remove(os.path.join(copy, "student_ce", "result.json"))
  last = max(int(d) for d in os.listdir(os.path.join(copy, "student_ce", "checkpoints"))
             if d.isdigit())
  made = plan.make_plan(config, copy, mesh, cache=False)
  assert made.states["student_ce"] == f"resume from step {last}"
  other = ml_collections.ConfigDict(config.to_dict())
  other.optimizer.momentum = 0.5
  with pytest.raises(UserError, match=r"teacher was trained with another config "
                                      r"\(optimizer.momentum 0.9 -> 0.5\)"):
    plan.make_plan(other, copy, mesh, cache=False)


def test_finished_stage_with_another_config_is_refused(demo_run):
  config, workdir, _ = demo_run
  other = ml_collections.ConfigDict(config.to_dict())
  other.student.name = "resnet14"
  with pytest.raises(UserError, match="resnet14"):
    train.train_and_evaluate(other, workdir)


def _final_student_params(workdir):
  mngr = checkpoint.manager(os.path.join(workdir, "student_kd", "checkpoints"), 1, 2)
  restored = mngr.restore(mngr.latest_step())
  return restored["state"]["params"], mngr.latest_step()


def test_killed_run_resumes_to_the_same_params(demo_run, tmp_path):
  """SIGKILL a run once it has written a student checkpoint, rerun, compare to uninterrupted."""
  config, ref_workdir, results = demo_run
  workdir = str(tmp_path / "killed")
  # The demo's own teacher, imported, so that only the KD student trains here.
  cmd = [sys.executable, "-m", "jaxkd.main", "--config", "configs/demo.py:runlocal",
         "--workdir", workdir, f"--config.dataset.data_dir={config.dataset.data_dir}",
         f"--config.teacher.checkpoint={results[0]['export']}", "--config.baselines=",
         "--config.checkpoint_every_steps=3"]
  env = helpers.device_env(4)
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
  ckpt_dir = os.path.join(workdir, "student_kd", "checkpoints")
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if os.path.isdir(ckpt_dir) and any(d.isdigit() for d in os.listdir(ckpt_dir)):
      break
    time.sleep(0.2)
  assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not os.path.exists(os.path.join(workdir, "student_kd", "result.json"))
  done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "resuming from step" in done.stdout
  got, got_step = _final_student_params(workdir)
  want, want_step = _final_student_params(ref_workdir)
  assert got_step == want_step
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  # The metrics file holds each logged step once, as the uninterrupted run's does.
  def logged(stage_dir):
    return [(r["step"], sorted(k for k in r if k != "step"))
            for r in metrics_log.read(stage_dir) if "train/loss" in r or "eval/top1" in r]
  assert logged(os.path.join(workdir, "student_kd")) == logged(
      os.path.join(ref_workdir, "student_kd"))


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("key,value,message", [
    ("student.name", "resnet_nope", "unknown model 'resnet_nope'.*resnet8x4"),
    ("method.name", "kd_nope", "unknown method 'kd_nope'.*kd"),
    ("dataset.name", "mnist_nope", "unknown dataset 'mnist_nope'.*cifar100"),
    ("batch_size", 6, "batch size 6 does not divide over 4 devices"),
])
def test_bad_config_values_give_one_clear_error(tmp_path, key, value, message):
  with pytest.raises(UserError, match=message):
    train.train_and_evaluate(smoke_config(**{key: value}), str(tmp_path / "w"))


def test_hsakd_pair_with_unequal_classifier_counts_fails_before_any_work(tmp_path):
  # vgg8 has 4 HSAKD classifiers, resnet8 has 3: caught before the teacher stage trains.
  config = smoke_config(**{"method.name": "hsakd", "teacher.name": "vgg8"})
  with pytest.raises(UserError, match="student has 3 and the teacher 4.*tapped stages"):
    train.train_and_evaluate(config, str(tmp_path / "w"))
  assert not list(tmp_path.rglob("checkpoints")) and not list(tmp_path.rglob("result.json"))


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(UserError, match="not writable"):
    train.train_and_evaluate(smoke_config(), str(blocker / "sub"))


def test_teacher_checkpoint_of_another_architecture_names_the_leaf(demo_run, tmp_path):
  config, workdir, results = demo_run
  bad = smoke_config(**{"teacher.name": "resnet14",
                        "teacher.checkpoint": results[0]["export"],
                        "dataset.data_dir": config.dataset.data_dir})
  # The demo teacher is resnet20 (3 blocks per stage), resnet14 has 2.
  with pytest.raises(UserError, match="does not fit the architecture: unexpected leaf "
                                      "'batch_stats/backbone/layer1_2/bn1/mean'"):
    train.train_and_evaluate(bad, str(tmp_path / "w"))


def test_cli_errors_exit_nonzero_without_traceback(tmp_path):
  env = helpers.device_env(4)
  base = [sys.executable, "-m", "jaxkd.main", "--config", "configs/demo.py:runlocal",
          "--workdir", str(tmp_path / "w")]
  bad_type = subprocess.run(base + ["--config.batch_size=abc"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
  assert bad_type.returncode != 0
  assert "batch_size" in bad_type.stderr and "Traceback" not in bad_type.stderr
  bad_name = subprocess.run(base + ["--config.student.name=nope"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
  assert bad_name.returncode == 2
  assert "error: unknown model 'nope'" in bad_name.stderr
  assert "Traceback" not in bad_name.stderr


# ------------------------------------------------- a method that prepares its teacher


def _toy_method(frozen_backbone):
  import flax.linen as nn
  from jaxkd.methods.base import Method, TeacherPreparation
  from jaxkd.methods.losses import cross_entropy

  class Head(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, out, train=False):
      return {"head_logits": nn.Dense(self.num_classes)(out["feats"]["pooled"])}

  def heads(num_classes, hparams, backbone):
    return Head(num_classes)

  def head_loss(out, teacher_out, labels, hparams):
    loss = cross_entropy(out["head_logits"], labels)
    if not frozen_backbone:
      loss = loss + cross_entropy(out["logits"], labels)
    return loss, {"loss": loss}

  def student_loss(out, teacher_out, labels, hparams):
    loss = distill_kl(out["logits"], teacher_out["head_logits"], 4.0)
    return loss, {"loss": loss}

  def eval_metrics(out, labels, hparams, mask):
    return {"twice_top1": 2.0 * (jnp.argmax(out["logits"], -1) == labels)}

  return Method(name="toy", loss=student_loss, student_heads=None,
                teacher=TeacherPreparation(heads=heads, loss=head_loss,
                                           frozen_backbone=frozen_backbone),
                defaults=dict(teacher_epochs=1, teacher_lr=0.1, teacher_milestones=(1,)),
                eval_metrics=eval_metrics)


@pytest.mark.parametrize("frozen", [True, False])
def test_teacher_preparation_stage(demo_run, tmp_path, monkeypatch, frozen):
  config, workdir, results = demo_run
  toy = _toy_method(frozen)
  monkeypatch.setattr(plan, "get_method", lambda name: toy if name == "toy" else get_method(name))
  cfg = smoke_config(**{"method.name": "toy", "baselines": "",
                        "dataset.data_dir": config.dataset.data_dir,
                        "teacher.checkpoint": results[0]["export"] if frozen else ""})
  out = train.train_and_evaluate(cfg, str(tmp_path))
  assert [r["stage"] for r in out] == (["teacher", "teacher_toy", "student_toy"] if frozen
                                       else ["teacher_toy", "student_toy"])
  prepared = checkpoint.import_variables(
      out[-2]["export"], teachers.load_teacher(
          networks.build_network("resnet20", 10, toy.teacher.heads, toy.hparams()),
          out[-2]["export"], data.get_dataset_info(cfg.dataset),
          parallel.create_mesh()).variables)
  assert set(prepared["params"]) == {"backbone", "heads"}
  plain = checkpoint.import_variables(results[0]["export"], {
      k: {"backbone": v["backbone"]} for k, v in prepared.items()})
  same = [np.array_equal(a, b) for a, b in zip(jax.tree.leaves(plain["params"]["backbone"]),
                                                jax.tree.leaves(prepared["params"]["backbone"]))]
  # Frozen: the imported teacher backbone is untouched; joint: it is trained from scratch.
  assert all(same) if frozen else not any(same)
  assert out[-1]["eval_last"]["twice_top1"] == pytest.approx(2 * out[-1]["top1_last"], rel=1e-5)


def test_teacher_keep_best_hands_on_the_best_evaluation(tmp_path):
  """teacher.keep='best' (SSKD's student loads the teacher's best.pth): the teacher stage keeps
  the evaluation with the best test top-1 and hands that file on; a bad value is refused."""
  config = smoke_config(**{"teacher.keep": "best", "eval_every_epochs": 1, "baselines": ""})
  config.dataset.data_dir = str(tmp_path / "tfds")
  results = train.train_and_evaluate(config, str(tmp_path / "run"))
  teacher = results[0]
  assert teacher["export"].endswith("best_teacher.msgpack")
  best = max(teacher["top1_best"], 0.0)
  record = [r for r in metrics_log.read(str(tmp_path / "run" / "teacher")) if "eval/top1" in r]
  assert len(record) == 2 and teacher["selected_score"] == pytest.approx(best)
  assert teacher["selected_step"] == max(record, key=lambda r: r["eval/top1"])["step"]
  assert results[1]["teacher_sha256"] == teacher["export_sha256"]
  config.teacher.keep = "first"
  with pytest.raises(UserError, match="teacher.keep is 'first'; it must be 'last' or 'best'"):
    train.train_and_evaluate(config, str(tmp_path / "bad"))
