"""Step-for-step parity of jaxkd's training step with the reference trainers.

    python experiments/parity.py tests/data/trajectory_sskd.npz
    python experiments/parity.py tests/data/trajectory_hsakd.npz --tolerance=3

A trajectory file holds N SGD steps of a reference student stage (SSKD `student.py`, HSAKD
`train_student_cifar.py`): the teacher's and the student's initial `state_dict`s (PyTorch
layouts, heads included), the batches in the order they were used, the learning rate of every
step, every loss term of every step (before its update) and the student's final weights and
BatchNorm statistics. Its `meta` (JSON) names the method, the reference architectures, the
hyper-parameters, the optimiser and the schedule; nothing here is specific to one file.

What runs is jaxkd's own: the method's `Method` record (loss, heads, teacher heads), the
networks of `jaxkd.networks.build_network`, the optimiser of `jaxkd.optim.make_optimizer` from a
config carrying the file's SGD settings, the schedule of `jaxkd.optim.learning_rate_schedule`
(checked against the stored lr of every step; where it cannot express them the stored values are
fed instead, and the output says so), and the trainer's jitted step
(`jaxkd.loop.compile_steps` -> `jaxkd.steps.train_step`), on the stored batches converted to
jaxkd's layout (NHWC; [B, 4, H, W, C] rotated views, row 4i+k = image i, view k; for HSAKD the
views are built from the un-rotated batch with `jaxkd.methods.hsakd.rotate_batch`). The
PyTorch tensors are converted with `jaxkd.interop.torch_layout`.

Output: one line per step with each loss term, jaxkd vs reference and their relative
divergence (and, for SSKD, whether the kept rows and ranks equal the reference's), then the
divergence of the final parameters and BatchNorm statistics. Exit status 0 within the
tolerances (`TOLERANCES`, times --tolerance), 1 beyond
them (the last line names the worst offence), 2 on bad input (one `error: ...` line).
"""

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import zipfile
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import ml_collections

# import_teacher: how the teacher importer renames another code base's keys (MobileNetV2's
# classifier in SSKD/HSAKD), applied to the backbones here too.
from jaxkd import import_teacher
from jaxkd import optim
from jaxkd.errors import UserError
from jaxkd.interop.torch_layout import strip_prefix, torch_to_flax
from jaxkd.methods import get_method
from jaxkd.methods import hsakd
from jaxkd.methods import sskd
from jaxkd.models import MODEL_NAMES
from jaxkd.state import TrainState
from jaxkd.tree_check import first_mismatch

EXIT_PASS, EXIT_DIVERGED, EXIT_BAD_INPUT = 0, 1, 2

# How far a float32 port may drift from a recorded reference trajectory: at least 3x the spread
# between float32 reruns of the reference whose start was perturbed by 1e-7 (the trajectories
# were recorded with seeds where that spread stayed under 1e-5 in the losses, 2e-5 in parameters
# and running means, 6e-5 relative in running variances).
TOLERANCES = dict(loss_rtol=1e-4, param_atol=1e-4, mean_atol=1e-4, var_rtol=2e-4)

# The lr a step applies may differ from the stored one (cast to float32) by this much: jaxkd's
# multistep schedule multiplies in float32, the references in Python floats (1 ulp apart).
LR_RTOL = 1e-6

# The BatchNorm of every jaxkd zoo network is PyTorch's default one.
JAXKD_BATCHNORM = dict(eps=1e-5, momentum=0.1)


class TrajectoryError(UserError):
  """A trajectory file that cannot be read or that jaxkd cannot follow."""


# --------------------------------------------------------------------------------------------
# What each reference trainer's file looks like, in jaxkd's terms.


@dataclasses.dataclass(frozen=True)
class Term:
  """One loss term: its label, the file's array (and column) and jaxkd's metric."""
  label: str
  file_key: str
  metric: str
  column: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class MethodSpec:
  """How one reference trainer's trajectory maps onto a jaxkd method.

  heads_prefix: the state_dict prefix of the heads next to `backbone.*` (both networks);
  head_renames: reference sub-module name -> jaxkd's, inside the heads;
  arch_suffix / arch_aliases: reference architecture name -> jaxkd zoo name;
  hparam_names: meta hyper-parameter name -> jaxkd hparam name (unlisted: the same name);
  views: 'stored' (x is [N, B, V, C, H, W], views as the dataset yields them) or 'rotate'
    (x is the un-rotated [N, B, C, H, W]; the four rotations are built here);
  terms: the loss terms, a '*' in a label expanding over the columns of a 2-d array;
  discrete: optional (teacher outputs, labels, hparams) -> {file key: jaxkd array} of the
    method's discrete choices, compared exactly.
  """
  name: str
  repo: str
  heads_prefix: str
  views: str
  terms: tuple[Term, ...]
  head_renames: Mapping[str, str] = dataclasses.field(default_factory=dict)
  arch_suffix: str = ""
  arch_aliases: Mapping[str, str] = dataclasses.field(default_factory=dict)
  hparam_names: Mapping[str, str] = dataclasses.field(default_factory=dict)
  discrete: Optional[Callable[[Any, jax.Array, ml_collections.ConfigDict],
                              dict[str, jax.Array]]] = None


