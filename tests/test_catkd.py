"""CAT-KD (jaxkd.methods.catkd) against the reference's numbers (tests/data/golden_modern.npz:
`CAT_KD` of GzyAftermath/CAT-KD on synthetic class activation maps, prefixes catkd, catkd_cat,
catkd_bin, catkd_part1, catkd_part0 — one per yaml config): the loss, the objective with CE, the
binarized teacher maps, the classes kept, the gradients w.r.t. the student's maps. Then the maps
of zoo networks: the gradient reaches the student's classifier kernel as through the reference's
bias-free 1×1 conv, and the plan refuses a network that gives none."""

import collections
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from modern_golden import GOLDEN, assert_grad_close, nhwc

from jaxkd import models, networks
from jaxkd.errors import UserError
from jaxkd.methods import catkd, get_method, objective
from jaxkd import plan

PREFIXES = ("catkd", "catkd_cat", "catkd_bin", "catkd_part1", "catkd_part0")
LOSS_TOL = dict(rtol=1e-5)


def _hparams(p):
  """The golden's configuration under jaxkd's names, every value read from `<p>_hp_*`."""
  g = GOLDEN
  return ml_collections.ConfigDict(dict(
      ce_weight=float(g[f"{p}_hp_ce_weight"]), cat_weight=float(g[f"{p}_hp_cat_loss_weight"]),
      cam_resolution=int(g[f"{p}_hp_cam_resolution"]), only_cat=bool(g[f"{p}_hp_only_cat"]),
      normalize=bool(g[f"{p}_hp_if_normalize"]), binarize=bool(g[f"{p}_hp_if_binarize"]),
      partial=bool(g[f"{p}_hp_partial"]), cams_nums=int(g[f"{p}_hp_cams_nums"]),
      strategy=int(g[f"{p}_hp_strategy"])))


def _inputs():
  g = GOLDEN
  return (nhwc(g["catkd_cam_s"]), nhwc(g["catkd_cam_t"]),
          jnp.asarray(g["catkd_target"].astype(np.int32)))


@functools.lru_cache(maxsize=None)
def _step(p):
  """(objective, metrics, d L_CAT / d A_s, d objective / d A_s) of prefix `p`; the logits are
  the spatial means of the maps, as the reference's stand-ins give them."""
  hparams = _hparams(p)
  cams_s, cams_t, labels = _inputs()

  def objective_of(cams):
    student = {"logits": jnp.mean(cams, (1, 2)), "class_maps": cams}
    teacher = {"logits": jnp.mean(cams_t, (1, 2)), "class_maps": cams_t}
    return catkd.catkd_objective(student, teacher, labels, hparams)

  @jax.jit
  def run(cams):
    (total, metrics), grad_total = jax.value_and_grad(objective_of, has_aux=True)(cams)
    grad_cat = jax.grad(lambda c: hparams.cat_weight * objective_of(c)[1]["loss_cat"])(cams)
    return total, metrics, grad_cat, grad_total

  return run(cams_s)


@pytest.mark.parametrize("p", PREFIXES)
def test_loss_and_objective_match_the_reference(p):
  g = GOLDEN
  hparams = _hparams(p)
  total, metrics, _, _ = _step(p)
  weighted = hparams.cat_weight * metrics["loss_cat"]
  np.testing.assert_allclose(weighted, g[f"{p}_loss"], **LOSS_TOL)
  np.testing.assert_allclose(weighted, g[f"{p}_loss_f64"], **LOSS_TOL)
  np.testing.assert_allclose(total, g[f"{p}_loss_total"], **LOSS_TOL)
  np.testing.assert_allclose(total, g[f"{p}_loss_total_f64"], **LOSS_TOL)
  if f"{p}_loss_ce" in g:
    np.testing.assert_allclose(metrics["loss_ce"], g[f"{p}_loss_ce"], **LOSS_TOL)
    np.testing.assert_allclose(metrics["loss_ce"], g[f"{p}_loss_ce_f64"], **LOSS_TOL)


@pytest.mark.parametrize("p", PREFIXES)
def test_gradients_with_respect_to_the_student_maps_match_the_reference(p):
  g = GOLDEN
  _, _, grad_cat, grad_total = _step(p)
  assert_grad_close(grad_cat, nhwc(g[f"{p}_grad_cam_s"]), what=p)
  if f"{p}_grad_total_cam_s" in g:  # The CE term reaches the maps through the logits.
    assert_grad_close(grad_total, nhwc(g[f"{p}_grad_total_cam_s"]), what=p)
  else:
    assert_grad_close(grad_total, nhwc(g[f"{p}_grad_cam_s"]), what=p)


def test_binarized_teacher_maps_are_the_references():
  """1 where A_t exceeds the mean of |A_t| over its map, exactly."""
  _, cams_t, _ = _inputs()
  binary = np.asarray(catkd.binarize(cams_t))
  np.testing.assert_array_equal(binary, nhwc(GOLDEN["catkd_bin_tea_binary"]).astype(np.float32))
  assert np.any(binary == 0) and np.any(binary == 1)


@pytest.mark.parametrize("p", ["catkd_part1", "catkd_part0"])
def test_classes_kept_are_the_references(p):
  """Strategy 1 keeps cams_nums + 1 classes, strategy 0 cams_nums − 1, chosen by the teacher's
  bias-free scores (the spatial means of its maps)."""
  g = GOLDEN
  hparams = _hparams(p)
  _, cams_t, _ = _inputs()
  keep = np.asarray(catkd.class_mask(jnp.mean(cams_t, (1, 2)), hparams.cams_nums,
                                     hparams.strategy))
  np.testing.assert_array_equal(keep, g[f"{p}_mask"])
  np.testing.assert_array_equal(keep.sum(1), int(g[f"{p}_n_kept"]))
  expected = hparams.cams_nums + 1 if hparams.strategy == 1 else hparams.cams_nums - 1
  assert int(g[f"{p}_n_kept"]) == expected
  _, metrics, _, _ = _step(p)
  np.testing.assert_allclose(metrics["cat_kept"], expected / keep.shape[1], rtol=1e-6)


