"""What the golden tests of the modern methods share: the reference numbers of
`tests/data/golden_modern.npz` (PyTorch layouts), their conversion to jaxkd's, and the
gradient criterion."""

import os

import jax.numpy as jnp
import numpy as np

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
