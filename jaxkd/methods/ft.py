"""FT: Factor Transfer, "Paraphrasing complex network: network compression via factor transfer"
(Kim, Park and Kwak, NeurIPS 2018), as RepDistiller implements it.

Reference: RepDistiller distiller_zoo/FT.py (`FactorTransfer`), `Paraphraser` and `Translator`
of models/util.py, helper/pretrain.py (`init`) and helper/loops.py. FT reads the last stage map
(taps[-2]) of both networks, in two stages:

1. Teacher preparation: a paraphraser, a convolutional auto-encoder without BN and with
   LeakyReLU(0.1) after every layer, is trained on the frozen teacher's map f_t [B, H, W, C]:

     encoder: conv3×3 C→C, conv3×3 C→kC, conv3×3 kC→kC        (k = 0.5; the "factor" F_t)
     decoder: convT3×3 kC→kC, convT3×3 kC→C, convT3×3 C→C      (stride 1, padding 1)
     loss = MSE(decoder(encoder(f_t)), f_t)

   for `--init_epochs` = 30 epochs (SGD, lr 0.01 for resnet/wrn students, else
   `--learning_rate`). Then it is frozen.
2. Distillation: a translator (the same encoder on the student's map, with BN after each conv,
   C_s → C_s → kC_t → kC_t) is trained with the student on

     loss_ft = mean | factor(T(f_s)) − factor(F_t) |,   factor(F) = ℓ2(mean_c F^p1) per sample

   (p1 = 2, p2 = 1 the |·| exponent; the larger of the two factor maps is average-pooled to
   the smaller one's height first). F_t is a constant. RepDistiller's weights
   (scripts/run_cifar_distill.sh): `-r 1 -a 0 -b 200`, i.e. L = CE + 200 · loss_ft.

Reproduces the reference's numbers (tests/data/golden_baselines.npz, prefixes ft, ftx,
ft_init).
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd.methods.connectors import ConvTranspose, pool_to_smaller, torch_conv2d
from jaxkd.methods.embedding_losses import hint_loss
from jaxkd.models import layers
from jaxkd.methods.base import Method, TeacherPreparation
from jaxkd.methods.numerics import l2_normalize
from jaxkd.methods.objective import LAST_MAP, WEIGHTS, bridge_term, distillation_objective, taps

P1 = 2
P2 = 1
K = 0.5
NEGATIVE_SLOPE = 0.1


def factor(x: jax.Array, p1: int = P1) -> jax.Array:
  """FT's normalised factor of a map x [B, H, W, C]: a = mean_c x^p1 flattened to [B, H·W]
  (row-major (H, W), as the reference's NCHW view), then a / max(‖a‖₂, 1e-12) per sample."""
  return l2_normalize(jnp.mean(x.astype(jnp.float32) ** p1, axis=-1).reshape(x.shape[0], -1))


def ft_loss(factor_s: jax.Array, factor_t: jax.Array, p1: int = P1, p2: int = P2) -> jax.Array:
  """FactorTransfer: with the larger map pooled to the smaller one's height (`pool_to_smaller`),
  d = factor(F_s, p1) − factor(F_t, p1); mean|d| when p2 = 1, else mean d^p2 (the reference's
  `.pow(p2)`, no absolute value). F_t is a constant."""
  f_s, f_t = pool_to_smaller(factor_s.astype(jnp.float32),
                           jax.lax.stop_gradient(factor_t.astype(jnp.float32)))
  diff = factor(f_s, p1) - factor(f_t, p1)
  if p2 == 1:
    return jnp.mean(jnp.abs(diff))
  return jnp.mean(diff ** p2)


def paraphraser_loss(reconstruction: jax.Array, f_t: jax.Array) -> jax.Array:
  """The paraphraser's training loss: MSE(reconstruction, f_t), mean over all entries (torch
  MSELoss); f_t is a constant."""
  return hint_loss(reconstruction, f_t)


def _leaky_relu(x: jax.Array) -> jax.Array:
  return nn.leaky_relu(x, NEGATIVE_SLOPE)


class Paraphraser(nn.Module):
  """FT's paraphraser as a teacher head: `heads(outputs, train)` on the teacher's outputs ->
  {'factor_t': encoder(f_t) [B, H, W, int(k·C)], 'reconstruction': decoder(factor_t)
  [B, H, W, C]}, f_t = taps[-2].

  No BN, so `train` changes nothing. Submodules `encoder_0`, `encoder_3`, `encoder_6` (3×3
  convs with bias, padding 1) and `decoder_0`, `decoder_3`, `decoder_6` (`ConvTranspose`
  3×3, stride 1, padding 1), named after the reference's Sequential indices; PyTorch default
  inits.
  """
  k: float = K

  @nn.compact
  def __call__(self, outputs: Any, train: bool = False) -> dict[str, jax.Array]:
    del train  # No batch statistics.
    f_t = taps(outputs)[-2].astype(jnp.float32)
    c = f_t.shape[-1]
    mid = int(c * self.k)
    x = _leaky_relu(torch_conv2d(c, (3, 3), c, 1, 1, name="encoder_0")(f_t))
    x = _leaky_relu(torch_conv2d(mid, (3, 3), c, 1, 1, name="encoder_3")(x))
    factor_t = _leaky_relu(torch_conv2d(mid, (3, 3), mid, 1, 1, name="encoder_6")(x))
    x = _leaky_relu(ConvTranspose(mid, 3, 1, 1, name="decoder_0")(factor_t))
    x = _leaky_relu(ConvTranspose(c, 3, 1, 1, name="decoder_3")(x))
    reconstruction = _leaky_relu(ConvTranspose(c, 3, 1, 1, name="decoder_6")(x))
    return {"factor_t": factor_t, "reconstruction": reconstruction}


class Translator(nn.Module):
  """FT's translator: `translator(f_s, train)` -> the student's factor [B, H, W, features].

  Three 3×3 convs (padding 1, with bias) C_s → C_s → features → features, each followed by BN
  (batch statistics when `train`) and LeakyReLU(0.1). Submodules `encoder_0`/`encoder_1`,
  `encoder_3`/`encoder_4`, `encoder_6`/`encoder_7` (conv/BN, the reference's Sequential
  indices); PyTorch default inits.
  """
  features: int

  @nn.compact
  def __call__(self, f_s: jax.Array, train: bool = False) -> jax.Array:
    x = f_s.astype(jnp.float32)
    widths = (x.shape[-1], self.features, self.features)
    for j, width in enumerate(widths):
      x = torch_conv2d(width, (3, 3), x.shape[-1], 1, 1, name=f"encoder_{3 * j}")(x)
      x = layers.BatchNorm(name=f"encoder_{3 * j + 1}")(x, use_running_average=not train)
      x = _leaky_relu(x)
    return x


class TranslatorBridge(nn.Module):
  """FT's translator as a bridge: `bridge(student_out, teacher_out, batch, train)` ->
  {'loss_ft': ft_loss(translator(taps_s[-2]), teacher_out['factor_t'], p1, p2)}.

  `teacher_out` must hold the frozen `Paraphraser` head's 'factor_t' (a constant here). The
  translator (submodule `translator`) has int(k · C_t) output channels, C_t the channels of the
  teacher's taps[-2].
  """
  p1: int = P1
  p2: int = P2
  k: float = K

  @nn.compact
  def __call__(self, student_out: Any, teacher_out: Optional[Any], batch: Optional[Any] = None,
               train: bool = False) -> dict[str, jax.Array]:
    del batch
    if teacher_out is None or "factor_t" not in teacher_out:
      raise ValueError("TranslatorBridge needs the teacher's outputs with the paraphraser's "
                       "'factor_t'")
    f_s = taps(student_out)[-2]
    t_channels = taps(teacher_out)[-2].shape[-1]
    factor_t = jax.lax.stop_gradient(teacher_out["factor_t"])
    factor_s = Translator(int(t_channels * self.k), name="translator")(f_s, train)
    return {"loss_ft": ft_loss(factor_s, factor_t, self.p1, self.p2)}


def paraphraser_objective(teacher_out, unused, labels, hparams):
  """Stage teacher_ft: the paraphraser's reconstruction error of the frozen teacher's map."""
  del unused, labels, hparams
  loss = paraphraser_loss(teacher_out["reconstruction"], taps(teacher_out)[-2])
  return loss, {"loss": loss, "loss_reconstruction": loss}


# RepDistiller trains the paraphraser at lr 0.01 when the student is one of these, else at the
# student's learning rate.
LOW_INIT_LR_STUDENTS = ("resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56",
                        "resnet110", "resnet8x4", "resnet32x4", "wrn_16_1", "wrn_16_2",
                        "wrn_40_1", "wrn_40_2")

METHOD = Method(
    name="ft", loss=distillation_objective("ft", bridge_term("loss_ft")), taps=LAST_MAP,
    defaults=dict(WEIGHTS, feat_weight=200.0, p1=P1, p2=P2, k=K, init_epochs=30, init_lr=-1.0),
    pair_defaults=lambda teacher, student: (
        {"init_lr": 0.01} if student in LOW_INIT_LR_STUDENTS else {}),
    teacher=TeacherPreparation(
        heads=lambda num_classes, hparams, backbone: Paraphraser(k=hparams.k),
        loss=paraphraser_objective, num_epochs="init_epochs", lr="init_lr", milestones=None),
    bridge=lambda num_data, hparams: TranslatorBridge(p1=hparams.p1, p2=hparams.p2,
                                                      k=hparams.k))
