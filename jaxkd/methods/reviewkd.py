"""ReviewKD: distilling knowledge via knowledge review (Chen, Liu, Zhao and Jia, CVPR 2021).

As mdistiller implements it (megvii-research/mdistiller @ a08d46f10d6102bd6e3f258ca5ac880b020ea259,
mdistiller/distillers/ReviewKD.py: `ReviewKD`, `ABF`, `hcl_loss`). The student's stage maps
f_1 … f_n (after their ReLU; mdistiller's `STU_PREACT` False) and its pooled vector f_{n+1}
(a 1×1 map) are reviewed from coarse to fine by attention-based fusion (ABF) modules, one per
level, trained with the student. With r_{n+2} = none, for k = n+1 … 1:

  x   = BN(conv1×1(f_k))                                (to `mid` channels)
  x   = x·a_0 + u·a_1,  a = σ(conv1×1([x, u])),          (k ≤ n: fusion with the coarser
        u = nearest(r_{k+1}, size of f_k)                  level)
  x   = nearest(x, size of the teacher's level k)        (when the sizes differ)
  r_k = x,   y_k = BN(conv3×3(x))                        (to the teacher's channels)

with mid = min(512, width of f_{n+1}). The teacher's levels t_1 … t_n are its stage maps
*before* their last ReLU (mdistiller's `preact_feats[1:]`) and t_{n+1} its pooled vector. The
hierarchical context loss compares each level at full size and pooled (`hcl_loss`):

  hcl = Σ_k [ mse(y_k, t_k) + Σ_j w_j · mse(P_l_j(y_k), P_l_j(t_k)) ] / (1 + Σ_j w_j)

over the sizes l ∈ (4, 2, 1) smaller than the level's height, w = ½, ¼, ⅛ in that order, P_l
torch's `adaptive_avg_pool2d` to l×l (overlapping windows when l does not divide the size).
The objective is

  L = ce_weight · CE + reviewkd_weight · min(epoch / warmup_epochs, 1) · hcl

with the 1-based epoch. Defaults are mdistiller's CIFAR-100 config (`CFG.REVIEWKD` +
configs/cifar100/reviewkd.yaml: CE 1, weight 5, warm-up 20 epochs). mdistiller configures the
channels and sizes per pair (`IN_CHANNELS`, `OUT_CHANNELS`, `SHAPES`, `OUT_SHAPES`); here they
are read from the two networks' taps. Reference behaviour followed: the student's stem tap is
never read; the last ABF built (the pooled level) has no attention conv; the residual handed on
is taken after the resize to the teacher's size; the nearest interpolation is torch's legacy
one, source index floor(i · in / out); mdistiller reads `MAX_MID_CHANNEL` but uses 512
(`max_mid_channel`, default 512, is that constant). The reference's numbers are reproduced in
tests (tests/data/golden_modern.npz, prefix reviewkd).
"""

from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxkd.errors import UserError
from jaxkd.methods.base import Method, Outputs
from jaxkd.methods.connectors import adaptive_avg_pool2d, torch_conv2d
from jaxkd.methods.losses import cross_entropy, topk_correct
from jaxkd.methods.objective import STAGE_MAPS, paired_taps
from jaxkd.models import layers

# mdistiller's CFG.REVIEWKD with configs/cifar100/reviewkd.yaml (REVIEWKD_WEIGHT 5).
DEFAULTS = dict(ce_weight=1.0, reviewkd_weight=5.0, warmup_epochs=20, max_mid_channel=512)

# The pooled sizes of hcl_loss, each used when smaller than the level's height.
HCL_SIZES = (4, 2, 1)

# kaiming_uniform_(a=1) of ABF's two convs: U(±sqrt(3 / fan_in)).
kaiming_uniform_a1 = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")


def nearest_index(size_in: int, size_out: int) -> np.ndarray:
  """torch's legacy 'nearest' source indices: min(floor(i · (in / out)), in − 1), the scale a
  float32 as torch computes it."""
  if size_in == size_out:
    return np.arange(size_out)
  scale = np.float32(size_in) / np.float32(size_out)
  index = np.floor(np.arange(size_out, dtype=np.float32) * scale).astype(np.int64)
  return np.minimum(index, size_in - 1)


