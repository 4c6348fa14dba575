"""ICKD (jaxkd.methods.ickd) against the reference's numbers (tests/data/golden_modern.npz:
`ICKDLoss(opt)([feat_s[-2]], [feat_t[-2]])` of ADLab-AutoDrive/ICKD, prefix ickd): the student
embedding (1×1 conv + BatchNorm in training mode), the loss, the gradients with respect to the
student map and the embedding's parameters, and the BatchNorm's running statistics; then the
bridge in the trainer's step on 1 and 4 devices."""

import collections
import os

import jax
import jax.numpy as jnp
import numpy as np

import method_steps
from jaxkd.methods import get_method, ickd

from modern_golden import GOLDEN, assert_grad_close


LOSS_TOL = dict(rtol=1e-5, atol=1e-8)
OUT_TOL = dict(rtol=1e-5, atol=1e-5)
STATE_TOL = dict(rtol=1e-5, atol=1e-6)


def nhwc(x):
  return jnp.asarray(np.transpose(x, (0, 2, 3, 1)))


def _out(f):
  """A network's outputs as the bridge sees them: the map as taps[-2], then the pooled vector."""
  return {"feats": collections.OrderedDict([("stage3", f), ("pooled", jnp.mean(f, (1, 2)))])}


def _variables():
  """The reference's embed_s before the step: conv OIHW -> HWIO, BN γ, β and running stats."""
  g = GOLDEN
  key = "ickd_param.embed_s"
  params = {"embed_s": {"conv": {"kernel": np.transpose(g[f"{key}.conv2d.weight"], (2, 3, 1, 0))},
                        "bn": {"scale": g[f"{key}.l2norm.weight"],
                               "bias": g[f"{key}.l2norm.bias"]}}}
  stats = {"embed_s": {"bn": {"mean": g[f"{key}.l2norm.running_mean"],
                              "var": g[f"{key}.l2norm.running_var"]}}}
  return jax.tree.map(jnp.asarray, {"params": params, "batch_stats": stats})


def test_initialisation_embeds_the_student_to_the_teachers_width():
  """From batch-1 outputs of both sides it creates exactly the reference's embed_s (a 1×1 conv
  without bias, t_C = feat_dim outputs, PyTorch's default init; a BatchNorm at γ 1, β 0)."""
  g = GOLDEN
  f_s, f_t = nhwc(g["ickd_feat_s"]), nhwc(g["ickd_feat_t"])
  assert f_t.shape[-1] == int(g["ickd_hp_feat_dim"])
  out, created = ickd.ICKDBridge().init_with_output(
      jax.random.key(0), _out(jnp.zeros_like(f_s[:1])), _out(jnp.zeros_like(f_t[:1])))
  assert set(out) == {"loss_ickd"}
  assert jax.tree.map(jnp.shape, created) == jax.tree.map(jnp.shape, _variables())
  kernel = created["params"]["embed_s"]["conv"]["kernel"]
  assert np.all(np.abs(kernel) <= 1.0 / np.sqrt(f_s.shape[-1])) and np.std(kernel) > 0
  np.testing.assert_array_equal(created["params"]["embed_s"]["bn"]["scale"], 1.0)
  np.testing.assert_array_equal(created["params"]["embed_s"]["bn"]["bias"], 0.0)


