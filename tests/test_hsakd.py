"""HSAKD against the reference code: rotations and joint labels, every loss term, gradient and
accuracy count of golden_hsakd.npz, the two auxiliary networks of golden_hsakd_net_*.npz,
parameter counts of HSAKD's PyTorch classifiers, the method's wiring and the recipes.
"""

import functools
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import helpers

from jaxkd.errors import UserError
from jaxkd.interop.torch_layout import strip_prefix, torch_to_flax
from jaxkd.methods import get_method, hsakd
from jaxkd.models import auxiliary as aux
from jaxkd.models import get_model
from jaxkd.networks import Network
from jaxkd.tree_check import first_mismatch

DATA = pathlib.Path(__file__).parent / "data"
CONFIGS = pathlib.Path(__file__).parents[1] / "configs" / "hsakd"
TAPS = ("stage1", "stage2", "stage3")


@pytest.fixture(scope="module")
def golden():
  with np.load(DATA / "golden_hsakd.npz") as npz:
    return {k: npz[k] for k in npz.files}


def _nhwc(a):
  return np.transpose(a, (0, 2, 3, 1))


def _count(tree) -> int:
  return int(sum(np.prod(leaf.shape, dtype=np.int64) for leaf in jax.tree_util.tree_leaves(tree)))


# --- rotations and labels ------------------------------------------------------------------------


def test_rotated_batch_and_labels_are_the_reference_ones(golden):
  np.testing.assert_array_equal(hsakd.rotate_batch(golden["images_nhwc"]),
                                golden["rot_inputs_nhwc"])
  np.testing.assert_array_equal(hsakd.joint_labels(golden["targets"]), golden["joint_labels"])
  np.testing.assert_array_equal(hsakd.row_class_labels(golden["targets"]),
                                golden["multi_target"])
  # [[0,1,2],[3,4,5],[6,7,8]] turned once: the first output row is the last input column.
  example = _nhwc(golden["rot90_example_in"])
  np.testing.assert_array_equal(hsakd.rotate_batch(example)[1],
                                _nhwc(golden["rot90_example_k1"])[0])
  np.testing.assert_array_equal(hsakd.joint_labels(np.array([9, 0])), [36, 37, 38, 39, 0, 1, 2, 3])


def test_rotation_summed_class_logits(golden):
  np.testing.assert_array_equal(hsakd.rotation_summed_class_logits(golden["s_ss_logits"]),
                                golden["s_ss_class_logits"])


# --- the losses ----------------------------------------------------------------------------------


def _student_loss(g, temperature=None):
  return hsakd.hsakd_loss(g["s_logits"], g["s_ss_logits"], g["t_logits"], g["t_ss_logits"],
                          g["targets"], float(g["kd_T"]) if temperature is None else temperature)


