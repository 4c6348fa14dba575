"""SSKD against the reference code (tests/data/golden_sskd.npz), and its pieces by hand."""

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxkd.methods import get_method
from jaxkd.methods import sskd

DATA = os.path.join(os.path.dirname(__file__), "data")
HPARAMS = ("kd_T", "tf_T", "ss_T", "ratio_tf", "ratio_ss", "ce_weight", "kd_weight", "tf_weight",
           "ss_weight")


@pytest.fixture(scope="module")
def golden():
  return dict(np.load(os.path.join(DATA, "golden_sskd.npz")))


def _hparams(g, prefix):
  return ml_collections.ConfigDict({k: float(g[f"{prefix}hp_{k}"]) for k in HPARAMS})


def _linear(w, b):
  """A torch Linear (out, in) as the params of jaxkd's Linear."""
  return {"kernel": jnp.asarray(w.T), "bias": jnp.asarray(b)}


def _student_params(g):
  return {"body": _linear(g["s_body_w"], g["s_body_b"]), "fc": _linear(g["s_fc_w"], g["s_fc_b"]),
          "ss": {"fc1": _linear(g["s_proj_w1"], g["s_proj_b1"]),
                 "fc2": _linear(g["s_proj_w2"], g["s_proj_b2"])}}


def _student_forward(params, x_flat):
  """The golden's stand-in student: f = relu(x W^T + b), logits = fc(f), rep = SS(f)."""
  feat = jax.nn.relu(x_flat @ params["body"]["kernel"] + params["body"]["bias"])
  logits = feat @ params["fc"]["kernel"] + params["fc"]["bias"]
  rep = sskd.SSModule().apply({"params": params["ss"]}, {"feats": {"pooled": feat}})["ss_rep"]
  return logits, rep


# ------------------------------------------------------------------------- the SS module


def test_ss_module_is_the_reference_head_with_torch_init(golden):
  g = golden
  t_head = {"fc1": _linear(g["t_proj_w1"], g["t_proj_b1"]),
            "fc2": _linear(g["t_proj_w2"], g["t_proj_b2"])}
  out = sskd.SSModule().apply({"params": t_head}, {"feats": {"pooled": g["t_feat"]}})
  np.testing.assert_allclose(out["ss_rep"], g["t_rep"], rtol=1e-5, atol=1e-5)
  _, rep = _student_forward(_student_params(g), g["x_flat"])
  np.testing.assert_allclose(rep, g["s_rep"], rtol=1e-5, atol=1e-5)

  # PyTorch's default Linear init: weights and biases U(±1/sqrt(d)), d = the pooled width.
  head = sskd.ss_module(100, None, None)
  variables = head.init(jax.random.key(0), {"feats": {"pooled": jnp.ones((2, 256))}})
  bound = 1 / np.sqrt(256)
  for layer in ("fc1", "fc2"):
    kernel, bias = variables["params"][layer]["kernel"], variables["params"][layer]["bias"]
    assert kernel.shape == (256, 256) and bias.shape == (256,)
    assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.95 * bound
    assert np.abs(bias).max() <= bound
    np.testing.assert_allclose(np.var(kernel), bound ** 2 / 3, rtol=0.05)


# -------------------------------------------------------------------------- the pieces