def nearest_resize(x: jax.Array, out_hw: Sequence[int]) -> jax.Array:
  """`F.interpolate(x, out_hw, mode='nearest')` on an NHWC map."""
  (h, w), (oh, ow) = x.shape[1:3], tuple(int(d) for d in out_hw)
  if (h, w) == (oh, ow):
    return x
  x = jnp.take(x, nearest_index(h, oh), axis=1)
  return jnp.take(x, nearest_index(w, ow), axis=2)


def hcl_level(f_s: jax.Array, f_t: jax.Array) -> jax.Array:
  """One level of the hierarchical context loss on NHWC maps of equal shape:
  [mse(f_s, f_t) + Σ_j w_j mse(P_l(f_s), P_l(f_t))] / (1 + Σ_j w_j), l ∈ HCL_SIZES below the
  height, w_j = 2^−(j+1)."""
  f_s, f_t = f_s.astype(jnp.float32), f_t.astype(jnp.float32)
  loss = jnp.mean(jnp.square(f_s - f_t))
  weight, total = 1.0, 1.0
  for size in HCL_SIZES:
    if size >= f_s.shape[1]:
      continue
    weight /= 2.0
    pooled_s = adaptive_avg_pool2d(f_s, (size, size))
    pooled_t = adaptive_avg_pool2d(f_t, (size, size))
    loss = loss + weight * jnp.mean(jnp.square(pooled_s - pooled_t))
    total += weight
  return loss / total


def hcl_loss(students: Sequence[jax.Array], teachers: Sequence[jax.Array]) -> jax.Array:
  """mdistiller's `hcl_loss`: Σ_k hcl_level(y_k, t_k) over the paired levels (fine → coarse);
  the teacher's maps are constants."""
  if len(students) != len(teachers):
    raise ValueError(f"{len(students)} fused levels but {len(teachers)} teacher levels")
  return sum(hcl_level(s, jax.lax.stop_gradient(t)) for s, t in zip(students, teachers))


def warmup_factor(epoch: Union[int, jax.Array], warmup_epochs: Union[int, float]) -> jax.Array:
  """min(epoch / warmup_epochs, 1), `epoch` 1-based as mdistiller's trainer counts it."""
  return jnp.minimum(jnp.asarray(epoch, jnp.float32) / warmup_epochs, 1.0)


class ABF(nn.Module):
  """One attention-based fusion module: `abf(x, residual, out_hw, train)` -> (y, r).

  x [B, h, w, C_in] is the student's level, `residual` the coarser level's r (None for the
  module that does not fuse, `fuse` False), `out_hw` the teacher level's (H, W). Submodules
  named as the reference's Sequentials: `conv1_0` (1×1, no bias) and `conv1_1` (BN) to `mid`
  channels, `att_conv_0` (1×1 with bias, 2·mid → 2) when fusing, `conv2_0` (3×3, padding 1, no
  bias) and `conv2_1` (BN) to `out_channels`. BNs use batch statistics when `train`.
  """
  mid_channels: int
  out_channels: int
  fuse: bool

  @nn.compact
  def __call__(self, x: jax.Array, residual: Optional[jax.Array], out_hw: Sequence[int],
               train: bool = False) -> tuple[jax.Array, jax.Array]:
    x = x.astype(jnp.float32)
    x = layers.conv(self.mid_channels, 1, kernel_init=kaiming_uniform_a1, name="conv1_0")(x)
    x = layers.BatchNorm(name="conv1_1")(x, use_running_average=not train)
    if self.fuse:
      y = nearest_resize(residual, x.shape[1:3])
      z = torch_conv2d(2, (1, 1), 2 * self.mid_channels, name="att_conv_0")(
          jnp.concatenate([x, y], axis=-1))
      z = jax.nn.sigmoid(z)
      x = x * z[..., 0:1] + y * z[..., 1:2]
    x = nearest_resize(x, out_hw)
    out = layers.conv(self.out_channels, 3, 1, 1, kernel_init=kaiming_uniform_a1,
                      name="conv2_0")(x)
    out = layers.BatchNorm(name="conv2_1")(out, use_running_average=not train)
    return out, x


def levels(out: Outputs) -> list[jax.Array]:
  """A network's ReviewKD levels, fine → coarse: its stage maps taps[1:-1], then its pooled
  vector as a 1×1 map."""
  taps = list(out["feats"].values())
  pooled = taps[-1]
  return list(taps[1:-1]) + [pooled.reshape(pooled.shape[0], 1, 1, pooled.shape[-1])]


