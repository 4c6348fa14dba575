"""The RepDistiller baselines that own trained modules (FitNet, CC, VID, AB, FT) against the
reference's numbers (tests/data/golden_baselines.npz): losses, the gradients w.r.t. the student's
maps and the modules' parameters, the BN running statistics after a train-mode forward, and the
modules' initialisation."""

import collections
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd.methods import ab, cc, connectors, fitnet, ft, vid

GOLDEN = np.load(os.path.join(os.path.dirname(__file__), "data", "golden_baselines.npz"))
LOSS_TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = dict(rtol=1e-4, atol=1e-6)
B = 8


def _nhwc(x):
  x = np.asarray(x)
  return jnp.asarray(x.transpose(0, 2, 3, 1) if x.ndim == 4 else x)


def _dummy():
  """A tap the module under test does not read."""
  return jnp.zeros((B, 1), jnp.float32)


def _stage_feats(maps):
  """{'stem', 'stage1'.., 'pooled'} with the given stage maps; stem and pooled unused."""
  feats = collections.OrderedDict(stem=_dummy())
  for i, m in enumerate(maps, start=1):
    feats[f"stage{i}"] = m
  feats["pooled"] = _dummy()
  return feats


# --- PyTorch state dict -> Flax variables ------------------------------------------------------


def _flax_path(torch_key):
  """'translator.encoder.0.weight' -> (collection, ('translator', 'encoder_0', leaf), transform).

  A Sequential / ModuleList index joins the name before it ('encoder.0' -> 'encoder_0'); a
  LinearEmbed's inner 'linear' is the Flax Linear itself. Kernels: conv OIHW and
  ConvTranspose (in, out, kH, kW) both transpose (2, 3, 1, 0); Linear (out, in) -> (in, out).
  """
  parts = [p for p in torch_key.split(".") if p != "linear"]
  *names, leaf = parts
  path = []
  for name in names:
    if name.isdigit() and path:
      path[-1] = f"{path[-1]}_{name}"
    else:
      path.append(name)
  if leaf == "weight":
    return "params", tuple(path) + ("kernel",), "weight"
  if leaf == "bias":
    return "params", tuple(path) + ("bias",), None
  if leaf == "running_mean":
    return "batch_stats", tuple(path) + ("mean",), None
  if leaf == "running_var":
    return "batch_stats", tuple(path) + ("var",), None
  if leaf == "log_scale":
    return "params", tuple(path) + ("log_scale",), None
  if leaf == "num_batches_tracked":
    return None, None, None
  raise KeyError(torch_key)


def _convert(value, kind):
  value = np.asarray(value, np.float32)
  if kind == "weight":
    if value.ndim == 4:
      return value.transpose(2, 3, 1, 0)
    if value.ndim == 2:
      return value.T
  return value


def _entries(prefix, section, module, rename=lambda key: key):
  """{(collection, path): array} of the golden `<prefix>_<section>.<module>.*`, Flax layouts.
  A 1-D `weight` is a BN scale."""
  head = f"{prefix}_{section}." + (f"{module}." if module else "")
  out = {}
  for key in GOLDEN.files:
    if not key.startswith(head):
      continue
    collection, path, kind = _flax_path(rename(key[len(head):]))
    if collection is None:
      continue
    value = _convert(GOLDEN[key], kind)
    if kind == "weight" and value.ndim == 1:
      path = path[:-1] + ("scale",)
    out[(collection, path)] = value
  return out


def _variables(entries):
  """Nested {'params': ..., 'batch_stats': ...} of `_entries`."""
  flat = {(collection,) + path: jnp.asarray(v) for (collection, path), v in entries.items()}
  variables = flax.traverse_util.unflatten_dict(flat)
  variables.setdefault("params", {})
  variables.setdefault("batch_stats", {})
  return variables


def _shapes(tree):
  return {k: tuple(np.shape(v)) for k, v in flax.traverse_util.flatten_dict(tree).items()}


def _init_shapes(module, *args, **kwargs):
  """The shapes of `module.init(key, *args, **kwargs)`, traced but not run."""
  return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args, **kwargs))


def _check_same_structure(initialised, loaded):
  for collection in ("params", "batch_stats"):
    assert _shapes(flax.core.unfreeze(initialised).get(collection, {})) == \
        _shapes(loaded[collection]), collection