def _sskd_discrete(teacher_out: Any, labels: jax.Array, hparams: ml_collections.ConfigDict
                   ) -> dict[str, jax.Array]:
  """The ranks and kept rows of SSKD's selective terms (they depend on the teacher only)."""
  terms = sskd.sskd_loss(teacher_out["logits"], teacher_out["logits"], teacher_out["ss_rep"],
                         teacher_out["ss_rep"], labels, hparams)
  return {"tf_rank": terms.rank_tf, "ss_rank": terms.rank_ss, "tf_keep": terms.mask_tf,
          "ss_keep": terms.mask_ss}


SPECS = {
    "sskd": MethodSpec(
        name="sskd", repo="xuguodong03/SSKD", heads_prefix="proj_head", views="stored",
        # wrapper.proj_head = Sequential(Linear, ReLU, Linear): jaxkd's SSModule fc1, fc2.
        head_renames={"0": "fc1", "2": "fc2"},
        terms=(Term("ce", "loss_ce", "loss_ce"), Term("kd", "loss_kd", "loss_kd"),
               Term("tf", "loss_tf", "loss_tf"), Term("ss", "loss_ss", "loss_ss"),
               Term("total", "loss_total", "loss")),
        discrete=_sskd_discrete),
    "hsakd": MethodSpec(
        name="hsakd", repo="winycg/HSAKD", heads_prefix="auxiliary_classifier", views="rotate",
        arch_suffix="_aux",
        # HSAKD's factory names whose network is a jaxkd zoo model of another name.
        arch_aliases={"vgg13_bn": "vgg13", "mobilenetV2": "MobileNetV2_stride1"},
        hparam_names={"kd_T": "T"},
        terms=(Term("cls", "loss_cls", "loss_cls"),
               Term("div_aux*", "loss_div_aux", "loss_div_aux*"),
               Term("div_final", "loss_div_final", "loss_div_final"),
               Term("div", "loss_div", "loss_div"), Term("total", "loss_total", "loss"))),
}


# --------------------------------------------------------------------------------------------
# Reading a file.


@dataclasses.dataclass
class Trajectory:
  """A trajectory file, read and checked (arrays as stored: PyTorch layouts, NCHW)."""
  path: str
  meta: dict[str, Any]
  spec: MethodSpec
  teacher_model: str       # jaxkd zoo names
  student_model: str
  num_classes: int
  num_images: int          # B
  num_steps: int           # N
  hparams: ml_collections.ConfigDict    # the method's, with the file's values
  momentum: float
  weight_decay: float
  nesterov: bool
  lr: np.ndarray           # float64 [N], the lr optimizer.step() used at step n
  images: np.ndarray       # [N, B, V, C, H, W] or [N, B, C, H, W]
  labels: np.ndarray       # [N, B]
  teacher: dict[str, np.ndarray]        # state_dicts, keys without the file's prefix
  student_init: dict[str, np.ndarray]
  student_final: dict[str, np.ndarray]
  terms: tuple[Term, ...]  # expanded
  arrays: dict[str, np.ndarray]         # every other array (losses, ranks, masks)


def _require(meta: Mapping[str, Any], key: str, path: str) -> Any:
  if key not in meta:
    raise TrajectoryError(f"{path}: meta has no {key!r} (keys: {', '.join(sorted(meta))})")
  return meta[key]


def method_spec(meta: Mapping[str, Any], path: str) -> MethodSpec:
  """The spec of the reference trainer that wrote the file (from meta's repo, else method)."""
  reference = meta.get("reference") or {}
  repo = str(reference.get("repo", "")) if isinstance(reference, Mapping) else ""
  for spec in SPECS.values():
    if repo.lower() == spec.repo.lower():
      return spec
  described = str(meta.get("method", ""))
  for spec in SPECS.values():
    if described.split(" ", 1)[0].lower() == spec.name:
      return spec
  raise TrajectoryError(
      f"{path}: unknown method (meta reference.repo {repo!r}, method {described[:60]!r}); "
      f"known: {', '.join(f'{s.name} ({s.repo})' for s in SPECS.values())}")


