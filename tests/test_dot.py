"""DOT (mdistiller's Distillation-Oriented Trainer): the optimiser against the reference's
parameters and both momentum buffers over five steps, which loss terms reach which parameters,
the train step handing it the two terms' gradients, and a run killed mid-stage resuming to the
same bits."""

import functools
import os
import re
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
from jaxkd import networks
from jaxkd import parallel
from jaxkd import steps
from jaxkd.errors import UserError
from jaxkd.methods import dot, get_method
from jaxkd.optim import make_optimizer
from jaxkd.state import TrainState
from modern_golden import GOLDEN

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = [str(name) for name in GOLDEN["dot_param_names"]]


def _nested(prefix: str, row=None) -> dict:
  """{'shared': {'weight': …, 'bias': …}, …} of the golden arrays `<prefix>.<name>` present."""
  tree = {}
  for name in NAMES:
    key = f"{prefix}.{name}"
    if key in GOLDEN.files:
      module, leaf = name.split(".")
      value = GOLDEN[key] if row is None else GOLDEN[key][row]
      tree.setdefault(module, {})[leaf] = jnp.asarray(value)
  return tree


def _stand_in(grads: dict):
  """The reference's stand-in term Σ_p Σ(p ⊙ G_p): its gradient is G_p on the parameters it
  names and none elsewhere."""
  def term(params):
    return sum(jnp.sum(params[m][leaf] * g) for m, sub in grads.items() for leaf, g in sub.items())
  return term


def test_momenta_are_the_reference_configs():
  hp = lambda k: float(GOLDEN[f"dot_hp_{k}"])  # noqa: E731
  assert dot.dot_momenta(hp("solver_momentum"), hp("delta")) == (
      hp("momentum_task"), hp("momentum_kd"), hp("momentum_avg"))
  assert dot.DOT_DEFAULTS["delta"] == hp("delta") and hp("dampening") == 0.0
  assert (dot.DOT_DEFAULTS["T"], dot.DOT_DEFAULTS["ce_weight"],
          dot.DOT_DEFAULTS["kd_weight"]) == (4.0, 0.1, 0.9)


def test_five_steps_match_the_reference_parameters_and_both_buffers():
  """From `dot_init_param`, the task and distillation gradients of step n and lr n: every
  parameter and both buffers after each step (atol 2e-6); which terms reach which parameter is
  read from the terms themselves, as the train step reads it."""
  hp = lambda k: float(GOLDEN[f"dot_hp_{k}"])  # noqa: E731
  lrs = jnp.asarray(GOLDEN["dot_lr"], jnp.float32)
  tx = dot.dot_optimizer(lambda count: lrs[count], hp("solver_momentum"), hp("delta"),
                         hp("weight_decay"), dampening=hp("dampening"))
  params = _nested("dot_init_param")
  state = tx.init(params)
  for n in range(int(GOLDEN["dot_hp_n_steps"])):
    task, distill = _stand_in(_nested("dot_grad_task", n)), _stand_in(_nested("dot_grad_kd", n))

    def fn(p, task=task, distill=distill):
      metrics = {dot.TASK_TERM: task(p), dot.DISTILL_TERM: distill(p)}
      return metrics[dot.TASK_TERM] + metrics[dot.DISTILL_TERM], (metrics, None)

    grads, reached, _ = steps.term_gradients(fn, params, (dot.TASK_TERM, dot.DISTILL_TERM))
    assert reached == {
        dot.TASK_TERM: {"shared": {"weight": True, "bias": True}, "task_only": {"weight": True},
                        "kd_only": {"weight": False}, "frozen": {"weight": False}},
        dot.DISTILL_TERM: {"shared": {"weight": True, "bias": True},
                           "task_only": {"weight": False}, "kd_only": {"weight": True},
                           "frozen": {"weight": False}}}
    updates, state = tx.update(grads, state, params, reached=reached)
    params = jax.tree.map(jnp.add, params, updates)
    for got, prefix in ((params, "param"), (state.task, "buf_task"),
                        (state.distill, "buf_kd")):
      want = _nested(f"dot_step{n}.{prefix}")
      for module, sub in got.items():
        for leaf, value in sub.items():
          expected = want.get(module, {}).get(leaf, np.zeros_like(value))  # No buffer: unused.
          np.testing.assert_allclose(value, expected, rtol=0, atol=2e-6,
                                     err_msg=f"step {n} {prefix}.{module}.{leaf}")
  for name in NAMES:
    module, leaf = name.split(".")
    np.testing.assert_allclose(params[module][leaf], GOLDEN[f"dot_step4.param.{name}_f64"],
                               rtol=0, atol=2e-6)


