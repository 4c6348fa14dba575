"""NKD: normalized knowledge distillation (Yang, Zeng, Li, Zhang, Yuan and Li, ICCV 2023,
"From Knowledge Distillation to Self-Knowledge Distillation").

As the authors' code computes it: yzd-v/cls_KD @ 1e5d48f, `mmcls/models/dis_losses/nkd.py::
NKDLoss`, called by `mmcls/distillation/distillers/classification_distiller.py::
ClassificationDistiller` on the two networks' logits and the labels. With g the label of a row,
p = softmax(z_s), q = softmax(z_t) at temperature 1, and z' the logits with the label's column
removed (N − 1 columns left),

  L_target = −1/R Σ_r q_g · log p_g                         (q_g a constant)
  L_non    = −γ · T² · 1/R Σ_r Σ_j softmax(z'_t / T)_j · log softmax(z'_s / T)_j
  L_NKD    = L_target + L_non

The non-target term is a cross-entropy without the teacher's entropy (its value is large; its
gradient is the KL's). The label's column is removed, not masked: both softmaxes run over the
N − 1 other classes. Labels given as score rows [R, N] (mixup or cutmix targets) are reduced to
their arg-max, as the reference does (`torch.max(gt, 1)[1]`).

The training objective is `ce_weight · CE(z_s, y) + L_NKD` (the distiller adds the head's
cross-entropy, weight 1). Defaults: the kwargs of
`configs/distillers/cifar100/res34_distill_res18_cifar.py` (`temp=3.0`, `gamma=3.5`). The
reference's numbers are reproduced in tests (tests/data/golden_modern.npz, prefixes nkd and
nkd_soft).
"""

import jax
import jax.numpy as jnp
import ml_collections

from jaxkd.errors import UserError
from jaxkd.methods.base import Method, Outputs
from jaxkd.methods.losses import cross_entropy, topk_correct

# res34_distill_res18_cifar.py: NKDLoss(temp=3.0, gamma=3.5); the head's CE has weight 1.
NKD_DEFAULTS = dict(ce_weight=1.0, T=3.0, gamma=3.5)


def hard_labels(labels: jax.Array) -> jax.Array:
  """Class indices [R]: `labels` itself, or the arg-max of score rows [R, N]."""
  return jnp.argmax(labels, axis=1) if labels.ndim == 2 else labels


def drop_column(x: jax.Array, labels: jax.Array) -> jax.Array:
  """x [R, N] without the column labels[r] of each row r, order kept: [R, N − 1]."""
  n = x.shape[1]
  others = jnp.arange(n - 1)[None, :]
  columns = others + (others >= labels[:, None]).astype(others.dtype)
  return jnp.take_along_axis(x, columns, axis=1)


def nkd_target_term(logits_s: jax.Array, logits_t: jax.Array, labels: jax.Array) -> jax.Array:
  """L_target = −mean_r q_g · log p_g at temperature 1, q = softmax(z_t) a constant."""
  labels = hard_labels(labels)
  log_p = jax.nn.log_softmax(logits_s.astype(jnp.float32), axis=1)
  q = jax.nn.softmax(jax.lax.stop_gradient(logits_t.astype(jnp.float32)), axis=1)
  pick = lambda x: jnp.take_along_axis(x, labels[:, None], axis=1)[:, 0]
  return -jnp.mean(pick(q) * pick(log_p))


def nkd_non_target_term(logits_s: jax.Array, logits_t: jax.Array, labels: jax.Array,
                        temperature: float, gamma: float) -> jax.Array:
  """L_non = −γ T² mean_r Σ_j softmax(z'_t / T)_j log softmax(z'_s / T)_j, z' = z without the
  label's column."""
  labels = hard_labels(labels)
  s = drop_column(logits_s.astype(jnp.float32), labels) / temperature
  t = drop_column(jax.lax.stop_gradient(logits_t.astype(jnp.float32)), labels) / temperature
  cross = jnp.sum(jax.nn.softmax(t, axis=1) * jax.nn.log_softmax(s, axis=1), axis=1)
  return -gamma * temperature ** 2 * jnp.mean(cross)


def nkd_loss(logits_s: jax.Array, logits_t: jax.Array, labels: jax.Array, temperature: float,
             gamma: float) -> jax.Array:
  """L_NKD = L_target + L_non (the reference `NKDLoss(temp=T, gamma=γ)(z_s, z_t, labels)`);
  `labels` [R] class indices or [R, N] score rows."""
  return (nkd_target_term(logits_s, logits_t, labels)
          + nkd_non_target_term(logits_s, logits_t, labels, temperature, gamma))


def nkd_objective(student_out: Outputs, teacher_out: Outputs, labels: jax.Array,
                  hparams: ml_collections.ConfigDict) -> tuple[jax.Array, dict[str, jax.Array]]:
  """L = ce_weight · CE(z_s, y) + L_target + L_non.

  Metrics: loss, loss_ce, loss_nkd, loss_nkd_target, loss_nkd_non, top1.
  """
  s, t = student_out["logits"], teacher_out["logits"]
  loss_ce = cross_entropy(s, labels)
  target = nkd_target_term(s, t, labels)
  non_target = nkd_non_target_term(s, t, labels, hparams.T, hparams.gamma)
  loss_nkd = target + non_target
  loss = hparams.ce_weight * loss_ce + loss_nkd
  return loss, {"loss": loss, "loss_ce": loss_ce, "loss_nkd": loss_nkd,
                "loss_nkd_target": target, "loss_nkd_non": non_target,
                "top1": topk_correct(s, labels, 1).mean()}


def check_hparams(hparams: ml_collections.ConfigDict) -> None:
  """γ weighs the non-target term: it must be ≥ 0."""
  if not hparams.gamma >= 0:
    raise UserError(f"nkd's gamma is {hparams.gamma!r}; it must be >= 0 (a loss weight): set "
                    f"e.g. --config.method.gamma={NKD_DEFAULTS['gamma']}")


METHOD = Method(name="nkd", loss=nkd_objective, defaults=NKD_DEFAULTS,
                check_hparams=check_hparams)