def zoo_name(spec: MethodSpec, arch: str, path: str) -> str:
  """jaxkd's zoo name of a reference architecture name (e.g. HSAKD's 'resnet20_aux')."""
  name = str(arch)
  if spec.arch_suffix and name.endswith(spec.arch_suffix):
    name = name[:-len(spec.arch_suffix)]
  name = spec.arch_aliases.get(name, name)
  if name not in MODEL_NAMES:
    raise TrajectoryError(f"{path}: architecture {arch!r} is not a jaxkd zoo model; known: "
                          f"{', '.join(MODEL_NAMES)}")
  return name


def method_hparams(spec: MethodSpec, meta_hparams: Mapping[str, Any], path: str
                   ) -> ml_collections.ConfigDict:
  """The jaxkd method's hyper-parameters with the file's numeric values (strings in meta are
  descriptions and are skipped); a number jaxkd has no field for is refused."""
  method = get_method(spec.name)
  overrides = {}
  for key, value in meta_hparams.items():
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      continue
    name = spec.hparam_names.get(key, key)
    if name not in method.defaults:
      raise TrajectoryError(f"{path}: hyper-parameter {key!r} = {value!r} has no counterpart "
                            f"in jaxkd's {spec.name} (fields: {', '.join(method.defaults)})")
    overrides[name] = type(method.defaults[name])(value)
  return method.hparams(ml_collections.ConfigDict(overrides))


def _prefixed(arrays: Mapping[str, np.ndarray], prefix: str, path: str) -> dict[str, np.ndarray]:
  out = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
  if not out:
    raise TrajectoryError(f"{path}: no array named {prefix}*")
  return out


def load_trajectory(path: str) -> Trajectory:
  """Reads and checks a trajectory file; raises TrajectoryError (one line) on bad input."""
  try:
    return _load_trajectory(path)
  except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
    # A meta field or array of the wrong kind (e.g. a string where a number belongs).
    raise TrajectoryError(f"{path}: malformed trajectory file ({type(e).__name__}: {e})"
                          ) from None


