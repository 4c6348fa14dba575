"""VID: Variational Information Distillation for knowledge transfer (Ahn et al., CVPR 2019), as
RepDistiller implements it.

Reference: RepDistiller distiller_zoo/VID.py (`VIDLoss`, one per tap), called in
helper/loops.py on the stage maps taps[1:-1] of both networks and summed. For each tap a
regressor predicts the teacher map t (C_t channels) from the student map s by a Gaussian with a
per-channel variance:

  μ = W₃ · ReLU(W₂ · ReLU(W₁ · s))      (three bias-free 1×1 convs, C_s → C_t → C_t → C_t)
  σ² = softplus(α) + ε                   (α = `log_scale` [C_t], ε = 1e-5)
  loss_i = mean over (B, H, W, C) of ½ ((μ − t)² / σ² + log σ²)

with α initialised to log(exp(init_pred_var − ε) − 1), init_pred_var = 5 (σ² starts at 5).
When the heights differ the larger map is average-pooled to the smaller one first (the student
map before the regressor, or the teacher target). The regressors and α are trained with the
student; the teacher maps are constants. RepDistiller's weights (scripts/run_cifar_distill.sh):
`-r 1 -a 0 -b 1`, i.e. L = CE + loss_vid with loss_vid = Σ_i loss_i.

Reproduces the reference's numbers (tests/data/golden_baselines.npz, prefixes vid, vidx).
"""

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd.methods.connectors import pool_to_smaller
from jaxkd.models import layers
from jaxkd.methods.base import Method
from jaxkd.methods.objective import (STAGE_MAPS, WEIGHTS, bridge_term, distillation_objective,
                                     paired_taps)

INIT_PRED_VAR = 5.0
EPS = 1e-5


def vid_loss(mean: jax.Array, log_scale: jax.Array, target: jax.Array, eps: float = EPS
             ) -> jax.Array:
  """mean of ½ ((μ − t)² / σ² + log σ²), σ² = softplus(log_scale) + eps, over all entries.

  mean, target [B, H, W, C]; log_scale [C] (broadcast over the channel axis, the last in NHWC).
  The target is a constant.
  """
  target = jax.lax.stop_gradient(target.astype(jnp.float32))
  pred_var = jax.nn.softplus(log_scale.astype(jnp.float32)) + eps
  neg_log_prob = 0.5 * (jnp.square(mean.astype(jnp.float32) - target) / pred_var
                        + jnp.log(pred_var))
  return jnp.mean(neg_log_prob)


def log_scale_init(init_pred_var: float = INIT_PRED_VAR, eps: float = EPS):
  """Initialiser of α: the constant log(exp(init_pred_var − eps) − 1) (in float64, then stored
  as float32, as the reference does), so that softplus(α) + eps = init_pred_var."""
  value = math.log(math.exp(init_pred_var - eps) - 1.0)

  def init(key: jax.Array, shape, dtype=layers.PARAM_DTYPE) -> jax.Array:
    del key
    return jnp.full(shape, value, dtype)

  return init


class VIDRegressor(nn.Module):
  """One tap's VIDLoss: `regressor(s, t)` -> loss_i (see the module docstring).

  Submodules `regressor_0`, `regressor_2`, `regressor_4` (bias-free 1×1 convs, PyTorch default
  init, the names of the reference's Sequential indices) and the param `log_scale` [C_t].
  """
  init_pred_var: float = INIT_PRED_VAR
  eps: float = EPS

  @nn.compact
  def __call__(self, s: jax.Array, t: jax.Array) -> jax.Array:
    s, t = pool_to_smaller(s.astype(jnp.float32), jax.lax.stop_gradient(t.astype(jnp.float32)))
    channels = t.shape[-1]

    def conv1x1(name):
      return layers.conv1x1(channels, kernel_init=layers.torch_default_kernel, name=name)

    mean = conv1x1("regressor_0")(s)
    mean = conv1x1("regressor_2")(nn.relu(mean))
    mean = conv1x1("regressor_4")(nn.relu(mean))
    log_scale = self.param("log_scale", log_scale_init(self.init_pred_var, self.eps),
                           (channels,), layers.PARAM_DTYPE)
    return vid_loss(mean, log_scale, t, self.eps)


class VIDBridge(nn.Module):
  """VID's regressors as a bridge: `bridge(student_out, teacher_out, batch, train)` ->
  {'loss_vid': Σ_i loss_i, 'loss_vid_<i>': loss_i}, i = 0, 1, ... over the stage taps
  taps[1:-1] of both networks (submodules `vid_<i>`, `VIDRegressor`s). No batch statistics.
  `teacher_out` is required (also at init: the teacher's channels size the regressors).
  """
  init_pred_var: float = INIT_PRED_VAR
  eps: float = EPS

  @nn.compact
  def __call__(self, student_out: Any, teacher_out: Optional[Any], batch: Optional[Any] = None,
               train: bool = False) -> dict[str, jax.Array]:
    del batch, train
    taps_s, taps_t = paired_taps(student_out, teacher_out, "VIDBridge")
    g_s, g_t = taps_s[1:-1], taps_t[1:-1]
    if len(g_s) != len(g_t):
      raise ValueError(f"{len(g_s)} student stage taps but {len(g_t)} teacher stage taps")
    out = {}
    for i, (s, t) in enumerate(zip(g_s, g_t)):
      out[f"loss_vid_{i}"] = VIDRegressor(self.init_pred_var, self.eps, name=f"vid_{i}")(s, t)
    out["loss_vid"] = sum(out[f"loss_vid_{i}"] for i in range(len(g_s)))
    return out


METHOD = Method(name="vid", loss=distillation_objective("vid", bridge_term("loss_vid")),
                defaults=dict(WEIGHTS, feat_weight=1.0, init_pred_var=INIT_PRED_VAR, eps=EPS),
                bridge=lambda num_data, hparams: VIDBridge(init_pred_var=hparams.init_pred_var,
                                                           eps=hparams.eps),
                taps=STAGE_MAPS)
