"""EGA: distilling a self-supervised (or CLIP) teacher by Embedding Graph Alignment.

Ma, Chen and Akata, BMVC 2022, as the reference code computes it (yccm/EGA @ 0963f8e,
`distiller_zoo/EGA.py`, `models/stud_net.py`, `models/teac_net.py`, `train_student.py`;
docs/methods.md).

The frozen teacher gives one embedding per image (CLIP's `encode_image`, or the pooled feature
of a self-supervised zoo backbone); the student is a zoo backbone whose classifier is not used.
Two small heads map both into a joint D = 256 space:

  teacher head  ft = Linear(t_dim → D)(teacher embedding),  logit_t = Linear(D → N)(ft)
  student head  fs = Linear(f_dim → D)(student feature),    logit_s = Linear(D → N)(fs)

The teacher head learns from CE(logit_t, y) alone, with its own optimiser (SGD lr 0.01, momentum
0.9, wd 5e-4, no schedule): see `teacher_head_loss` and `TEACHER_HEAD`. The student objective is

  L = γ · CE(logit_s, y) + β · (w_node · L_node + w_edge · L_edge) + α · KD(logit_s, logit_t; T)

with the graph terms over the instances of the (global) batch (see `pcc_graph`, `ega_terms`).
Every input of the student objective that comes from the teacher side (ft, logit_t) is a constant
for the student: the reference zeroes the EGA gradient that reaches `ft` before the teacher
head's step, which is what `stop_gradient` says here.

The reference's comparison methods replace the graph term by another term on the same joint
embeddings (`hparams.distill`, see `embedding_term`); each is also registered as `ega_<name>`.

Both heads read the backbone's `feats['pooled']` tap: the pooled feature of a zoo network, and
the image embedding of a CLIP tower (jaxkd.models.clip returns it under that name too). The
student head's logits replace the backbone's as the network's 'logits', so evaluation reports
the student's top-1 through its head, as the reference does.
"""

import dataclasses
import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxkd.errors import UserError, unknown_name
from jaxkd.methods import crd
from jaxkd.methods import embedding_losses
from jaxkd.methods.base import Method, OnlineTeacherHead, Outputs
from jaxkd.methods.losses import cross_entropy, distill_kl, topk_correct
from jaxkd.methods.numerics import safe_norm
from jaxkd.methods.objective import POOLED
from jaxkd.models import layers

# Variance floor of the Pearson correlation: a constant embedding row (zero variance) gets
# correlation 0 with every row (itself included) instead of 0/0 = NaN. 1e-8 is below float32
# resolution for the variances of real embeddings, so it leaves their graph unchanged.
PCC_EPS = 1e-8


# ---------------------------------------------------------------------------- pure loss


def pcc_graph(x: jax.Array, eps: float = PCC_EPS) -> jax.Array:
  """Pearson correlation between the rows of x [R, D], computed over the feature axis:

  M = x − mean_d(x);  Cov = M Mᵀ / (D − 1);  C_ij = Cov_ij / sqrt((Cov_ii + ε)(Cov_jj + ε))

  C is [R, R] in float32. With ε = 0 this is the reference (torch) formula exactly; ε > 0
  keeps a constant row finite (its correlations are 0) instead of NaN.
  """
  x = x.astype(jnp.float32)
  d = x.shape[-1]
  centred = x - jnp.mean(x, axis=-1, keepdims=True)
  cov = centred @ centred.T / (d - 1)
  std = jnp.sqrt(jnp.diagonal(cov) + eps)
  return cov / (std[:, None] * std[None, :])


def frobenius_norm(a: jax.Array) -> jax.Array:
  """‖a‖_F = sqrt(Σ a²) over all entries (torch.norm(a, 2) with no dim), gradient 0 at a = 0.

  Not `jnp.linalg.norm(a, 2)`, which is the spectral norm of a matrix. At a = 0 the gradient of
  sqrt is infinite; torch returns 0 there and so does this (`numerics.safe_norm`).
  """
  return safe_norm(a.astype(jnp.float32).reshape(-1), keepdims=False)