def _load_trajectory(path: str) -> Trajectory:
  if not os.path.isfile(path):
    raise TrajectoryError(f"no such file: {path}")
  if not zipfile.is_zipfile(path):
    raise TrajectoryError(f"{path} is not an .npz file")
  try:
    with np.load(path, allow_pickle=False) as npz:
      arrays = {k: npz[k] for k in npz.files}
  except (OSError, ValueError, zipfile.BadZipFile) as e:
    raise TrajectoryError(f"cannot read {path} as an .npz file ({e})") from None
  if "meta" not in arrays:
    raise TrajectoryError(f"{path}: no 'meta' array (not a trajectory file)")
  try:
    meta = json.loads(str(arrays.pop("meta")))
  except json.JSONDecodeError as e:
    raise TrajectoryError(f"{path}: meta is not JSON ({e})") from None
  if not isinstance(meta, dict):
    raise TrajectoryError(f"{path}: meta is not a JSON object")
  spec = method_spec(meta, path)

  num_classes = int(_require(meta, "num_classes", path))
  hparams = method_hparams(spec, _require(meta, "hyper_parameters", path), path)
  teacher_model = zoo_name(spec, _require(meta, "teacher_arch", path), path)
  student_model = zoo_name(spec, _require(meta, "student_arch", path), path)

  opt = _require(meta, "optimizer", path)
  if "SGD" not in str(opt.get("type", "")):
    raise TrajectoryError(f"{path}: optimizer {opt.get('type')!r}: jaxkd's is torch.optim.SGD")
  if float(opt.get("dampening", 0.0)) != 0.0:
    raise TrajectoryError(f"{path}: SGD dampening {opt['dampening']} cannot be expressed by "
                          "jaxkd's optimiser (optax.sgd has none)")
  bn = meta.get("batchnorm", JAXKD_BATCHNORM)
  for key, value in JAXKD_BATCHNORM.items():
    if float(bn.get(key, value)) != value:
      raise TrajectoryError(f"{path}: BatchNorm {key} {bn[key]}: jaxkd's zoo BatchNorm has "
                            f"{key} {value}")

  for key in ("lr", "x", "y"):
    if key not in arrays:
      raise TrajectoryError(f"{path}: no {key!r} array")
  lr = np.asarray(arrays.pop("lr"), np.float64)
  images, labels = arrays.pop("x"), arrays.pop("y")
  if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
    raise TrajectoryError(f"{path}: y has shape {labels.shape} and dtype {labels.dtype}, "
                          "expected integer labels [N, B]")
  num_steps, num_images = labels.shape
  if lr.shape != (num_steps,):
    raise TrajectoryError(f"{path}: lr has shape {lr.shape}, y {labels.shape}")
  listed = (meta.get("lr_schedule") or {}).get("lr")
  if listed is not None and not np.array_equal(np.asarray(listed, np.float64), lr):
    raise TrajectoryError(f"{path}: meta lr_schedule.lr differs from the lr array")
  want = ((num_steps, num_images, sskd.NUM_VIEWS, 3) if spec.views == "stored"
          else (num_steps, num_images, 3))
  if images.shape[:len(want)] != want or images.ndim != len(want) + 2:
    raise TrajectoryError(f"{path}: x has shape {images.shape}, expected {want} + (H, W) for "
                          f"{spec.name}")
  for key, value in (("N", num_steps), ("B", num_images)):
    if key in meta and int(meta[key]) != value:
      raise TrajectoryError(f"{path}: meta {key} = {meta[key]} but the arrays hold {value}")

  teacher = _prefixed(arrays, "teacher/", path)
  student_init = _prefixed(arrays, "student_init/", path)
  student_final = _prefixed(arrays, "student_final/", path)
  for prefix in ("teacher/", "student_init/", "student_final/"):
    arrays = {k: v for k, v in arrays.items() if not k.startswith(prefix)}

  terms = []
  for term in spec.terms:
    if term.file_key not in arrays:
      raise TrajectoryError(f"{path}: no {term.file_key!r} array ({spec.name} loss term)")
    values = arrays[term.file_key]
    if "*" in term.label:
      if values.ndim != 2 or values.shape[0] != num_steps:
        raise TrajectoryError(f"{path}: {term.file_key} has shape {values.shape}, expected "
                              f"[{num_steps}, L]")
      terms += [Term(term.label.replace("*", str(l + 1)), term.file_key,
                     term.metric.replace("*", str(l + 1)), column=l)
                for l in range(values.shape[1])]
    else:
      if values.shape != (num_steps,):
        raise TrajectoryError(f"{path}: {term.file_key} has shape {values.shape}, expected "
                              f"[{num_steps}]")
      terms.append(term)

  return Trajectory(
      path=path, meta=meta, spec=spec, teacher_model=teacher_model, student_model=student_model,
      num_classes=num_classes, num_images=num_images, num_steps=num_steps, hparams=hparams,
      momentum=float(_require(opt, "momentum", path)),
      weight_decay=float(_require(opt, "weight_decay", path)),
      nesterov=bool(opt.get("nesterov", False)), lr=lr, images=images,
      labels=labels.astype(np.int32), teacher=teacher, student_init=student_init,
      student_final=student_final, terms=tuple(terms), arrays=arrays)


# --------------------------------------------------------------------------------------------
# PyTorch state_dicts -> jaxkd variables.


def network_variables(traj: Trajectory, state_dict: Mapping[str, np.ndarray], arch: str,
                      what: str) -> dict[str, dict[str, Any]]:
  """{'params', 'batch_stats'} -> {'backbone', 'heads'} of a reference state_dict (backbone.*
  plus the method's heads), converted by jaxkd.interop.torch_layout."""
  spec = traj.spec
  known = ("backbone.", spec.heads_prefix + ".")
  stray = [k for k in state_dict if not k.startswith(known)]
  if stray:
    raise TrajectoryError(f"{traj.path}: {what} entry {stray[0]!r} is neither backbone.* nor "
                          f"{spec.heads_prefix}.*")
  backbone = import_teacher.apply_aliases(
      arch, strip_prefix(state_dict, "backbone"))
  heads = {}
  for key, value in strip_prefix(state_dict, spec.heads_prefix).items():
    first, _, rest = key.partition(".")
    heads[f"{spec.head_renames.get(first, first)}.{rest}"] = value
  parts = {"backbone": torch_to_flax(backbone), "heads": torch_to_flax(heads)}
  return {col: {part: tree[col] for part, tree in parts.items() if tree[col]}
          for col in ("params", "batch_stats")}


def check_fits(traj: Trajectory, network: Any, variables: Any, image_shape: Sequence[int],
               what: str) -> None:
  expected = jax.eval_shape(lambda: network.init(
      jax.random.key(0), jnp.zeros((1,) + tuple(image_shape), jnp.float32), train=False))
  expected = {col: expected[col] for col in ("params", "batch_stats") if col in expected}
  mismatch = first_mismatch(expected, variables)
  if mismatch is not None:
    raise TrajectoryError(f"{traj.path}: the {what} does not fit jaxkd's network: {mismatch}")


