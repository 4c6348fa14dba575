"""CRD on the pooled features (jaxkd.methods.crd.ContrastMemory with a feature tap) against the
reference's numbers (tests/data/golden_baselines.npz: RepDistiller's `CRDLoss` over two steps,
for equal widths, prefix crd, and for s_dim ≠ t_dim, prefix crdx)."""

import collections
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd.methods import crd

GOLDEN = np.load(os.path.join(os.path.dirname(__file__), "data", "golden_baselines.npz"))

TAP = "pooled"
STATE_TOL = dict(rtol=1e-5, atol=1e-6)
LOSS_TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = dict(rtol=1e-4, atol=1e-6)


def _out(f):
  """A network's outputs as the bridge sees them: the pooled vector among the taps."""
  return {"feats": collections.OrderedDict([(TAP, f)])}


def _module(p):
  g = GOLDEN
  # The reference reads K, T and the momentum back from its float32 `params` buffer: T is
  # 0.07000000029802322 there. Scaling a float32 array casts T to float32 either way, so the
  # buffer's value and the hyper-parameter give the same computation.
  buffer = g[f"{p}_contrast_params_before"]
  assert np.float32(float(buffer[1])) == np.float32(g[f"{p}_hp_nce_t"])
  assert float(buffer[4]) == float(g[f"{p}_hp_nce_m"])
  assert int(buffer[0]) == int(g[f"{p}_hp_nce_k"])
  return crd.ContrastMemory(num_data=int(g[f"{p}_hp_n_data"]), feat_dim=int(g[f"{p}_hp_feat_dim"]),
                            temperature=float(buffer[1]), momentum=float(buffer[4]), tap=TAP)


def _variables(p):
  """The reference's state before step 1: embed Linears (kernel = W.T), banks, Z unset."""
  g = GOLDEN
  params = {side: {"kernel": g[f"{p}_param.{side}.linear.weight"].T,
                   "bias": g[f"{p}_param.{side}.linear.bias"]} for side in ("embed_s", "embed_t")}
  buffer = g[f"{p}_contrast_params_before"]
  stats = {"memory_s": g[f"{p}_memory_v1_before"], "memory_t": g[f"{p}_memory_v2_before"],
           "z_s": buffer[2], "z_t": buffer[3]}
  return jax.tree.map(jnp.asarray, {"params": params, "batch_stats": stats})


def _step_fn(module):
  @jax.jit
  def step(variables, f_s, f_t, index, contrast):
    def loss_fn(params, f_s, f_t):
      out, updates = module.apply(
          {"params": params, "batch_stats": variables["batch_stats"]}, _out(f_s), _out(f_t),
          {"index": index, "contrast_index": contrast}, train=True, mutable=["batch_stats"])
      return out["loss_crd"], (out, updates["batch_stats"])
    (loss, (out, stats)), grads = jax.value_and_grad(
        loss_fn, argnums=(0, 1, 2), has_aux=True)(variables["params"], f_s, f_t)
    return loss, out, stats, grads
  return step


@pytest.mark.parametrize("p", ["crd", "crdx"])
def test_initialisation_takes_the_widths_of_both_sides(p):
  """Initialised on batch-1 outputs of both networks (batch None), it creates exactly the
  reference's variables (embed_s on s_dim, embed_t on t_dim) and returns nothing."""
  g = GOLDEN
  module = _module(p)
  s_dim, t_dim = g[f"{p}_f_s"].shape[1], g[f"{p}_f_t"].shape[1]
  out, created = module.init_with_output(jax.random.key(0), _out(jnp.zeros((1, s_dim))),
                                         _out(jnp.zeros((1, t_dim))), None)
  assert out == {}
  assert jax.tree.map(jnp.shape, created) == jax.tree.map(jnp.shape, _variables(p))
  bound = 1.0 / np.sqrt(int(g[f"{p}_hp_feat_dim"]) / 3)
  stats = created["batch_stats"]
  assert np.all(np.abs(stats["memory_s"]) <= bound) and np.all(np.abs(stats["memory_t"]) <= bound)
  assert float(stats["z_s"]) == float(stats["z_t"]) == -1.0
  # Torch's default Linear init, U(±1/sqrt(fan_in)).
  assert np.all(np.abs(created["params"]["embed_s"]["kernel"]) <= 1.0 / np.sqrt(s_dim))
  assert np.all(np.abs(created["params"]["embed_t"]["kernel"]) <= 1.0 / np.sqrt(t_dim))