def test_one_step_matches_the_reference():
  g = GOLDEN
  module = ickd.ICKDBridge()
  variables = _variables()
  f_s, f_t = nhwc(g["ickd_feat_s"]), nhwc(g["ickd_feat_t"])

  @jax.jit
  def step(params, a, b):
    def loss_fn(params, a, b):
      out, updates = module.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                  _out(a), _out(b), None, train=True, mutable=["batch_stats"])
      return out["loss_ickd"], updates["batch_stats"]
    (loss, stats), grads = jax.value_and_grad(loss_fn, argnums=(0, 1, 2), has_aux=True)(
        params, a, b)
    embedded = ickd.ChannelEmbed(b.shape[-1]).apply(
        {"params": params["embed_s"], "batch_stats": variables["batch_stats"]["embed_s"]}, a,
        train=True, mutable=["batch_stats"])[0]
    return loss, stats, grads, embedded

  loss, stats, (grad_params, grad_fs, grad_ft), embedded = step(variables["params"], f_s, f_t)
  np.testing.assert_allclose(embedded, nhwc(g["ickd_embed_s_out"]), **OUT_TOL)
  np.testing.assert_allclose(loss, g["ickd_loss"], **LOSS_TOL)
  np.testing.assert_allclose(loss, g["ickd_loss_f64"], rtol=1e-5)
  # torchdistill's ChSimLoss divides by C·B² instead of C·B.
  np.testing.assert_allclose(loss / f_s.shape[0], g["ickd_loss_torchdistill_chsim"], **LOSS_TOL)

  assert_grad_close(grad_fs, nhwc(g["ickd_grad_feat_s"]))
  key = "ickd_grad_param.embed_s"
  assert_grad_close(grad_params["embed_s"]["conv"]["kernel"],
                    np.transpose(g[f"{key}.conv2d.weight"], (2, 3, 1, 0)))
  assert_grad_close(grad_params["embed_s"]["bn"]["scale"], g[f"{key}.l2norm.weight"])
  assert_grad_close(grad_params["embed_s"]["bn"]["bias"], g[f"{key}.l2norm.bias"])
  assert np.all(np.asarray(grad_ft) == 0)

  bn = stats["embed_s"]["bn"]
  np.testing.assert_allclose(bn["mean"], g["ickd_updated.embed_s.l2norm.running_mean"],
                             **STATE_TOL)
  np.testing.assert_allclose(bn["var"], g["ickd_updated.embed_s.l2norm.running_var"],
                             **STATE_TOL)
  assert int(g["ickd_updated.embed_s.l2norm.num_batches_tracked"]) == 1


def _numpy_ickd(f_s, f_t):
  """The loss in float64 NumPy from NCHW maps: per sample G = F Fᵀ over positions, rows
  normalised, Σ (G_s − G_t)² / (C · B)."""
  def gram(f):
    flat = f.reshape(f.shape[0], f.shape[1], -1).astype(np.float64)
    g = flat @ flat.transpose(0, 2, 1)
    return g / np.maximum(np.linalg.norm(g, axis=2, keepdims=True), 1e-12)
  b, c = f_s.shape[:2]
  return np.sum((gram(f_s) - gram(f_t)) ** 2) / (c * b)


def test_maps_of_different_sizes_compare_through_their_channel_grams():
  """The Gram matrices are C×C whatever H·W, so a teacher map of another spatial size works,
  as in the reference (only the channels must agree after the embedding)."""
  rng = np.random.default_rng(0)
  f_s = rng.normal(size=(4, 16, 4, 4)).astype(np.float32)
  f_t = rng.normal(size=(4, 16, 2, 2)).astype(np.float32)
  np.testing.assert_allclose(ickd.ickd_loss(nhwc(f_s), nhwc(f_t)), _numpy_ickd(f_s, f_t),
                             rtol=1e-5)
  np.testing.assert_allclose(ickd.ickd_loss(nhwc(f_s), nhwc(f_s)), 0.0, atol=1e-10)


def test_defaults_are_the_authors_scripts():
  """run_cifar_distill.sh / Cifar100/README.md: ICKD `-a 0 -b 2.5` (-r 1), ICKD-C `-a 1 -b 2.5`."""
  g = GOLDEN
  hparams = get_method("ickd").hparams()
  assert (hparams.ce_weight, hparams.kd_weight, hparams.feat_weight) == (
      float(g["ickd_hp_w_gamma"]), float(g["ickd_hp_w_alpha"]), float(g["ickd_hp_w_beta"]))
  assert hparams.T == 4.0
  with_kd = get_method("ickd_kd").hparams()
  assert (with_kd.ce_weight, with_kd.kd_weight, with_kd.feat_weight) == (1.0, 1.0, 2.5)


def test_training_steps_do_not_depend_on_the_device_count():
  """resnet8x4 → resnet8 through the trainer's step: the embedding's BatchNorm and the loss
  read the global batch, so 1 and 4 devices give the same terms, parameters (the embedding's
  included) and running statistics."""
  one, four = method_steps.one_and_four_devices("ickd")
  method_steps.assert_same_run(one, four, ["loss", "loss_ickd", "loss_ce", "grad_norm"])
  state, metrics = one
  assert set(state.params["bridge"]) == {"embed_s"}
  kernel = state.params["bridge"]["embed_s"]["conv"]["kernel"]
  assert kernel.shape == (1, 1, 64, 256)
  assert float(metrics[0]["loss_ickd"]) > 0
  # The running statistics of the embedding's BatchNorm moved.
  assert not np.allclose(state.batch_stats["bridge"]["embed_s"]["bn"]["mean"], 0.0)