# --------------------------------------------------------------------------------------------
# The trainer's pieces, built as a student stage builds them.


@dataclasses.dataclass
class Setup:
  """jaxkd's student stage for a trajectory: the jitted step, its state and teacher."""
  train: Callable             # the trainer's jitted train step (loop.compile_steps)
  state: TrainState
  teacher_variables: Any
  teacher_apply: Callable     # jitted teacher forward in inference mode
  schedule: Callable
  schedule_note: str
  lr_jaxkd: np.ndarray        # float32 [N]: the lr jaxkd's schedule gives each step
  final_variables: Any        # the reference's final student, in jaxkd's tree


def learning_rate_plan(traj: Trajectory) -> tuple[Optional[tuple[float, tuple[int, ...], float]],
                                                  str]:
  """(base lr, milestones, decay) of a multistep schedule giving the stored lr, or None and why.

  Every step is one epoch here (the references move their schedules once per epoch).
  """
  lr = traj.lr
  if np.any(lr <= 0):
    return None, "the stored lr is not positive everywhere"
  milestones = tuple(int(n) for n in range(1, len(lr)) if lr[n] != lr[n - 1])
  ratios = [float(lr[n] / lr[n - 1]) for n in milestones]
  if ratios and (max(ratios) >= 1 or not np.allclose(ratios, ratios[0], rtol=1e-9, atol=0)):
    return None, (f"the stored lr changes by factors {', '.join(f'{r:.6g}' for r in ratios)} at "
                  f"steps {', '.join(map(str, milestones))}, not by one constant decay")
  return (float(lr[0]), milestones, float(ratios[0]) if ratios else 0.1), ""


def student_config(traj: Trajectory, plan) -> ml_collections.ConfigDict:
  """The method's recipe config (configs/<method>/common.py) with the file's SGD settings."""
  from configs.hsakd import common as hsakd_recipe  # pylint: disable=import-outside-toplevel
  from configs.sskd import common as sskd_recipe  # pylint: disable=import-outside-toplevel
  recipe = {"sskd": sskd_recipe, "hsakd": hsakd_recipe}[traj.spec.name]
  config = recipe.get_config(traj.teacher_model, traj.student_model)
  base_lr, milestones, decay = plan if plan else (float(traj.lr[0]), (), 0.1)
  config.optimizer.lr = base_lr
  config.optimizer.momentum = traj.momentum
  config.optimizer.weight_decay = traj.weight_decay
  config.optimizer.nesterov = traj.nesterov
  config.schedule.name = "multistep"
  config.schedule.milestones = milestones
  config.schedule.decay = decay
  config.schedule.warmup_epochs = 0
  config.num_epochs = traj.num_steps
  config.batch_size = traj.num_images
  config.half_precision = False
  return config


