"""The objective the feature-based baselines share, and how they read the networks' taps.

RepDistiller trains every baseline on one objective (its `-r -a -b` weights):

  L = ce_weight · CE(s, y) + kd_weight · DistillKL_T(s, t) + feat_weight · L_method

where L_method is the method's own term on the feature taps (or computed by its bridge), and
DistillKL_T is Hinton's KD term of jaxkd.methods.losses.distill_kl.
"""

import functools
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from jaxkd import models
from jaxkd.errors import UserError
from jaxkd.methods.base import LossFn, Outputs, TapNeed
from jaxkd.methods.losses import cross_entropy, distill_kl, topk_correct

# term(student_out, teacher_out, hparams) -> (L_method, {metric name: scalar})
TermFn = Callable[[Outputs, Outputs, ml_collections.ConfigDict],
                  tuple[jax.Array, dict[str, jax.Array]]]

# ce_weight, kd_weight (RepDistiller's -r, -a) and T of the objective; each method adds its
# feat_weight (-b) and its own hyper-parameters.
WEIGHTS = dict(ce_weight=1.0, kd_weight=0.0, T=4.0)


def taps(out: Outputs) -> list[jax.Array]:
  """The network's taps as RepDistiller's `feat` list: [f0 (stem), stage maps…, pooled]."""
  return list(out["feats"].values())


def paired_taps(student_out: Outputs, teacher_out: Optional[Outputs], bridge: str
                ) -> tuple[list[jax.Array], list[jax.Array]]:
  """(student taps, teacher taps as constants) for a bridge; the teacher's outputs are needed
  also at initialisation, where their shapes size the bridge's modules."""
  if teacher_out is None:
    raise ValueError(f"{bridge} needs the teacher's outputs (their shapes size its modules)")
  return taps(student_out), jax.lax.stop_gradient(taps(teacher_out))


@functools.lru_cache(maxsize=None)
def tap_shapes(model_name: str, num_classes: int, image_shape: tuple[int, ...] = (32, 32, 3)
               ) -> tuple[tuple[str, tuple[int, ...]], ...]:
  """(name, shape) of each tap of network `model_name` for one image (nothing is computed)."""
  model = models.get_model(model_name, num_classes)
  (_, feats), _ = jax.eval_shape(lambda: model.init_with_output(
      jax.random.key(0), jnp.zeros((1,) + tuple(image_shape)), train=False))
  return tuple((name, tuple(f.shape)) for name, f in feats.items())


@functools.lru_cache(maxsize=None)
def class_map_shape(model_name: str, num_classes: int, image_shape: tuple[int, ...] = (32, 32, 3)
                    ) -> Optional[tuple[int, ...]]:
  """The shape of network `model_name`'s class activation maps for one image, [1, h, w,
  num_classes] (its feats' 'class_maps' with `class_maps=True`), or None when it gives none."""
  model = models.get_model(model_name, num_classes)
  try:
    (_, feats), _ = jax.eval_shape(lambda: model.init_with_output(
        jax.random.key(0), jnp.zeros((1,) + tuple(image_shape)), train=False, class_maps=True))
  except TypeError:  # A registered network without the argument.
    return None
  shape = tuple(feats["class_maps"].shape) if "class_maps" in feats else None
  return shape if shape is not None and len(shape) == 4 and shape[-1] == num_classes else None


def tap_channels(model_name: str, num_classes: int) -> list[int]:
  """The channel count of each tap of network `model_name`."""
  return [shape[-1] for _, shape in tap_shapes(model_name, num_classes)]


STAGE_MAPS = TapNeed("the stage maps taps[1:-1]", lambda taps, h: taps[1:-1], paired=True)
LAST_MAP = TapNeed("the last stage map taps[-2]", lambda taps, h: taps[-2:-1])
POOLED = TapNeed("the pooled vector as the last tap", lambda taps, h: taps[-1:], rank=2)


def unequal_channels(method: str, s_channels: Sequence[int], t_channels: Sequence[int]
                     ) -> Optional[str]:
  """None when every student tap has the channels of its teacher tap, else why not."""
  s_channels, t_channels = list(s_channels), list(t_channels)
  if len(s_channels) != len(t_channels):
    return (f"{method} pairs the taps one to one, but the student has {len(s_channels)} and "
            f"the teacher {len(t_channels)}")
  for i, (c_s, c_t) in enumerate(zip(s_channels, t_channels)):
    if c_s != c_t:
      return (f"{method} needs equal student and teacher channels at every tap it reads, but "
              f"tap {i} has {c_s} student and {c_t} teacher channels (student {s_channels}, "
              f"teacher {t_channels})")
  return None


def equal_channels(method: str, select: Callable[[list[int]], list[int]]
                   ) -> Callable[[str, str, int], None]:
  """A Method.check_pair refusing pairs whose selected taps (`select` of the tap list, e.g.
  f[1:-1]) differ in channels, as RepDistiller's code fails on them."""
  def check_pair(teacher: str, student: str, num_classes: int) -> None:
    problem = unequal_channels(method, select(tap_channels(student, num_classes)),
                               select(tap_channels(teacher, num_classes)))
    if problem is not None:
      raise UserError(f"teacher {teacher} -> student {student}: {problem}; choose a pair with "
                      f"matching widths (RepDistiller lists {method} as N/A for such pairs)")
  return check_pair


def bridge_term(key: str) -> TermFn:
  """A method term its bridge has already computed into the student outputs (`key`)."""
  def term(student_out, teacher_out, hparams):
    del teacher_out, hparams
    return student_out[key], {}
  return term


def distillation_objective(name: str, term: Optional[TermFn]) -> LossFn:
  """The baseline's student loss: ce_weight·CE + kd_weight·KD + feat_weight·term (see above);
  without a term (a method whose own term only trains a preparation stage, AB and FSP),
  ce_weight·CE + kd_weight·KD.

  Metrics: loss, loss_ce, loss_kd (where kd_weight ≠ 0), loss_<name> (unweighted) and what
  the term adds, top1.
  """
  def loss(student_out, teacher_out, labels, hparams):
    logits = student_out["logits"]
    loss_ce = cross_entropy(logits, labels)
    metrics = dict(loss_ce=loss_ce, top1=topk_correct(logits, labels, 1).mean())
    total = hparams.ce_weight * loss_ce
    if term is not None:
      value, extra = term(student_out, teacher_out, hparams)
      total = total + hparams.feat_weight * value
      metrics.update(extra)
      metrics[f"loss_{name}"] = value
    if hparams.kd_weight:
      metrics["loss_kd"] = distill_kl(logits, teacher_out["logits"], hparams.T)
      total = total + hparams.kd_weight * metrics["loss_kd"]
    metrics["loss"] = total
    return total, metrics
  return loss


def preparation_objective(name: str, term: TermFn) -> LossFn:
  """A student preparation stage's loss: the method's term alone, unweighted (RepDistiller's
  `init`)."""
  def loss(student_out, teacher_out, labels, hparams):
    del labels
    value, metrics = term(student_out, teacher_out, hparams)
    return value, dict(metrics, loss=value, **{f"loss_{name}": value})
  return loss
