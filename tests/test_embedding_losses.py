"""EGA's comparison methods on the joint embeddings (hint, RKD, PKT, NCE, CCL, CRD) against the
reference code's numbers (tests/data/golden_embedding_losses.npz, written by
tests/data/make_embedding_goldens.py), the negatives the pipeline draws for CRD, and how the
EGA method routes `distill`."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import helpers

from jaxkd import data
from jaxkd.data import negatives
from jaxkd.errors import UserError
from jaxkd.methods import crd
from jaxkd.methods import ega
from jaxkd.methods import embedding_losses as el
from jaxkd.methods import get_method
from jaxkd.methods.losses import cross_entropy, distill_kl

GOLDEN = np.load(os.path.join(os.path.dirname(__file__), "data",
                              "golden_embedding_losses.npz"))


def _inputs():
  g = GOLDEN
  return (jnp.asarray(g["fs"]), jnp.asarray(g["ft"]), jnp.asarray(g["labels"]),
          jnp.asarray(g["logit_s"]), jnp.asarray(g["logit_t"]))


PURE_LOSSES = {
    "hint": lambda fs, ft, y, ls, lt: el.hint_loss(fs, ft),
    "rkd": lambda fs, ft, y, ls, lt: el.rkd_loss(fs, ft),
    "pkt": lambda fs, ft, y, ls, lt: el.pkt_loss(fs, ft),
    "nce": lambda fs, ft, y, ls, lt: el.class_nce_loss(fs, ft, y, 0.1),
    "ccl": lambda fs, ft, y, ls, lt: el.ccl_loss(fs, ft, y, ls, lt),
}


@pytest.mark.parametrize("name", sorted(PURE_LOSSES))
def test_loss_and_gradients_match_the_reference(name):
  fs, ft, labels, logit_s, logit_t = _inputs()
  fn = PURE_LOSSES[name]
  value, (grad_fs, grad_logit_s, grad_ft) = jax.jit(jax.value_and_grad(
      lambda a, b, c: fn(a, c, labels, b, logit_t), argnums=(0, 1, 2)))(fs, logit_s, ft)
  np.testing.assert_allclose(value, GOLDEN[f"{name}_loss"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grad_fs, GOLDEN[f"{name}_grad_fs"], rtol=1e-4, atol=1e-6)
  if f"{name}_grad_logit_s" in GOLDEN:
    np.testing.assert_allclose(grad_logit_s, GOLDEN[f"{name}_grad_logit_s"], rtol=1e-4,
                               atol=1e-6)
  # The teacher side is a constant for the student.
  assert np.all(np.asarray(grad_ft) == 0)


def test_degenerate_inputs_stay_finite():
  """Identical rows (zero distances, zero difference vectors) and a batch of one class give
  finite values and gradients (the reference gives NaN for NCE's empty negative set)."""
  fs = jnp.ones((4, 5))
  ft = jnp.arange(20.0).reshape(4, 5)
  labels = jnp.zeros(4, jnp.int32)
  for fn in PURE_LOSSES.values():
    value, grad = jax.value_and_grad(fn)(fs, ft, labels, jnp.zeros((4, 3)), jnp.ones((4, 3)))
    assert np.isfinite(value) and np.all(np.isfinite(grad))


def test_rkd_on_a_hand_computed_example():
  """Three points; the student's triangle is the teacher's scaled by 2, so distances (after
  dividing by their mean) and angles agree and the loss is 0; moving one point changes it."""
  t = jnp.array([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
  assert float(el.rkd_loss(2.0 * t, t)) == pytest.approx(0.0, abs=1e-6)
  # Distances 3, 4, 5 have mean 4: normalised 0.75, 1, 1.25 (each pair twice, zeros on the
  # diagonal).
  d = el.pairwise_distances(t)
  np.testing.assert_allclose(d, [[0, 3, 4], [3, 0, 5], [4, 5, 0]], rtol=1e-6)
  assert float(el.rkd_loss(t.at[2, 1].set(1.0), t)) > 0.0


# ---------------------------------------------------------------------------------- CRD


def _crd_module():
  g = GOLDEN
  return crd.ContrastMemory(num_data=int(g["crd_N"]), embed_dim=int(g["D"]),
                            feat_dim=int(g["crd_F"]), temperature=0.07, momentum=0.5)


def _crd_variables():
  g = GOLDEN
  params = {"embed_s": {"kernel": g["crd_embed_s_w"].T, "bias": g["crd_embed_s_b"]},
            "embed_t": {"kernel": g["crd_embed_t_w"].T, "bias": g["crd_embed_t_b"]}}
  stats = {"memory_s": g["crd_memory_s0"], "memory_t": g["crd_memory_t0"],
           "z_s": np.float32(-1.0), "z_t": np.float32(-1.0)}
  return jax.tree.map(jnp.asarray, {"params": params, "batch_stats": stats})


def test_crd_memory_two_steps_match_the_reference():
  """Two steps: loss and gradients (student embedding, both embedding layers), the banks after
  each step, and the normalisation constants fixed by the first step."""
  module = _crd_module()
  g = GOLDEN
  n = int(g["crd_N"])

  @jax.jit
  def step(variables, fs, ft, index, contrast):
    def loss_fn(params, fs):
      out, updates = module.apply(
          {"params": params, "batch_stats": variables["batch_stats"]}, {"embedding": fs},
          {"embedding": ft}, {"index": index, "contrast_index": contrast}, train=True,
          mutable=["batch_stats"])
      loss = crd.crd_loss(out["crd_student"], out["crd_teacher"], n)
      return out["loss_crd"], (loss, updates["batch_stats"])
    (value, (loss, stats)), grads = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
        variables["params"], fs)
    return value, loss, grads, stats

  variables = _crd_variables()
  # Created at initialisation, without a teacher: the same tree.
  created = module.init(jax.random.key(0), {"embedding": jnp.zeros((1, int(g["D"])))}, None,
                        None)
  assert jax.tree.map(jnp.shape, created) == jax.tree.map(jnp.shape, variables)
  bound = 1.0 / np.sqrt(int(g["crd_F"]) / 3)
  assert np.all(np.abs(created["batch_stats"]["memory_s"]) <= bound)
  for s in (1, 2):
    p = f"crd{s}_"
    value, loss, (grad_params, grad_fs), stats = step(
        variables, g[p + "fs"], g[p + "ft"], g[p + "index"], g[p + "contrast_index"])
    np.testing.assert_allclose(loss, g[p + "loss"][0], rtol=1e-5)
    np.testing.assert_allclose(value, loss, rtol=1e-6)
    np.testing.assert_allclose(grad_fs, g[p + "grad_fs"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(grad_params["embed_s"]["kernel"], g[p + "grad_embed_s_w"].T,
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(grad_params["embed_t"]["kernel"], g[p + "grad_embed_t_w"].T,
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats["memory_s"], g[p + "memory_s"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["memory_t"], g[p + "memory_t"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["z_s"], g[p + "z_s"], rtol=1e-5)
    np.testing.assert_allclose(stats["z_t"], g[p + "z_t"], rtol=1e-5)
    variables = {"params": variables["params"], "batch_stats": stats}


def test_contrast_loss_on_a_hand_computed_example():
  """One row, K = 2, N = 4: noise m·Pn = 1/2; scores (1, 1/2, 3/2):
  L = −[log(1/1.5) + log(0.5/1) + log(0.5/2)] (ε aside)."""
  value = crd.contrast_loss(jnp.array([[1.0, 0.5, 1.5]]), num_data=4)
  want = -(np.log(1 / 1.5) + np.log(0.5 / 1.0) + np.log(0.5 / 2.0))
  assert float(value) == pytest.approx(want, rel=1e-5)


# ----------------------------------------------------------------- negatives in the pipeline


def test_other_class_sampler_draws_distinct_other_class_examples():
  labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 1, 2, 0, 2])
  key = (3, 4)
  for k, distinct in ((5, True), (8, True), (10, False)):
    sampler = negatives.OtherClassSampler(labels, k)
    for i, c in enumerate(labels):
      got = sampler(i, c, key)
      assert got.shape == (k + 1,) and got[0] == i
      assert np.all(labels[got[1:]] != c) and np.all((0 <= got) & (got < len(labels)))
      others = np.sum(labels != c)
      if k <= others:
        assert len(set(got[1:])) == k  # without replacement
      else:
        assert not distinct
    np.testing.assert_array_equal(sampler(2, 2, key), sampler(2, 2, key))
  with pytest.raises(UserError, match="two classes"):
    negatives.OtherClassSampler(np.zeros(5, np.int64), 2)


def test_training_batches_carry_index_and_other_class_negatives(digits_dir):
  config = helpers.dataset_config("digits", digits_dir, num_train_examples=40,
                                  num_eval_examples=8, train_fraction=0.5)
  info = data.get_dataset_info(config)
  split_index, set_labels = data.pipeline.training_set(config, info, seed=3)
  assert len(set_labels) == info.num_train == 20
  batches = data.train_batches(config, "none", 10, seed=3, num_negatives=6)
  seen = []
  for _ in range(2):  # One epoch.
    batch = next(batches)
    assert batch["contrast_index"].shape == (10, 7)
    np.testing.assert_array_equal(batch["contrast_index"][:, 0], batch["index"])
    np.testing.assert_array_equal(set_labels[batch["index"]], batch["label"])
    assert np.all(set_labels[batch["contrast_index"][:, 1:]] != batch["label"][:, None])
    seen.extend(batch["index"])
  assert sorted(seen) == list(range(20))
  resumed = next(data.train_batches(config, "none", 10, seed=3, start_step=1, num_negatives=6))
  np.testing.assert_array_equal(resumed["contrast_index"], batch["contrast_index"])


# -------------------------------------------------------------------- the EGA method routes


def test_distill_choice_weighs_its_term_and_keeps_ce_and_kd():
  fs, ft, labels, logit_s, logit_t = _inputs()
  student, teacher = {"embedding": fs, "logits": logit_s}, {"embedding": ft, "logits": logit_t}
  ce, kd = cross_entropy(logit_s, labels), distill_kl(logit_s, logit_t, 4.0)
  for name in ("hint", "rkd", "pkt", "nce", "ccl"):
    method = get_method(f"ega_{name}")
    hparams = method.hparams(ml_collections.ConfigDict(dict(beta=2.0, alpha=0.5)))
    loss, metrics = method.loss(student, teacher, labels, hparams)
    term = PURE_LOSSES[name](fs, ft, labels, logit_s, logit_t)
    np.testing.assert_allclose(metrics[f"loss_{name}"], term, rtol=1e-6)
    np.testing.assert_allclose(loss, ce + 2.0 * term + 0.5 * kd, rtol=1e-5)
  kd_method = get_method("ega_kd")
  loss, _ = kd_method.loss(student, teacher, labels, kd_method.hparams())
  np.testing.assert_allclose(loss, ce + kd, rtol=1e-5)
  crd_hparams = get_method("ega_crd").hparams()
  loss, _ = ega.ega_loss(dict(student, loss_crd=jnp.float32(3.0)), teacher, labels, crd_hparams)
  np.testing.assert_allclose(loss, ce + 3.0, rtol=1e-5)
  assert get_method("ega_crd").negatives(crd_hparams) == 16384
  assert ega.METHOD.negatives(ega.METHOD.hparams()) == 0
  assert ega.METHOD.bridge(100, ega.METHOD.hparams()) is None


def test_unknown_distill_is_refused_with_the_choices():
  hparams = ega.METHOD.hparams(ml_collections.ConfigDict(dict(distill="fitnet")))
  with pytest.raises(UserError, match="fitnet.*hint"):
    ega.METHOD.check_hparams(hparams)