def _check_params_grads(grads, prefix, module, rename=lambda key: key):
  expected = _entries(prefix, "grad_param", module, rename)
  flat = flax.traverse_util.flatten_dict(grads)
  # Every trained parameter has a reference gradient and nothing else is trained.
  assert set(flat) == {path for _, path in expected}
  for (_, path), ref in expected.items():
    np.testing.assert_allclose(flat[path], ref, err_msg=f"{prefix} {path}", **GRAD_TOL)


def _check_updated(batch_stats, prefix, module, rename=lambda key: key):
  expected = _entries(prefix, "updated", module, rename)
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(batch_stats))
  assert set(flat) == {path for _, path in expected}
  for (_, path), ref in expected.items():
    np.testing.assert_allclose(flat[path], ref, rtol=1e-5, atol=1e-6,
                               err_msg=f"{prefix} {path}")


def _run_bridge(bridge, key, variables, make_student, student_inputs, teacher_out):
  """Train-mode forward of the bridge on the student's maps: (outputs, grads w.r.t. params,
  grads w.r.t. the inputs, the updated batch_stats)."""

  def objective(params, inputs):
    out, updated = bridge.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                make_student(inputs), teacher_out, None, train=True,
                                mutable=["batch_stats"])
    return out[key], (out, updated)

  (_, (out, updated)), (g_params, g_inputs) = jax.jit(
      jax.value_and_grad(objective, argnums=(0, 1), has_aux=True))(variables["params"],
                                                                   student_inputs)
  return out, g_params, g_inputs, updated.get("batch_stats", {})


# --- FitNet ------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["fitnet", "fitnetx_h1", "fitnetx_h2", "fitnetx_h3"])
def test_fitnet_matches_the_reference(prefix):
  g = GOLDEN
  h = int(g[f"{prefix}_hp_hint_layer"])
  f_s, f_t = _nhwc(g[f"{prefix}_f_s"]), _nhwc(g[f"{prefix}_f_t"])

  def feats(tap):
    return collections.OrderedDict((f"f{i}", tap if i == h else _dummy()) for i in range(5))

  make_student = lambda x: {"feats": feats(x)}
  teacher_out = {"feats": feats(f_t)}
  bridge = fitnet.HintBridge(hint_layer=h)
  variables = _variables(_entries(prefix, "param", ""))
  _check_same_structure(_init_shapes(bridge, make_student(f_s[:1]),
                                    {"feats": feats(f_t[:1])}, None, train=False), variables)
  out, g_params, g_fs, batch_stats = _run_bridge(bridge, "loss_fitnet", variables, make_student,
                                                 f_s, teacher_out)
  np.testing.assert_allclose(out["loss_fitnet"], g[f"{prefix}_loss"], **LOSS_TOL)
  np.testing.assert_allclose(g_fs, _nhwc(g[f"{prefix}_grad_f_s"]), **GRAD_TOL)
  _check_params_grads(g_params, prefix, "")
  _check_updated(batch_stats, prefix, "")


# --- CC ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["cc", "ccx"])
def test_cc_matches_the_reference(prefix):
  g = GOLDEN
  f_s, f_t = jnp.asarray(g[f"{prefix}_f_s"]), jnp.asarray(g[f"{prefix}_f_t"])
  make_student = lambda x: {"feats": collections.OrderedDict(pooled=x)}
  teacher_out = {"feats": collections.OrderedDict(pooled=f_t)}
  bridge = cc.CorrelationBridge(feat_dim=int(g[f"{prefix}_hp_feat_dim"]))
  variables = _variables(_entries(prefix, "param", ""))
  _check_same_structure(_init_shapes(bridge, make_student(f_s), teacher_out,
                                    None), variables)
  out, g_params, g_fs, _ = _run_bridge(bridge, "loss_cc", variables, make_student, f_s,
                                       teacher_out)
  np.testing.assert_allclose(out["loss_cc"], g[f"{prefix}_loss"], **LOSS_TOL)
  np.testing.assert_allclose(g_fs, g[f"{prefix}_grad_f_s"], **GRAD_TOL)
  # Both embeddings are trained: the teacher's Linear has a (nonzero) gradient too.
  assert np.abs(np.asarray(g_params["embed_t"]["kernel"])).max() > 0
  _check_params_grads(g_params, prefix, "")


