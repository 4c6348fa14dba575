"""OFD: a comprehensive overhaul of feature distillation (Heo, Kim, Yun, Park, Kwak and Choi,
ICCV 2019).

As mdistiller implements it (megvii-research/mdistiller @ a08d46f10d6102bd6e3f258ca5ac880b020ea259,
mdistiller/distillers/OFD.py: `OFD`, `ConnectorConvBN`, `feat_loss`). OFD reads the stage maps of
both networks *before* their last ReLU (mdistiller's `preact_feats[1:]`). Each student map
passes a connector, conv k×k (padding (k − 1)/2, no bias) + BN to the teacher's channels,
trained with the student; the teacher's map is average-pooled to the student's size (torch's
`adaptive_avg_pool2d`) and is a constant. Per channel c the margin m_c is the expected value of
the teacher's response where it is negative, read from the BatchNorm before the ReLU (scale γ,
bias β), its response modelled as N(β, γ²) with s = |γ|:

  m_c = β − s · φ(β/s) / Φ(−β/s)   if Φ(−β/s) > 0.001,   else −3s

(φ, Φ the standard normal density and CDF; computed once in float64 from the frozen teacher).
The partial L2 distance between the connected student map s and the teacher map t is

  d(s, t) = (s − m)² · 1[s > m ∧ t ≤ m] + (s − t)² · 1[s > t ∧ m < t ≤ 0] + (s − t)² · 1[t > 0]

reduced by a mean over the batch and a sum over positions and channels, and with n stage maps

  L_OFD = Σ_i d_i / 2^(n − 1 − i),   L = ce_weight · CE + feat_weight · L_OFD.

Defaults are mdistiller's CIFAR-100 config (`CFG.OFD`, configs/cifar100/ofd.yaml: CE 1, feature
weight 0.001, connector kernel 1). Reference behaviour followed: `OFD.train()` puts the teacher in
training mode too, so its BatchNorms use the batch's statistics (Method.teacher_train_mode); the
margins take |γ|; the connectors are initialised N(0, 2 / (k²·C_t)), BN 1/0; when the two networks
have different numbers of stage maps the last ones are paired (`_align_list`). Where jaxkd
differs: mdistiller takes the margins of the teacher's first BNs whatever taps it keeps, which
only works when the teacher has no more stage maps than the student; here the margins follow the
kept teacher taps. The BatchNorm each family puts before a stage's last ReLU is a fact of the
model (`jaxkd.models.bn_before_relu`); mdistiller has none for ShuffleNets (a ShuffleV2 teacher is
refused; ShuffleV1 uses jaxkd's rule, see jaxkd/models/shufflenetv1.py), and its ImageNet ResNets
list stages 2–4 only (here every stage map both networks give is paired). A BN scale of 0 gives
the limit min(β, 0) where the reference divides by zero. The reference's numbers are reproduced in
tests (tests/data/golden_modern.npz, prefix ofd).
"""

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxkd import models
from jaxkd.errors import UserError
from jaxkd.methods.base import Method, Outputs, TapNeed
from jaxkd.methods.connectors import adaptive_avg_pool2d
from jaxkd.methods.losses import cross_entropy, topk_correct
from jaxkd.methods.objective import paired_taps
from jaxkd.models import layers

# mdistiller's CFG.OFD (configs/cifar100/ofd.yaml overrides none of it).
DEFAULTS = dict(ce_weight=1.0, feat_weight=0.001, kernel_size=1)

# Φ(−β/s) at or below which the margin is −3s.
MARGIN_CDF_CUT = 0.001