def test_frozen_parameters_never_move():
  tx = dot.dot_optimizer(lambda _: 0.1, 0.9, 0.075, 5e-4, frozen={"a": True, "b": False})
  params = {"a": jnp.ones(3), "b": jnp.ones(2)}
  grads = {t: jax.tree.map(jnp.ones_like, params) for t in (dot.TASK_TERM, dot.DISTILL_TERM)}
  reached = {t: {"a": True, "b": True} for t in grads}
  updates, _ = tx.update(grads, tx.init(params), params, reached=reached)
  np.testing.assert_array_equal(updates["a"], 0.0)
  assert np.all(np.asarray(updates["b"]) < 0)


def test_a_zero_task_momentum_keeps_no_task_buffer():
  """μ − Δ = 0: `dot()` steps the task gradient as it is (even for a task-only parameter, which
  would otherwise take ā), while the distillation buffer keeps momentum μ + Δ."""
  tx = dot.dot_optimizer(lambda _: 0.1, 0.45, 0.45, 0.5)
  params = {"a": jnp.ones(2), "b": jnp.ones(2)}
  grads = {t: jax.tree.map(jnp.ones_like, params) for t in (dot.TASK_TERM, dot.DISTILL_TERM)}
  reached = {dot.TASK_TERM: {"a": True, "b": True}, dot.DISTILL_TERM: {"a": True, "b": False}}
  state = tx.init(params)
  for _ in range(2):
    updates, state = tx.update(grads, state, params, reached=reached)
  np.testing.assert_allclose(updates["b"], -0.1 * (1.0 + 0.5), rtol=1e-6)
  np.testing.assert_allclose(updates["a"], -0.1 * 1.5 - 0.1 * (0.9 * 1.0 + 1.0), rtol=1e-6)
  np.testing.assert_array_equal(state.task["a"], 0.0)


def test_a_term_reaches_what_it_differentiates():
  """Through nested jitted functions and custom derivatives; `stop_gradient` reaches nothing,
  as PyTorch's detach leaves `.grad` None; a zero weight still reaches (a zero gradient)."""
  def fn(p):
    one = jax.jit(lambda a, b: jnp.sum(a * jax.nn.relu(b)))(p["a"], p["b"])
    two = jnp.sum(p["a"] ** 2) + jnp.sum(jax.lax.stop_gradient(p["c"])) + 0.0 * jnp.sum(p["d"])
    return one + two, ({"one": one, "two": two}, None)

  params = {k: jnp.arange(1.0, 4.0) for k in "abcd"}
  grads, reached, _ = steps.term_gradients(fn, params, ("one", "two"))
  assert reached == {"one": {"a": True, "b": True, "c": False, "d": False},
                     "two": {"a": True, "b": False, "c": False, "d": True}}
  for term in ("one", "two"):
    want = jax.grad(lambda p, t=term: fn(p)[1][0][t])(params)
    for k in "abcd":
      np.testing.assert_allclose(grads[term][k], want[k], rtol=1e-6)


def test_the_plan_refuses_momenta_dot_cannot_split():
  check = get_method("dot").optimizer.check
  config = demo.get_config()
  hparams = get_method("dot").hparams()
  check(config, hparams)
  with pytest.raises(UserError, match="delta=0.2 with optimizer.momentum=0.9"):
    check(config, get_method("dot").hparams(ml_collections.ConfigDict(dict(delta=0.2))))
  config.optimizer.nesterov = True
  with pytest.raises(UserError, match="nesterov=False"):
    check(config, hparams)


def _three_steps(method_name: str, config, tx_of, batches):
  mesh = parallel.create_mesh()
  network = networks.build_network("resnet8", 10)
  teacher_net = networks.build_network("resnet8", 10)
  method = get_method(method_name)
  hparams = method.hparams()
  schedule = lambda _: jnp.float32(0.1)  # noqa: E731
  tx = tx_of(hparams, schedule)
  variables = networks.init_variables(network, (8, 8, 1), 0, mesh)
  teacher_vars = networks.init_variables(teacher_net, (8, 8, 1), 1, mesh)
  state = parallel.replicate(TrainState(
      step=jnp.zeros((), jnp.int32), params=variables["params"],
      batch_stats=variables["batch_stats"], opt_state=tx.init(variables["params"])), mesh)
  terms = method.optimizer.terms if method.optimizer else ()
  step = jax.jit(functools.partial(
      steps.train_step, network=network, teacher_network=teacher_net, loss=method.loss,
      hparams=hparams, tx=tx, schedule=schedule, steps_per_epoch=1, gradient_terms=terms))
  for b in batches:
    state, metrics = step(state, teacher_vars, parallel.to_global(b, mesh))
  return jax.device_get(state), jax.device_get(metrics)


