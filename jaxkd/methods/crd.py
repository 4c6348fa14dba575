"""CRD's contrastive objective with a memory bank (Tian, Krishnan and Isola, ICLR 2020).

As the RepDistiller code computes it: on the pooled features fs [B, s_dim], ft [B, t_dim] of the
two networks for the CRD baseline (the widths may differ), on the joint embeddings for the EGA
reference's comparison. Both sides are embedded into a unit sphere of `feat_dim` = 128
dimensions,

  v_s = ℓ2(Linear(fs)),  v_t = ℓ2(Linear(ft)),

and each training example i owns a row in two memory banks of the whole training set, M_s
(student) and M_t (teacher), of unit vectors (initialised uniform in ±1/sqrt(feat_dim/3)).
For the K + 1 indices J_i = (i, K training examples of other classes) the pipeline gives:

  o^s_ij = exp(<M_t[j], v_s,i> / τ) / Z_s,   o^t_ij = exp(<M_s[j], v_t,i> / τ) / Z_t

with Z_s, Z_t fixed at the first step to N · mean(exp(...) of that batch). After the scores,
the banks move: M_s[i] ← ℓ2(m · M_s[i] + (1 − m) v_s,i) (same for the teacher), m = 0.5.
The loss is the NCE of `contrast_loss` on each side, summed. Both embeddings are trained with
the student (the teacher's embedding Linear too); the teacher feature ft itself is a constant.

The banks and the two constants live in the 'batch_stats' collection: like BatchNorm's running
statistics they are state that a training-mode forward pass updates without a gradient, so they
are checkpointed, replicated over devices and restored with the student.
"""

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxkd.methods.base import Method
from jaxkd.methods.objective import POOLED, WEIGHTS, bridge_term, distillation_objective
from jaxkd.models import layers

CONTRAST_EPS = 1e-7


def contrast_loss(scores: jax.Array, num_data: int, eps: float = CONTRAST_EPS) -> jax.Array:
  """The NCE loss of CRD (its Eq. 18) on scores [B, K + 1], the positive in column 0:

  with P_n = 1/N the noise probability and m = K,
    L = −1/B Σ_i [ log(o_i0 / (o_i0 + m P_n + ε)) + Σ_{k≥1} log(m P_n / (o_ik + m P_n + ε)) ].
  """
  scores = scores.astype(jnp.float32)
  m = scores.shape[1] - 1
  noise = m / float(num_data)
  positive, negatives = scores[:, 0], scores[:, 1:]
  log_d1 = jnp.log(positive / (positive + noise + eps))
  log_d0 = jnp.log(noise / (negatives + noise + eps))
  return -(jnp.sum(log_d1) + jnp.sum(log_d0)) / scores.shape[0]


def unit_rows(x: jax.Array) -> jax.Array:
  """x_i / ‖x_i‖ (the reference's Normalize(2), no epsilon)."""
  return x / jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))


