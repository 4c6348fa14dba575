"""Building blocks shared by the model zoo: PyTorch-faithful BatchNorm, conv/linear helpers, inits.

Everything here follows PyTorch numerics (see reference/WEIGHTS.md) so that converted
PyTorch checkpoints reproduce their reference outputs. Layout is NHWC, kernels HWIO.
Every module takes `dtype`, the compute dtype; parameters and BN statistics always stay float32.
"""

from typing import Any, Callable, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Initializer = Callable[..., jax.Array]

PARAM_DTYPE = jnp.float32

# --- Initialisers (WEIGHTS.md section 4) -------------------------------------------------------

# kaiming_normal_(mode='fan_out', nonlinearity='relu'): N(0, 2 / (kh*kw*C_out)), untruncated
# (Flax's he_normal is truncated, which shrinks the spread). Also equals the WRN/VGG/MobileNetV2
# rule normal(0, sqrt(2 / (k*k*C_out))).
kaiming_normal_fan_out: Initializer = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# PyTorch's default Conv2d/Linear weight init, kaiming_uniform_(a=sqrt(5)) = U(+-1/sqrt(fan_in)).
torch_default_kernel: Initializer = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

# VGG / MobileNetV2 classifier weights: normal(0, 0.01).
normal_001: Initializer = nn.initializers.normal(0.01)

zeros: Initializer = nn.initializers.zeros
ones: Initializer = nn.initializers.ones


def torch_default_bias(fan_in: int) -> Initializer:
  """PyTorch's default Conv/Linear bias init, U(-1/sqrt(fan_in), +1/sqrt(fan_in)).

  A factory because the bias shape alone does not reveal fan_in.
  """
  bound = 1.0 / float(fan_in) ** 0.5 if fan_in > 0 else 0.0

  def init(key: jax.Array, shape: Sequence[int], dtype: Dtype = PARAM_DTYPE) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


# --- BatchNorm -----------------------------------------------------------------------------------


class BatchNorm(nn.Module):
  """BatchNorm with PyTorch `BatchNorm{1,2}d` semantics over the last (channel) axis.

  y = (x - mu) / sqrt(v + eps) * scale + bias, with (mu, v) = batch mean and *biased* batch
  variance in training, running `mean`/`var` otherwise. The training update is

    mean <- momentum * mean + (1 - momentum) * mu
    var  <- momentum * var  + (1 - momentum) * v * n / (n - 1)

  (n = elements reduced per channel), i.e. PyTorch momentum 0.1 == `momentum=0.9` here, and the
  running variance stores the *unbiased* batch variance as PyTorch does (stock Flax stores the
  biased one). Statistics reduce over every axis but the last with plain `jnp.mean`, so under
  `jax.jit` with the batch sharded over devices they are global-batch statistics.
  Statistics and normalisation run in float32 whatever `dtype` is; the output is cast to `dtype`.
  Variables: params `scale`, `bias`; batch_stats `mean`, `var` (all shape (C,)).
  Running stats are not updated while initialising (as in `flax.linen.BatchNorm`).
  """
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  scale_init: Initializer = ones
  bias_init: Initializer = zeros

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool) -> jax.Array:
    features = x.shape[-1]
    reduce_axes = tuple(range(x.ndim - 1))
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), PARAM_DTYPE))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), PARAM_DTYPE))
    scale = self.param("scale", self.scale_init, (features,), PARAM_DTYPE)
    bias = self.param("bias", self.bias_init, (features,), PARAM_DTYPE)

    x32 = jnp.asarray(x, jnp.float32)
    if use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      mean = jnp.mean(x32, axis=reduce_axes)
      # Two-pass variance: E[x^2]-E[x]^2 loses digits when activations have a large mean.
      var = jnp.mean(jnp.square(x32 - mean), axis=reduce_axes)
      if not self.is_initializing():
        n = 1
        for a in reduce_axes:
          n *= x.shape[a]
        unbiased = var * (n / max(n - 1, 1))
        ra_mean.value = self.momentum * ra_mean.value + (1.0 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1.0 - self.momentum) * unbiased

    mul = jax.lax.rsqrt(var + self.epsilon) * scale
    y = (x32 - mean) * mul + bias
    return jnp.asarray(y, self.dtype)


# --- Convolutions and linear layers -------------------------------------------------------------


def torch_padding(pad: Union[int, Sequence[int]], ndim: int = 2) -> tuple[tuple[int, int], ...]:
  """PyTorch `padding=p` as explicit Flax padding: p zeros before and after on each spatial axis.

  Never 'SAME': for a stride-2 conv on an even map SAME pads (0, 1) where PyTorch pads (1, 1).
  """
  pads = (pad,) * ndim if isinstance(pad, int) else tuple(pad)
  return tuple((int(p), int(p)) for p in pads)


def conv(features: int, kernel_size: int, stride: int = 1, padding: int = 0, *,
         groups: int = 1, use_bias: bool = False, dtype: Dtype = jnp.float32,
         kernel_init: Initializer = kaiming_normal_fan_out,
         bias_init: Initializer = zeros, name: Optional[str] = None) -> nn.Conv:
  """A square `nn.Conv` configured like `torch.nn.Conv2d(k, stride, padding, groups, bias)`.

  Kernel (k, k, C_in/groups, features); output spatial size floor((H + 2p - k) / s) + 1.
  Call it inside a compact method or `setup()` so the conv becomes a submodule there.
  """
  return nn.Conv(features, (kernel_size, kernel_size), strides=(stride, stride),
                 padding=torch_padding(padding), feature_group_count=groups, use_bias=use_bias,
                 dtype=dtype, param_dtype=PARAM_DTYPE, kernel_init=kernel_init,
                 bias_init=bias_init, name=name)


def conv3x3(features: int, stride: int = 1, **kwargs: Any) -> nn.Conv:
  """3x3 conv, PyTorch padding 1 (H_out = ceil(H / stride) for even or odd H), no bias."""
  return conv(features, 3, stride, 1, **kwargs)


def conv1x1(features: int, stride: int = 1, **kwargs: Any) -> nn.Conv:
  """1x1 conv, no padding (VALID), no bias: the projection shortcut of residual blocks."""
  return conv(features, 1, stride, 0, **kwargs)


class Linear(nn.Module):
  """`torch.nn.Linear` on the last axis: y = x @ kernel + bias, kernel (in, out).

  Defaults are PyTorch's: kernel and bias both U(+-1/sqrt(in)). `bias_init=None` means that
  default (it needs fan_in, known only at call time); pass `zeros` for WRN/VGG-style heads.
  """
  features: int
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  kernel_init: Initializer = torch_default_kernel
  bias_init: Optional[Initializer] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    fan_in = x.shape[-1]
    kernel = self.param("kernel", self.kernel_init, (fan_in, self.features), PARAM_DTYPE)
    x = jnp.asarray(x, self.dtype)
    y = jnp.dot(x, jnp.asarray(kernel, self.dtype))
    if self.use_bias:
      bias_init = self.bias_init if self.bias_init is not None else torch_default_bias(fan_in)
      bias = self.param("bias", bias_init, (self.features,), PARAM_DTYPE)
      y = y + jnp.asarray(bias, self.dtype)
    return y


def global_avg_pool(x: jax.Array) -> jax.Array:
  """Spatial mean (N, H, W, C) -> (N, C).

  Equals the zoo's fixed `AvgPool2d(8)` / `avg_pool2d(., 4)` heads at their native 32x32 input,
  and stays a global pool at any other input size (e.g. 8x8 digits).
  """
  return jnp.mean(x, axis=(1, 2))