def test_a_selection_whose_count_is_not_a_multiple_of_the_batch_transfers_every_map():
  """The reference's `_mask` falls back to all maps when the kept maps cannot be laid out as
  B rows: ties in the teacher's scores keep 3 + 2 = 5 maps of B = 2 images."""
  rng = np.random.default_rng(0)
  cams_s = jnp.asarray(rng.normal(size=(2, 3, 3, 6)), jnp.float32)
  cams_t = jnp.asarray(rng.normal(size=(2, 3, 3, 6)), jnp.float32)
  keep = jnp.asarray([[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]], bool)
  every = catkd.cat_loss(cams_s, cams_t, 2, True)
  np.testing.assert_allclose(catkd.cat_loss(cams_s, cams_t, 2, True, keep), every, rtol=1e-6)
  even = keep.at[1, 2].set(True)
  s, t = catkd.pooled_maps(cams_s, 2, True), catkd.pooled_maps(cams_t, 2, True)
  expected = np.mean(np.square(np.asarray(s - t))[np.broadcast_to(
      np.asarray(even)[:, None, None, :], s.shape)])
  np.testing.assert_allclose(catkd.cat_loss(cams_s, cams_t, 2, True, even), expected, rtol=1e-6)


def test_zoo_class_maps_carry_the_gradient_into_the_classifier_kernel():
  """Through a resnet8 with class_maps=True: the CAT term's gradient w.r.t. the classifier's
  kernel is Σ_{b,h,w} map ⊗ ∂L/∂A (the reference's 1×1 conv), none reaches the bias, and the
  logits are the maps' spatial mean plus the bias."""
  network = networks.build_network("resnet8", 10).clone(class_maps=True)
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
  variables = jax.jit(lambda k: network.init(k, x, train=False))(jax.random.key(1))
  cams_t = jax.random.normal(jax.random.key(2), (4, 2, 2, 10))
  hparams = catkd.METHOD.hparams()

  def loss(params):
    out = network.apply(dict(variables, params=params), x, train=False)
    return catkd.catkd_terms(out["class_maps"], cams_t, hparams)[0], out

  grads, out = jax.jit(jax.grad(loss, has_aux=True))(variables["params"])
  assert set(out["feats"]) == {"stem", "stage1", "stage2", "stage3", "pooled"}
  head = models.classifier_params("resnet8", variables)
  np.testing.assert_allclose(out["logits"], jnp.mean(out["class_maps"], (1, 2)) + head["bias"],
                             rtol=1e-5, atol=1e-6)
  grad_cams = jax.grad(lambda c: catkd.catkd_terms(c, cams_t, hparams)[0])(out["class_maps"])
  expected = jnp.einsum("bhwc,bhwk->ck", out["feats"]["stage3"], grad_cams)
  fc = grads["backbone"]["fc"]
  assert_grad_close(fc["kernel"], expected, what="kernel")
  assert np.max(np.abs(fc["kernel"])) > 0
  np.testing.assert_array_equal(fc["bias"], 0.0)


class _NoMaps(nn.Module):
  """A registered network that gives no class activation maps."""
  num_classes: int

  @nn.compact
  def __call__(self, x, train=False, preact=False):
    pooled = jnp.mean(x, (1, 2))
    feats = collections.OrderedDict(stem=x, stage1=x, pooled=pooled)
    return nn.Dense(self.num_classes)(pooled), feats


def test_networks_without_class_maps_are_refused_before_any_work():
  name = "catkd_test_no_maps"
  if name not in models._REGISTRY:  # pylint: disable=protected-access
    models.register(name, lambda num_classes, dtype=jnp.float32: _NoMaps(num_classes))
  assert objective.class_map_shape(name, 10, (8, 8, 3)) is None
  assert objective.class_map_shape("wrn_16_1", 10, (8, 8, 3)) == (1, 2, 2, 10)
  info = collections.namedtuple("Info", "num_classes image_shape")(10, (8, 8, 3))
  config = ml_collections.ConfigDict(dict(student=dict(name="resnet8"),
                                          teacher=dict(name=name)))
  with pytest.raises(UserError, match="teacher 'catkd_test_no_maps' gives none"):
    plan.check_class_maps(config, get_method("catkd"), info)


def test_defaults_pairs_and_hyper_parameter_checks():
  method = get_method("catkd")
  assert method.class_maps and method.deployed is None
  assert method.hparams().cat_weight == 15.0 and not method.hparams().normalize
  pair = method.hparams(pair=("resnet32x4", "ShuffleV1"))
  assert (pair.cat_weight, pair.cam_resolution, pair.normalize) == (600.0, 4, True)
  assert method.hparams(pair=("wrn_40_2", "wrn_40_1")).cat_weight == 1.5
  for key, bad in (("cam_resolution", dict(cam_resolution=0)), ("strategy", dict(strategy=2)),
                   ("cams_nums", dict(partial=True, cams_nums=1))):
    with pytest.raises(UserError, match=key):
      catkd.check_hparams(method.hparams(ml_collections.ConfigDict(bad)))
  with pytest.raises(UserError, match="rank"):
    catkd.class_mask(jnp.zeros((2, 10)), 10, 1)