def ega_terms(ft: jax.Array, fs: jax.Array, eps: float = PCC_EPS
              ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(L_node, L_edge, C) for teacher and student embeddings ft, fs of shape [B, D].

  C = pcc_graph(concat(ft, fs)) is 2B × 2B (teacher rows first). With E_t = C[:B, :B] (teacher
  edges), E_s = C[B:, B:] (student edges) and N_ts = C[:B, B:] (cross nodes):

    L_edge = ‖E_t − E_s‖_F,   L_node = ‖N_ts − I‖_F

  Frobenius norms, not squared and not averaged, so both grow with B. Compute them over the
  global batch (plain jnp under jit with a sharded batch does).
  """
  b = ft.shape[0]
  c = pcc_graph(jnp.concatenate([ft, fs], axis=0), eps)
  edge_t, edge_s, nodes = c[:b, :b], c[b:, b:], c[:b, b:]
  loss_node = frobenius_norm(nodes - jnp.eye(b, dtype=c.dtype))
  loss_edge = frobenius_norm(edge_t - edge_s)
  return loss_node, loss_edge, c


def ega_objective(fs: jax.Array, logit_s: jax.Array, ft: jax.Array, logit_t: jax.Array,
                  labels: jax.Array, *, node_weight: float = 0.8, edge_weight: float = 0.24,
                  gamma: float = 1.0, beta: float = 1.0, alpha: float = 0.0, T: float = 4.0,
                  eps: float = PCC_EPS) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The student objective of EGA on one batch of B images:

  L_EGA = node_weight · L_node + edge_weight · L_edge             (see `ega_terms`)
  L_KD  = T²/B Σ_i KL(softmax(logit_t,i / T) ‖ softmax(logit_s,i / T))   (RepDistiller DistillKL)
  L     = γ · CE(logit_s, y) + β · L_EGA + α · L_KD

  fs, ft: [B, D] student / teacher joint embeddings; logit_s, logit_t: [B, N]; labels: [B].
  The teacher side (ft, logit_t) carries no gradient. Returns (L, metrics) with every term.
  """
  hparams = ml_collections.ConfigDict(dict(
      distill="ega", node_weight=node_weight, edge_weight=edge_weight, gamma=gamma, beta=beta,
      alpha=alpha, T=T, pcc_eps=eps))
  return ega_loss({"embedding": fs, "logits": logit_s}, {"embedding": ft, "logits": logit_t},
                  labels, hparams)


# The comparison methods of the reference, on the same joint embeddings: the term β weighs.
# 'kd' adds nothing there (its KD is the α term: set method.alpha); 'crd' reads the loss of
# the ContrastMemory bridge (jaxkd.methods.crd).
DISTILL_NAMES = ("ega", "kd", "hint", "rkd", "pkt", "nce", "ccl", "crd")


def embedding_term(student_out: Outputs, teacher_out: Outputs, labels: jax.Array,
                   hparams: ml_collections.ConfigDict) -> tuple[jax.Array, dict[str, jax.Array]]:
  """L_distill(fs, ft) of `hparams.distill` (one of DISTILL_NAMES) and its own metrics.

  ega: w_node · L_node + w_edge · L_edge (`ega_terms`); hint, rkd, pkt, nce, ccl: the functions
  of jaxkd.methods.embedding_losses; crd: the bridge's `loss_crd`; kd: 0.
  """
  fs, ft = student_out["embedding"], jax.lax.stop_gradient(teacher_out["embedding"])
  distill = hparams.distill
  if distill == "ega":
    loss_node, loss_edge, _ = ega_terms(ft, fs, hparams.get("pcc_eps", PCC_EPS))
    return (hparams.node_weight * loss_node + hparams.edge_weight * loss_edge,
            {"loss_node": loss_node, "loss_edge": loss_edge})
  if distill == "kd":
    return jnp.zeros((), jnp.float32), {}
  if distill == "hint":
    return embedding_losses.hint_loss(fs, ft), {}
  if distill == "rkd":
    return embedding_losses.rkd_loss(fs, ft), {}
  if distill == "pkt":
    return embedding_losses.pkt_loss(fs, ft), {}
  if distill == "nce":
    return embedding_losses.class_nce_loss(fs, ft, labels, hparams.nce_temperature), {}
  if distill == "ccl":
    return embedding_losses.ccl_loss(fs, ft, labels, student_out["logits"],
                                     teacher_out["logits"]), {}
  if distill == "crd":
    return student_out["loss_crd"], {}
  raise unknown_name("method.distill", distill, DISTILL_NAMES)


def ega_loss(student_out: Outputs, teacher_out: Outputs, labels: jax.Array,
             hparams: ml_collections.ConfigDict) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The `Method` loss on the heads' outputs:

  L = γ · CE(logit_s, y) + β · L_distill(fs, ft) + α · KD(logit_s, logit_t; T)

  with L_distill of `hparams.distill` (`embedding_term`); for 'ega' this is `ega_objective`.
  student_out: {'logits': logit_s, 'embedding': fs, ...} (StudentHead, and the CRD bridge);
  teacher_out: {'logits': logit_t, 'embedding': ft, ...} (TeacherHead, current parameters).
  """
  logit_s = student_out["logits"]
  logit_t = jax.lax.stop_gradient(teacher_out["logits"])
  loss_distill, metrics = embedding_term(student_out, teacher_out, labels, hparams)
  loss_ce = cross_entropy(logit_s, labels)
  loss_kd = distill_kl(logit_s, logit_t, hparams.T)
  loss = hparams.gamma * loss_ce + hparams.beta * loss_distill + hparams.alpha * loss_kd
  name = "loss_ega" if hparams.distill == "ega" else f"loss_{hparams.distill}"
  metrics.update({"loss": loss, "loss_ce": loss_ce, name: loss_distill, "loss_kd": loss_kd,
                  "top1": topk_correct(logit_s, labels, 1).mean()})
  return loss, metrics


def check_hparams(hparams: ml_collections.ConfigDict, variant: Optional[str] = None) -> None:
  """An unknown `distill`, or one that contradicts the registered variant `ega_<variant>`,
  fails before any work is done."""
  if hparams.distill not in DISTILL_NAMES:
    raise unknown_name("method.distill", hparams.distill, DISTILL_NAMES)
  if variant is not None and hparams.distill != variant:
    raise UserError(
        f"method 'ega_{variant}' distils with {variant!r} but method.distill is "
        f"{hparams.distill!r}; set --config.method.distill={variant} (or use method 'ega' "
        f"with --config.method.distill={hparams.distill})")


def teacher_head_loss(teacher_out: Outputs, student_out: Any, labels: jax.Array,
                      hparams: ml_collections.ConfigDict
                      ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """L_t = CE(logit_t, y): the only loss the teacher head learns from (the reference's TeacNet).

  Differentiate it with respect to the teacher head's parameters alone; the teacher backbone is
  frozen and the student plays no part (`student_out` is ignored).
  """
  del student_out, hparams
  logits = teacher_out["logits"]
  loss = cross_entropy(logits, labels)
  return loss, {"loss_teacher_head": loss,
                "top1_teacher_head": topk_correct(logits, labels, 1).mean()}


# ---------------------------------------------------------------------------- heads


class JointHead(nn.Module):
  """embedding = Linear(in → embed_dim)(feats[tap]); logits = Linear(embed_dim → N)(embedding).

  The reference's `StudNet` and `TeacNet` (submodules `fit_dim_Net`, `cl_Net`, PyTorch default
  init), called as `head(outputs, train=...)` on a backbone's outputs and returning
  {'logits', 'embedding'}. The dropout the reference constructs is never applied there; none here.
  """
  num_classes: int
  embed_dim: int = 256
  tap: str = "pooled"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, outputs: Outputs, train: bool = False) -> dict[str, jax.Array]:
    del train
    x = outputs["feats"][self.tap]
    embedding = layers.Linear(self.embed_dim, dtype=self.dtype, name="fit_dim_Net")(x)
    logits = layers.Linear(self.num_classes, dtype=self.dtype, name="cl_Net")(embedding)
    return {"logits": logits, "embedding": embedding}


def student_heads(num_classes: int, hparams: ml_collections.ConfigDict,
                  backbone: Optional[nn.Module] = None) -> nn.Module:
  """StudNet on the student backbone's pooled feature; its logits become the network's."""
  return JointHead(num_classes, hparams.embed_dim, hparams.get("student_tap", "pooled"))


def teacher_heads(num_classes: int, hparams: ml_collections.ConfigDict,
                  backbone: Optional[nn.Module] = None) -> nn.Module:
  """TeacNet on the frozen teacher's embedding (CLIP image embedding or pooled feature)."""
  return JointHead(num_classes, hparams.embed_dim, hparams.get("teacher_tap", "pooled"))


def teacher_head_optimizer(hparams: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """torch.optim.SGD(lr, momentum, weight_decay) with a constant lr (the reference's TeacNet):

  g ← g + wd·θ;  v ← μ·v + g;  θ ← θ − lr·v
  """
  return optax.chain(optax.add_decayed_weights(hparams.teacher_head_weight_decay),
                     optax.sgd(hparams.teacher_head_lr, momentum=hparams.teacher_head_momentum))


TEACHER_HEAD = OnlineTeacherHead(heads=teacher_heads, loss=teacher_head_loss,
                                 optimizer=teacher_head_optimizer)

DEFAULTS = dict(
    distill="ega",      # the term β weighs: one of DISTILL_NAMES
    node_weight=0.8,    # The reference's ViT-B/32 setting; its RN101 script uses
    edge_weight=0.24,   # 0.8 / 0.3.
    gamma=1.0,          # CE weight
    beta=1.0,           # EGA weight
    alpha=0.0,          # KD weight (DistillKL on logit_s, logit_t)
    T=4.0,
    embed_dim=256,
    pcc_eps=PCC_EPS,
    teacher_head_lr=0.01,
    teacher_head_momentum=0.9,
    teacher_head_weight_decay=5e-4,
    nce_temperature=0.1,   # distill='nce' (the reference's NCELoss(temperature=0.1))
    # distill='crd', RepDistiller's defaults (the EGA reference never sets them):
    crd_feat_dim=128,      # dimension of the contrastive embedding
    nce_k=16384,           # negatives per example
    nce_t=0.07,            # temperature
    nce_m=0.5,             # momentum of the memory banks
)


def crd_bridge(num_data: int, hparams: ml_collections.ConfigDict) -> Optional[nn.Module]:
  """CRD's embeddings and memory banks over the `num_data` training examples (distill='crd')."""
  if hparams.distill != "crd":
    return None
  return crd.ContrastMemory(num_data=num_data, embed_dim=hparams.embed_dim,
                            feat_dim=hparams.crd_feat_dim, temperature=hparams.nce_t,
                            momentum=hparams.nce_m)


def crd_negatives(hparams: ml_collections.ConfigDict) -> int:
  """Negatives per example the pipeline draws: nce_k for distill='crd', else none."""
  return hparams.nce_k if hparams.distill == "crd" else 0

METHOD = Method(name="ega", loss=ega_loss, views="none", uses_teacher=True,
                defaults=DEFAULTS, student_heads=student_heads,
                online_teacher_head=TEACHER_HEAD, bridge=crd_bridge, negatives=crd_negatives,
                check_hparams=check_hparams, taps=POOLED,
                optional_hparams=("student_tap", "teacher_tap"))

# The reference's comparison rows, one registered name each (`ega_<distill>`), so that one config
# can list them as baselines. 'ega_kd' sets α = 1 (the reference's `--distill kd` adds only the α
# term, which is 0 unless given).
METHODS = {"ega": METHOD}
for _distill in DISTILL_NAMES[1:]:
  METHODS[f"ega_{_distill}"] = dataclasses.replace(
      METHOD, name=f"ega_{_distill}",
      defaults=dict(DEFAULTS, distill=_distill, **({"alpha": 1.0} if _distill == "kd" else {})),
      check_hparams=functools.partial(check_hparams, variant=_distill))