class ReviewKDBridge(nn.Module):
  """The ABFs and the hierarchical context loss as a bridge:
  `bridge(student_out, teacher_out, batch, train)` -> {'loss_hcl', 'reviewkd_results' (y_1 …
  y_{n+1}, fine → coarse), 'reviewkd_abf_out', 'reviewkd_abf_res' (each module's y and r, in
  module order)}.

  The caller gives the student's post-ReLU and the teacher's pre-activation taps. Submodules
  `abfs_<k>`, k = 0 the pooled level … n the finest stage (the reference's `abfs` order); their
  widths come from the taps (`teacher_out` is needed at initialisation as well).
  """
  max_mid_channel: int = 512

  @nn.compact
  def __call__(self, student_out: Any, teacher_out: Optional[Any], batch: Optional[Any] = None,
               train: bool = False) -> dict[str, Any]:
    del batch
    paired_taps(student_out, teacher_out, "ReviewKDBridge")
    students = levels(student_out)
    teachers = [jax.lax.stop_gradient(t) for t in levels(teacher_out)]
    if len(students) != len(teachers):
      raise ValueError(f"ReviewKD pairs the levels one to one: {len(students)} student and "
                       f"{len(teachers)} teacher levels")
    mid = min(self.max_mid_channel, students[-1].shape[-1])
    outs, residuals = [], []
    residual = None
    for k, (x, t) in enumerate(zip(students[::-1], teachers[::-1])):
      abf = ABF(mid, t.shape[-1], fuse=k > 0, name=f"abfs_{k}")
      y, residual = abf(x, residual, t.shape[1:3], train)
      outs.append(y)
      residuals.append(residual)
    results = outs[::-1]
    return {"loss_hcl": hcl_loss(results, teachers), "reviewkd_results": results,
            "reviewkd_abf_out": outs, "reviewkd_abf_res": residuals}


def reviewkd_objective(student_out: Outputs, teacher_out: Outputs, labels: jax.Array,
                       hparams: ml_collections.ConfigDict
                       ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """L = ce_weight · CE + reviewkd_weight · min(epoch / warmup_epochs, 1) · hcl (the bridge's
  `loss_hcl`), with the 1-based epoch of the step. Metrics: loss, loss_ce, loss_hcl
  (unweighted), loss_reviewkd (weighted, mdistiller's `loss_kd`), reviewkd_warmup, top1."""
  del teacher_out
  logits = student_out["logits"]
  loss_ce = cross_entropy(logits, labels)
  ramp = warmup_factor(student_out["epoch"], hparams.warmup_epochs)
  loss_hcl = student_out["loss_hcl"]
  loss_reviewkd = hparams.reviewkd_weight * ramp * loss_hcl
  loss = hparams.ce_weight * loss_ce + loss_reviewkd
  return loss, {"loss": loss, "loss_ce": loss_ce, "loss_hcl": loss_hcl,
                "loss_reviewkd": loss_reviewkd, "reviewkd_warmup": ramp,
                "top1": topk_correct(logits, labels, 1).mean()}


def check_hparams(hparams: ml_collections.ConfigDict) -> None:
  """The warm-up divides the epoch and the fusion width must hold a channel."""
  if not hparams.warmup_epochs > 0:
    raise UserError(f"method.warmup_epochs={hparams.warmup_epochs!r} must be > 0 (the weight "
                    f"ramps as epoch / warmup_epochs); set e.g. "
                    f"--config.method.warmup_epochs={DEFAULTS['warmup_epochs']}")
  if not int(hparams.max_mid_channel) >= 1:
    raise UserError(f"method.max_mid_channel={hparams.max_mid_channel!r} must be ≥ 1; set e.g. "
                    f"--config.method.max_mid_channel={DEFAULTS['max_mid_channel']}")


def bridge(num_data: int, hparams: ml_collections.ConfigDict) -> nn.Module:
  """The ABF modules, trained with the student."""
  del num_data
  return ReviewKDBridge(max_mid_channel=int(hparams.max_mid_channel))


# Student taps after their ReLU, the teacher's before it (mdistiller: STU_PREACT False, the
# teacher's `preact_feats`); one level per stage map plus the pooled vector, paired one to one.
METHOD = Method(name="reviewkd", loss=reviewkd_objective, defaults=DEFAULTS, bridge=bridge,
                taps=STAGE_MAPS, preact=False, teacher_preact=True, check_hparams=check_hparams)