@pytest.mark.parametrize("p", ["crd", "crdx"])
def test_two_steps_match_the_reference(p):
  """Step 1 fixes Z and moves the banks; step 2 reads the moved rows again with Z kept. At each
  step: the embeddings, the scores, Z, the loss and its two sides, the banks after the call and
  the gradients w.r.t. f_s and both embed Linears (f_t is a constant)."""
  g = GOLDEN
  module = _module(p)
  step = _step_fn(module)
  n_data = int(g[f"{p}_hp_n_data"])
  labels = g[f"{p}_dataset_labels"]
  variables = _variables(p)
  for q in (p, p + "2"):
    index = g[f"{q}_idx"].astype(np.int32)
    contrast = g[f"{q}_contrast_idx"].astype(np.int32)
    # The indices are the reference sampler's: column 0 the example, negatives of other classes.
    np.testing.assert_array_equal(contrast[:, 0], index)
    assert np.all(labels[contrast[:, 1:]] != labels[index][:, None])
    f_s, f_t = jnp.asarray(g[f"{q}_f_s"]), jnp.asarray(g[f"{q}_f_t"])
    loss, out, stats, (grad_params, grad_fs, grad_ft) = step(variables, f_s, f_t, index,
                                                             contrast)
    params = variables["params"]
    for side, f in (("embed_s", f_s), ("embed_t", f_t)):
      embedded = crd.unit_rows(f @ params[side]["kernel"] + params[side]["bias"])
      np.testing.assert_allclose(embedded, g[f"{q}_{side}_out"], **STATE_TOL)

    np.testing.assert_allclose(out["crd_student"], g[f"{q}_out_s"][..., 0], **STATE_TOL)
    np.testing.assert_allclose(out["crd_teacher"], g[f"{q}_out_t"][..., 0], **STATE_TOL)
    np.testing.assert_allclose(stats["z_s"], g[f"{q}_Z_v1"], rtol=1e-5)
    np.testing.assert_allclose(stats["z_t"], g[f"{q}_Z_v2"], rtol=1e-5)
    np.testing.assert_allclose(crd.contrast_loss(out["crd_student"], n_data), g[f"{q}_loss_s"],
                               **LOSS_TOL)
    np.testing.assert_allclose(crd.contrast_loss(out["crd_teacher"], n_data), g[f"{q}_loss_t"],
                               **LOSS_TOL)
    np.testing.assert_allclose(loss, g[f"{q}_loss"], **LOSS_TOL)
    np.testing.assert_allclose(loss, g[f"{q}_loss_f64"], rtol=1e-5)
    np.testing.assert_allclose(stats["memory_s"], g[f"{q}_memory_v1_after"], **STATE_TOL)
    np.testing.assert_allclose(stats["memory_t"], g[f"{q}_memory_v2_after"], **STATE_TOL)

    np.testing.assert_allclose(grad_fs, g[f"{q}_grad_f_s"], **GRAD_TOL)
    for side in ("embed_s", "embed_t"):
      np.testing.assert_allclose(grad_params[side]["kernel"],
                                 g[f"{q}_grad_param.{side}.linear.weight"].T, **GRAD_TOL)
      np.testing.assert_allclose(grad_params[side]["bias"],
                                 g[f"{q}_grad_param.{side}.linear.bias"], **GRAD_TOL)
    assert np.all(np.asarray(grad_ft) == 0)
    # No optimiser step between the reference's two calls: same parameters, the new state.
    variables = {"params": params, "batch_stats": stats}


def test_evaluation_mode_leaves_the_state_alone():
  """Outside training the banks and Z do not move; with Z unset the scores are normalised by
  the batch's own constant, as in the first training call."""
  g = GOLDEN
  module = _module("crd")
  variables = _variables("crd")
  batch = {"index": g["crd_idx"].astype(np.int32),
           "contrast_index": g["crd_contrast_idx"].astype(np.int32)}
  out, updates = module.apply(variables, _out(jnp.asarray(g["crd_f_s"])),
                              _out(jnp.asarray(g["crd_f_t"])), batch, train=False,
                              mutable=["batch_stats"])
  jax.tree.map(np.testing.assert_array_equal, updates["batch_stats"], variables["batch_stats"])
  np.testing.assert_allclose(out["crd_student"], g["crd_out_s"][..., 0], **STATE_TOL)
  np.testing.assert_allclose(out["loss_crd"], g["crd_loss"], **LOSS_TOL)