def build_setup(traj: Trajectory) -> Setup:
  """The student stage jaxkd's trainer would run for this file, from the file's weights."""
  # The trainer's loop brings TensorFlow (its input pipeline): imported once the file is read.
  from jaxkd import loop  # pylint: disable=import-outside-toplevel
  from jaxkd import networks  # pylint: disable=import-outside-toplevel
  from jaxkd import stage as stage_lib  # pylint: disable=import-outside-toplevel
  from jaxkd import teachers  # pylint: disable=import-outside-toplevel
  method = get_method(traj.spec.name)
  image_shape = traj.images.shape[-2:] + traj.images.shape[-3:-2]   # (H, W, C)
  plan, why = learning_rate_plan(traj)
  config = student_config(traj, plan)
  steps_per_epoch = 1
  schedule = optim.learning_rate_schedule(config, config.optimizer.lr, traj.num_steps,
                                          steps_per_epoch)
  lr_jaxkd = np.asarray([schedule(n) for n in range(traj.num_steps)], np.float32)
  stored = traj.lr.astype(np.float32)
  if plan is None:
    note = f"jaxkd's multistep schedule cannot express the stored lr ({why}); fed the stored values"
  elif not np.allclose(lr_jaxkd, stored, rtol=LR_RTOL, atol=0):
    note = (f"jaxkd's schedule (base {plan[0]}, milestones {plan[1]}, decay {plan[2]}) gives "
            f"{lr_jaxkd.tolist()}, not the stored lr; fed the stored values")
    plan = None
  else:
    ulps = int(np.max(np.abs(lr_jaxkd.view(np.int32) - stored.view(np.int32))))
    note = (f"jaxkd's multistep schedule (base lr {plan[0]:g}, milestones {list(plan[1])}, "
            f"decay {plan[2]:g}, 1 step per epoch) reproduces the stored lr of every step"
            + ("" if ulps == 0 else f" to {ulps} float32 ulp"))
  if plan is None:
    table = jnp.asarray(stored)
    schedule = lambda count: table[jnp.minimum(count, len(stored) - 1)]  # noqa: E731
    lr_jaxkd = stored

  hparams = traj.hparams
  prep = method.teacher
  teacher_heads = prep.heads if prep is not None else method.student_heads
  teacher_network = networks.build_network(traj.teacher_model, traj.num_classes, teacher_heads,
                                       hparams)
  teacher_variables = network_variables(traj, traj.teacher, traj.teacher_model, "teacher")
  check_fits(traj, teacher_network, teacher_variables, image_shape, "teacher")
  teacher = teachers.Teacher(network=teacher_network,
                             variables=jax.device_put(teacher_variables), path=traj.path,
                             sha256="")
  inputs = loop.Inputs(teacher=teacher)
  stage = stage_lib.Stage(name=f"student_{method.name}", config=config,
                          model_name=traj.student_model, method=method, hparams=hparams,
                          num_epochs=traj.num_steps, base_lr=config.optimizer.lr,
                          teacher=stage_lib.TeacherSource(traj.teacher_model, path=traj.path))
  network = stage.network(traj.num_classes, networks.compute_dtype(config))
  init = network_variables(traj, traj.student_init, traj.student_model, "student")
  final = network_variables(traj, traj.student_final, traj.student_model, "final student")
  check_fits(traj, network, init, image_shape, "initial student")
  check_fits(traj, network, final, image_shape, "final student")

  tx = optim.make_optimizer(config, schedule, None)
  params = jax.device_put(init["params"])
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                     batch_stats=jax.device_put(init.get("batch_stats", {})),
                     opt_state=jax.jit(tx.init)(params))
  # No deployed network of its own (SSKD, HSAKD): no mesh or dataset is needed to build it.
  compiled = loop.compile_steps(stage, inputs, network, tx, schedule, None, steps_per_epoch,
                                mesh=None, info=None)
  teacher_apply = jax.jit(
      lambda v, x: loop.teacher_network(stage, inputs).apply(v, x, train=False))
  return Setup(train=compiled.train, state=state, teacher_variables=teacher.variables,
               teacher_apply=teacher_apply, schedule=schedule, schedule_note=note,
               lr_jaxkd=lr_jaxkd, final_variables=final)


def batch_of_step(traj: Trajectory, n: int) -> dict[str, np.ndarray]:
  """Step n's batch in jaxkd's layout: {'image': [B, 4, H, W, C], 'label': [B]}."""
  x = traj.images[n]
  if traj.spec.views == "stored":       # [B, V, C, H, W], views as the dataset yields them
    views = np.transpose(x, (0, 1, 3, 4, 2))
  else:                                 # [B, C, H, W] un-rotated; jaxkd's rotations
    rows = np.asarray(hsakd.rotate_batch(np.transpose(x, (0, 2, 3, 1))))
    views = rows.reshape((traj.num_images, hsakd.NUM_ROTATIONS) + rows.shape[1:])
  return {"image": np.ascontiguousarray(views, np.float32), "label": traj.labels[n]}


# --------------------------------------------------------------------------------------------
# The comparison.


def relative(got: float, want: float) -> float:
  return abs(got - want) / max(abs(want), 1e-30)


@dataclasses.dataclass
class StepRecord:
  step: int
  lr_reference: float
  lr_jaxkd: float
  terms: dict[str, tuple[float, float, float]]   # label -> (jaxkd, reference, relative)
  terms_f64: dict[str, float]                     # label -> relative vs the float64 run
  discrete: dict[str, int]                        # file key -> entries that differ


# How the final state is compared: kind -> (measure, tolerance).
FINAL_KINDS = {"params": ("abs", "param_atol"), "running_mean": ("abs", "mean_atol"),
               "running_var": ("rel", "var_rtol")}


@dataclasses.dataclass
class FinalRecord:
  kind: str            # params, running_mean, running_var
  measure: str         # 'abs' or 'rel'
  value: float
  where: str
  moved: float         # max |final - init| of the reference (how much the steps moved it)

  @property
  def tolerance_key(self) -> str:
    return FINAL_KINDS[self.kind][1]


