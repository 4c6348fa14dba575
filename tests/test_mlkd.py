"""MLKD (jaxkd.methods.mlkd) against the reference's numbers (tests/data/golden_modern.npz:
KD_ours called as AugTrainer calls it, prefix mlkd; the logit standardization fork's MLKD,
prefix ls_mlkd): losses, parts, per-temperature terms, masks, gradients; its rows and its
per-view student forward in the trainer's step; its in-batch terms on 1 and 4 devices."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import method_steps
from jaxkd import networks
from jaxkd import parallel
from jaxkd import steps
from jaxkd.errors import UserError
from jaxkd.methods import get_method, mlkd
from jaxkd.methods import logit_standardization as ls

from modern_golden import GOLDEN, assert_grad_close, assert_logit_objective_is_global

PREFIXES = ["mlkd", "ls_mlkd"]
LOSS_TOL = dict(rtol=1e-5, atol=1e-8)
PARTS = ("ce", "kd", "cc", "bc", "kd_weak", "kd_strong", "cc_weak", "cc_strong", "bc_weak",
         "bc_strong")


def _hparams(p):
  """The golden's hyper-parameters under jaxkd's names."""
  g = GOLDEN
  return ml_collections.ConfigDict(dict(
      T=float(g[f"{p}_hp_T"]), kd_weight=float(g[f"{p}_hp_kd_weight"]),
      ce_weight=float(g[f"{p}_hp_ce_weight"]), percentile=float(g[f"{p}_hp_percentile"]),
      logit_standardize=bool(g[f"{p}_hp_logit_stand"])))


def _inputs(p):
  """(s_weak, s_strong, t_weak, t_strong, labels)."""
  logits = [jnp.asarray(GOLDEN[f"{p}_logit_{who}_{view}"])
            for who, view in (("s", "weak"), ("s", "strong"), ("t", "weak"), ("t", "strong"))]
  return (*logits, jnp.asarray(GOLDEN[f"{p}_target"].astype(np.int32)))


@functools.lru_cache(maxsize=None)
def _run(p):
  """MLKD's terms, and the gradients of the distillation loss (all but CE) and of the total
  with respect to both views' student logits."""
  s_weak, s_strong, t_weak, t_strong, y = _inputs(p)
  hp = _hparams(p)

  def parts(a, b):
    return mlkd.mlkd_loss(a, b, t_weak, t_strong, y, hp)

  @jax.jit
  def run(a, b):
    terms = parts(a, b)
    grad = jax.grad(lambda x, z: parts(x, z).total - parts(x, z).ce, argnums=(0, 1))(a, b)
    grad_total = jax.grad(lambda x, z: parts(x, z).total, argnums=(0, 1))(a, b)
    return terms, grad, grad_total

  return jax.device_get(run(s_weak, s_strong))


@pytest.mark.parametrize("p", PREFIXES)
def test_loss_and_parts_match_the_reference(p):
  terms, _, _ = _run(p)
  np.testing.assert_allclose(terms.total, GOLDEN[f"{p}_loss_total"], **LOSS_TOL)
  np.testing.assert_allclose(terms.total, GOLDEN[f"{p}_loss_total_f64"], rtol=1e-5)
  # `<p>_loss`: everything but the CE, as the golden records it.
  np.testing.assert_allclose(terms.kd + terms.cc + terms.bc, GOLDEN[f"{p}_loss"], **LOSS_TOL)
  np.testing.assert_allclose(terms.kd + terms.cc + terms.bc, GOLDEN[f"{p}_loss_f64"], rtol=1e-5)
  for part in PARTS:
    np.testing.assert_allclose(getattr(terms, part), GOLDEN[f"{p}_loss_{part}"], **LOSS_TOL,
                               err_msg=part)
    np.testing.assert_allclose(getattr(terms, part), GOLDEN[f"{p}_loss_{part}_f64"], **LOSS_TOL,
                               err_msg=part)


