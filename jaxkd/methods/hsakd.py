"""HSAKD: Hierarchical Self-supervised Augmented Knowledge Distillation (Yang et al., IJCAI 2021),
as the reference code computes it (winycg/HSAKD @ 28c8dc2, `train_teacher_cifar.py` and
`train_student_cifar.py`; docs/methods.md).

Every image b of a batch of B originals is seen under the four rotations t_k, k = 0..3
(k·90° counter-clockwise), interleaved: row 4b + k of the 4B rows is image b rotated k times,
and its joint label is κ = 4·y_b + k (class-major, rotation-minor: unit j of a 4N head means
class ⌊j/4⌋, rotation j mod 4). Auxiliary classifiers on every backbone stage
(`jaxkd.models.auxiliary`) predict κ.

Teacher (stage `teacher_hsakd`): L_T = CE(p^T(x), y) + Σ_l mean_rows CE(q^T_l, κ).
  'hsakd':      "Teacher" — the trained teacher backbone is frozen in inference mode, only the
                classifiers learn (100 epochs, lr 0.05 ×0.1 at 30/60/90; the paper's "Ours").
  'hsakd_star': "Teacher*" — backbone and classifiers trained jointly from scratch (240 epochs,
                ×0.1 at 150/180/210; the paper's "Ours*").
Student: L_S = CE(p^S(x), y) + Σ_l KL_T(q^S_l, q^T_l) + KL_T(p^S, p^T), T = 3 (see `hsakd_loss`).
At inference the classifiers are dropped: the paper reports the student's final-head top-1 on
unrotated test images (`eval/top1`).
"""

import re
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import ml_collections

from jaxkd.errors import UserError
from jaxkd.methods.base import Method, Outputs, TeacherPreparation
from jaxkd.methods.losses import cross_entropy, distill_kl, topk_correct
from jaxkd.models import auxiliary as aux

NUM_ROTATIONS = aux.NUM_ROTATIONS
# The student's and the teacher's batches: the 4 rotations of each image, interleaved. The
# reference flips and crops an image once and rotates the result; the pipeline's 'rotations'
# share the flip but crop each rotated view on its own (SSKD's order). Eval views are equal.
VIEWS = "rotations_of_crop"  # HSAKD crops and flips once, then rotates

DEFAULTS = dict(
    T=3.0,
    # "Teacher" (hsakd): classifiers on the frozen teacher.
    teacher_epochs=100, teacher_lr=0.05, teacher_milestones=(30, 60, 90),
    # "Teacher*" (hsakd_star): backbone + classifiers from scratch.
    joint_teacher_epochs=240, joint_teacher_lr=0.05, joint_teacher_milestones=(150, 180, 210),
    # Which teacher the student learns from: 'best' = highest max_l aux{l}_joint_acc on the eval
    # split (the reference's `_best` file), 'last' = the last epoch (what the reference CIFAR
    # student scripts load).
    teacher_checkpoint="best",
)
TEACHER_CHECKPOINTS = ("best", "last")


# --- rotations and labels ----------------------------------------------------------------------


def rotate_batch(images: jax.Array) -> jax.Array:
  """[B, H, W, C] -> [4B, H, W, C], row 4b + k = images[b] rotated k·90° counter-clockwise.

  The same as `np.rot90(image, k)` on (H, W) and the reference's `torch.rot90(x, k, (2, 3))`
  on NCHW; H must equal W.
  """
  rotated = [jnp.rot90(images, k, axes=(1, 2)) for k in range(NUM_ROTATIONS)]
  return jnp.stack(rotated, axis=1).reshape((-1,) + images.shape[1:])


def joint_labels(labels: jax.Array) -> jax.Array:
  """[B] class labels -> [4B] joint labels κ = 4·y_b + k of the rows 4b + k."""
  labels = jnp.asarray(labels)
  return (NUM_ROTATIONS * labels[:, None] + jnp.arange(NUM_ROTATIONS, dtype=labels.dtype)
          ).reshape(-1)


