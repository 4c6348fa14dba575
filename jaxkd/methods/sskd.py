"""SSKD: knowledge distillation meets self-supervision (Xu et al., ECCV 2020), as its code runs.

Each image comes as 4 views (the original, then rotated by 90, 180, 270 degrees), flattened into
4B interleaved rows: row 4i + k is image i, view k. The B rows with k = 0 are the originals; the
3B others, in row order, are the transformed rows, so transformed row j comes from image j // 3.

Both networks carry an SS module (Linear–ReLU–Linear on the pooled feature). Its outputs z give
each network a 3B x B cosine matrix A[j, i] = cos(z_transformed_j, z_original_i), where row j is
the task "which original did transformed view j come from" (positive column j // 3).

Stages (the trainer runs them from `METHOD`):
  teacher       the plain teacher, trained with cross-entropy (stage `teacher`);
  teacher_sskd  the teacher's SS module on the frozen teacher (backbone in inference mode), with
                `ss_pretrain_loss`: CE over the rows of A_t, no temperature;
  student_sskd  the student and its own SS module with `sskd_loss`: CE and KD on the originals,
                KD on the transformed rows the teacher gets (nearly) right, and the KL between the
                teacher's and the student's cosine matrices on the rows the teacher ranks well.

Everything below is a pure function of arrays, usable from any training loop:

    terms = sskd_loss(student_logits, teacher_logits, student_rep, teacher_rep, labels, hparams)
    terms.total, terms.ce, terms.kd, terms.tf, terms.ss, terms.mask_tf, terms.kept_ss, ...
"""

from typing import Any, Mapping, NamedTuple, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxkd.methods.base import Method, Outputs, TeacherPreparation
from jaxkd.methods.losses import cross_entropy, distill_kl, kl_rows, topk_correct
from jaxkd.methods.numerics import l2_normalize
from jaxkd.methods.objective import POOLED
from jaxkd.models import layers

NUM_VIEWS = 4  # The original and three rotations, as the `rotations` views deliver them.
COSINE_EPS = 1e-8  # F.cosine_similarity's default.

HParams = Mapping[str, Any]


# --------------------------------------------------------------------------------------------
# The SS module.


class SSModule(nn.Module):
  """The SS module: z = W2 · relu(W1 · f + b1) + b2 on the pooled feature f (width d).

  Both layers are d -> d with PyTorch's default `nn.Linear` init, U(±1/sqrt(d)) for weights and
  biases. Called as a `Network` head: `heads(outputs, train)` -> {'ss_rep': [R, d]}.
  """

  @nn.compact
  def __call__(self, outputs: Outputs, train: bool = False) -> dict[str, jax.Array]:
    del train  # No batch statistics in the module.
    pooled = outputs["feats"]["pooled"]
    width = pooled.shape[-1]
    hidden = nn.relu(layers.Linear(width, name="fc1")(pooled))
    return {"ss_rep": layers.Linear(width, name="fc2")(hidden)}


def ss_module(num_classes: int, hparams: HParams, backbone: Any = None) -> SSModule:
  """Heads factory of teacher and student: the SS module (its width follows the pooled feature)."""
  del num_classes, hparams, backbone
  return SSModule()


# --------------------------------------------------------------------------------------------
# Batch layout.


def split_views(rows: jax.Array, num_views: int = NUM_VIEWS) -> tuple[jax.Array, jax.Array]:
  """[V·B, ...] -> (originals [B, ...] = rows V·i, transformed [(V−1)·B, ...]).

  Transformed row j is row V·(j // (V−1)) + j % (V−1) + 1: image j // (V−1), image-major.
  """
  grouped = rows.reshape((-1, num_views) + rows.shape[1:])
  return grouped[:, 0], grouped[:, 1:].reshape((-1,) + rows.shape[1:])


def transformed_targets(num_images: int, num_views: int = NUM_VIEWS) -> jax.Array:
  """Positive column of each transformed row in the cosine matrix: j // (V−1), shape [(V−1)·B]."""
  return jnp.arange((num_views - 1) * num_images) // (num_views - 1)


def transformed_labels(labels: jax.Array, num_views: int = NUM_VIEWS) -> jax.Array:
  """Class label of each transformed row: ỹ_j = y_{j // (V−1)}, shape [(V−1)·B]."""
  return jnp.repeat(labels, num_views - 1)


# --------------------------------------------------------------------------------------------
# Pieces of the losses.