@dataclasses.dataclass
class ParityReport:
  path: str
  method: str
  teacher: str
  student: str
  num_steps: int
  num_images: int
  schedule_note: str
  steps: list[StepRecord]
  final: list[FinalRecord]
  tolerances: dict[str, float]
  seconds: float

  def max_term(self, label: str, f64: bool = False) -> float:
    return max((s.terms_f64 if f64 else {k: v[2] for k, v in s.terms.items()})[label]
               for s in self.steps)

  @property
  def labels(self) -> list[str]:
    return list(self.steps[0].terms) if self.steps else []

  def failures(self) -> list[str]:
    """Every offence, worst relative to its tolerance first."""
    found = []
    rtol = self.tolerances["loss_rtol"]
    for s in self.steps:
      for label, (_, _, rel) in s.terms.items():
        if not rel <= rtol:
          found.append((rel / rtol, f"loss {label} at step {s.step} diverges by {rel:.2e} "
                                    f"relative (tolerance {rtol:.0e})"))
      for key, count in s.discrete.items():
        if count:
          found.append((math.inf, f"{key} at step {s.step}: {count} entries differ from the "
                                  "reference (must be exact)"))
      if not relative(s.lr_jaxkd, float(np.float32(s.lr_reference))) <= LR_RTOL:
        found.append((math.inf, f"lr at step {s.step}: jaxkd {s.lr_jaxkd!r}, reference "
                                f"{s.lr_reference!r}"))
    for f in self.final:
      tolerance = self.tolerances[f.tolerance_key]
      if not f.value <= tolerance:
        found.append((f.value / tolerance,
                      f"final {f.kind} diverge by {f.value:.2e} {f.measure} at {f.where} "
                      f"(tolerance {tolerance:.0e})"))
    return [text for _, text in sorted(found, key=lambda t: -t[0])]

  @property
  def passed(self) -> bool:
    return not self.failures()


def format_step(record: StepRecord) -> str:
  parts = [f"step {record.step:3d} lr {record.lr_jaxkd:.3g}"]
  for label, (got, want, rel) in record.terms.items():
    parts.append(f"{label} {got:.7g} / {want:.7g} ({rel:.1e})")
  line = " | ".join(parts)
  if record.discrete:
    bad = {k: v for k, v in record.discrete.items() if v}
    line += " | " + (", ".join(f"{k} {v} differ" for k, v in bad.items()) if bad else
                     f"{'/'.join(record.discrete)} equal")
  return line


def format_summary(report: ParityReport) -> list[str]:
  lines = [f"max relative divergence per term over {report.num_steps} steps (jaxkd vs the "
           f"float32 reference; vs its float64 run): " + ", ".join(
               f"{label} {report.max_term(label):.1e} ({report.max_term(label, True):.1e})"
               for label in report.labels)
           + f"; tolerance {report.tolerances['loss_rtol']:.0e}"]
  for f in report.final:
    lines.append(f"final {f.kind}: max {f.measure} divergence {f.value:.2e} at {f.where} "
                 f"(tolerance {report.tolerances[f.tolerance_key]:.0e}; the reference's steps "
                 f"moved them by up to {f.moved:.2e})")
  return lines


def _flat(tree: Any) -> dict[str, np.ndarray]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf)
          for path, leaf in leaves}


def compare_final(got: Any, want: Any, init: Any) -> list[FinalRecord]:
  """Max divergence of the final params (abs), running means (abs) and variances (rel)."""
  got, want, init = _flat(got), _flat(want), _flat(init)
  worst = {kind: (0.0, "-", 0.0) for kind in FINAL_KINDS}
  for path, ref in want.items():
    kind = ("params" if path.startswith("params/") else
            "running_mean" if path.endswith("/mean") else "running_var")
    diff = np.abs(got[path].astype(np.float64) - ref.astype(np.float64))
    if FINAL_KINDS[kind][0] == "rel":
      diff = diff / np.maximum(np.abs(ref.astype(np.float64)), 1e-30)
    value, where, moved = worst[kind]
    moved = max(moved, float(np.max(np.abs(ref.astype(np.float64) - init[path]))))
    if float(np.max(diff)) >= value:
      value, where = float(np.max(diff)), path
    worst[kind] = (value, where, moved)
  return [FinalRecord(kind=kind, measure=measure, value=worst[kind][0], where=worst[kind][1],
                      moved=worst[kind][2])
          for kind, (measure, _) in FINAL_KINDS.items()]