def test_correlation_pairs_consecutive_rows():
  """Rows (0, 1) and (2, 3) differ, (1, 2) do not overlap: only consecutive products count."""
  es = jnp.array([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [0.0, 4.0]])
  et = jnp.zeros_like(es)
  # Σ_d |Δ_i||Δ_{i+1}| = 2, 0, 12 over i = 0, 1, 2; mean 14/3.
  np.testing.assert_allclose(cc.correlation_loss(es, et), 14.0 / 3.0, rtol=1e-6)


# --- VID ---------------------------------------------------------------------------------------


def _vid_rename(key):
  return f"vid.{key}"


@pytest.mark.parametrize("prefix", ["vid", "vidx"])
def test_vid_matches_the_reference(prefix):
  g = GOLDEN
  g_s = [_nhwc(g[f"{prefix}_feat_s.{i}"]) for i in range(3)]
  g_t = [_nhwc(g[f"{prefix}_feat_t.{i}"]) for i in range(3)]
  make_student = lambda maps: {"feats": _stage_feats(maps)}
  teacher_out = {"feats": _stage_feats(g_t)}
  bridge = vid.VIDBridge(init_pred_var=float(g[f"{prefix}_hp_init_pred_var"]),
                         eps=float(g[f"{prefix}_hp_eps"]))
  variables = _variables(_entries(prefix, "param", "", _vid_rename))
  initialised = _init_shapes(bridge, make_student(g_s), teacher_out, None)
  _check_same_structure(initialised, variables)
  out, g_params, g_inputs, _ = _run_bridge(bridge, "loss_vid", variables, make_student, g_s,
                                           teacher_out)
  np.testing.assert_allclose(out["loss_vid"], g[f"{prefix}_loss"], **LOSS_TOL)
  for i in range(3):
    np.testing.assert_allclose(out[f"loss_vid_{i}"], g[f"{prefix}_loss_group.{i}"], **LOSS_TOL)
    np.testing.assert_allclose(g_inputs[i], _nhwc(g[f"{prefix}_grad_feat_s.{i}"]), **GRAD_TOL)
  _check_params_grads(g_params, prefix, "", _vid_rename)


# --- AB ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["ab", "abx"])
def test_ab_matches_the_reference(prefix):
  g = GOLDEN
  g_s = [_nhwc(g[f"{prefix}_feat_s.{i}"]) for i in range(3)]
  g_t = [_nhwc(g[f"{prefix}_feat_t.{i}"]) for i in range(3)]
  make_student = lambda maps: {"feats": _stage_feats(maps)}
  teacher_out = {"feats": _stage_feats(g_t)}
  bridge = ab.ABBridge(margin=float(g[f"{prefix}_hp_margin"]))
  variables = _variables(_entries(prefix, "param", ""))
  _check_same_structure(_init_shapes(bridge, make_student([m[:1] for m in g_s]),
                                    {"feats": _stage_feats([m[:1] for m in g_t])}, None),
                        variables)
  out, g_params, g_inputs, batch_stats = _run_bridge(bridge, "loss_ab", variables, make_student,
                                                     g_s, teacher_out)
  np.testing.assert_allclose(out["loss_ab"], g[f"{prefix}_loss"], **LOSS_TOL)
  for i in range(3):
    np.testing.assert_allclose(out[f"loss_ab_{i}"], g[f"{prefix}_loss_group.{i}"], **LOSS_TOL)
    np.testing.assert_allclose(g_inputs[i], _nhwc(g[f"{prefix}_grad_feat_s.{i}"]), **GRAD_TOL)
  _check_params_grads(g_params, prefix, "")
  _check_updated(batch_stats, prefix, "")


def test_ab_weights_and_margin():
  """n = 3 taps weigh 1/4, 1/2, 1, then /B/1000·3; entries inside the margin on the right side
  cost nothing."""
  s = jnp.full((2, 1, 1, 1), 0.5)
  t_pos, t_neg = jnp.ones_like(s), -jnp.ones_like(s)
  # s = 0.5 with t > 0: (0.5 − 1)² per entry; with t ≤ 0: (0.5 + 1)².
  assert float(ab.ab_loss(s, t_pos)) == pytest.approx(2 * 0.25)
  assert float(ab.ab_loss(s, t_neg)) == pytest.approx(2 * 2.25)
  assert float(ab.ab_loss(jnp.full_like(s, 1.5), t_pos)) == 0.0
  group = ab.ab_loss_group([s, s, s], [t_pos, t_pos, t_pos])
  np.testing.assert_allclose(group, [w * 0.5 / 2 / 1000 * 3 for w in (0.25, 0.5, 1.0)],
                             rtol=1e-6)


