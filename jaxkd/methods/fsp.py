"""Flow of Solution Procedure (FSP) matrices as pure functions of NHWC feature maps.

Reference: Yim, Joo, Bae and Kim, "A Gift from Knowledge Distillation: Fast Optimization, Network
Minimization and Transfer Learning", CVPR 2017; RepDistiller's `distiller_zoo/FSP.py` (`FSP`).
RepDistiller passes `feat[:-1]` (f0 stem .. f3, post-ReLU) and uses FSP only in the init stage
(`helper/pretrain.py::init`): the student's feature modules are trained on the unweighted
`sum(loss_group)` for `--init_epochs`, and the distillation stage has `loss_kd = 0`.

FSP needs equal student and teacher channels at every tap: the reference's constructor refuses
other pairs (its README lists FSP as N/A for wrn_40_2 → wrn_40_1), and so does jaxkd, before any work.

Reproduces the reference's numbers (tests/data/golden_baselines.npz, prefix `fsp`).
"""

from typing import Sequence

import jax
import jax.numpy as jnp

from jaxkd.methods.connectors import pool_to_smaller
from jaxkd.methods.base import Method, StudentPreparation, TapNeed
from jaxkd.methods.objective import (WEIGHTS, distillation_objective, equal_channels,
                                     preparation_objective, taps, unequal_channels)


def fsp_matrix(top: jax.Array, bottom: jax.Array) -> jax.Array:
  """The FSP matrix of two consecutive NHWC maps, [B, C_top, C_bottom]:

  G[b, i, j] = mean over (h, w) of top[b, h, w, i] · bottom[b, h, w, j],

  after pooling the spatially larger of the two maps to the smaller one's size.
  """
  bottom, top = pool_to_smaller(bottom.astype(jnp.float32), top.astype(jnp.float32))
  hw = top.shape[1] * top.shape[2]
  return jnp.einsum("bhwi,bhwj->bij", top, bottom) / hw


def fsp_matrices(feats: Sequence[jax.Array]) -> list[jax.Array]:
  """[fsp_matrix(feats[i + 1], feats[i]) for each consecutive pair of taps]."""
  return [fsp_matrix(feats[i + 1], feats[i]) for i in range(len(feats) - 1)]


def fsp_loss(feats_s: Sequence[jax.Array], feats_t: Sequence[jax.Array]
             ) -> tuple[jax.Array, list[jax.Array]]:
  """RepDistiller's `FSP` over paired lists of maps (feat[:-1] in the reference):

  L_i = mean over (b, j, k) of (G_s,i − G_t,i)²  for each consecutive pair i (see `fsp_matrix`);
  returns (Σ_i L_i, [L_i]). The teacher maps are constants. Raises UserError when the channel
  counts differ (runs refuse such pairs before any work: Method.check_pair).
  """
  problem = unequal_channels("FSP", [f.shape[-1] for f in feats_s],
                             [f.shape[-1] for f in feats_t])
  if problem is not None:
    raise ValueError(problem)
  g_s = fsp_matrices(feats_s)
  g_t = fsp_matrices([jax.lax.stop_gradient(f) for f in feats_t])
  group = [jnp.mean(jnp.square(s - t)) for s, t in zip(g_s, g_t)]
  return sum(group[1:], group[0]), group


def fsp_term(student_out, teacher_out, hparams):
  """Σ of the FSP losses of consecutive taps f0..f3 (RepDistiller's feat[:-1])."""
  del hparams
  total, group = fsp_loss(taps(student_out)[:-1], taps(teacher_out)[:-1])
  return total, {f"loss_fsp_{i}": value for i, value in enumerate(group)}


# FSP trains the student's feature layers on its term for init_epochs (stage student_fsp_init,
# lr −1: the student's), then distils with CE alone (RepDistiller: `-r 1 -a 0`, loss_kd = 0).
METHOD = Method(name="fsp", loss=distillation_objective("fsp", None),
                defaults=dict(WEIGHTS, init_epochs=30, init_lr=-1.0),
                student_preparation=StudentPreparation(loss=preparation_objective("fsp", fsp_term)),
                check_pair=equal_channels("FSP", lambda channels: channels[:-1]),
                taps=TapNeed("the stem and stage maps taps[:-1]", lambda taps, h: taps[:-1],
                             at_least=2))
