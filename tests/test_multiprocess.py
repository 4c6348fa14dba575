"""Scale-out: 2 processes x 2 devices give the params of 1 process x 1 device; in-batch terms do
not depend on the device count; the multi-process set-up rejects bad arguments.

Run as a script (`python tests/test_multiprocess.py --worker ...`) this file is one process of the
multi-process run that `test_two_processes_match_one_device` starts.
"""

import argparse
import functools
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import helpers  # noqa: E402  pylint: disable=g-import-not-at-top
from configs import demo  # noqa: E402
from jaxkd import checkpoint  # noqa: E402
from jaxkd import distributed  # noqa: E402
from jaxkd import interrupts  # noqa: E402
from jaxkd import main as jaxkd_main  # noqa: E402
from jaxkd import workdir_lock  # noqa: E402
from jaxkd import networks  # noqa: E402
from jaxkd import parallel  # noqa: E402
from jaxkd import steps  # noqa: E402
from jaxkd.errors import UserError  # noqa: E402
from jaxkd.methods import ega, get_method, sskd  # noqa: E402
from jaxkd.optim import learning_rate_schedule, make_optimizer  # noqa: E402
from jaxkd.state import TrainState  # noqa: E402

NUM_STEPS = 3
IMAGES = 8  # global batch: 8 images x 4 rotated views = 32 rows


# ------------------------------------------------------------- the run both sides share


def global_batches():
  """NUM_STEPS global SSKD batches {'image': [8, 4, 8, 8, 1], 'label': [8]}, fixed."""
  rng = np.random.default_rng(0)
  return [{"image": rng.normal(size=(IMAGES, 4, 8, 8, 1)).astype(np.float32),
           "label": rng.integers(0, 10, size=IMAGES).astype(np.int32)}
          for _ in range(NUM_STEPS)]


def sskd_steps(mesh, batches, checkpoint_dir=None):
  """NUM_STEPS SSKD steps of a resnet8 student (+ SS module) from a resnet8 teacher.

  Each process feeds its own contiguous rows of every global batch (process i: rows
  [i·b, (i+1)·b), b = 8 / process_count), as the input pipeline does with its shard.
  """
  config = demo.get_config()
  method = get_method("sskd")
  hparams = method.hparams()
  # Teacher and student share the architecture here, so one compiled init serves both.
  network = networks.build_network("resnet8", 10, sskd.ss_module, hparams)
  schedule = learning_rate_schedule(config, 0.1, 1, NUM_STEPS)
  tx = make_optimizer(config, schedule)
  init = jax.jit(lambda seed: network.init(jax.random.key(seed), jnp.zeros((1, 8, 8, 1))),
                 out_shardings=parallel.replicated(mesh))
  variables, teacher_variables = init(0), init(1)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                     batch_stats=variables["batch_stats"],
                     opt_state=jax.jit(tx.init, out_shardings=parallel.replicated(mesh))(
                         variables["params"]))
  state = parallel.replicate(state, mesh)
  step = jax.jit(functools.partial(
      steps.train_step, network=network, teacher_network=network, loss=method.loss,
      hparams=hparams, tx=tx, schedule=schedule, steps_per_epoch=1), donate_argnums=(0,))
  index, count = jax.process_index(), jax.process_count()
  losses = []
  for batch in batches:
    rows = IMAGES // count
    local = {k: v[index * rows:(index + 1) * rows] for k, v in batch.items()}
    state, metrics = step(state, teacher_variables, parallel.to_global(local, mesh))
    losses.append(float(np.asarray(metrics["loss"].addressable_data(0))))
  if checkpoint_dir is not None:
    mngr = checkpoint.manager(checkpoint_dir, 1, 1)
    checkpoint.save(mngr, NUM_STEPS, state, {"losses": losses}, force=True)
    mngr.wait_until_finished()
  return state, losses


