"""What the golden tests of the modern methods share: the reference numbers of
`tests/data/golden_modern.npz` (PyTorch layouts), their conversion to jaxkd's, and the
gradient criterion."""

import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxkd import parallel

GOLDEN = np.load(os.path.join(os.path.dirname(__file__), "data", "golden_modern.npz"))


def nhwc(x) -> jnp.ndarray:
  """A PyTorch NCHW map as NHWC (other ranks as they are)."""
  x = np.asarray(x)
  return jnp.asarray(x.transpose(0, 2, 3, 1) if x.ndim == 4 else x)


def logit_inputs(p: str) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """(student logits, teacher logits, labels) of prefix `p`."""
  return (jnp.asarray(GOLDEN[f"{p}_logit_s"]), jnp.asarray(GOLDEN[f"{p}_logit_t"]),
          jnp.asarray(GOLDEN[f"{p}_target"].astype(np.int32)))


def assert_grad_close(actual, expected, rel: float = 1e-4, what: str = "") -> None:
  """max|g − ref| ≤ rel · max|ref| over the array."""
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.shape == expected.shape, what
  err = np.max(np.abs(actual - expected))
  assert err <= rel * np.max(np.abs(expected)), (what, err, np.max(np.abs(expected)))


def assert_trees_match(grads, expected_grads, stats, expected_stats,
                       stats_tol: dict) -> None:
  """A module's parameter gradients against the reference's (assert_grad_close per array)
  and its BatchNorm running statistics (at `stats_tol`), leaf for leaf."""
  expected = flax.traverse_util.flatten_dict(expected_grads)
  flat = flax.traverse_util.flatten_dict(grads)
  assert set(flat) == set(expected)
  for path, ref in expected.items():
    assert_grad_close(flat[path], ref, what=path)
  expected = flax.traverse_util.flatten_dict(expected_stats)
  flat = flax.traverse_util.flatten_dict(stats)
  assert set(flat) == set(expected)
  for path, ref in expected.items():
    np.testing.assert_allclose(flat[path], ref, err_msg=str(path), **stats_tol)


def assert_logit_objective_is_global(objective, s, t, y, hparams, atol: float = 0.0):
  """`objective({'logits': s}, {'logits': t}, y, hparams)` jitted with the rows sharded over 4
  devices gives the loss, its parts (rtol 1e-6) and its gradient (1e-6 of its largest entry) of
  one device: its in-batch terms read the global batch. Returns the 4-device (loss, metrics,
  gradient)."""
  def run(mesh):
    rows = NamedSharding(mesh, P(parallel.DATA_AXIS))
    args = [jax.device_put(x, rows) for x in (s, t, y)]
    fn = jax.jit(jax.value_and_grad(
        lambda a, b, c: objective({"logits": a}, {"logits": b}, c, hparams), has_aux=True))
    (loss, metrics), grad = fn(*args)
    assert len(grad.sharding.device_set) == mesh.size
    return jax.device_get((loss, metrics, grad))

  one = run(parallel.create_mesh(jax.devices()[:1]))
  four = run(parallel.create_mesh(jax.devices()[:4]))
  for a, b in zip(jax.tree.leaves((one[0], one[1])), jax.tree.leaves((four[0], four[1]))):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=atol)
  assert_grad_close(four[2], one[2], rel=1e-6)
  return four