@pytest.mark.parametrize("p", PREFIXES)
def test_masks_keep_the_less_confident_half_exactly(p):
  terms, _, _ = _run(p)
  masks = terms.masks
  np.testing.assert_array_equal(masks.mask, GOLDEN[f"{p}_mask"])
  np.testing.assert_array_equal(masks.class_mask, GOLDEN[f"{p}_class_conf_mask"])
  assert masks.mask.sum() == 4 and masks.class_mask.sum() == 50
  np.testing.assert_allclose(masks.confidence, GOLDEN[f"{p}_confidence"], rtol=1e-5)
  np.testing.assert_allclose(masks.class_confidence, GOLDEN[f"{p}_class_confidence"], rtol=1e-5)
  np.testing.assert_allclose(masks.threshold, GOLDEN[f"{p}_conf_thresh"], rtol=1e-5)
  np.testing.assert_allclose(masks.class_threshold, GOLDEN[f"{p}_class_confidence_thresh"],
                             rtol=1e-5)


@pytest.mark.parametrize("p", PREFIXES)
def test_every_term_at_every_temperature(p):
  """Each term function alone, per temperature (T, 3, 5, 2, 6), unmasked and unweighted; the
  instance term on standardized logits under the switch."""
  s_weak, s_strong, t_weak, t_strong, _ = _inputs(p)
  hp = _hparams(p)
  taus = mlkd.temperatures(hp.T)
  np.testing.assert_array_equal(taus, GOLDEN[f"{p}_temperatures"])
  std = functools.partial(ls.maybe_standardize, hparams=hp)
  views = {"weak": (s_weak, t_weak), "strong": (s_strong, t_strong)}
  for view, (s, t) in views.items():
    for name, fn, (a, b) in (("kd", mlkd.kd_term, (std(s), std(t))), ("cc", mlkd.cc_term, (s, t)),
                             ("bc", mlkd.bc_term, (s, t))):
      got = [fn(a, b, tau) for tau in taus]
      np.testing.assert_allclose(got, GOLDEN[f"{p}_terms_{name}_{view}"], **LOSS_TOL,
                                 err_msg=f"{name} {view}")


@pytest.mark.parametrize("p", PREFIXES)
def test_gradients_match_the_reference(p):
  _, grad, grad_total = _run(p)
  for k, view in enumerate(("weak", "strong")):
    assert_grad_close(grad[k], GOLDEN[f"{p}_grad_logit_s_{view}"], what=view)
    assert_grad_close(grad_total[k], GOLDEN[f"{p}_grad_total_logit_s_{view}"], what=view)


def _interleaved(p):
  """Both networks' logits as the step's rows (2i weak, 2i + 1 strong) and the labels."""
  s_weak, s_strong, t_weak, t_strong, y = _inputs(p)
  return (steps.interleave_views(s_weak, s_strong), steps.interleave_views(t_weak, t_strong), y)


@pytest.mark.parametrize("p", PREFIXES)
def test_the_objective_reads_the_steps_interleaved_rows(p):
  """mlkd_objective on rows 2i (weak) and 2i + 1 (strong): AugTrainer's sum of the returned
  losses, its logged parts, and the total's gradient row by row."""
  s, t, y = _interleaved(p)
  hp = _hparams(p)
  fn = jax.jit(jax.value_and_grad(
      lambda a: mlkd.mlkd_objective({"logits": a}, {"logits": t}, y, hp), has_aux=True))
  (total, metrics), grad = fn(s)
  np.testing.assert_allclose(total, GOLDEN[f"{p}_loss_total"], **LOSS_TOL)
  for part in ("ce", "kd", "cc", "bc", "kd_weak", "kd_strong"):
    np.testing.assert_allclose(metrics[f"loss_{part}"], GOLDEN[f"{p}_loss_{part}"], **LOSS_TOL)
  assert metrics["mlkd_kept"] == 0.5 and metrics["mlkd_class_kept"] == 0.5
  weak, strong = mlkd.split_views(grad)
  assert_grad_close(weak, GOLDEN[f"{p}_grad_total_logit_s_weak"])
  assert_grad_close(strong, GOLDEN[f"{p}_grad_total_logit_s_strong"])


def test_defaults_are_the_cifar100_config_and_the_switch_brings_its_own():
  """configs/cifar100/ours/res32x4_res8x4.yaml over mdistiller's CFG: T 4, weights 0.9 and 0.1
  (the golden `mlkd`); with logit_standardize: T 2, kd_weight 9 (the golden `ls_mlkd`)."""
  method = get_method("mlkd")
  assert method.views == "weak_strong" and method.student_views_apart
  plain = dict(method.hparams())
  assert plain == mlkd.MLKD_DEFAULTS
  assert dict(_hparams("mlkd"), logit_standardize=False) == dict(plain, logit_standardize=False)
  switched = method.hparams(ml_collections.ConfigDict(dict(logit_standardize=True)))
  assert dict(switched) == dict(_hparams("ls_mlkd"))