def local_copy(tree):
  """This process's copy of a replicated tree, as numpy."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


def worker(args):
  jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
  distributed.initialize(f"localhost:{args.port}", args.num_processes, args.process_id,
                         timeout_seconds=60)
  if args.locked_workdir:
    refuse_locked(args.locked_workdir)
  if args.lose:
    lose_one(args)
  assert jax.process_count() == args.num_processes
  assert len(jax.devices()) == 2 * args.num_processes
  mesh = parallel.create_mesh()
  state, losses = sskd_steps(mesh, global_batches(), os.path.join(args.out, "checkpoints"))
  host = local_copy({"params": state.params, "batch_stats": state.batch_stats})
  flat = {"/".join(str(getattr(k, "key", k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(host)[0]}
  np.savez(os.path.join(args.out, f"process_{args.process_id}.npz"), losses=np.array(losses),
           **flat)


def refuse_locked(workdir):
  """A process of a run on a workdir another run holds: refused, as jaxkd.main ends it."""
  try:
    with workdir_lock.hold(workdir):
      print("not refused", flush=True)
  except UserError as e:
    sys.exit(jaxkd_main._exit_status(jaxkd_main.report(e)))  # pylint: disable=protected-access


def lose_one(args):
  """Process 1 is lost (`args.lose`: killed, or stopped as a hung machine would be) while the
  processes run collectives; process 0 must end, as jaxkd.main ends it, with one line."""
  distributed.watch(jaxkd_main._end_lost, lost_seconds=3)  # pylint: disable=protected-access
  distributed.barrier("all started")
  if args.process_id == 1:
    os.kill(os.getpid(), signal.SIGKILL if args.lose == "kill" else signal.SIGSTOP)
  try:
    for i in range(600):
      distributed.barrier(f"step {i}")
      time.sleep(0.05)
  except (RuntimeError, ValueError) as e:
    lost = distributed.lost_process_error(e, interrupts.what_stays)
    if lost is None:
      raise
    jaxkd_main._exit_status(jaxkd_main.report(lost))  # pylint: disable=protected-access
  print("not stopped", flush=True)


# ---------------------------------------------------------------------------- the tests


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_match_one_device(tmp_path):
  """2 processes x 2 CPU devices (gloo), 3 SSKD steps on one global batch, one collective
  checkpoint == 1 process x 1 device."""
  port = _free_port()
  env = helpers.device_env(2, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  procs = [subprocess.Popen(
      [sys.executable, __file__, "--worker", f"--port={port}", "--num_processes=2",
       f"--process_id={i}", f"--out={tmp_path}"], env=env, cwd=REPO,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
  logs = []
  try:
    # The reference run, while the workers start.
    one_state, one_losses = sskd_steps(parallel.create_mesh(jax.devices()[:1]),
                                       global_batches())
    for p in procs:
      logs.append(p.communicate(timeout=150)[0].decode()[-3000:])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert all(p.returncode == 0 for p in procs), "\n----\n".join(logs)

  want = local_copy({"params": one_state.params, "batch_stats": one_state.batch_stats})
  want_flat = {"/".join(str(getattr(k, "key", k)) for k in path): leaf
               for path, leaf in jax.tree_util.tree_flatten_with_path(want)[0]}
  for i in range(2):
    got = np.load(tmp_path / f"process_{i}.npz")
    np.testing.assert_allclose(got["losses"], one_losses, rtol=1e-5)
    assert set(got.files) - {"losses"} == set(want_flat)
    for name, value in want_flat.items():
      np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-6, err_msg=name)

  # The checkpoint both processes wrote together restores to the same state on one device.
  mngr = checkpoint.manager(str(tmp_path / "checkpoints"), 1, 1)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          one_state)
  restored, record = checkpoint.restore_latest(mngr, abstract)
  assert int(restored.step) == NUM_STEPS
  np.testing.assert_allclose(record["losses"], one_losses, rtol=1e-5)
  for a, b in zip(jax.tree.leaves((restored.params, restored.opt_state)),
                  jax.tree.leaves((one_state.params, one_state.opt_state))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _start_workers(tmp_path, *flags):
  """Two processes of this file's worker (2 CPU devices each), with `flags`."""
  port = _free_port()
  env = helpers.device_env(2, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  return [subprocess.Popen(
      [sys.executable, __file__, "--worker", f"--port={port}", "--num_processes=2",
       f"--process_id={i}", f"--out={tmp_path}", *flags], env=env, cwd=REPO,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]


# Gloo prints `[Gloo] Rank R is connected to N peer ranks. Expected number of connected peer
# ranks is : N` on stdout from C++, piece by piece: two of its threads' pieces can interleave
# ("[Gloo] Rank 0[Gloo] Rank 0 is connected ...\n is connected ...\n").
_GLOO_PIECES = re.compile(r"\[Gloo\] Rank \d*| is connected to \d*| peer ranks\. ?"
                          r"|Expected number of connected peer ranks is : \d*")


def _own_lines(text):
  """Output without the C++ libraries' lines: absl's log format (I0123 12:34:56 ...) and gloo's
  connection line, whose interleaved pieces leave only digits behind."""
  text = _GLOO_PIECES.sub("", text)
  return [line for line in text.splitlines()
          if line.strip() and not line.strip().isdigit() and not re.match(r"[IWEF]\d{4} ", line)]


def test_a_locked_workdir_is_refused_by_every_process(tmp_path):
  """A multi-process run on a workdir another run holds: every process refuses, in one line."""
  workdir = str(tmp_path / "w")
  os.makedirs(workdir)
  with workdir_lock.hold(workdir):
    procs = _start_workers(tmp_path, f"--locked_workdir={workdir}")
    try:
      results = [p.communicate(timeout=120) for p in procs]
    finally:
      for p in procs:
        p.kill()
  for p, (out, err) in zip(procs, results):
    assert p.returncode == 2 and not _own_lines(out), err[-3000:]
    assert _own_lines(err) == [f"error: workdir {workdir!r} is in use by another run (pid "
                               f"{os.getpid()} on {socket.gethostname()} since "
                               f"{_own_lines(err)[0].split(' since ')[1]}"], err[-3000:]


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_a_lost_process_stops_the_others_in_one_line(tmp_path, how):
  """Process 1 killed (its peers' collective fails) or stopped like a hung machine (the
  collective hangs; its beats stop): process 0 ends within seconds, in one line, status 4."""
  procs = _start_workers(tmp_path, f"--lose={how}")
  try:
    out, err = procs[0].communicate(timeout=120)
  finally:
    for p in procs:
      p.kill()
  lines = _own_lines(err)
  assert procs[0].returncode == 4 and not _own_lines(out), err[-3000:]
  assert len(lines) == 1 and lines[0].startswith("error: process 0 of 2 stopped: "), err[-3000:]
  assert lines[0].endswith("; every finished stage stays; start every process again with the "
                           "same command to resume")
  if how == "stop":  # Only the beats can tell.
    assert "process 1 of the run was lost (silent for 3 s)" in lines[0]


def _on_devices(fn, arrays, num_devices):
  """fn(*arrays) and its gradient under jit, with every array's rows split over the mesh."""
  mesh = parallel.create_mesh(jax.devices()[:num_devices])
  placed = [jax.device_put(a, parallel.data_sharding(mesh)) for a in arrays]
  value, grads = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(*placed)
  return jax.device_get((value, grads))


def test_sskd_loss_and_gradient_same_on_1_and_4_devices():
  """The SSKD ranking/selection terms see the global batch whatever the device count."""
  assert len(jax.devices()) >= 4
  rng = np.random.default_rng(1)
  images, classes, width = 8, 10, 16
  s_logits = rng.normal(size=(4 * images, classes)).astype(np.float32)
  s_rep = rng.normal(size=(4 * images, width)).astype(np.float32)
  t_logits = (s_logits + rng.normal(size=s_logits.shape)).astype(np.float32)
  t_rep = (s_rep + 0.5 * rng.normal(size=s_rep.shape)).astype(np.float32)
  labels = rng.integers(0, classes, size=images).astype(np.int32)
  hparams = get_method("sskd").hparams()

  def loss(s_logits, s_rep, t_logits, t_rep, labels):
    return sskd.sskd_loss(s_logits, t_logits, s_rep, t_rep, labels, hparams).total

  arrays = (s_logits, s_rep, t_logits, t_rep, labels)
  one, four = _on_devices(loss, arrays, 1), _on_devices(loss, arrays, 4)
  terms = sskd.sskd_loss(s_logits, t_logits, s_rep, t_rep, labels, hparams)
  # Both selections drop rows here, so the test depends on the global ranking.
  assert 0 < int(terms.kept_ss) < 3 * images and int(terms.correct_tf) < 3 * images
  np.testing.assert_allclose(one[0], four[0], rtol=1e-6)
  for a, b in zip(one[1], four[1]):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  # And it is the loss on the whole batch, not a mean of per-device losses.
  np.testing.assert_allclose(four[0], terms.total, rtol=1e-6)
  quarters = [[a[i * len(a) // 4:(i + 1) * len(a) // 4] for a in arrays] for i in range(4)]
  per_device = np.mean([loss(*q) for q in quarters])
  assert abs(per_device - four[0]) > 1e-3


def test_ega_graph_loss_and_gradient_same_on_1_and_4_devices():
  """EGA's node and edge terms (B x B correlation graphs) see the global batch too."""
  rng = np.random.default_rng(2)
  fs = rng.normal(size=(16, 8)).astype(np.float32)
  ft = (fs + rng.normal(size=fs.shape)).astype(np.float32)

  def loss(fs, ft):
    node, edge, _ = ega.ega_terms(ft, fs)
    return 0.8 * node + 0.24 * edge

  one, four = _on_devices(loss, (fs, ft), 1), _on_devices(loss, (fs, ft), 4)
  np.testing.assert_allclose(one[0], four[0], rtol=1e-6)
  np.testing.assert_allclose(one[1][0], four[1][0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_processes=2, process_id=0), "--coordinator_address"),
    (dict(coordinator_address="localhost:1234", num_processes=2), "--process_id"),
    (dict(coordinator_address="localhost", num_processes=2, process_id=0), "needs a port"),
    (dict(coordinator_address="localhost:1234", num_processes=2, process_id=2),
     r"--process_id=2 must be in \[0, 1\]"),
])
def test_bad_multiprocess_arguments_give_one_clear_error(monkeypatch, kwargs, message):
  monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
  with pytest.raises(UserError, match=message):
    distributed.initialize(**kwargs)


def test_single_process_needs_no_initialisation(monkeypatch):
  monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
  assert not distributed.initialize()
  assert not distributed.initialize(num_processes=1)
  assert distributed.is_main_process()
  distributed.barrier("single")  # no-op with one process


if __name__ == "__main__":
  parser = argparse.ArgumentParser()
  parser.add_argument("--worker", action="store_true", required=True)
  parser.add_argument("--port", type=int, required=True)
  parser.add_argument("--num_processes", type=int, required=True)
  parser.add_argument("--process_id", type=int, required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--locked_workdir", default="")
  parser.add_argument("--lose", choices=["", "kill", "stop"], default="")
  worker(parser.parse_args())