# --- FT ----------------------------------------------------------------------------------------


def _ft_teacher(prefix, f_t):
  """The teacher outputs with the paraphraser head (reference parameters) applied."""
  teacher_out = {"feats": collections.OrderedDict(stage3=f_t, pooled=_dummy())}
  heads = ft.Paraphraser()
  variables = _variables(_entries(prefix, "param", "paraphraser"))
  _check_same_structure(_init_shapes(heads, teacher_out), variables)
  return heads, variables, teacher_out


@pytest.mark.parametrize("prefix", ["ft", "ftx"])
def test_ft_matches_the_reference(prefix):
  g = GOLDEN
  f_s, f_t = _nhwc(g[f"{prefix}_f_s"]), _nhwc(g[f"{prefix}_f_t"])
  heads, head_vars, teacher_out = _ft_teacher(prefix, f_t)
  teacher_out.update(jax.jit(heads.apply)(head_vars, teacher_out))
  make_student = lambda x: {"feats": collections.OrderedDict(stage3=x, pooled=_dummy())}
  bridge = ft.TranslatorBridge(p1=int(g[f"{prefix}_hp_p1"]), p2=int(g[f"{prefix}_hp_p2"]))
  variables = _variables(_entries(prefix, "param", "translator"))
  variables = {c: {"translator": v} for c, v in variables.items()}
  _check_same_structure(_init_shapes(bridge, make_student(f_s[:1]),
                                    jax.tree.map(lambda x: x[:1], teacher_out), None),
                        variables)
  out, g_params, g_fs, batch_stats = _run_bridge(bridge, "loss_ft", variables, make_student,
                                                 f_s, teacher_out)
  np.testing.assert_allclose(out["loss_ft"], g[f"{prefix}_loss"], **LOSS_TOL)
  np.testing.assert_allclose(g_fs, _nhwc(g[f"{prefix}_grad_f_s"]), **GRAD_TOL)
  _check_params_grads(g_params["translator"], prefix, "translator")
  _check_updated(batch_stats["translator"], prefix, "translator")


def test_ft_paraphraser_training_matches_the_reference():
  """The paraphraser's own stage: MSE(reconstruction, f_t) and its parameter gradients."""
  g = GOLDEN
  f_t = _nhwc(g["ft_f_t"])
  heads, variables, teacher_out = _ft_teacher("ft", f_t)

  def objective(params):
    out = heads.apply({"params": params}, teacher_out, train=True)
    return ft.paraphraser_loss(out["reconstruction"], f_t)

  loss, grads = jax.jit(jax.value_and_grad(objective))(variables["params"])
  np.testing.assert_allclose(loss, g["ft_init_loss"], **LOSS_TOL)
  _check_params_grads(grads, "ft_init", "paraphraser")


def test_ft_teacher_factor_is_a_constant():
  g = GOLDEN
  f_s, f_t = _nhwc(g["ftx_f_s"]), _nhwc(g["ftx_f_t"])
  grad_s, grad_t = jax.jit(jax.grad(ft.ft_loss, argnums=(0, 1)))(f_s, f_t)
  assert np.abs(np.asarray(grad_s)).max() > 0
  assert np.all(np.asarray(grad_t) == 0)


# --- Initialisation ----------------------------------------------------------------------------


def _bound(fan_in):
  return 1.0 / np.sqrt(fan_in)