def test_student_loss_terms_match_the_reference(golden):
  loss, terms = _student_loss(golden)
  assert float(golden["kd_T"]) == hsakd.DEFAULTS["T"] == 3.0
  for name, ref in (("loss_cls", "loss_cls"), ("loss_div_aux", "loss_div_ss"),
                    ("loss_div_final", "loss_div_final"), ("loss_div", "loss_div"),
                    ("loss", "loss_total")):
    np.testing.assert_allclose(terms[name], golden[ref], rtol=1e-5, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(terms[name], golden[ref + "_f32"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(loss, golden["loss_total"], rtol=1e-5)


def test_student_loss_gradients_match_the_reference(golden):
  def total(s, s_aux, t, t_aux):
    return hsakd.hsakd_loss(s, s_aux, t, t_aux, golden["targets"], 3.0)[0]

  g_s, g_aux, g_t, g_taux = jax.jit(jax.grad(total, argnums=(0, 1, 2, 3)))(
      golden["s_logits"], golden["s_ss_logits"], golden["t_logits"], golden["t_ss_logits"])
  np.testing.assert_allclose(g_s, golden["grad_s_logits"], atol=1e-6)
  np.testing.assert_allclose(g_aux, golden["grad_s_ss_logits"], atol=1e-6)
  assert not np.any(g_t) and not np.any(g_taux)  # the teacher is a constant


def test_teacher_loss_matches_the_reference(golden):
  loss, terms = hsakd.hsakd_teacher_loss(golden["t_logits"], golden["t_ss_logits"],
                                         golden["targets"])
  np.testing.assert_allclose(terms["loss_ce_aux"], golden["teacher_loss_ce_ss"], rtol=1e-5)
  np.testing.assert_allclose(terms["loss_cls"], golden["teacher_loss_ce_final"], rtol=1e-5)
  np.testing.assert_allclose(loss, golden["teacher_loss_total"], rtol=1e-5)


@pytest.mark.parametrize("k", [1, 5])
def test_accuracy_counts_match_the_reference(golden, k):
  joint, cls = hsakd.aux_correct(golden["s_ss_logits"], golden["targets"], k)
  np.testing.assert_array_equal(joint.sum(-1), golden[f"ss_top{k}_correct"])
  np.testing.assert_array_equal(cls.sum(-1), golden[f"class_top{k}_correct"])
  np.testing.assert_array_equal(hsakd.final_correct(golden["s_logits"], golden["targets"], k).sum(),
                                golden[f"final_top{k}_correct"])


def test_method_losses_name_every_term_and_accuracy(golden):
  method = get_method("hsakd")
  hp = method.hparams(ml_collections.ConfigDict(dict(name="hsakd", T=3.0)))
  student = {"logits": golden["s_logits"], "aux_logits": golden["s_ss_logits"]}
  teacher = {"logits": golden["t_logits"], "aux_logits": golden["t_ss_logits"]}
  loss, metrics = method.loss(student, teacher, golden["targets"], hp)
  np.testing.assert_allclose(loss, golden["loss_total"], rtol=1e-5)
  for l in range(3):
    np.testing.assert_allclose(metrics[f"loss_div_aux{l + 1}"], golden["loss_div_ss"][l],
                               rtol=1e-5)
    assert metrics[f"aux{l + 1}_joint_acc"] == golden["ss_top1_correct"][l] / 32
    assert metrics[f"aux{l + 1}_class_acc"] == golden["class_top1_correct"][l] / 32
  assert metrics["top1"] == golden["final_top1_correct"] / 8
  assert all(np.ndim(v) == 0 for v in metrics.values())

  t_loss, t_metrics = method.teacher.loss(teacher, None, golden["targets"], hp)
  np.testing.assert_allclose(t_loss, golden["teacher_loss_total"], rtol=1e-5)
  np.testing.assert_allclose(t_metrics["loss_ce_aux2"], golden["teacher_loss_ce_ss"][1], rtol=1e-5)


def test_eval_metrics_average_to_the_per_row_accuracies(golden):
  out = {"logits": golden["s_logits"], "aux_logits": golden["s_ss_logits"]}
  scores = hsakd.eval_metrics(out, golden["targets"], ml_collections.ConfigDict())
  assert sorted(scores) == sorted(f"aux{l}_{kind}_acc" for l in (1, 2, 3)
                                  for kind in ("joint", "class"))
  for l in range(3):
    assert scores[f"aux{l + 1}_joint_acc"].shape == (8,)
    np.testing.assert_allclose(scores[f"aux{l + 1}_joint_acc"].mean(),
                               golden["ss_top1_correct"][l] / 32, rtol=1e-6)
    np.testing.assert_allclose(scores[f"aux{l + 1}_class_acc"].mean(),
                               golden["class_top1_correct"][l] / 32, rtol=1e-6)
  averaged = {f"eval/{k}": float(v.mean()) for k, v in scores.items()}
  assert hsakd.teacher_selection_score(averaged) == max(golden["ss_top1_correct"]) / 32


def test_mismatched_numbers_of_classifiers_are_refused(golden):
  with pytest.raises(UserError, match="student has 2 and the teacher 3"):
    hsakd.hsakd_loss(golden["s_logits"], golden["s_ss_logits"][:2], golden["t_logits"],
                     golden["t_ss_logits"], golden["targets"])


def test_both_teacher_variants_are_registered():
  frozen, joint = get_method("hsakd"), get_method("hsakd_star")
  assert frozen.views == joint.views == frozen.teacher.views == "rotations_of_crop"
  assert frozen.teacher.frozen_backbone and not joint.teacher.frozen_backbone
  assert frozen.loss is joint.loss and frozen.teacher.loss is joint.teacher.loss
  hp = frozen.hparams()
  assert (hp[frozen.teacher.num_epochs], hp[frozen.teacher.lr],
          tuple(hp[frozen.teacher.milestones])) == (100, 0.05, (30, 60, 90))
  assert (hp[joint.teacher.num_epochs], hp[joint.teacher.lr],
          tuple(hp[joint.teacher.milestones])) == (240, 0.05, (150, 180, 210))
  assert hsakd.keep_best_teacher(hp)
  scores = {"eval/top1": 90.0, "eval/aux1_joint_acc": 20.0, "eval/aux2_joint_acc": 35.0,
            "eval/aux2_class_acc": 60.0}
  assert hsakd.select_teacher(scores, hp) == 35.0
  hp.teacher_checkpoint = "last"
  assert hsakd.select_teacher(scores, hp) is None
  with pytest.raises(UserError, match="teacher_checkpoint='newest'"):
    hsakd.keep_best_teacher(ml_collections.ConfigDict(dict(teacher_checkpoint="newest")))


# --- the auxiliary networks ----------------------------------------------------------------------

# Parameter counts of winycg/HSAKD @ 28c8dc2's `<arch>_aux` models (docs/zoo.md): (classes,
# backbone, classifiers, L).
PARAMS = {
    "resnet20": (100, 278_324, 762_992, 3),
    "resnet56": (100, 861_620, 2_206_064, 3),
    "resnet8x4": (100, 1_233_540, 3_557_296, 3),
    "resnet32x4": (100, 7_433_860, 18_907_056, 3),
    "wrn_16_2": (100, 703_284, 1_928_304, 3),
    "wrn_40_1": (100, 569_780, 1_484_432, 3),
    "wrn_40_2": (100, 2_255_156, 5_769_328, 3),
    "vgg13": (100, 9_462_180, 37_049_664, 4),
    "MobileNetV2_stride1": (100, 812_836, 4_671_496, 4),
    "ShuffleV1": (100, 949_258, 3_118_740, 3),
    "ShuffleV2": (100, 1_355_528, 4_519_988, 3),
    "ResNet50": (100, 23_705_252, 76_976_704, 4),
    "resnet34_imagenet": (1000, 21_797_672, 76_474_240, 4),
    "resnet18_imagenet": (1000, 11_689_512, 47_555_456, 4),
}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_parameter_counts_and_output_shapes(name):
  num_classes, backbone, classifiers, depth = PARAMS[name]
  net = Network(get_model(name, num_classes), aux.for_model(name, num_classes))
  assert len(net.heads.taps) == depth
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  out, variables = jax.eval_shape(net.init_with_output, jax.random.key(0), x)
  assert (_count(variables["params"]["backbone"]), _count(variables["params"]["heads"])) == \
      (backbone, classifiers)
  assert out["aux_logits"].shape == (depth, 2, 4 * num_classes)


@pytest.fixture(scope="module", params=["resnet20", "wrn_16_2"])
def net_golden(request):
  name = request.param
  with np.load(DATA / f"golden_hsakd_net_{name}_aux.npz") as npz:
    data = {k: npz[k] for k in npz.files}
  state_dict = strip_prefix(data, "sd")
  parts = {part: torch_to_flax(strip_prefix(state_dict, prefix))
           for part, prefix in (("backbone", "backbone"), ("heads", "auxiliary_classifier"))}
  variables = {col: {part: parts[part][col] for part in parts} for col in ("params", "batch_stats")}
  net = Network(get_model(name, 100), aux.for_model(name, 100))
  return name, net, variables, data


def _close(got, want, what):
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4, err_msg=what)


def test_reference_aux_network_loads_and_reproduces_its_outputs(net_golden):
  name, net, variables, data = net_golden
  x = _nhwc(data["rot_inputs"])
  assert first_mismatch(jax.eval_shape(net.init, jax.random.key(0), x), variables) is None
  assert _count(variables["params"]) == sum(PARAMS[name][1:3])
  np.testing.assert_array_equal(hsakd.joint_labels(data["targets"]), data["joint_labels"])
  np.testing.assert_array_equal(hsakd.rotate_batch(_nhwc(data["images"])), x)
  with jax.default_matmul_precision("highest"):
    out = net.apply(variables, x)
    train_out, _ = net.apply(variables, x, train=True, mutable=["batch_stats"])
  _close(out["logits"], data["eval_logits"], "eval logits")
  _close(out["aux_logits"], data["eval_ss_logits"], "eval aux logits")
  for l, tap in enumerate(TAPS, start=1):
    _close(out["feats"][tap], _nhwc(data[f"eval_feat{l}"]), f"tap {tap}")
  # Train mode: batch statistics over the 8 rotated rows, in the backbone and every classifier.
  _close(train_out["logits"], data["train_logits"], "train logits")
  _close(train_out["aux_logits"], data["train_ss_logits"], "train aux logits")


def test_frozen_teacher_classifiers_pass_no_gradient_to_the_backbone():
  rng = np.random.RandomState(0)
  feats = {"stage1": rng.randn(2, 8, 8, 16), "stage2": rng.randn(2, 4, 4, 32),
           "stage3": rng.randn(2, 2, 2, 64)}
  feats = {k: jnp.asarray(v, jnp.float32) for k, v in feats.items()}
  heads = {d: aux.for_model("resnet8", 10, detach=d) for d in (False, True)}
  variables = jax.jit(heads[False].init)(jax.random.key(0), {"feats": feats})

  @functools.partial(jax.jit, static_argnums=0)
  def logits_and_grads(detach):
    def aux_energy(taps):
      logits = heads[detach].apply(variables, {"feats": taps})["aux_logits"]
      return jnp.sum(logits ** 2), logits
    return jax.grad(aux_energy, has_aux=True)(feats)

  (g_attached, attached), (g_detached, detached) = logits_and_grads(False), logits_and_grads(True)
  assert all(np.any(g) for g in g_attached.values())
  assert not any(np.any(g) for g in g_detached.values())
  np.testing.assert_array_equal(attached, detached)  # Same classifiers, same outputs.


def _init_heads(name):
  """Freshly initialised classifiers of `name`, on taps of a 16x16 input (cheap to compile)."""
  backbone = get_model(name, 10)
  _, feats = jax.eval_shape(lambda x: backbone.init_with_output(jax.random.key(0), x)[0],
                            jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32))
  heads = aux.for_backbone(backbone, 10)
  taps = {k: jnp.ones(feats[k].shape, jnp.float32) for k in heads.taps}
  return jax.jit(heads.init)(jax.random.key(1), {"feats": taps})["params"]


def _kaiming_std(kernel):
  return np.sqrt(2.0 / (kernel.shape[0] * kernel.shape[1] * kernel.shape[-1]))


def test_classifier_initialisers_follow_the_reference():
  # VGG: the reference never calls its classifiers' init: PyTorch's U(+-1/sqrt(fan_in)) for
  # conv kernels and biases and for the 4N-way linear.
  params = _init_heads("vgg8")
  conv = params["block_extractor4_0_0"]
  bound = 1 / np.sqrt(9 * 512)
  for leaf in (conv["kernel"], conv["bias"]):
    assert bound / 2 < np.abs(leaf).max() <= bound
  assert np.any(params["fc4"]["bias"])
  # ShuffleV1: kaiming-normal (fan_out) convs, unlike its PyTorch-default backbone; fc bias 0.
  params = _init_heads("ShuffleV1")
  kernel = np.asarray(params["block_extractor3_0_0"]["conv1"]["kernel"])
  assert abs(kernel.std() / _kaiming_std(kernel) - 1) < 0.1
  assert not np.any(params["fc3"]["bias"])


def test_families_without_classifiers_name_the_ones_with_them():
  with pytest.raises(UserError, match="unknown model 'nope'"):
    aux.for_model("nope", 100)
  assert {"resnet8x4", "wrn_40_2"} <= set(aux.model_names())


# --- recipes -------------------------------------------------------------------------------------

# file -> (student lr, paper's Ours, Ours*)
RECIPES = {
    "wrn_40_2-wrn_16_2": (0.05, "77.20", "78.67"),
    "wrn_40_2-wrn_40_1": (0.05, "77.00", "78.12"),
    "resnet56-resnet20": (0.05, "72.58", "73.73"),
    "resnet32x4-resnet8x4": (0.05, "77.26", "77.69"),
    "vgg13-MobileNetV2_stride1": (0.01, "77.45", "79.27"),
    "ResNet50-MobileNetV2_stride1": (0.01, "78.79", "79.43"),
    "wrn_40_2-ShuffleV1": (0.01, "78.51", "80.11"),
    "resnet32x4-ShuffleV2": (0.01, "79.93", "80.86"),
    "imagenet_resnet34-resnet18": (0.1, "72.16", "72.39"),
}


def _recipe(stem):
  return helpers.load_module(CONFIGS / f"{stem}.py", f"hsakd_recipe_{stem}")


def test_one_recipe_per_pair():
  assert {p.stem for p in CONFIGS.glob("*-*.py")} == set(RECIPES)


@pytest.mark.parametrize("stem", sorted(RECIPES))
def test_recipes(stem):
  lr, ours, ours_star = RECIPES[stem]
  module = _recipe(stem)
  assert f"configs/hsakd/{stem}.py --workdir" in module.__doc__
  assert f"configs/hsakd/{stem}.py:star --workdir" in module.__doc__
  assert ours in module.__doc__ and ours_star in module.__doc__
  config = module.get_config()
  if not stem.startswith("imagenet"):
    assert (config.teacher.name, config.student.name) == tuple(stem.split("-"))
    assert (config.dataset.name, config.num_epochs, config.batch_size) == ("cifar100", 240, 64)
    assert tuple(config.schedule.milestones) == (150, 180, 210)
    assert config.optimizer.nesterov and config.optimizer.weight_decay == 5e-4
    assert tuple(config.method.teacher_milestones) == (30, 60, 90)
  assert config.optimizer.lr == lr and config.optimizer.momentum == 0.9
  assert config.schedule.decay == 0.1
  # Every HSAKD hyper-parameter is in the (locked) config, so the command line can set it.
  assert config.method.name == "hsakd" and config.method.T == 3.0
  assert set(config.method) == set(hsakd.DEFAULTS) | {"name"}
  # Teacher classifier l teaches student classifier l: both have the same number.
  depths = [len(aux.for_model(config[role].name, 10).taps) for role in ("teacher", "student")]
  assert depths[0] == depths[1]
  star = module.get_config("star,runlocal")
  assert star.method.name == "hsakd_star" and star.batch_size == 8
  with pytest.raises(ValueError, match="valid: star, runlocal"):
    module.get_config("fast")