def test_layout_cosine_matrices_and_ranks(golden):
  g = golden
  b = int(g["B"])
  originals, transformed = sskd.split_views(jnp.arange(4 * b))
  np.testing.assert_array_equal(originals, np.flatnonzero(g["nor_index"]))
  np.testing.assert_array_equal(transformed, np.flatnonzero(g["aug_index"]))
  np.testing.assert_array_equal(sskd.transformed_targets(b), g["ss_targets"])
  np.testing.assert_array_equal(sskd.transformed_labels(g["labels"]), g["aug_labels"])

  np.testing.assert_allclose(sskd.cosine_matrix(g["t_rep"]), g["t_simi"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(sskd.cosine_matrix(g["s_rep"]), g["s_simi"], rtol=1e-5, atol=1e-6)

  _, t_aug = sskd.split_views(g["t_logits"])
  for temperature in (g["hp_tf_T"], g["alt_hp_tf_T"]):
    rank = sskd.target_rank(jax.nn.softmax(t_aug / temperature), g["aug_labels"])
    np.testing.assert_array_equal(rank, g["tf_rank"])
  np.testing.assert_array_equal(sskd.target_rank(g["t_simi"], g["ss_targets"]), g["ss_rank"])


def test_teacher_ss_pretraining_loss_and_accuracy(golden):
  loss, acc = sskd.ss_pretrain_loss(golden["t_rep"])
  np.testing.assert_allclose(loss, golden["t_ss_pretrain_loss"], rtol=1e-5)
  np.testing.assert_allclose(acc, golden["t_ss_pretrain_acc"], rtol=0, atol=0)
  # The same through the method's teacher loss on network outputs.
  value, metrics = sskd.METHOD.teacher.loss({"ss_rep": golden["t_rep"]}, None, golden["labels"],
                                            sskd.METHOD.hparams())
  np.testing.assert_allclose(value, golden["t_ss_pretrain_loss"], rtol=1e-5)
  np.testing.assert_allclose(metrics["ss_acc"], golden["t_ss_pretrain_acc"])


def test_selection_keeps_smallest_ranks_with_stable_ties():
  ranks = jnp.array([0, 2, 1, 2, 0, 3])
  sel = sskd.select_rows(ranks, 0.5)  # 2 correct, 4 wrong: K = 2 + 2
  assert (int(sel.correct), int(sel.wrong), int(sel.kept)) == (2, 4, 4)
  np.testing.assert_array_equal(sel.mask, [True, True, True, False, True, False])
  # All 100 rows wrong: K = int(100 * 0.29) = 28 in Python's float64 (28.999999999999996).
  sel = jax.jit(sskd.select_rows, static_argnums=1)(jnp.ones(100, jnp.int32), 0.29)
  assert int(sel.kept) == int(100 * 0.29) == 28
  np.testing.assert_array_equal(sel.mask, np.arange(100) < 28)
  sel = sskd.select_rows(jnp.array([3, 0, 1, 0]), 1.0)
  assert int(sel.kept) == 4 and bool(sel.mask.all())
  sel = sskd.select_rows(jnp.array([3, 0, 1, 0]), 0.0)
  np.testing.assert_array_equal(sel.mask, [False, True, False, True])


def test_masked_distill_kl_by_hand():
  s = np.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [2.0, 2.0, 2.0]], np.float32)
  t = np.array([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0], [0.0, 5.0, 0.0]], np.float32)
  mask = np.array([True, False, True])

  def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

  p_t, p_s = softmax(t / 2), softmax(s / 2)
  kl = np.sum(p_t * (np.log(p_t) - np.log(p_s)), -1)
  np.testing.assert_allclose(sskd.masked_distill_kl(s, t, 2.0, mask), 4 * kl[mask].mean(),
                             rtol=1e-6)
  grad = jax.grad(sskd.masked_distill_kl)(s, t, 2.0, mask)
  np.testing.assert_array_equal(grad[1], 0.0)
  np.testing.assert_allclose(grad[mask], 2.0 / 2 * (p_s - p_t)[mask], atol=1e-6)


# ----------------------------------------------------------------------- the whole loss


@functools.lru_cache(maxsize=None)
def _run(prefix):
  """Terms, input gradients and student parameter gradients of one hparams set, in one jit."""
  g = dict(np.load(os.path.join(DATA, "golden_sskd.npz")))
  hp = _hparams(g, prefix)

  def total(s_logits, s_rep, t_logits, t_rep):
    terms = sskd.sskd_loss(s_logits, t_logits, s_rep, t_rep, g["labels"], hp)
    return terms.total, terms

  def student_total(params):
    logits, rep = _student_forward(params, g["x_flat"])
    return total(logits, rep, g["t_logits"], g["t_rep"])[0]

  @jax.jit
  def run(s_logits, s_rep, t_logits, t_rep, params):
    input_grads, terms = jax.grad(total, argnums=(0, 1, 2, 3), has_aux=True)(
        s_logits, s_rep, t_logits, t_rep)
    value, param_grads = jax.value_and_grad(student_total)(params)
    return terms, input_grads, value, param_grads

  return jax.device_get(run(g["s_logits"], g["s_rep"], g["t_logits"], g["t_rep"],
                            _student_params(g)))


@pytest.mark.parametrize("prefix", ["", "alt_"])
def test_sskd_loss_terms_masks_and_counts_match_reference(golden, prefix):
  g, p = golden, prefix
  terms = _run(prefix)[0]
  for name in ("ce", "kd", "tf", "ss", "total"):
    np.testing.assert_allclose(getattr(terms, name), g[f"{p}loss_{name}_f64"], rtol=1e-5,
                               err_msg=name)
    np.testing.assert_allclose(getattr(terms, name), g[f"{p}loss_{name}"], rtol=1e-5)
  np.testing.assert_array_equal(terms.rank_tf, g["tf_rank"])
  np.testing.assert_array_equal(terms.rank_ss, g["ss_rank"])
  for term in ("tf", "ss"):
    mask = np.asarray(getattr(terms, f"mask_{term}"))
    np.testing.assert_array_equal(mask, g[f"{p}mask_{term}"])
    np.testing.assert_array_equal(np.flatnonzero(mask), g[f"{p}distill_index_{term}"])
    correct = int(getattr(terms, f"correct_{term}"))
    assert correct == g[f"{p}{term}_correct_num"]
    assert mask.size - correct == g[f"{p}{term}_wrong_num"]
    assert int(getattr(terms, f"kept_{term}")) == g[f"{p}{term}_keep_num"] == mask.sum()


