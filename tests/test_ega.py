"""EGA against the reference golden numbers, its NaN guard and global-batch graph, its teacher and
student views, and the STL-10 / TinyImageNet sources."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow as tf

import helpers

from jaxkd import models
from jaxkd import parallel
from jaxkd.data import sources
from jaxkd.data import teacher_views
from jaxkd.data.keys import example_key
from jaxkd.errors import UserError
from jaxkd.methods import ega, get_method
from jaxkd.methods.base import Method
from jaxkd.models import clip
from jaxkd.networks import Network

DATA = os.path.join(os.path.dirname(__file__), "data")


@pytest.fixture(scope="module")
def g():
  return dict(np.load(os.path.join(DATA, "golden_ega.npz")))


def _head_variables(g, prefix):
  """A JointHead's variables from the reference Linear layers (PyTorch (out, in) weights)."""
  return {"params": {name: {"kernel": g[f"{prefix}_{name}_weight"].T,
                            "bias": g[f"{prefix}_{name}_bias"]}
                     for name in ("fit_dim_Net", "cl_Net")}}


def _hparams(g):
  return ega.METHOD.hparams(ml_collections.ConfigDict(dict(
      node_weight=float(g["node_weight"]), edge_weight=float(g["edge_weight"]),
      gamma=float(g["gamma"]), beta=float(g["beta"]), alpha=float(g["alpha"]),
      T=float(g["kd_T"]))))


def _outputs(feat):
  return {"feats": {"pooled": jnp.asarray(feat)}}


# ---------------------------------------------------------------------------- golden