def cosine_matrix(rep: jax.Array, num_views: int = NUM_VIEWS, eps: float = COSINE_EPS
                  ) -> jax.Array:
  """A[j, i] = a_j · o_i / (max(‖a_j‖, ε) · max(‖o_i‖, ε)), shape [(V−1)·B, B].

  a_j: transformed rows of `rep` [V·B, d], o_i: original rows; ε = 1e-8 as F.cosine_similarity
  (the reference's broadcast form, written here as one matmul of normalised rows).
  """
  rep = rep.astype(jnp.float32)
  originals, transformed = split_views(rep, num_views)
  return l2_normalize(transformed, eps=eps) @ l2_normalize(originals, eps=eps).T


def target_rank(scores: jax.Array, targets: jax.Array) -> jax.Array:
  """r_j = #{c : scores[j, c] > scores[j, targets_j]}, int32 [R].

  The 0-based position of the target in the row sorted in descending order (0: the row's top-1
  is the target), which is what the reference reads off its argsort when the row has no tie at
  the target.
  """
  at_target = jnp.take_along_axis(scores, targets[:, None], axis=-1)
  return jnp.sum(scores > at_target, axis=-1).astype(jnp.int32)


class Selection(NamedTuple):
  """The rows a selective term keeps (see `select_rows`)."""
  mask: jax.Array     # bool [N]: the kept rows
  correct: jax.Array  # int32 []: n_correct = #{j : r_j = 0}
  wrong: jax.Array    # int32 []: n_wrong = N − n_correct
  kept: jax.Array     # int32 []: K = n_correct + ⌊ratio · n_wrong⌋


def _keep_wrong(wrong: jax.Array, num_rows: int, ratio: Union[float, jax.Array]) -> jax.Array:
  """⌊ratio · n_wrong⌋, the reference's `int(wrong_num * ratio)`."""
  if isinstance(ratio, (int, float)):
    # A table of Python's own float64 products, so every cut-off is the reference's exactly.
    table = np.array([int(n * float(ratio)) for n in range(num_rows + 1)], np.int32)
    return jnp.asarray(table)[wrong]
  return jnp.floor(wrong * ratio).astype(jnp.int32)


def select_rows(ranks: jax.Array, ratio: Union[float, jax.Array]) -> Selection:
  """Keeps the K rows of smallest rank, K = n_correct + ⌊ratio · n_wrong⌋.

  n_wrong = #{j : r_j > 0}: every row the teacher gets right is kept, and the ratio of the least
  wrong others; equal ranks go in row order (a stable sort), so the result is deterministic.
  Row j's place in that order is #{i : r_i < r_j} + #{i < j : r_i = r_j}; it is kept when < K.
  """
  num_rows = ranks.shape[0]
  correct = jnp.sum(ranks == 0).astype(jnp.int32)
  wrong = num_rows - correct
  kept = correct + _keep_wrong(wrong, num_rows, ratio)
  rows = jnp.arange(num_rows)
  before = (ranks[None, :] < ranks[:, None]) | (
      (ranks[None, :] == ranks[:, None]) & (rows[None, :] < rows[:, None]))
  place = jnp.sum(before, axis=-1)
  return Selection(mask=place < kept, correct=correct, wrong=wrong, kept=kept)


def masked_distill_kl(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float,
                      mask: jax.Array) -> jax.Array:
  """T² / K · Σ_{j : mask_j} KL(softmax(t_j/T) ‖ softmax(s_j/T)),  K = Σ_j mask_j.

  "batchmean" over the kept rows only; dropped rows get exactly zero gradient.
  """
  kl = kl_rows(student_logits, teacher_logits, temperature)
  total = jnp.sum(jnp.where(mask, kl, 0.0))
  return temperature ** 2 * total / jnp.sum(mask).astype(jnp.float32)


def ss_accuracy_rows(simi: jax.Array) -> jax.Array:
  """1.0 where row j of the cosine matrix peaks at its positive column j // (V−1), else 0.0."""
  num_images = simi.shape[1]
  num_views = simi.shape[0] // num_images + 1
  return (jnp.argmax(simi, axis=-1) == transformed_targets(num_images, num_views)
          ).astype(jnp.float32)


def ss_pretrain_loss(rep: jax.Array, num_views: int = NUM_VIEWS) -> tuple[jax.Array, jax.Array]:
  """The teacher SS module's loss and accuracy on one batch:

  L = 1/((V−1)B) Σ_j −log softmax(A[j])_{j // (V−1)},   acc = mean_j [argmax_i A[j, i] = j // (V−1)]

  with A = cosine_matrix(rep): the raw cosines are the logits (no temperature), as in the code.
  """
  simi = cosine_matrix(rep, num_views)
  targets = transformed_targets(simi.shape[1], num_views)
  loss = optax.softmax_cross_entropy_with_integer_labels(simi, targets).mean()
  return loss, ss_accuracy_rows(simi).mean()