@pytest.mark.parametrize("prefix", ["", "alt_"])
def test_sskd_gradients_match_reference(golden, prefix):
  g, p = golden, prefix
  _, grads, student_total, pgrads = _run(prefix)
  np.testing.assert_allclose(grads[0], g[f"{p}grad_s_logits"], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(grads[1], g[f"{p}grad_s_rep"], rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(grads[2], 0.0)  # The teacher side carries no gradient.
  np.testing.assert_array_equal(grads[3], 0.0)
  # Rows dropped by a selection get exactly zero gradient.
  _, trans_grad = sskd.split_views(grads[0])
  dropped = ~g[f"{p}mask_tf"]
  assert np.all(np.asarray(trans_grad)[dropped] == 0.0)
  assert np.all(g[f"{p}grad_s_logits"][g["aug_index"]][dropped] == 0.0)

  # Through the stand-in student: every parameter gradient, as the reference's autograd.
  np.testing.assert_allclose(student_total, g[f"{p}loss_total_f64"], rtol=1e-5)
  for key, name in (("body", "s_body"), ("fc", "s_fc")):
    np.testing.assert_allclose(pgrads[key]["kernel"].T, g[f"{p}grad_{name}_w"], rtol=1e-4,
                               atol=1e-6)
    np.testing.assert_allclose(pgrads[key]["bias"], g[f"{p}grad_{name}_b"], rtol=1e-4, atol=1e-6)
  for layer, i in (("fc1", 1), ("fc2", 2)):
    np.testing.assert_allclose(pgrads["ss"][layer]["kernel"].T, g[f"{p}grad_s_proj_w{i}"],
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(pgrads["ss"][layer]["bias"], g[f"{p}grad_s_proj_b{i}"],
                               rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------- the method


def test_method_registry_defaults_and_metrics(golden):
  g = golden
  method = get_method("sskd")
  assert method is sskd.METHOD and method.views == "rotations" and method.uses_teacher
  assert method.teacher.views == "rotations" and method.teacher.frozen_backbone
  hp = method.hparams(ml_collections.ConfigDict(dict(name="sskd", ratio_ss=0.5)))
  assert (hp.kd_T, hp.tf_T, hp.ss_T, hp.ratio_tf, hp.ratio_ss) == (4.0, 4.0, 0.5, 1.0, 0.5)
  assert (hp.ce_weight, hp.kd_weight, hp.tf_weight, hp.ss_weight) == (0.1, 0.9, 2.7, 10.0)
  assert (hp.teacher_epochs, hp.teacher_lr, tuple(hp.teacher_milestones)) == (60, 0.05, (30, 45))

  hp = _hparams(g, "")
  loss, metrics = method.loss({"logits": g["s_logits"], "ss_rep": g["s_rep"]},
                              {"logits": g["t_logits"], "ss_rep": g["t_rep"]}, g["labels"], hp)
  np.testing.assert_allclose(loss, g["loss_total_f64"], rtol=1e-5)
  for name in ("ce", "kd", "tf", "ss"):
    np.testing.assert_allclose(metrics[f"loss_{name}"], g[f"loss_{name}_f64"], rtol=1e-5)
  assert float(metrics["kept_tf"]) == g["tf_keep_num"] and float(metrics["kept_ss"]) == 21
  s_orig = g["s_logits"][g["nor_index"]]
  np.testing.assert_allclose(metrics["top1"], np.mean(s_orig.argmax(-1) == g["labels"]))
  targets = g["ss_targets"]
  np.testing.assert_allclose(metrics["ss_acc"], np.mean(g["s_simi"].argmax(-1) == targets))
  np.testing.assert_allclose(metrics["teacher_ss_acc"], g["t_ss_pretrain_acc"])
  np.testing.assert_allclose(metrics["teacher_tf_top1"], g["tf_correct_num"] / 24)
  assert all(np.ndim(v) == 0 for v in metrics.values())


def test_eval_metrics_score_each_image_and_skip_padding(golden):
  g = golden
  per_image = sskd.METHOD.eval_metrics({"ss_rep": g["t_rep"]}, g["labels"], None)["ss_acc"]
  correct = g["t_simi"].argmax(-1) == g["ss_targets"]
  np.testing.assert_allclose(per_image, correct.reshape(8, 3).mean(-1))
  np.testing.assert_allclose(per_image.mean(), g["t_ss_pretrain_acc"], rtol=1e-6)
  # A padding image (mask 0) is no negative of the real ones.
  assert per_image[3] == 1.0
  rep = np.asarray(g["t_rep"]).copy()
  rep[4] = rep[13]  # Image 1's original is image 3's first rotated view.
  mask = np.ones(8, np.float32)
  mask[1] = 0.0
  scores = sskd.eval_metrics({"ss_rep": rep}, g["labels"], None, mask=mask)["ss_acc"]
  unmasked = sskd.eval_metrics({"ss_rep": rep}, g["labels"], None)["ss_acc"]
  assert scores[3] == 1.0 and unmasked[3] < 1.0