def test_heads_and_graph_match_reference(g):
  hparams = _hparams(g)
  student = ega.student_heads(int(g["n_cls"]), hparams)
  teacher = ega.teacher_heads(int(g["n_cls"]), hparams)
  s_out = student.apply(_head_variables(g, "stud"), _outputs(g["feat_s"]))
  t_out = teacher.apply(_head_variables(g, "teac"), _outputs(g["feat_t"]))
  np.testing.assert_allclose(s_out["embedding"], g["fs"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(s_out["logits"], g["logit_s"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(t_out["embedding"], g["ft"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(t_out["logits"], g["logit_t"], rtol=1e-5, atol=1e-6)
  loss_node, loss_edge, pcc = ega.ega_terms(g["ft"], g["fs"])
  np.testing.assert_allclose(pcc, g["pcc"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(loss_node, g["loss_node"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(loss_edge, g["loss_edge"], rtol=1e-5, atol=1e-5)
  # The same graph with no epsilon at all: the guard does not move the reference numbers.
  np.testing.assert_allclose(ega.pcc_graph(np.concatenate([g["ft"], g["fs"]]), eps=0.0),
                             g["pcc"], rtol=1e-5, atol=1e-6)


def test_losses_match_reference(g):
  loss, metrics = ega.ega_loss({"logits": g["logit_s"], "embedding": g["fs"]},
                               {"logits": g["logit_t"], "embedding": g["ft"]},
                               g["target"], _hparams(g))
  for name in ("loss_node", "loss_edge", "loss_ega"):
    np.testing.assert_allclose(metrics[name], g[name], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(metrics["loss_ce"], g["loss_cls"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(metrics["loss_kd"], g["loss_div"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(loss, g["loss_total"], rtol=1e-5, atol=1e-5)
  t_loss, t_metrics = ega.teacher_head_loss({"logits": g["logit_t"]}, None, g["target"],
                                            _hparams(g))
  np.testing.assert_allclose(t_loss, g["loss_cls_t"], rtol=1e-5, atol=1e-5)
  assert set(t_metrics) == {"loss_teacher_head", "top1_teacher_head"}


def test_gradients_match_reference(g):
  hparams = _hparams(g)
  n_cls = int(g["n_cls"])
  student, teacher = ega.student_heads(n_cls, hparams), ega.teacher_heads(n_cls, hparams)
  s_vars, t_vars = _head_variables(g, "stud"), _head_variables(g, "teac")
  t_out = teacher.apply(t_vars, _outputs(g["feat_t"]))

  def student_objective(params, feat_s):
    s_out = student.apply({"params": params}, _outputs(feat_s))
    return ega.ega_loss(s_out, t_out, g["target"], hparams)[0]

  grad_params, grad_feat = jax.jit(jax.grad(student_objective, argnums=(0, 1)))(
      s_vars["params"], g["feat_s"])
  np.testing.assert_allclose(grad_feat, g["grad_feat_s"], rtol=1e-4, atol=1e-6)
  for name in ("fit_dim_Net", "cl_Net"):
    np.testing.assert_allclose(grad_params[name]["kernel"], g[f"grad_{name}_weight"].T,
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(grad_params[name]["bias"], g[f"grad_{name}_bias"],
                               rtol=1e-4, atol=1e-6)

  def objective_of_fs(fs):  # fs feeds the graph and, through cl_Net, the CE.
    logit_s = fs @ g["stud_cl_Net_weight"].T + g["stud_cl_Net_bias"]
    return ega.ega_objective(fs, logit_s, g["ft"], g["logit_t"], g["target"],
                             node_weight=hparams.node_weight, edge_weight=hparams.edge_weight)[0]
  np.testing.assert_allclose(jax.jit(jax.grad(objective_of_fs))(g["fs"]), g["grad_fs"],
                             rtol=1e-4, atol=1e-6)

  # The teacher head learns from its own CE only; the student objective gives it nothing.
  def teacher_objective(params):
    out = teacher.apply({"params": params}, _outputs(g["feat_t"]))
    return ega.teacher_head_loss(out, None, g["target"], hparams)[0]
  grad_t = jax.jit(jax.grad(teacher_objective))(t_vars["params"])
  for name in ("fit_dim_Net", "cl_Net"):
    np.testing.assert_allclose(grad_t[name]["kernel"], g[f"grad_teac_{name}_weight"].T,
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(grad_t[name]["bias"], g[f"grad_teac_{name}_bias"],
                               rtol=1e-4, atol=1e-6)

  def student_objective_of_teacher(params):
    out = teacher.apply({"params": params}, _outputs(g["feat_t"]))
    s_out = student.apply(s_vars, _outputs(g["feat_s"]))
    return ega.ega_loss(s_out, out, g["target"], hparams)[0]
  grad_of_student_objective = jax.jit(jax.grad(student_objective_of_teacher))
  for leaf in jax.tree.leaves(grad_of_student_objective(t_vars["params"])):
    np.testing.assert_array_equal(leaf, 0.0)

  # One step of the head's own SGD: θ − lr·(g + wd·θ) (the momentum buffer starts at zero).
  tx = ega.TEACHER_HEAD.optimizer(hparams)

  @jax.jit
  def step(params):
    updates, _ = tx.update(jax.grad(teacher_objective)(params), tx.init(params), params)
    return jax.tree.map(lambda p, u: p + u, params, updates)
  stepped = step(t_vars["params"])
  w = g["teac_cl_Net_weight"]
  np.testing.assert_allclose(stepped["cl_Net"]["kernel"],
                             (w - 0.01 * (g["grad_teac_cl_Net_weight"] + 5e-4 * w)).T,
                             rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------- guards, batch


def test_constant_embedding_row_gives_finite_loss_and_gradients(g):
  """A constant row has zero variance: PCC_EPS makes its correlations 0 instead of 0/0."""
  fs = np.array(g["fs"])
  fs[3] = 0.7
  ft = np.array(g["ft"])
  ft[5] = -1.0

  def objective(fs):
    return ega.ega_objective(fs, g["logit_s"], ft, g["logit_t"], g["target"])[0]

  loss, grad = jax.jit(jax.value_and_grad(objective))(fs)
  assert np.isfinite(loss) and np.all(np.isfinite(grad))
  pcc_graph = jax.jit(ega.pcc_graph, static_argnames="eps")
  pcc = np.asarray(pcc_graph(np.concatenate([ft, fs])))
  b = fs.shape[0]
  np.testing.assert_array_equal(pcc[b + 3], 0.0)
  np.testing.assert_array_equal(pcc[:, 5], 0.0)
  # Without the guard the reference formula is 0/0.
  assert np.isnan(pcc_graph(np.concatenate([ft, fs]), eps=0.0)).any()
  # A student identical to the teacher: zero edge term, and torch's zero gradient of ‖0‖.
  same = jax.jit(jax.grad(lambda f: ega.ega_terms(g["ft"], f)[1]))(np.array(g["ft"]))
  np.testing.assert_array_equal(same, 0.0)


def test_graph_is_over_the_global_batch_on_a_sharded_mesh(g):
  """Under jit with the batch split over 4 devices, the loss is the single-device one."""
  mesh = parallel.create_mesh()
  sharding = parallel.data_sharding(mesh)
  args = [jax.device_put(np.asarray(g[k]), sharding)
          for k in ("fs", "logit_s", "ft", "logit_t", "target")]
  loss = jax.jit(lambda *a: ega.ega_objective(*a)[0])(*args)
  np.testing.assert_allclose(loss, g["loss_total"], rtol=1e-5)


def test_method_description():
  method = get_method("ega")
  assert isinstance(method, Method) and method is ega.METHOD
  assert method.uses_teacher and method.views == "none"
  hparams = method.hparams()
  assert (hparams.node_weight, hparams.edge_weight, hparams.gamma, hparams.beta,
          hparams.alpha, hparams.T, hparams.embed_dim) == (0.8, 0.24, 1.0, 1.0, 0.0, 4.0, 256)
  assert (hparams.teacher_head_lr, hparams.teacher_head_momentum,
          hparams.teacher_head_weight_decay) == (0.01, 0.9, 5e-4)
  assert ega.TEACHER_HEAD.heads is ega.teacher_heads
  # The student head's logits replace the backbone's, so evaluation goes through it.
  head = method.student_heads(10, hparams)
  out = {"logits": np.zeros((2, 100), np.float32),
         "feats": {"pooled": np.ones((2, 8), np.float32)}}
  variables = jax.eval_shape(head.init, jax.random.key(0), out)
  assert jax.tree.map(jnp.shape, variables["params"]) == {
      "fit_dim_Net": {"kernel": (8, 256), "bias": (256,)},
      "cl_Net": {"kernel": (256, 10), "bias": (10,)}}
  assert jax.eval_shape(head.apply, variables, out)["logits"].shape == (2, 10)


def test_heads_plug_into_networks_of_zoo_and_clip_backbones():
  """Student: a zoo backbone whose classifier is bypassed; teacher: a CLIP tower (its own
  224-px-style input) with the teacher head on its image embedding."""
  hparams = ega.METHOD.hparams()
  student = Network(models.get_model("resnet8", 10), ega.student_heads(10, hparams))
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(student.init, jax.random.key(0), x)
  out = jax.eval_shape(student.apply, variables, x)
  assert out["logits"].shape == (2, 10) and out["embedding"].shape == (2, 256)
  assert variables["params"]["heads"]["fit_dim_Net"]["kernel"].shape == (64, 256)

  tower = clip.build_clip(clip.VisionTransformerConfig(48, 16, 32, 1, 2, 24))
  teacher = Network(tower, ega.teacher_heads(10, hparams))
  x = jax.ShapeDtypeStruct((2, 48, 48, 3), jnp.float32)
  variables = jax.eval_shape(teacher.init, jax.random.key(0), x)
  out = jax.eval_shape(teacher.apply, variables, x)
  assert out["embedding"].shape == (2, 256) and out["logits"].shape == (2, 10)
  assert variables["params"]["heads"]["fit_dim_Net"]["kernel"].shape == (24, 256)


# ---------------------------------------------------------------------------- two views

CIFAR_LIKE = sources.DatasetInfo(
    name="cifar_like", tfds_name="none", num_classes=100, image_shape=(32, 32, 3), num_train=0,
    num_eval=0, mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.3), crop_padding=4, flip=True)


@pytest.fixture(scope="module")
def image():
  return np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)


def _keys(n, seed=0):
  return [example_key(seed, 0, i) for i in range(n)]


def _views_of_keys(image, keys, teacher, normalization="dataset"):
  fn = teacher_views.make_views_fn(CIFAR_LIKE, teacher, train=True,
                                   student_normalization=normalization)
  out = [fn(image, key) for key in keys]
  return {name: np.stack([o[name] for o in out]) for name in out[0]}


def _candidates(image, crop_then_flip):
  """Every crop offset (dy, dx) and flip of the padded image -> (params, [162, 32, 32, 3])."""
  padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
  params, crops = [], []
  for flip in (0, 1):
    for dy in range(9):
      for dx in range(9):
        if crop_then_flip:
          view = padded[dy:dy + 32, dx:dx + 32]
          view = view[:, ::-1] if flip else view
        else:
          source = np.pad(image[:, ::-1] if flip else image, ((4, 4), (4, 4), (0, 0)))
          view = source[dy:dy + 32, dx:dx + 32]
        params.append((dy, dx, flip))
        crops.append(view)
  return params, np.stack(crops).astype(np.float32)


def _identify(views, mean, std, params, candidates):
  pixels = np.round((np.asarray(views) * np.array(std) + np.array(mean)) * 255)
  found = []
  for view in pixels:
    match = np.flatnonzero(np.all(candidates == view, axis=(1, 2, 3)))
    assert len(match) == 1
    found.append(params[match[0]])
  return found


def test_teacher_and_student_views_are_drawn_independently(image):
  """With a same-size teacher the crop and flip of each view can be read off the pixels."""
  n = 160
  out = _views_of_keys(image, _keys(n), teacher_views.DATASET_INPUT)
  student = _identify(out["image"], CIFAR_LIKE.mean, CIFAR_LIKE.std,
                      *_candidates(image, crop_then_flip=False))
  teacher = _identify(out["teacher_image"], CIFAR_LIKE.mean, CIFAR_LIKE.std,
                      *_candidates(image, crop_then_flip=True))
  same = sum(s == t for s, t in zip(student, teacher))
  assert same <= 4  # 1 in 162 by chance.
  flips_agree = np.mean([s[2] == t[2] for s, t in zip(student, teacher)])
  assert 0.35 < flips_agree < 0.65
  for views in (student, teacher):
    assert len(set(views)) > 60 and 0.35 < np.mean([v[2] for v in views]) < 0.65
    assert {v[0] for v in views} == set(range(9)) == {v[1] for v in views}
  # Same key, same views; another key, other views.
  again = _views_of_keys(image, _keys(n), teacher_views.DATASET_INPUT)
  np.testing.assert_array_equal(again["image"], out["image"])
  np.testing.assert_array_equal(again["teacher_image"], out["teacher_image"])
  other = _views_of_keys(image, _keys(n, seed=1), teacher_views.DATASET_INPUT)
  assert not np.array_equal(other["teacher_image"], out["teacher_image"])


def test_clip_teacher_view_shapes_ranges_and_normalisation(image):
  out = _views_of_keys(image, _keys(4), teacher_views.CLIP_224, normalization="teacher")
  assert out["image"].shape == (4, 32, 32, 3) and out["teacher_image"].shape == (4, 224, 224, 3)
  assert out["teacher_image"].dtype == np.float32
  clip_mean, clip_std = np.array(teacher_views.CLIP_MEAN), np.array(teacher_views.CLIP_STD)
  for view in (out["image"], out["teacher_image"]):
    pixels = np.asarray(view) * clip_std + clip_mean
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
    # 8-bit levels, as after PIL's resize and ToTensor.
    np.testing.assert_allclose(pixels * 255, np.round(pixels * 255), atol=1e-3)
  assert teacher_views.teacher_view_shape(CIFAR_LIKE, teacher_views.CLIP_224) == (224, 224, 3)

  grey = sources.DatasetInfo(**{**CIFAR_LIKE.__dict__, "image_shape": (32, 32, 1),
                                "mean": (0.5,), "std": (0.25,)})
  fn = teacher_views.make_views_fn(grey, teacher_views.CLIP_224, train=False)
  level = np.full((32, 32, 1), 128, np.uint8)
  out = fn(level, None)
  np.testing.assert_allclose(out["image"], (128 / 255 - 0.5) / 0.25, atol=1e-6)
  np.testing.assert_allclose(out["teacher_image"],
                             np.broadcast_to((128 / 255 - clip_mean) / clip_std, (224, 224, 3)),
                             rtol=1e-5)
  with pytest.raises(UserError, match="student normalization 'teacher' needs 1-channel"):
    teacher_views.make_views_fn(grey, teacher_views.CLIP_224, True, "teacher")
  with pytest.raises(UserError, match="unknown student normalization"):
    teacher_views.make_views_fn(CIFAR_LIKE, teacher_views.CLIP_224, True, "clip")


# ---------------------------------------------------------------------------- sources


def _config(name, data_dir):
  return helpers.dataset_config(name, data_dir)


def test_stl10_offline_is_a_clear_error(tmp_path):
  sized = _config("stl10", tmp_path)
  sized.num_train_examples = sized.num_eval_examples = 8  # No builder needed for these.
  info = sources.get_dataset_info(sized)
  assert (info.num_classes, info.image_shape, info.crop_padding) == (10, (96, 96, 3), 12)
  assert "stl10" in sources.DATASET_NAMES and "tinyimagenet" in sources.DATASET_NAMES
  with pytest.raises(UserError, match=r"'stl10'.*not prepared.*tfds build stl10"):
    sources.get_dataset_info(_config("stl10", tmp_path))


def test_tinyimagenet_from_its_extracted_folder(tmp_path):
  config = _config("tinyimagenet", tmp_path)
  with pytest.raises(UserError, match=r"tinyimagenet is not in .*arrange_tinyimagenet"):
    sources.get_dataset_info(config)

  # An extracted tiny-imagenet-200/ in miniature: 2 classes, 3 + 2 train and 2 val images.
  extracted = tmp_path / "tiny-imagenet-200"
  rng = np.random.default_rng(0)
  jpeg = lambda: tf.io.encode_jpeg(rng.integers(0, 256, (64, 64, 3), np.uint8)).numpy()
  for wnid, count in (("n01443537", 3), ("n01629819", 2)):
    (extracted / "train" / wnid / "images").mkdir(parents=True)
    for i in range(count):
      (extracted / "train" / wnid / "images" / f"{wnid}_{i}.JPEG").write_bytes(jpeg())
  (extracted / "val" / "images").mkdir(parents=True)
  lines = []
  for i, wnid in enumerate(("n01629819", "n01443537")):
    (extracted / "val" / "images" / f"val_{i}.JPEG").write_bytes(jpeg())
    lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63\n")
  (extracted / "val" / "val_annotations.txt").write_text("".join(lines))

  root = sources.tinyimagenet_folder(config)
  os.symlink(extracted, root)  # The archive as extracted: refused, not mislabelled.
  with pytest.raises(UserError, match="layout of the extracted archive"):
    sources.get_dataset_info(config)
  os.remove(root)
  sources.arrange_tinyimagenet(str(extracted), root)
  config.eval_split = "val"
  info = sources.get_dataset_info(config)
  assert (info.num_train, info.num_eval, info.num_classes) == (5, 2, 200)
  examples = list(sources.load_split(config, "val").as_numpy_iterator())
  assert all(image.shape == (64, 64, 3) and image.dtype == np.uint8 for image, _ in examples)
  # Labels are the sorted wnids: val_0 is n01629819 (1), val_1 is n01443537 (0).
  assert sorted(int(label) for _, label in examples) == [0, 1]