# --------------------------------------------------------------------------------------------
# The student loss.


class SSKDTerms(NamedTuple):
  """Everything `sskd_loss` computes; scalars are float32 [] unless said otherwise."""
  total: jax.Array    # ce_weight·ce + kd_weight·kd + tf_weight·tf + ss_weight·ss
  ce: jax.Array       # CE of the student on the originals
  kd: jax.Array       # KD on the originals
  tf: jax.Array       # KD on the kept transformed rows
  ss: jax.Array       # KL between the cosine matrices on the kept rows
  rank_tf: jax.Array  # int32 [3B]: rank of ỹ_j in the teacher's prediction on transformed row j
  rank_ss: jax.Array  # int32 [3B]: rank of the positive column in row j of A_t
  mask_tf: jax.Array  # bool [3B]: transformed rows kept by the tf term
  mask_ss: jax.Array  # bool [3B]: transformed rows kept by the ss term
  correct_tf: jax.Array  # int32: rows with rank_tf = 0
  correct_ss: jax.Array  # int32: rows with rank_ss = 0
  kept_tf: jax.Array     # int32: K_tf
  kept_ss: jax.Array     # int32: K_ss
  simi_student: jax.Array  # [3B, B] A_s
  simi_teacher: jax.Array  # [3B, B] A_t


def sskd_loss(student_logits: jax.Array, teacher_logits: jax.Array, student_rep: jax.Array,
              teacher_rep: jax.Array, labels: jax.Array, hparams: HParams) -> SSKDTerms:
  """The SSKD student objective on V·B interleaved rows (row V·i + k = image i, view k).

  s, t: student / teacher logits [V·B, C]; O: the B originals, A: the (V−1)·B transformed rows;
  ỹ_j = y_{j // (V−1)}; A_s, A_t = cosine_matrix of the student / teacher SS outputs.

    ce = 1/B Σ_i CE(s_O,i, y_i)
    kd = T_kd² / B Σ_i KL(softmax(t_O,i/T_kd) ‖ softmax(s_O,i/T_kd))
    tf = T_tf² / K_tf Σ_{j kept} KL(softmax(t_A,j/T_tf) ‖ softmax(s_A,j/T_tf))
         kept: the K_tf rows of smallest r_j = rank of ỹ_j in softmax(t_A,j/T_tf),
         K_tf = n_correct + ⌊ratio_tf · n_wrong⌋ (see select_rows)
    ss = T_ss² / K_ss Σ_{j kept} KL(softmax(A_t[j]/T_ss) ‖ softmax(A_s[j]/T_ss))
         kept: likewise with ρ_j = rank of column j // (V−1) in A_t[j] and ratio_ss
    total = ce_weight·ce + kd_weight·kd + tf_weight·tf + ss_weight·ss

  hparams: kd_T, tf_T, ss_T, ratio_tf, ratio_ss, ce_weight, kd_weight, tf_weight, ss_weight
  (reference defaults 4, 4, 0.5, 1.0, 0.75, 0.1, 0.9, 2.7, 10). The teacher side, the ranks and
  the selections carry no gradient.
  """
  hp = hparams
  num_views = student_logits.shape[0] // labels.shape[0]
  teacher_logits = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
  s_orig, s_trans = split_views(student_logits, num_views)
  t_orig, t_trans = split_views(teacher_logits, num_views)

  ce = cross_entropy(s_orig, labels)
  kd = distill_kl(s_orig, t_orig, hp["kd_T"])

  rank_tf = target_rank(jax.nn.softmax(t_trans / hp["tf_T"], axis=-1),
                        transformed_labels(labels, num_views))
  keep_tf = select_rows(rank_tf, hp["ratio_tf"])
  tf = masked_distill_kl(s_trans, t_trans, hp["tf_T"], keep_tf.mask)

  simi_s = cosine_matrix(student_rep, num_views)
  simi_t = jax.lax.stop_gradient(cosine_matrix(teacher_rep, num_views))
  rank_ss = target_rank(simi_t, transformed_targets(labels.shape[0], num_views))
  keep_ss = select_rows(rank_ss, hp["ratio_ss"])
  ss = masked_distill_kl(simi_s, simi_t, hp["ss_T"], keep_ss.mask)

  total = (hp["ce_weight"] * ce + hp["kd_weight"] * kd + hp["tf_weight"] * tf
           + hp["ss_weight"] * ss)
  return SSKDTerms(total=total, ce=ce, kd=kd, tf=tf, ss=ss, rank_tf=rank_tf, rank_ss=rank_ss,
                   mask_tf=keep_tf.mask, mask_ss=keep_ss.mask, correct_tf=keep_tf.correct,
                   correct_ss=keep_ss.correct, kept_tf=keep_tf.kept, kept_ss=keep_ss.kept,
                   simi_student=simi_s, simi_teacher=simi_t)