def ofd_margin(scale: Any, bias: Any, cdf_cut: float = MARGIN_CDF_CUT) -> np.ndarray:
  """The margins m_c of one BatchNorm's (scale γ, bias β), float64 arithmetic, float32 result:
  β − s·φ(β/s)/Φ(−β/s) where Φ(−β/s) > `cdf_cut`, else −3s, with s = |γ| (min(β, 0) at s = 0)."""
  margins = []
  for gamma, beta in zip(np.asarray(scale, np.float64).ravel(),
                         np.asarray(bias, np.float64).ravel()):
    s, m = abs(float(gamma)), float(beta)
    if s == 0.0:
      margins.append(min(m, 0.0))
      continue
    cdf = 0.5 * math.erfc((m / s) / math.sqrt(2.0))          # Φ(−m/s)
    if cdf > cdf_cut:
      density = math.exp(-((m / s) ** 2) / 2) / math.sqrt(2 * math.pi)
      margins.append(-s * density / cdf + m)
    else:
      margins.append(-3 * s)
  return np.asarray(margins, np.float32)


def teacher_margins(teacher_name: str, teacher_variables: Any,
                    hparams: ml_collections.ConfigDict) -> dict[str, list[np.ndarray]]:
  """Method.teacher_constants of OFD: {'margins': [m per stage map of the teacher]}, from the
  BatchNorm before each stage's last ReLU (`jaxkd.models.bn_before_relu`)."""
  del hparams
  bns = models.bn_before_relu(teacher_name, teacher_variables)
  return {"margins": [ofd_margin(_host(bn["scale"]), _host(bn["bias"])) for bn in bns]}


def _host(x: Any) -> np.ndarray:
  """A replicated array's value on the host (from this process's first shard when the array
  spans several processes)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = x.addressable_data(0)
  return np.asarray(x)


def feat_loss(source: jax.Array, target: jax.Array, margin: jax.Array) -> jax.Array:
  """mdistiller's `feat_loss`: d(s, t) (module docstring) on NHWC maps of one shape, summed over
  all entries and divided by the batch size; `margin` [C] broadcasts over the channels, the
  target is a constant."""
  s = source.astype(jnp.float32)
  t = jax.lax.stop_gradient(target.astype(jnp.float32))
  m = jnp.asarray(margin, jnp.float32)
  loss = (jnp.square(s - m) * ((s > m) & (t <= m))
          + jnp.square(s - t) * ((s > t) & (t > m) & (t <= 0))
          + jnp.square(s - t) * (t > 0))
  return jnp.sum(jnp.abs(loss)) / s.shape[0]


def ofd_loss(sources: Sequence[jax.Array], targets: Sequence[jax.Array],
             margins: Sequence[jax.Array]) -> tuple[jax.Array, list[jax.Array]]:
  """(Σ_i d_i / 2^(n − 1 − i), [d_i]) over the n connected student maps, each teacher map
  pooled to its student map's size."""
  if not len(sources) == len(targets) == len(margins):
    raise ValueError(f"{len(sources)} student maps, {len(targets)} teacher maps and "
                     f"{len(margins)} margins")
  n = len(sources)
  parts = [feat_loss(s, adaptive_avg_pool2d(t, s.shape[1:3]), m)
           for s, t, m in zip(sources, targets, margins)]
  return sum(d / 2.0 ** (n - 1 - i) for i, d in enumerate(parts)), parts


