"""Building blocks shared by the model zoo: PyTorch-faithful BatchNorm, conv/linear helpers, inits.

Everything here follows PyTorch numerics (see docs/weights.md) so that converted
PyTorch checkpoints reproduce their reference outputs. Layout is NHWC, kernels HWIO.
Every module takes `dtype`, the compute dtype; parameters and BN statistics always stay float32.
"""

import functools
from typing import Any, Callable, Optional, Sequence, Union

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

Dtype = Any
Initializer = Callable[..., jax.Array]

PARAM_DTYPE = jnp.float32

# --- Initialisers (docs/weights.md, "Initialisers") ---------------------------------------------

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
  biased one). Statistics are column sums over all positions (`batch_norm_rows`), so under
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
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), PARAM_DTYPE))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), PARAM_DTYPE))
    scale = self.param("scale", self.scale_init, (features,), PARAM_DTYPE)
    bias = self.param("bias", self.bias_init, (features,), PARAM_DTYPE)

    x32 = jnp.asarray(x, jnp.float32)
    if use_running_average:
      mul = lax.rsqrt(ra_var.value + self.epsilon) * scale
      return jnp.asarray((x32 - ra_mean.value) * mul + bias, self.dtype)

    rows = x32.reshape(-1, features)
    y, mean, var = batch_norm_rows(rows, scale, bias, self.epsilon)
    if not self.is_initializing():
      n = rows.shape[0]
      unbiased = var * (n / max(n - 1, 1))
      ra_mean.value = self.momentum * ra_mean.value + (1.0 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1.0 - self.momentum) * unbiased
    return jnp.asarray(y.reshape(x.shape), self.dtype)


def column_sums(z: jax.Array) -> jax.Array:
  """s_c = Σ_i z[i, c] of a float32 (n, C) matrix.

  On CPU as the matrix-vector product 1ᵀZ: XLA:CPU lowers a sum over a long leading axis to
  strided reduce-windows that read memory 3-5x slower than Eigen's GEMV does (measured in
  experiments/README.md). Other backends keep their own reduction.
  """
  def on_cpu(z):
    return jnp.dot(jnp.ones((1, z.shape[0]), z.dtype), z, precision=lax.Precision.HIGHEST)[0]

  return lax.platform_dependent(z, cpu=on_cpu, default=lambda z: jnp.sum(z, axis=0))


def _batch_norm_rows_forward(x, scale, bias, epsilon):
  n = x.shape[0]
  mean = column_sums(x) / n
  centred = x - mean
  # Two-pass variance: E[x^2]-E[x]^2 loses digits when activations have a large mean. A sum of
  # a product stays a reduction over the rows: XLA fuses the product into it, where a matrix
  # product would first write the product out.
  var = jnp.sum(centred * centred, axis=0) / n
  inv_std = lax.rsqrt(var + epsilon)
  return centred * (inv_std * scale) + bias, mean, var, inv_std


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_rows(x: jax.Array, scale: jax.Array, bias: jax.Array,
                    epsilon: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Training-mode BatchNorm of the rows of x (n, C): (y, mean, var), var biased.

    mean = Σ_i x_i / n,   var = Σ_i (x_i - mean)² / n,   y = (x - mean) r scale + bias,
    r = (var + ε)^(-1/2).

  The gradient is written out, with d = x - mean and g = ∂L/∂y,

    ∂bias = Σ g,   ∂scale = r Σ g d,
    ∂x = scale r (g - ∂bias / n - d r² Σ g d / n) + ∂mean / n + 2 ∂var d / n,

  so that it too reduces over rows of (n, C) matrices, Σ g as `column_sums` (autodiff of the
  forward would reduce over the leading axes of the 4-D activations, which XLA:CPU does slowly).
  """
  y, mean, var, _ = _batch_norm_rows_forward(x, scale, bias, epsilon)
  return y, mean, var


def _batch_norm_rows_fwd(x, scale, bias, epsilon):
  y, mean, var, inv_std = _batch_norm_rows_forward(x, scale, bias, epsilon)
  return (y, mean, var), (x, mean, inv_std, scale)


def _batch_norm_rows_bwd(epsilon, residuals, cotangents):
  del epsilon
  x, mean, inv_std, scale = residuals
  g, g_mean, g_var = cotangents
  n = x.shape[0]
  centred = x - mean
  g_bias = column_sums(g)
  sum_g_centred = jnp.sum(g * centred, axis=0)
  g_x = (scale * inv_std) * (g - g_bias / n - centred * (inv_std * inv_std * sum_g_centred / n))
  g_x = g_x + g_mean / n + (2.0 / n) * g_var * centred
  return g_x, inv_std * sum_g_centred, g_bias


batch_norm_rows.defvjp(_batch_norm_rows_fwd, _batch_norm_rows_bwd)


# --- Convolutions and linear layers -------------------------------------------------------------


def torch_padding(pad: Union[int, Sequence[int]], ndim: int = 2) -> tuple[tuple[int, int], ...]:
  """PyTorch `padding=p` as explicit Flax padding: p zeros before and after on each spatial axis.

  Never 'SAME': for a stride-2 conv on an even map SAME pads (0, 1) where PyTorch pads (1, 1).
  """
  pads = (pad,) * ndim if isinstance(pad, int) else tuple(pad)
  return tuple((int(p), int(p)) for p in pads)


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                         padding: Union[str, Sequence[tuple[int, int]]],
                         **options: Any) -> jax.Array:
  """`lax.conv_general_dilated`, whose kernel gradient on CPU reads the stored input.

  Same values and gradients on every backend; `nn.Conv(conv_general_dilated=...)` calls it.
  In the backward pass XLA:CPU recomputes a convolution's input from its producers (BatchNorm,
  ReLU) inside the transpose that lays it out for the kernel-gradient convolution. That fused
  loop reads memory with a stride of H·W·C floats and runs 4-7x slower than transposing the
  stored input (experiments/README.md). A conditional is opaque to XLA's fusion, so on CPU the
  stored input passes through one on its way to the kernel gradient.
  """
  if not isinstance(padding, str):
    padding = tuple(tuple(int(p) for p in pair) for pair in padding)
  config = (tuple(window_strides), padding) + tuple(sorted(options.items()))
  return _conv_stored_input(lhs, rhs, config)


def _conv(lhs, rhs, config):
  window_strides, padding, *options = config
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, **dict(options))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_stored_input(lhs, rhs, config):
  return _conv(lhs, rhs, config)


def _conv_stored_input_fwd(lhs, rhs, config):
  return _conv(lhs, rhs, config), (lhs, rhs)


def _opaque_copy(x, kernel):
  # Two branches that differ before simplification, so XLA keeps the conditional; the predicate
  # depends on data so it is not folded. Both return x.
  return lax.cond(jnp.isnan(kernel.reshape(-1)[0]), lambda x: x + 0, lambda x: x * 1, x)


def _conv_stored_input_bwd(config, residuals, g):
  lhs, rhs = residuals
  lhs = lax.platform_dependent(lhs, rhs, cpu=_opaque_copy, default=lambda x, kernel: x)
  _, vjp = jax.vjp(lambda x, kernel: _conv(x, kernel, config), lhs, rhs)
  return vjp(g)


_conv_stored_input.defvjp(_conv_stored_input_fwd, _conv_stored_input_bwd)


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
                 bias_init=bias_init, name=name, conv_general_dilated=conv_general_dilated)


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
