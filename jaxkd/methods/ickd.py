"""ICKD: inter-channel correlation for knowledge distillation (Liu, Chen, Mao, Xie, Lin and Luo,
ICCV 2021).

As the authors' code computes it: ADLab-AutoDrive/ICKD @ 403b8d3,
`Cifar100/distiller_zoo/ICKD.py::ICKDLoss`, built by `Cifar100/train_student.py` (`--distill
ickd`) on the last stage maps of both networks (RepDistiller's feat[-2], taps[-2] here). The
student's map is embedded to the teacher's width t_C by a 1×1 convolution without bias followed
by a BatchNorm2d (named `l2norm` in the reference, but a BatchNorm, in training mode), trained
with the student:

  F_s = BN(Conv1×1(f_s)) ∈ [B, HW_s, t_C],  F_t = f_t ∈ [B, HW_t, t_C]
  G_b = row-ℓ2-normalised (F_bᵀ F_b)  ∈ [t_C, t_C]            (per sample, over positions;
                                                             each row divided by max(‖row‖, 1e-12))
  L_ICKD = Σ_b Σ_{c,c'} (G_s,b − G_t,b)²_{cc'} / (t_C · B)

The Gram matrices are over channels, so the two maps may have different spatial sizes. The
teacher map is a constant. The reference also builds a teacher embedding `embed_t` and hands it
to the optimiser, but never calls it; it changes nothing and is not built here.

The objective is RepDistiller's `-r -a -b`: ce_weight·CE + kd_weight·KD(T) + feat_weight·L_ICKD.
Defaults: `Cifar100/scripts/run_cifar_distill.sh` and `Cifar100/README.md` (ICKD: `-a 0 -b 2.5`,
`-r` 1, `--kd_T` 4; `Cifar100/train_student.sh` at this commit runs `-b 4` on one pair); the
`ickd_kd` variant is their "ICKD-C" with the KL term (`-a 1 -b 2.5`). The reference's numbers are
reproduced in tests (tests/data/golden_modern.npz, prefix ickd).
"""

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd.methods.base import Method
from jaxkd.methods.numerics import l2_normalize
from jaxkd.methods.objective import (LAST_MAP, WEIGHTS, bridge_term, distillation_objective,
                                     paired_taps)
from jaxkd.models import layers

# run_cifar_distill.sh / Cifar100/README.md: `--distill ickd -a 0 -b 2.5` (-r 1, kd_T 4).
DEFAULTS = dict(WEIGHTS, feat_weight=2.5)


def channel_gram(f: jax.Array) -> jax.Array:
  """Per sample of f [B, H, W, C]: G = Fᵀ F over the H·W positions, each row ℓ2-normalised
  (torch F.normalize(·, dim=2)); [B, C, C]."""
  f = f.astype(jnp.float32)
  flat = f.reshape(f.shape[0], -1, f.shape[-1])
  gram = jnp.einsum("bpc,bpd->bcd", flat, flat, precision=jax.lax.Precision.HIGHEST)
  return l2_normalize(gram, axis=2)


def ickd_loss(embedded_s: jax.Array, f_t: jax.Array) -> jax.Array:
  """L_ICKD = Σ (G_s − G_t)² / (C · B) of the embedded student map and the teacher map
  ([B, H, W, C], same B and C; H, W may differ). The teacher map is a constant."""
  g_s = channel_gram(embedded_s)
  g_t = channel_gram(jax.lax.stop_gradient(f_t))
  batch, channels = g_s.shape[0], g_s.shape[1]
  return jnp.sum(jnp.square(g_s - g_t)) / (channels * batch)


class ChannelEmbed(nn.Module):
  """The reference's `Embed`: a 1×1 convolution without bias (PyTorch's default init,
  U(±1/sqrt(in))) to `features` channels, then a BatchNorm2d (batch statistics when `train`,
  PyTorch momentum 0.1). Submodules `conv` and `bn`."""
  features: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = x.astype(jnp.float32)
    y = nn.Conv(self.features, (1, 1), use_bias=False, padding="VALID",
                param_dtype=layers.PARAM_DTYPE, kernel_init=layers.torch_default_kernel,
                name="conv", conv_general_dilated=layers.conv_general_dilated)(x)
    return layers.BatchNorm(name="bn")(y, use_running_average=not train)


class ICKDBridge(nn.Module):
  """ICKD's student embedding as a bridge: `bridge(student_out, teacher_out, batch, train)` ->
  {'loss_ickd': ickd_loss(embed_s(taps_s[-2]), taps_t[-2])}.

  `embed_s` is a `ChannelEmbed` to the teacher's channel count, trained with the student.
  `teacher_out` is required (also at init: it gives the teacher's width).
  """

  @nn.compact
  def __call__(self, student_out: Any, teacher_out: Optional[Any], batch: Optional[Any] = None,
               train: bool = False) -> dict[str, jax.Array]:
    del batch
    taps_s, taps_t = paired_taps(student_out, teacher_out, "ICKDBridge")
    f_s, f_t = taps_s[-2], taps_t[-2]
    embedded = ChannelEmbed(f_t.shape[-1], name="embed_s")(f_s, train)
    return {"loss_ickd": ickd_loss(embedded, f_t)}


METHOD = Method(name="ickd", loss=distillation_objective("ickd", bridge_term("loss_ickd")),
                defaults=DEFAULTS, bridge=lambda num_data, hparams: ICKDBridge(), taps=LAST_MAP)
METHODS = {"ickd": METHOD,
           "ickd_kd": dataclasses.replace(METHOD, name="ickd_kd",
                                          defaults=dict(DEFAULTS, kd_weight=1.0))}