@pytest.mark.parametrize("prefix,fan_in", [
    ("fitnetx_h1", 6 * 3 * 3),    # Conv2d(6, 8, 3): fan_in = C_in·k²
    ("fitnetx_h2", 8 * 1 * 1),    # Conv2d(8, 12, 1)
    ("fitnetx_h3", 16 * 4 * 4),   # ConvTranspose2d(12, 16, 4): fan_in = C_out·k² in torch
])
def test_conv_reg_init_is_pytorch_default(prefix, fan_in):
  """The kernel and bias are U(±1/sqrt(fan_in)) as torch draws them (the reference's own draw
  reaches the same bound), BN starts at scale 1, bias 0, mean 0, var 1."""
  g = GOLDEN
  f_s, f_t = _nhwc(g[f"{prefix}_f_s"]), _nhwc(g[f"{prefix}_f_t"])
  variables = jax.jit(lambda x: connectors.ConvReg().init(jax.random.PRNGKey(1), x, f_t.shape))(
      f_s)
  bound = _bound(fan_in)
  kernel = np.asarray(variables["params"]["conv"]["kernel"])
  bias = np.asarray(variables["params"]["conv"]["bias"])
  ref = np.abs(g[f"{prefix}_param.regress_s.conv.weight"])
  assert kernel.shape == _convert(g[f"{prefix}_param.regress_s.conv.weight"], "weight").shape
  for draw in (kernel, ref):
    assert np.abs(draw).max() <= bound
    if draw.size >= 500:
      assert np.abs(draw).max() > 0.97 * bound
  assert np.abs(bias).max() <= bound and ref.max() <= bound
  assert np.abs(g[f"{prefix}_param.regress_s.conv.bias"]).max() <= bound
  np.testing.assert_array_equal(variables["params"]["bn"]["scale"], 1.0)
  np.testing.assert_array_equal(variables["params"]["bn"]["bias"], 0.0)
  np.testing.assert_array_equal(variables["batch_stats"]["bn"]["mean"], 0.0)
  np.testing.assert_array_equal(variables["batch_stats"]["bn"]["var"], 1.0)


def test_vid_init_matches_the_reference():
  """log_scale starts at exactly the reference's float32 value; the 1×1 kernels are
  U(±1/sqrt(C_in))."""
  g = GOLDEN
  g_s = [_nhwc(g[f"vidx_feat_s.{i}"]) for i in range(3)]
  g_t = [_nhwc(g[f"vidx_feat_t.{i}"]) for i in range(3)]
  bridge = vid.VIDBridge(init_pred_var=float(g["vidx_hp_init_pred_var"]),
                         eps=float(g["vidx_hp_eps"]))
  params = jax.jit(bridge.init)(jax.random.PRNGKey(2), {"feats": _stage_feats(g_s)},
                                {"feats": _stage_feats(g_t)}, None)["params"]
  for i in range(3):
    np.testing.assert_array_equal(params[f"vid_{i}"]["log_scale"], g[f"vidx_param.{i}.log_scale"])
    for j in (0, 2, 4):
      kernel = np.asarray(params[f"vid_{i}"][f"regressor_{j}"]["kernel"])
      assert np.abs(kernel).max() <= _bound(kernel.shape[2])
      assert np.abs(g[f"vidx_param.{i}.regressor.{j}.weight"]).max() <= _bound(kernel.shape[2])


def test_cc_and_ft_inits_are_pytorch_default():
  g = GOLDEN
  params = jax.jit(cc.CorrelationBridge(feat_dim=16).init)(
      jax.random.PRNGKey(3), {"feats": {"pooled": jnp.ones((2, 12))}},
      {"feats": {"pooled": jnp.ones((2, 16))}}, None)["params"]
  for name, fan_in in (("embed_s", 12), ("embed_t", 16)):
    for leaf in ("kernel", "bias"):
      assert np.abs(np.asarray(params[name][leaf])).max() <= _bound(fan_in)
      ref = g[f"ccx_param.{name}.linear.{'weight' if leaf == 'kernel' else 'bias'}"]
      assert np.abs(ref).max() <= _bound(fan_in)
  # Paraphraser on 32 channels: decoder ConvTranspose2d(16, 32, 3) has torch fan_in 32·9.
  f_t = jnp.ones((2, 2, 2, 32))
  feats = collections.OrderedDict(stage3=f_t, pooled=jnp.ones((2, 32)))
  params = jax.jit(ft.Paraphraser().init)(jax.random.PRNGKey(4), {"feats": feats})["params"]
  for name, fan_in in (("encoder_0", 32 * 9), ("encoder_3", 32 * 9), ("encoder_6", 16 * 9),
                       ("decoder_0", 16 * 9), ("decoder_3", 32 * 9), ("decoder_6", 32 * 9)):
    kernel = np.asarray(params[name]["kernel"])
    assert np.abs(kernel).max() <= _bound(fan_in)
    assert np.abs(kernel).max() > 0.97 * _bound(fan_in)
    ref = g[f"ft_param.paraphraser.{name.replace('_', '.')}.weight"]
    assert np.abs(ref).max() <= _bound(fan_in) and np.abs(ref).max() > 0.97 * _bound(fan_in)


def test_conv_reg_rejects_an_unsupported_size():
  with pytest.raises(ValueError, match="no ConvReg layer"):
    connectors.conv_reg_layer((2, 2), (8, 8))