def test_the_masks_only_scale_their_terms():
  """`(term * mask).mean()` with a scalar term: the weak view's terms are weighed by the kept
  fraction, whichever samples are kept; with every sample and class kept (percentile 100) they
  are the plain weighted sums."""
  s_weak, s_strong, t_weak, t_strong, y = _inputs("mlkd")
  hp = _hparams("mlkd")
  half = mlkd.mlkd_loss(s_weak, s_strong, t_weak, t_strong, y, hp)
  hp.percentile = 100.0
  full = mlkd.mlkd_loss(s_weak, s_strong, t_weak, t_strong, y, hp)
  assert full.masks.mask.all() and full.masks.class_mask.all()
  for part in ("kd_weak", "cc_weak", "bc_weak", "bc_strong"):
    np.testing.assert_allclose(getattr(half, part), 0.5 * getattr(full, part), rtol=1e-6)
  np.testing.assert_allclose(half.kd_strong, full.kd_strong, rtol=1e-6)
  taus = mlkd.temperatures(hp.T)
  np.testing.assert_allclose(full.cc_weak, hp.kd_weight * sum(
      mlkd.cc_term(s_weak, t_weak, tau) for tau in taus), rtol=1e-6)


def test_a_percentile_outside_0_100_is_refused():
  hparams = get_method("mlkd").hparams(ml_collections.ConfigDict(dict(percentile=120.0)))
  with pytest.raises(UserError, match="percentile is 120.0"):
    get_method("mlkd").check_hparams(hparams)


def test_the_student_runs_each_view_apart():
  """Method.student_views_apart: one forward per view (BatchNorm statistics of that view's
  images, running statistics updated weak then strong), as the reference calls its student;
  the outputs interleaved into rows 2i + k. It differs from one forward over all rows."""
  mesh = parallel.create_mesh(jax.devices()[:1])
  network = networks.build_network("resnet8", 10)
  variables = networks.init_variables(network, (8, 8, 3), 0, mesh)
  params, stats = variables["params"], variables["batch_stats"]
  images = jnp.asarray(np.random.default_rng(0).normal(size=(4, 2, 8, 8, 3)), jnp.float32)
  out, apart = jax.jit(functools.partial(steps.student_forward, network, views_apart=True))(
      params, stats, {"image": images}, None)
  expected_stats, rows = stats, []
  for k in range(2):
    view_out, updates = network.apply({"params": params, "batch_stats": expected_stats},
                                      images[:, k], train=True, mutable=["batch_stats"])
    expected_stats = updates["batch_stats"]
    rows.append(view_out["logits"])
  np.testing.assert_allclose(out["logits"], steps.interleave_views(*rows), rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(apart), jax.tree.leaves(expected_stats)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  pooled, _ = steps.student_forward(network, params, stats, {"image": images}, None)
  assert not np.allclose(pooled["logits"], out["logits"], atol=1e-3)


def test_loss_and_gradients_do_not_depend_on_the_device_count():
  """The masks' medians and the batch- and class-level terms read the whole batch: with the
  rows sharded over 4 devices the jitted objective and its gradient are those of one device."""
  s, t, y = _interleaved("mlkd")
  four = assert_logit_objective_is_global(mlkd.mlkd_objective, s, t, y, _hparams("mlkd"),
                                          atol=1e-9)
  np.testing.assert_allclose(four[0], GOLDEN["mlkd_loss_total"], **LOSS_TOL)


def test_training_steps_do_not_depend_on_the_device_count():
  """Two steps of the trainer's step (each view through the student apart) on a global batch of
  8 images × 2 views: the same terms and parameters on 1 and on 4 devices."""
  one, four = method_steps.one_and_four_devices("mlkd")
  method_steps.assert_same_run(one, four, ["loss", "loss_ce", "loss_kd", "loss_cc", "loss_bc",
                                           "mlkd_kept", "grad_norm"])