def run_parity(path_or_trajectory: Any, tolerance_scale: float = 1.0,
               tolerances: Optional[Mapping[str, float]] = None,
               log: Optional[Callable[[str], None]] = None) -> ParityReport:
  """Runs jaxkd's trainer step over a trajectory and compares it step by step.

  `tolerances` (default TOLERANCES) are multiplied by `tolerance_scale`; `log` receives one
  line per step as it runs. Raises TrajectoryError (a UserError) on bad input.
  """
  start = time.perf_counter()
  traj = (path_or_trajectory if isinstance(path_or_trajectory, Trajectory)
          else load_trajectory(path_or_trajectory))
  tol = {k: v * tolerance_scale for k, v in dict(TOLERANCES, **(tolerances or {})).items()}
  # Full float32 products on every backend (TPU/GPU default to lower-precision matmuls).
  with jax.default_matmul_precision("highest"):
    setup = build_setup(traj)
    if log:
      log(f"{traj.path}: {traj.spec.name}, teacher {traj.teacher_model} -> student "
          f"{traj.student_model}, {traj.num_classes} classes, {traj.num_steps} steps of "
          f"{traj.num_images} images; {setup.schedule_note}")
    state, steps = setup.state, []
    for n in range(traj.num_steps):
      batch = batch_of_step(traj, n)
      discrete = {}
      if traj.spec.discrete is not None:
        teacher_out = setup.teacher_apply(setup.teacher_variables,
                                          batch["image"].reshape((-1,) + batch["image"].shape[2:]))
        for key, value in traj.spec.discrete(teacher_out, jnp.asarray(batch["label"]),
                                             traj.hparams).items():
          if key in traj.arrays:
            discrete[key] = int(np.sum(np.asarray(value) != traj.arrays[key][n]))
      state, metrics = setup.train(state, setup.teacher_variables, batch)
      metrics = jax.device_get(metrics)
      terms, terms_f64 = {}, {}
      for term in traj.terms:
        ref = traj.arrays[term.file_key][n]
        ref64 = traj.arrays.get(term.file_key + "_f64")
        if term.column is not None:
          ref = ref[term.column]
          ref64 = None if ref64 is None else ref64[n][term.column]
        elif ref64 is not None:
          ref64 = ref64[n]
        got = float(metrics[term.metric])
        terms[term.label] = (got, float(ref), relative(got, float(ref)))
        terms_f64[term.label] = math.nan if ref64 is None else relative(got, float(ref64))
      record = StepRecord(step=n, lr_reference=float(traj.lr[n]),
                          lr_jaxkd=float(np.float32(metrics["lr"])), terms=terms,
                          terms_f64=terms_f64, discrete=discrete)
      steps.append(record)
      if log:
        log(format_step(record))
    final_state = jax.device_get(state)
  init = network_variables(traj, traj.student_init, traj.student_model, "student")
  got = {"params": final_state.params, "batch_stats": final_state.batch_stats}
  final = compare_final(got, setup.final_variables, init)
  return ParityReport(path=traj.path, method=traj.spec.name, teacher=traj.teacher_model,
                      student=traj.student_model, num_steps=traj.num_steps,
                      num_images=traj.num_images, schedule_note=setup.schedule_note,
                      steps=steps, final=final, tolerances=tol,
                      seconds=time.perf_counter() - start)


# --------------------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      description="Step-for-step parity of jaxkd's train step with a reference trajectory.")
  parser.add_argument("file", help="trajectory .npz (e.g. tests/data/trajectory_sskd.npz)")
  parser.add_argument("--tolerance", type=float, default=1.0,
                      help="multiplies every tolerance (default 1: loss rtol 1e-4, params and "
                           "running_mean atol 1e-4, running_var rtol 2e-4)")
  for key, value in TOLERANCES.items():
    parser.add_argument(f"--{key}", type=float, default=value, help=f"default {value:g}")
  args = parser.parse_args(argv)
  if not args.tolerance > 0:
    print("error: --tolerance must be > 0", file=sys.stderr)
    return EXIT_BAD_INPUT
  try:
    report = run_parity(args.file, args.tolerance,
                        {key: getattr(args, key) for key in TOLERANCES},
                        log=lambda line: print(line, flush=True))
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_BAD_INPUT
  for line in format_summary(report):
    print(line)
  failures = report.failures()
  if failures:
    print(f"FAIL: {failures[0]}" + (f" (and {len(failures) - 1} more)" if len(failures) > 1
                                    else ""))
    return EXIT_DIVERGED
  print(f"PASS: {report.method} {report.teacher} -> {report.student}, {report.num_steps} steps "
        f"within tolerance ({report.seconds:.1f} s)")
  return EXIT_PASS


if __name__ == "__main__":
  sys.exit(main())