def row_class_labels(labels: jax.Array) -> jax.Array:
  """[B] -> [4B]: the class of every row, y_b repeated 4 times (the reference `multi_target`)."""
  return jnp.repeat(jnp.asarray(labels), NUM_ROTATIONS)


def originals(rows: jax.Array) -> jax.Array:
  """The unrotated rows 0::4 of a [4B, ...] array."""
  return rows[::NUM_ROTATIONS]


def rotation_summed_class_logits(joint_logits: jax.Array) -> jax.Array:
  """[..., 4N] -> [..., N]: class c scores Σ_k logit[4c + k] (logits, not probabilities, summed).

  Used only to monitor how well a joint head knows the class whatever the rotation.
  """
  return joint_logits.reshape(joint_logits.shape[:-1] + (-1, NUM_ROTATIONS)).sum(-1)


# --- the losses ----------------------------------------------------------------------------------


def hsakd_loss(student_logits: jax.Array, student_aux_logits: jax.Array,
               teacher_logits: jax.Array, teacher_aux_logits: jax.Array, labels: jax.Array,
               temperature: float = 3.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The HSAKD student objective (paper Eq. 5; reference `train_student_cifar.py`):

    L_S = CE(z^S_{0::4}, y) + Σ_l KL_T(u^S_l, u^T_l) + KL_T(z^S, z^T)
    KL_T(a, c) = T²/R · Σ_r Σ_j p_rj (log p_rj − log softmax(a_r/T)_j),  p_r = softmax(c_r/T)

  with z the N-way final logits [4B, N], u_l the 4N-way logits of classifier l [L, 4B, 4N],
  R = 4B: both KLs run over every row, rotated ones included, averaged over the 4B rows; the CE
  (T = 1) only over the B originals. No weights. The teacher gets no gradient.

  Returns (L_S, terms) with terms 'loss_cls', 'loss_div_aux' [L], 'loss_div_final',
  'loss_div' (= Σ loss_div_aux + loss_div_final, the reference's `train_loss_div`) and 'loss'.
  """
  check_classifier_counts(teacher_aux_logits.shape[0], student_aux_logits.shape[0])
  loss_cls = cross_entropy(originals(student_logits), labels)
  loss_div_aux = jax.vmap(lambda s, t: distill_kl(s, t, temperature))(
      student_aux_logits, teacher_aux_logits)
  loss_div_final = distill_kl(student_logits, teacher_logits, temperature)
  loss_div = jnp.sum(loss_div_aux) + loss_div_final
  loss = loss_cls + loss_div
  return loss, {"loss": loss, "loss_cls": loss_cls, "loss_div_aux": loss_div_aux,
                "loss_div_final": loss_div_final, "loss_div": loss_div}


def check_classifier_counts(teacher_count: int, student_count: int) -> None:
  """HSAKD pairs classifier l of the student with classifier l of the teacher: equal counts."""
  if student_count != teacher_count:
    raise UserError(
        f"HSAKD pairs classifier l of the student with classifier l of the teacher, but the "
        f"student has {student_count} and the teacher {teacher_count}; pick a teacher/student "
        "pair with the same number of tapped stages (3: ResNet, WRN, ShuffleNet; 4: VGG, "
        "MobileNetV2, ResNet50, ImageNet ResNets)")


def check_pair(teacher_model: str, student_model: str, num_classes: int) -> None:
  """Both models have HSAKD classifiers, as many on each side."""
  teacher_taps = aux.for_model(teacher_model, num_classes).taps
  student_taps = aux.for_model(student_model, num_classes).taps
  check_classifier_counts(len(teacher_taps), len(student_taps))


def hsakd_teacher_loss(logits: jax.Array, aux_logits: jax.Array, labels: jax.Array
                       ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The teacher objective (paper Eq. 1; reference `train_teacher_cifar.py`):

    L_T = CE(z_{0::4}, y) + Σ_l (1/4B) Σ_r CE(u_{l,r}, κ_r)

  (the per-row mean over 4B rows is the paper's 1/M Σ_k). Temperature 1, no weights.
  Returns (L_T, terms) with 'loss_cls', 'loss_ce_aux' [L] and 'loss'.
  """
  kappa = joint_labels(labels)
  loss_cls = cross_entropy(originals(logits), labels)
  loss_ce_aux = jax.vmap(lambda u: cross_entropy(u, kappa))(aux_logits)
  loss = loss_cls + jnp.sum(loss_ce_aux)
  return loss, {"loss": loss, "loss_cls": loss_cls, "loss_ce_aux": loss_ce_aux}


# --- accuracies ----------------------------------------------------------------------------------


def aux_correct(aux_logits: jax.Array, labels: jax.Array, k: int = 1
                ) -> tuple[jax.Array, jax.Array]:
  """Per-row hits of every classifier, ([L, 4B] joint, [L, 4B] class), 1.0 = hit.

  joint: κ among the k best of the 4N logits (the reference's "ss_accuracy").
  class: y among the k best rotation-summed class logits (the reference's "class_accuracy").
  """
  kappa, classes = joint_labels(labels), row_class_labels(labels)
  joint = jax.vmap(lambda u: topk_correct(u, kappa, k))(aux_logits)
  cls = jax.vmap(lambda u: topk_correct(rotation_summed_class_logits(u), classes, k))(aux_logits)
  return joint, cls


def final_correct(logits: jax.Array, labels: jax.Array, k: int = 1) -> jax.Array:
  """[B] hits of the N-way final head on the unrotated rows (what the paper reports)."""
  return topk_correct(originals(logits), labels, k)


def _accuracy_metrics(out: Outputs, labels: jax.Array) -> dict[str, jax.Array]:
  joint, cls = aux_correct(out["aux_logits"], labels)
  metrics = {"top1": final_correct(out["logits"], labels).mean()}
  for l in range(joint.shape[0]):
    metrics[f"aux{l + 1}_joint_acc"] = joint[l].mean()
    metrics[f"aux{l + 1}_class_acc"] = cls[l].mean()
  return metrics


# --- the method ----------------------------------------------------------------------------------


def student_loss(student_out: Outputs, teacher_out: Outputs, labels: jax.Array,
                 hparams: ml_collections.ConfigDict) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`hsakd_loss` on the outputs of the student and the prepared teacher (4B rotated rows).

  Metrics: loss, loss_cls, loss_div, loss_div_final, loss_div_aux{l}; top1 = the final head on
  the unrotated rows; aux{l}_joint_acc / aux{l}_class_acc of the student's classifiers.
  """
  loss, terms = hsakd_loss(student_out["logits"], student_out["aux_logits"],
                           teacher_out["logits"], teacher_out["aux_logits"], labels, hparams.T)
  metrics = {k: v for k, v in terms.items() if k != "loss_div_aux"}
  for l, term in enumerate(terms["loss_div_aux"]):
    metrics[f"loss_div_aux{l + 1}"] = term
  metrics.update(_accuracy_metrics(student_out, labels))
  return loss, metrics


def teacher_loss(teacher_out: Outputs, unused_teacher: Optional[Outputs], labels: jax.Array,
                 hparams: ml_collections.ConfigDict) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`hsakd_teacher_loss` on the teacher's outputs over the 4B rotated rows.

  Metrics: loss, loss_cls, loss_ce_aux{l}, top1, aux{l}_joint_acc, aux{l}_class_acc.
  """
  del unused_teacher, hparams
  loss, terms = hsakd_teacher_loss(teacher_out["logits"], teacher_out["aux_logits"], labels)
  metrics = {"loss": loss, "loss_cls": terms["loss_cls"]}
  for l, term in enumerate(terms["loss_ce_aux"]):
    metrics[f"loss_ce_aux{l + 1}"] = term
  metrics.update(_accuracy_metrics(teacher_out, labels))
  return loss, metrics


def eval_metrics(out: Outputs, labels: jax.Array, hparams: ml_collections.ConfigDict,
                 mask: Optional[jax.Array] = None) -> dict[str, jax.Array]:
  """Per-image [B] scores of the classifiers on the 4 rotations of each eval image:

    aux{l}_joint_acc: the fraction of its 4 rows whose top-1 joint label is right
    aux{l}_class_acc: the same for the rotation-summed class logits

  Averaged over the split they are the reference's per-row "ss_accuracy" and "class_accuracy".
  Neither is what the paper's tables report: that is the final head's top-1 on the unrotated
  images, `eval/top1`. The teacher is kept by `teacher_selection_score` of these.
  """
  del hparams
  joint, cls = aux_correct(out["aux_logits"], labels)
  per_image = lambda hits: hits.reshape(-1, NUM_ROTATIONS).mean(-1)  # noqa: E731
  scores = {}
  for l in range(joint.shape[0]):
    scores[f"aux{l + 1}_joint_acc"] = per_image(joint[l])
    scores[f"aux{l + 1}_class_acc"] = per_image(cls[l])
  return scores


_JOINT_ACC = re.compile(r"aux\d+_joint_acc")


def teacher_selection_score(scores: Mapping[str, Any]) -> float:
  """The reference's rule for the best teacher: max over classifiers of the eval joint accuracy.

  `scores` are the split-averaged `eval_metrics` (an `eval/` prefix is ignored). The reference
  replaces its best teacher only on a strictly higher score.
  """
  values = [float(v) for k, v in scores.items()
            if _JOINT_ACC.fullmatch(k.rpartition("/")[2])]
  if not values:
    raise ValueError(f"no aux<l>_joint_acc among the scores {sorted(scores)}")
  return max(values)


def keep_best_teacher(hparams: ml_collections.ConfigDict) -> bool:
  """Whether `hparams.teacher_checkpoint` asks for the best teacher ('best') or the last."""
  choice = hparams.get("teacher_checkpoint", "best")
  if choice not in TEACHER_CHECKPOINTS:
    raise UserError(f"method.teacher_checkpoint={choice!r} is not one of "
                    f"{', '.join(TEACHER_CHECKPOINTS)} (best: highest aux joint accuracy on the "
                    "eval split, the reference rule; last: the last epoch)")
  return choice == "best"


def select_teacher(scores: Mapping[str, Any], hparams: ml_collections.ConfigDict
                   ) -> Optional[float]:
  """The score that ranks the teacher-stage evaluations, or None to keep the last epoch.

  The trainer keeps (and hands to the student) the teacher of the evaluation with the strictly
  highest score: `teacher_selection_score(scores)` for teacher_checkpoint='best'.
  """
  return teacher_selection_score(scores) if keep_best_teacher(hparams) else None


def _heads(detach: bool):
  def build(num_classes: int, hparams: ml_collections.ConfigDict, backbone: Any) -> Any:
    """The HSAKD classifiers of the zoo module `backbone` (4·num_classes-way, its dtype)."""
    del hparams
    return aux.for_backbone(backbone, num_classes, detach=detach)
  return build


# The student's classifiers learn through its backbone; so do those of "Teacher*".
student_heads = _heads(detach=False)
# "Teacher": the taps of the frozen backbone are detached, as the reference's grad=False.
frozen_teacher_heads = _heads(detach=True)


def make_method(name: str, joint_teacher: bool) -> Method:
  """'hsakd' (frozen "Teacher") or 'hsakd_star' (joint "Teacher*"); the student side is equal."""
  prefix = "joint_teacher" if joint_teacher else "teacher"
  return Method(
      name=name, loss=student_loss, views=VIEWS, defaults=DEFAULTS,
      student_heads=student_heads,
      teacher=TeacherPreparation(
          heads=student_heads if joint_teacher else frozen_teacher_heads, loss=teacher_loss,
          views=VIEWS, frozen_backbone=not joint_teacher, num_epochs=f"{prefix}_epochs",
          lr=f"{prefix}_lr", milestones=f"{prefix}_milestones", select=select_teacher),
      eval_metrics=eval_metrics, check_pair=check_pair)


METHOD = make_method("hsakd", joint_teacher=False)
