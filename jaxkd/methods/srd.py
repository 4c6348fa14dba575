"""SRD: the simple recipe of "Understanding the Role of the Projector in Knowledge
Distillation" (Miles and Mikolajczyk, AAAI 2024).

As the authors' code computes it: roymiles/Simple-Recipe-Distillation @ 31e8477,
`imagenet/torchdistill/losses/single.py::OurDistillationLoss`, with the objective of
`imagenet/configs/ilsvrc2012/ours/res3418.yaml` (CE and the loss, factors 1 and 1). On the
features the two classifiers read, z_s [B, s_C] and z_t [B, t_C] (the pooled vectors, taps[-1];
the reference averages its ResNets' `layer4` outputs over the positions, which is their
classifiers' input):

  e_s = Linear(z_s)                                 (the projector, trained with the student)
  L_rep   = rep_weight · log Σ_{b,d} |BN_s(e_s) − BN_t(z_t)|^exponent
  L_logit = T² / B · Σ_b KL(softmax(y_t,b / T) ‖ softmax(y_s,b / T))   (y: the logits)
  L_SRD   = L_rep + L_logit

BN_s and BN_t are affine-free BatchNorm1d's (eps 1e-4) in training mode: batch statistics over
the global batch (biased variance), running statistics moved with momentum 0.1 (unbiased
variance) though never read in training. The teacher's features are batch-normalised too; they
and the teacher's logits are constants. The sum in L_rep runs over the batch and the features
(not a mean), and its log is taken. The training objective is
`ce_weight · CE + srd_weight · L_SRD`.

Where this differs from the reference: its `__init__` hard-codes the ResNet-34/18 width
(Linear(512, 512), BatchNorm1d(512)); here the projector maps the student's width to the
teacher's, whatever the pair. And it reads the classifier's input of every zoo network, which
for networks other than ResNets is not the mean of the last stage map (WRN: after a last
BatchNorm and ReLU; MobileNetV2: after a 1×1 head convolution).

The repository has no CIFAR-100 configuration: the defaults are its loss's constants
(`rep_weight` 2, `exponent` 4, `bn_eps` 1e-4, `T` 1) and res3418.yaml's factors (`ce_weight` 1,
`srd_weight` 1). The reference's numbers are reproduced in tests (tests/data/golden_modern.npz,
prefix srd).
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxkd.errors import UserError
from jaxkd.methods.base import Method, Outputs
from jaxkd.methods.losses import cross_entropy, distill_kl, topk_correct
from jaxkd.methods.objective import POOLED, paired_taps
from jaxkd.models import layers

# OurDistillationLoss's constants and res3418.yaml's factors (no CIFAR-100 config exists).
SRD_DEFAULTS = dict(ce_weight=1.0, srd_weight=1.0, rep_weight=2.0, exponent=4.0, bn_eps=1e-4,
                    T=1.0)


class AffineFreeBatchNorm(nn.Module):
  """`torch.nn.BatchNorm1d(C, eps, affine=False)` over the last axis: y = (x − μ) / sqrt(v + eps)
  with the batch mean and biased variance when `train` (the running `mean` / `var` move with
  PyTorch momentum 0.1, the variance unbiased), the running ones otherwise. No parameters;
  batch_stats `mean`, `var` (C,)."""
  epsilon: float = 1e-4
  momentum: float = 0.9

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    features = x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean",
                            lambda: jnp.zeros((features,), layers.PARAM_DTYPE))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), layers.PARAM_DTYPE))
    x = x.astype(jnp.float32)
    if not train:
      return (x - ra_mean.value) * jax.lax.rsqrt(ra_var.value + self.epsilon)
    rows = x.reshape(-1, features)
    ones, zeros = jnp.ones((features,), jnp.float32), jnp.zeros((features,), jnp.float32)
    y, mean, var = layers.batch_norm_rows(rows, ones, zeros, self.epsilon)
    if not self.is_initializing():
      n = rows.shape[0]
      unbiased = var * (n / max(n - 1, 1))
      ra_mean.value = self.momentum * ra_mean.value + (1.0 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1.0 - self.momentum) * unbiased
    return y.reshape(x.shape)


def rep_loss(normed_s: jax.Array, normed_t: jax.Array, rep_weight: float, exponent: float
             ) -> jax.Array:
  """L_rep = rep_weight · log Σ |n_s − n_t|^exponent over all entries of the two normalised
  [B, D] features."""
  diff = jnp.abs(normed_s.astype(jnp.float32) - normed_t.astype(jnp.float32))
  return rep_weight * jnp.log(jnp.sum(diff ** exponent))


class SRDBridge(nn.Module):
  """SRD's projector and its two BatchNorms as a bridge: `bridge(student_out, teacher_out,
  batch, train)` -> {'loss_srd_rep': L_rep} on the pooled vectors (taps[-1]) of both sides.

  Submodules `embed` (`layers.Linear` s_C → t_C, PyTorch's default init, trained with the
  student), `bn_s`, `bn_t` (`AffineFreeBatchNorm`, batch statistics when `train`). `teacher_out`
  is required (also at init: it gives the teacher's width).
  """
  rep_weight: float = SRD_DEFAULTS["rep_weight"]
  exponent: float = SRD_DEFAULTS["exponent"]
  bn_eps: float = SRD_DEFAULTS["bn_eps"]

  @nn.compact
  def __call__(self, student_out: Any, teacher_out: Optional[Any], batch: Optional[Any] = None,
               train: bool = False) -> dict[str, jax.Array]:
    del batch
    taps_s, taps_t = paired_taps(student_out, teacher_out, "SRDBridge")
    z_s, z_t = (f.reshape(f.shape[0], -1).astype(jnp.float32)
                for f in (taps_s[-1], taps_t[-1]))
    e_s = layers.Linear(z_t.shape[-1], name="embed")(z_s)
    normed_s = AffineFreeBatchNorm(self.bn_eps, name="bn_s")(e_s, train)
    normed_t = AffineFreeBatchNorm(self.bn_eps, name="bn_t")(z_t, train)
    return {"loss_srd_rep": rep_loss(normed_s, normed_t, self.rep_weight, self.exponent)}


def srd_logit_loss(logits_s: jax.Array, logits_t: jax.Array, temperature: float) -> jax.Array:
  """L_logit = T²/B Σ_b KL(softmax(z_t / T) ‖ softmax(z_s / T)) (kl_div summed, over B)."""
  return distill_kl(logits_s, logits_t, temperature)


def srd_objective(student_out: Outputs, teacher_out: Outputs, labels: jax.Array,
                  hparams: ml_collections.ConfigDict) -> tuple[jax.Array, dict[str, jax.Array]]:
  """L = ce_weight · CE(z_s, y) + srd_weight · (L_rep + L_logit), L_rep from the bridge.

  Metrics: loss, loss_ce, loss_srd (unweighted), loss_srd_rep, loss_srd_logit, top1.
  """
  s, t = student_out["logits"], teacher_out["logits"]
  loss_ce = cross_entropy(s, labels)
  rep = student_out["loss_srd_rep"]
  logit = srd_logit_loss(s, t, hparams.T)
  loss_srd = rep + logit
  loss = hparams.ce_weight * loss_ce + hparams.srd_weight * loss_srd
  return loss, {"loss": loss, "loss_ce": loss_ce, "loss_srd": loss_srd, "loss_srd_rep": rep,
                "loss_srd_logit": logit, "top1": topk_correct(s, labels, 1).mean()}


def srd_bridge(num_data: int, hparams: ml_collections.ConfigDict) -> nn.Module:
  """The projector and BatchNorms of SRD with the run's hyper-parameters."""
  del num_data
  return SRDBridge(rep_weight=hparams.rep_weight, exponent=hparams.exponent,
                   bn_eps=hparams.bn_eps)


def check_hparams(hparams: ml_collections.ConfigDict) -> None:
  """The exponent of L_rep and the BatchNorms' eps must be > 0."""
  for key in ("exponent", "bn_eps"):
    if not hparams[key] > 0:
      raise UserError(f"srd's {key} is {hparams[key]!r}; it must be > 0: set e.g. "
                      f"--config.method.{key}={SRD_DEFAULTS[key]}")


METHOD = Method(name="srd", loss=srd_objective, defaults=SRD_DEFAULTS, bridge=srd_bridge,
                taps=POOLED, check_hparams=check_hparams)
