"""DIST: knowledge distillation from a stronger teacher (Huang, You, Wang, Qian and Xu,
NeurIPS 2022).

As the authors' code computes it: hunto/image_classification_sota @ d9662f7 (the
`classification` submodule of hunto/DIST_KD @ 2418f18), `lib/models/losses/dist_kd.py::DIST`,
called by `lib/models/losses/kd_loss.py::KDLoss` with `kd_method='dist_t4'` (CIFAR-100,
`configs/strategies/distill/dist_cifar.yaml`) or `'dist'` (ImageNet, τ = 1).

DIST matches relations, not values. With the probabilities Y_s = softmax(z_s / τ),
Y_t = softmax(z_t / τ) of the R rows of the step ([R, N]), and Pearson's correlation of two
vectors written with DIST's own cosine,

  ρ(a, b) = ⟨a − ā, b − b̄⟩ / (‖a − ā‖ · ‖b − b̄‖ + ε),  ε = 1e-8 (added, not a floor),

  inter = τ² · (1 − 1/R Σ_r ρ(Y_s[r, :], Y_t[r, :]))     (each row: over the classes)
  intra = τ² · (1 − 1/N Σ_n ρ(Y_s[:, n], Y_t[:, n]))     (each class: over the batch)
  L_DIST = β · inter + γ · intra

and the training objective is `ce_weight · CE(z_s, y) + dist_weight · L_DIST` (KDLoss's
`ori_loss_weight` and `kd_loss_weight`). The intra-class term reads a whole column of the batch:
under the trainer's global view it is computed over the global batch, as on one GPU, whatever
the number of devices. The teacher side is a constant.

Defaults: dist_cifar.yaml (`kd: dist_t4`, `ori_loss_weight: 1.`, `kd_loss_weight: 2.`) and
KDLoss's `dist_t4` (β = γ = 1, τ = 4). The reference's numbers are reproduced in tests
(tests/data/golden_modern.npz, prefixes dist and dist_t1).
"""

import jax
import jax.numpy as jnp
import ml_collections

from jaxkd.errors import UserError
from jaxkd.methods.base import Method, Outputs
from jaxkd.methods.losses import cross_entropy, topk_correct
from jaxkd.methods.numerics import safe_norm

# DIST's epsilon, added to the product of the two norms of its cosine.
DIST_EPS = 1e-8

# dist_cifar.yaml: ori_loss_weight 1, kd_loss_weight 2, kd 'dist_t4' (β = γ = 1, τ = 4).
DIST_DEFAULTS = dict(ce_weight=1.0, dist_weight=2.0, beta=1.0, gamma=1.0, T=4.0)


def cosine_similarity(a: jax.Array, b: jax.Array, eps: float = DIST_EPS) -> jax.Array:
  """Per row: ⟨a, b⟩ / (‖a‖ · ‖b‖ + eps), shape [R] (DIST's cosine; an all-zero row gives 0
  with a zero gradient through its norm)."""
  dot = jnp.sum(a * b, axis=1)
  return dot / (safe_norm(a, axis=1, keepdims=False) * safe_norm(b, axis=1, keepdims=False)
                + eps)


def pearson_correlation(a: jax.Array, b: jax.Array, eps: float = DIST_EPS) -> jax.Array:
  """Per row: the cosine of the rows centred on their means, shape [R]."""
  return cosine_similarity(a - jnp.mean(a, axis=1, keepdims=True),
                           b - jnp.mean(b, axis=1, keepdims=True), eps)


def inter_class_relation(y_s: jax.Array, y_t: jax.Array) -> jax.Array:
  """1 − mean_r ρ(y_s[r], y_t[r]): each row's correlation over the classes."""
  return 1.0 - jnp.mean(pearson_correlation(y_s, y_t))


def intra_class_relation(y_s: jax.Array, y_t: jax.Array) -> jax.Array:
  """1 − mean_n ρ(y_s[:, n], y_t[:, n]): each class's correlation over the rows of the batch."""
  return inter_class_relation(y_s.T, y_t.T)


def dist_terms(logits_s: jax.Array, logits_t: jax.Array, temperature: float
               ) -> tuple[jax.Array, jax.Array]:
  """(inter, intra) of softmax(z / τ), each multiplied by τ² (see the module docstring)."""
  y_s = jax.nn.softmax(logits_s.astype(jnp.float32) / temperature, axis=1)
  y_t = jax.nn.softmax(jax.lax.stop_gradient(logits_t.astype(jnp.float32)) / temperature,
                       axis=1)
  scale = temperature ** 2
  return scale * inter_class_relation(y_s, y_t), scale * intra_class_relation(y_s, y_t)


def dist_loss(logits_s: jax.Array, logits_t: jax.Array, beta: float, gamma: float,
              temperature: float) -> jax.Array:
  """L_DIST = β · inter + γ · intra (the reference `DIST(β, γ, τ)(z_s, z_t)`)."""
  inter, intra = dist_terms(logits_s, logits_t, temperature)
  return beta * inter + gamma * intra


def dist_objective(student_out: Outputs, teacher_out: Outputs, labels: jax.Array,
                   hparams: ml_collections.ConfigDict) -> tuple[jax.Array, dict[str, jax.Array]]:
  """L = ce_weight · CE(z_s, y) + dist_weight · (β · inter + γ · intra) (KDLoss.__call__).

  Metrics: loss, loss_ce, loss_dist (unweighted), loss_dist_inter, loss_dist_intra (each with
  its τ², without β / γ), top1.
  """
  s, t = student_out["logits"], teacher_out["logits"]
  loss_ce = cross_entropy(s, labels)
  inter, intra = dist_terms(s, t, hparams.T)
  loss_dist = hparams.beta * inter + hparams.gamma * intra
  loss = hparams.ce_weight * loss_ce + hparams.dist_weight * loss_dist
  return loss, {"loss": loss, "loss_ce": loss_ce, "loss_dist": loss_dist,
                "loss_dist_inter": inter, "loss_dist_intra": intra,
                "top1": topk_correct(s, labels, 1).mean()}


def check_hparams(hparams: ml_collections.ConfigDict) -> None:
  """β and γ weigh the two relations: each must be ≥ 0."""
  for key in ("beta", "gamma"):
    if not hparams[key] >= 0:
      raise UserError(f"dist's {key} is {hparams[key]!r}; it must be >= 0 (a loss weight): set "
                      f"e.g. --config.method.{key}={DIST_DEFAULTS[key]}")


METHOD = Method(name="dist", loss=dist_objective, defaults=DIST_DEFAULTS,
                check_hparams=check_hparams)