def test_without_delta_the_train_step_is_sgd_on_the_kd_objective():
  """Δ = 0 gives both buffers the config's momentum; as every student parameter is reached by
  both terms and only the task step decays the weights, the two buffers sum to SGD's buffer on
  the whole objective: three DOT train steps land where KD's SGD steps do (float32 rounding of
  the two half-steps apart). The step hands the optimiser both terms' gradients."""
  config = demo.get_config()
  rng = np.random.default_rng(0)
  batches = [{"image": rng.normal(size=(8, 8, 8, 1)).astype(np.float32),
              "label": rng.integers(0, 10, size=8).astype(np.int32)} for _ in range(3)]
  sgd, _ = _three_steps("kd", config, lambda hp, s: make_optimizer(config, s), batches)
  split, metrics = _three_steps(
      "dot", config, lambda hp, s: dot.make_dot(config, _no_delta(hp), s, None), batches)
  np.testing.assert_allclose(metrics["loss"], metrics["loss_task"] + metrics["loss_distill"],
                             rtol=1e-6)
  assert np.isfinite(metrics["grad_norm"]) and int(split.opt_state.count) == 3
  for a, b in zip(jax.tree.leaves((split.params, split.batch_stats)),
                  jax.tree.leaves((sgd.params, sgd.batch_stats))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def _no_delta(hparams):
  hparams = ml_collections.ConfigDict(hparams.to_dict())
  hparams.delta = 0.0
  return hparams


# ------------------------------------------------------------- kill -9 mid-stage, resume


def _teacher_file(path: str) -> str:
  """A resnet8 teacher of random weights for the digits (10 classes, 8×8×1)."""
  network = networks.build_network("resnet8", 10)
  shapes = jax.eval_shape(functools.partial(network.init, train=False), jax.random.key(0),
                          jnp.zeros((1, 8, 8, 1)))
  rng = np.random.RandomState(0)
  draw = lambda path, leaf: (np.ones if path[-1].key == "var" else np.zeros)(  # noqa: E731
      leaf.shape, leaf.dtype) if path[-1].key in ("var", "mean") else (
          0.1 * rng.normal(size=leaf.shape)).astype(leaf.dtype)
  checkpoint.export_variables(path, jax.tree_util.tree_map_with_path(draw, shapes))
  return path


def _final_state(workdir: str):
  mngr = checkpoint.manager(os.path.join(workdir, "student_dot", "checkpoints"), 1, 2)
  return mngr.latest_step(), mngr.restore(mngr.latest_step())["state"]


def test_a_run_killed_mid_stage_resumes_to_the_same_bits(tmp_path):
  """SIGKILL a DOT stage once it has written a checkpoint, rerun it: parameters, BatchNorm
  statistics, the step count and both momentum buffers equal the uninterrupted run's bit for
  bit (the optimiser's state is part of the checkpointed train state)."""
  teacher = _teacher_file(str(tmp_path / "teacher.msgpack"))
  env = helpers.device_env(4)

  def command(workdir):
    return [sys.executable, "-m", "jaxkd.main", "--config", "configs/demo.py:runlocal",
            "--workdir", str(workdir), f"--config.dataset.data_dir={tmp_path / 'tfds'}",
            "--config.teacher.name=resnet8", f"--config.teacher.checkpoint={teacher}",
            "--config.method.name=dot", "--config.baselines=", "--config.num_epochs=8",
            "--config.checkpoint_every_steps=3"]

  done = subprocess.run(command(tmp_path / "whole"), cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  killed = tmp_path / "killed"
  proc = subprocess.Popen(command(killed), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE)
  ckpt_dir = killed / "student_dot" / "checkpoints"
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if ckpt_dir.is_dir() and any(d.name.isdigit() for d in ckpt_dir.iterdir()):
      break
    time.sleep(0.02)
  assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (killed / "student_dot" / "result.json").exists()
  again = subprocess.run(command(killed), cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  resumed = re.search(r"\[student_dot\] resuming from step (\d+)", again.stdout)
  assert resumed and 0 < int(resumed.group(1)) < 64, again.stdout[-3000:]
  got_step, got = _final_state(str(killed))
  want_step, want = _final_state(str(tmp_path / "whole"))
  assert got_step == want_step == 64
  assert int(got["opt_state"]["count"]) == 64
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)