class ContrastMemory(nn.Module):
  """CRD's embeddings and memory banks, as a bridge between the student and the teacher.

  Called as `bridge(student_out, teacher_out, batch, train=...)` on the student's and the
  teacher's outputs and the batch's 'index' [B] and 'contrast_index' [B, K + 1] (column 0 the
  index itself); returns {'crd_student': o^s, 'crd_teacher': o^t, 'loss_crd': `crd_loss`}
  (see the module docstring) and, in training, moves the banks and fixes Z on the first call.

  The features read are `out[key]` of both sides (EGA: the joint embeddings fs, ft, of width
  `embed_dim`), or, when `tap` is set, `out['feats'][tap]` (the CRD baseline: the pooled
  vector, RepDistiller's feat[-1]); the two widths may differ. At initialisation it only
  creates its variables and returns {}: with `teacher_out` None both embeddings take inputs of
  width `embed_dim`; with a real `teacher_out` and `batch` None they take the widths of the
  two sides' features.
  """
  num_data: int
  embed_dim: Optional[int] = None
  feat_dim: int = 128
  temperature: float = 0.07
  momentum: float = 0.5
  key: str = "embedding"
  tap: Optional[str] = None

  def features(self, out: Any) -> jax.Array:
    """The feature this bridge embeds: out['feats'][tap] when `tap` is set, else out[key]."""
    x = out["feats"][self.tap] if self.tap is not None else out[self.key]
    return x.astype(jnp.float32)

  @nn.compact
  def __call__(self, student_out: Any, teacher_out: Optional[Any], batch: Optional[Any],
               train: bool = False) -> dict[str, jax.Array]:
    embed_s = layers.Linear(self.feat_dim, name="embed_s")
    embed_t = layers.Linear(self.feat_dim, name="embed_t")
    stdv = 1.0 / (self.feat_dim / 3) ** 0.5

    def bank(name):
      return self.variable("batch_stats", name, lambda: jax.random.uniform(
          self.make_rng("params"), (self.num_data, self.feat_dim), jnp.float32, -stdv, stdv))

    memory_s, memory_t = bank("memory_s"), bank("memory_t")
    z_s = self.variable("batch_stats", "z_s", lambda: jnp.array(-1.0, jnp.float32))
    z_t = self.variable("batch_stats", "z_t", lambda: jnp.array(-1.0, jnp.float32))
    if teacher_out is None:
      if self.embed_dim is None:
        raise ValueError("ContrastMemory needs `embed_dim` to be initialised without a teacher")
      zeros = jnp.zeros((1, self.embed_dim), jnp.float32)
      embed_s(zeros), embed_t(zeros)
      return {}
    f_s = self.features(student_out)
    f_t = jax.lax.stop_gradient(self.features(teacher_out))
    if batch is None:
      embed_s(f_s), embed_t(f_t)
      return {}

    v_s = unit_rows(embed_s(f_s))
    v_t = unit_rows(embed_t(f_t))
    contrast = batch["contrast_index"]
    # The banks are constants of this step: scores read them before they move.
    bank_s, bank_t = jax.lax.stop_gradient((memory_s.value, memory_t.value))
    scores_s = jnp.exp(jnp.einsum("bkf,bf->bk", bank_t[contrast], v_s) / self.temperature)
    scores_t = jnp.exp(jnp.einsum("bkf,bf->bk", bank_s[contrast], v_t) / self.temperature)
    norm_s = jnp.where(z_s.value < 0, jnp.mean(scores_s) * self.num_data, z_s.value)
    norm_t = jnp.where(z_t.value < 0, jnp.mean(scores_t) * self.num_data, z_t.value)
    norm_s, norm_t = jax.lax.stop_gradient((norm_s, norm_t))

    if train and not self.is_initializing():
      index = batch["index"]
      z_s.value, z_t.value = norm_s, norm_t
      v_s_const, v_t_const = jax.lax.stop_gradient((v_s, v_t))
      m = self.momentum
      memory_s.value = bank_s.at[index].set(unit_rows(m * bank_s[index] + (1 - m) * v_s_const))
      memory_t.value = bank_t.at[index].set(unit_rows(m * bank_t[index] + (1 - m) * v_t_const))
    scores_s, scores_t = scores_s / norm_s, scores_t / norm_t
    return {"crd_student": scores_s, "crd_teacher": scores_t,
            "loss_crd": crd_loss(scores_s, scores_t, self.num_data)}


def crd_loss(student_scores: jax.Array, teacher_scores: jax.Array, num_data: int) -> jax.Array:
  """L_CRD = contrast_loss(o^s) + contrast_loss(o^t)."""
  return contrast_loss(student_scores, num_data) + contrast_loss(teacher_scores, num_data)


# The CRD baseline on the zoo's pooled features (RepDistiller's `crd`: `-r 1 -a 0 -b 0.8`;
# CRD+KD adds KD with `-a 1`), in CRD's, SSKD's and HSAKD's tables.
DEFAULTS = dict(WEIGHTS, feat_weight=0.8, feat_dim=128, nce_k=16384, nce_t=0.07, nce_m=0.5)


def baseline_bridge(num_data: int, hparams: ml_collections.ConfigDict) -> nn.Module:
  """Embeddings and memory banks of the `num_data` training examples on the pooled taps."""
  return ContrastMemory(num_data=num_data, feat_dim=hparams.feat_dim, temperature=hparams.nce_t,
                        momentum=hparams.nce_m, tap="pooled")


METHOD = Method(name="crd", loss=distillation_objective("crd", bridge_term("loss_crd")),
                defaults=DEFAULTS, bridge=baseline_bridge, negatives=lambda h: h.nce_k,
                taps=POOLED)
METHODS = {"crd": METHOD,
           "crd_kd": dataclasses.replace(METHOD, name="crd_kd",
                                         defaults=dict(DEFAULTS, kd_weight=1.0))}
