"""Loss pieces shared by several methods, as small pure functions of arrays."""

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean over rows of −log softmax(logits)[label]  (torch's F.cross_entropy)."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels).mean()


def kl_rows(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float
            ) -> jax.Array:
  """Per-row KL(softmax(t/T) ‖ softmax(s/T)) = Σ_j p_t,j (log p_t,j − log p_s,j), shape [R].

  The teacher side carries no gradient.
  """
  t = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32)) / temperature
  s = student_logits.astype(jnp.float32) / temperature
  log_p_t = jax.nn.log_softmax(t, axis=-1)
  log_p_s = jax.nn.log_softmax(s, axis=-1)
  # xlogy-style: rows where p_t underflows to 0 contribute 0, as torch's kl_div does.
  return jnp.sum(jnp.where(log_p_t > -jnp.inf, jnp.exp(log_p_t) * (log_p_t - log_p_s), 0.0),
                 axis=-1)


def distill_kl(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float
               ) -> jax.Array:
  """Hinton's distillation term, the reference `DistillKL` ("batchmean" with T²):

  L = T² / R · Σ_r KL(softmax(t_r/T) ‖ softmax(s_r/T))
  """
  return temperature ** 2 * kl_rows(student_logits, teacher_logits, temperature).mean()


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """1.0 where the label is among the k largest logits of the row, else 0.0; shape [R]."""
  topk = jax.lax.top_k(logits, k)[1]
  return jnp.any(topk == labels[:, None], axis=-1).astype(jnp.float32)