class ConnectorConvBN(nn.Module):
  """mdistiller's connector: conv k×k (stride 1, padding (k − 1)/2, no bias) `conv` + BN `bn`
  to `features` channels; conv N(0, 2 / (k²·features)), BN 1/0. BN with batch statistics when
  `train`."""
  features: int
  kernel_size: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    k = self.kernel_size
    y = layers.conv(self.features, k, 1, (k - 1) // 2, name="conv")(x.astype(jnp.float32))
    return layers.BatchNorm(name="bn")(y, use_running_average=not train)


class OFDBridge(nn.Module):
  """OFD's connectors and loss as a bridge: `bridge(student_out, teacher_out, batch, train)` ->
  {'loss_ofd': L_OFD, 'ofd_feat_loss': [d_i], 'ofd_connector_out': [connected maps]}.

  The caller gives pre-activation taps of both networks, and the teacher's margins as
  `teacher_out['constants']['margins']` (one [C] per teacher stage map; see teacher_margins).
  Submodules `connectors_<i>` (ConnectorConvBN) over the last n = min(#student, #teacher) stage
  maps; their widths come from the taps, so `teacher_out` is needed at initialisation too (the
  margins are not: it then only creates the connectors).
  """
  kernel_size: int = 1

  @nn.compact
  def __call__(self, student_out: Any, teacher_out: Optional[Any], batch: Optional[Any] = None,
               train: bool = False) -> dict[str, Any]:
    del batch
    taps_s, taps_t = paired_taps(student_out, teacher_out, "OFDBridge")
    g_s, g_t = taps_s[1:-1], taps_t[1:-1]
    n = min(len(g_s), len(g_t))
    kept_s, kept_t = g_s[len(g_s) - n:], g_t[len(g_t) - n:]
    connected = [ConnectorConvBN(t.shape[-1], self.kernel_size, name=f"connectors_{i}")(s, train)
                 for i, (s, t) in enumerate(zip(kept_s, kept_t))]
    constants = teacher_out.get("constants")
    if constants is None:
      if self.is_initializing():
        return {}
      raise ValueError("OFDBridge needs the teacher's margins as teacher_out['constants']"
                       "['margins'] (Method.teacher_constants, given to steps.train_step as "
                       "teacher_constants=)")
    margins = list(constants["margins"])
    if len(margins) != len(g_t):
      raise ValueError(f"{len(margins)} margins for {len(g_t)} teacher stage maps")
    loss, parts = ofd_loss(connected, kept_t, margins[len(margins) - n:])
    return {"loss_ofd": loss, "ofd_feat_loss": parts, "ofd_connector_out": connected}


def ofd_objective(student_out: Outputs, teacher_out: Outputs, labels: jax.Array,
                  hparams: ml_collections.ConfigDict) -> tuple[jax.Array, dict[str, jax.Array]]:
  """L = ce_weight · CE + feat_weight · L_OFD (the bridge's `loss_ofd`). Metrics: loss, loss_ce,
  loss_ofd (unweighted), top1."""
  del teacher_out
  logits = student_out["logits"]
  loss_ce = cross_entropy(logits, labels)
  loss_ofd = student_out["loss_ofd"]
  loss = hparams.ce_weight * loss_ce + hparams.feat_weight * loss_ofd
  return loss, {"loss": loss, "loss_ce": loss_ce, "loss_ofd": loss_ofd,
                "top1": topk_correct(logits, labels, 1).mean()}


def check_hparams(hparams: ml_collections.ConfigDict) -> None:
  """The connector's kernel must be a positive odd size (its padding keeps the map's size)."""
  k = hparams.kernel_size
  if not (isinstance(k, int) and k >= 1 and k % 2 == 1):
    raise UserError(f"method.kernel_size={k!r} must be a positive odd integer (the connector's "
                    f"padding (k - 1)/2 keeps the map's size); set e.g. "
                    f"--config.method.kernel_size={DEFAULTS['kernel_size']}")


def check_pair(teacher: str, student: str, num_classes: int) -> None:
  """A teacher whose BatchNorms before its stages' last ReLUs are unknown is refused."""
  del student, num_classes
  if models.bn_before_relu_paths(teacher) is None:
    raise UserError(
        f"OFD reads its margins from the BatchNorm before each stage's last ReLU of the "
        f"teacher, and teacher {teacher!r} has none listed (mdistiller does not support it as "
        f"an OFD teacher either); choose another teacher, or register the network with "
        f"jaxkd.models.register(..., bn_before_relu=...)")


def bridge(num_data: int, hparams: ml_collections.ConfigDict) -> nn.Module:
  """The connectors, trained with the student."""
  del num_data
  return OFDBridge(kernel_size=int(hparams.kernel_size))


# The stage maps of both networks, before their last ReLU; the first ones of the longer list
# are left out, so the counts may differ.
STAGE_MAPS_ALIGNED = TapNeed("the stage maps taps[1:-1]", lambda taps, h: taps[1:-1])

METHOD = Method(name="ofd", loss=ofd_objective, defaults=DEFAULTS, bridge=bridge, preact=True,
                taps=STAGE_MAPS_ALIGNED, teacher_train_mode=True, teacher_constants=teacher_margins,
                check_hparams=check_hparams, check_pair=check_pair)
