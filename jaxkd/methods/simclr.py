"""SimCLR (Chen et al., ICML 2020): a self-supervised teacher for EGA, trained by jaxkd.

The `pretrain` stage trains any zoo backbone, without labels, on two independent crop+flip
views of each image (views 'two_crops', rows interleaved image-major: row 2i + k is image i,
view k). A projection head maps the backbone's pooled feature to z; the NT-Xent loss pulls the
two views of an image together against the other 2B − 2 rows of the (global) batch. After the
stage the head is dropped and the backbone's pooled feature is the teacher's embedding.
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxkd.methods.base import Method, Outputs
from jaxkd.methods.numerics import l2_normalize
from jaxkd.models import layers


def nt_xent(z_a: jax.Array, z_b: jax.Array, temperature: float
            ) -> tuple[jax.Array, jax.Array]:
  """NT-Xent, the normalised-temperature cross-entropy of SimCLR, over two views of B images.

  With u = [z_a; z_b] (2B rows, each L2-normalised), s_ij = u_iᵀ u_j / τ and p(i) the other
  view of row i's image (i ± B):

    L = 1/(2B) Σ_i −log( exp(s_i,p(i)) / Σ_{j ≠ i} exp(s_ij) )

  z_a, z_b: [B, D], view a and view b of the same B images, row i of both = image i.
  Returns (L, correct) with correct [2B] = 1.0 where the positive is the most similar other row.
  Over the global batch under jit, as the reference computes it on one device.
  """
  b = z_a.shape[0]
  u = l2_normalize(jnp.concatenate([z_a, z_b], axis=0).astype(jnp.float32))
  sim = u @ u.T / temperature
  self_mask = jnp.eye(2 * b, dtype=bool)
  sim = jnp.where(self_mask, -jnp.inf, sim)  # A row is never its own negative.
  positive = jnp.concatenate([jnp.arange(b, 2 * b), jnp.arange(b)])
  log_prob = jax.nn.log_softmax(sim, axis=-1)
  loss = -jnp.mean(jnp.take_along_axis(log_prob, positive[:, None], axis=-1))
  correct = (jnp.argmax(sim, axis=-1) == positive).astype(jnp.float32)
  return loss, correct


def simclr_loss(student_out: Outputs, teacher_out: None, labels: jax.Array,
                hparams: ml_collections.ConfigDict) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The `Method` loss: NT-Xent on the projections of the interleaved two-crop rows.

  student_out['projection'] is [2B, D] with row 2i + k = image i, view k. Labels are unused.
  """
  del teacher_out, labels
  z = student_out["projection"]
  loss, correct = nt_xent(z[0::2], z[1::2], hparams.temperature)
  return loss, {"loss": loss, "loss_nt_xent": loss, "contrastive_acc": correct.mean()}


class ProjectionHead(nn.Module):
  """SimCLR's projection g(h) = W2 ReLU(W1 h) on the backbone's pooled feature h.

  Linear(d → hidden) → ReLU → Linear(hidden → proj_dim), hidden = d by default, PyTorch init.
  Called as `head(outputs, train=...)`; returns {'projection': z}, leaving 'logits' alone.
  """
  proj_dim: int = 128
  hidden_dim: int = 0  # 0: the width of the tapped feature.
  tap: str = "pooled"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, outputs: Outputs, train: bool = False) -> dict[str, jax.Array]:
    del train
    h = outputs["feats"][self.tap]
    hidden = self.hidden_dim or h.shape[-1]
    x = nn.relu(layers.Linear(hidden, dtype=self.dtype, name="fc1")(h))
    return {"projection": layers.Linear(self.proj_dim, dtype=self.dtype, name="fc2")(x)}


def projection_heads(num_classes: int, hparams: ml_collections.ConfigDict,
                     backbone: Optional[nn.Module] = None) -> nn.Module:
  del num_classes  # No labels are used.
  return ProjectionHead(hparams.proj_dim, hparams.get("proj_hidden_dim", 0))


# The `pretrain` stage: the student network of this "method" is the future teacher.
METHOD = Method(
    name="simclr", loss=simclr_loss, views="two_crops", uses_teacher=False,
    defaults=dict(temperature=0.5, proj_dim=128, proj_hidden_dim=0),
    student_heads=projection_heads)