# --------------------------------------------------------------------------------------------
# The method, as the trainer sees it.


def student_loss(student_out: Outputs, teacher_out: Outputs, labels: jax.Array,
                 hparams: HParams) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`sskd_loss` on the outputs of student and teacher (logits and SS module), with metrics.

  loss_ce / loss_kd / loss_tf / loss_ss: the four terms; top1: student top-1 on the originals;
  ss_acc / teacher_ss_acc: fraction of transformed rows whose cosine row peaks at its own
  original (student / teacher); teacher_tf_top1: teacher top-1 on the transformed rows;
  kept_tf / kept_ss: number of transformed rows each selective term keeps.
  """
  terms = sskd_loss(student_out["logits"], teacher_out["logits"], student_out["ss_rep"],
                    teacher_out["ss_rep"], labels, hparams)
  num_views = student_out["logits"].shape[0] // labels.shape[0]
  s_orig, _ = split_views(student_out["logits"], num_views)
  num_transformed = terms.rank_tf.shape[0]
  metrics = {
      "loss": terms.total, "loss_ce": terms.ce, "loss_kd": terms.kd, "loss_tf": terms.tf,
      "loss_ss": terms.ss,
      "top1": topk_correct(s_orig, labels, 1).mean(),
      "ss_acc": ss_accuracy_rows(terms.simi_student).mean(),
      "teacher_ss_acc": ss_accuracy_rows(terms.simi_teacher).mean(),
      "teacher_tf_top1": terms.correct_tf.astype(jnp.float32) / num_transformed,
      "kept_tf": terms.kept_tf.astype(jnp.float32),
      "kept_ss": terms.kept_ss.astype(jnp.float32),
  }
  return terms.total, metrics


def teacher_loss(teacher_out: Outputs, unused_teacher_out: None, labels: jax.Array,
                 hparams: HParams) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`ss_pretrain_loss` of the teacher's SS module (metrics: loss, ss_acc)."""
  del unused_teacher_out, hparams
  num_views = teacher_out["ss_rep"].shape[0] // labels.shape[0]
  loss, acc = ss_pretrain_loss(teacher_out["ss_rep"], num_views)
  return loss, {"loss": loss, "ss_acc": acc}


def eval_metrics(out: Outputs, labels: jax.Array, hparams: HParams,
                 mask: Optional[jax.Array] = None) -> dict[str, jax.Array]:
  """ss_acc [B]: per image, the fraction of its transformed views whose cosine row peaks at it.

  The negatives are the other images of the eval batch, so the score depends on the eval batch
  size (the reference evaluates with 64 images). `mask` [B] (1 real, 0 padding), when given,
  keeps padding images out of the negatives.
  """
  del hparams
  num_images = labels.shape[0]
  num_views = out["ss_rep"].shape[0] // num_images
  simi = cosine_matrix(out["ss_rep"], num_views)
  if mask is not None:
    simi = jnp.where(mask[None, :] > 0, simi, -jnp.inf)
  correct = ss_accuracy_rows(simi)
  return {"ss_acc": correct.reshape(num_images, num_views - 1).mean(axis=-1)}


METHOD = Method(
    name="sskd",
    views="rotations",
    loss=student_loss,
    student_heads=ss_module,
    teacher=TeacherPreparation(
        heads=ss_module, loss=teacher_loss, views="rotations", frozen_backbone=True,
        num_epochs="teacher_epochs", lr="teacher_lr", milestones="teacher_milestones"),
    defaults=dict(kd_T=4.0, tf_T=4.0, ss_T=0.5, ratio_tf=1.0, ratio_ss=0.75, ce_weight=0.1,
                  kd_weight=0.9, tf_weight=2.7, ss_weight=10.0, teacher_epochs=60,
                  teacher_lr=0.05, teacher_milestones=(30, 45)),
    eval_metrics=eval_metrics,
    taps=POOLED,
)
