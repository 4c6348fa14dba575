"""Shape adapters between a student's and a teacher's feature maps, for the RepDistiller baselines.

RepDistiller (HobbitLong/RepDistiller, models/util.py) attaches small trained modules to some of
its losses; the one shared by several methods is `ConvReg`, the convolutional regressor of
FitNet (Romero et al., ICLR 2015) that AB's `Connector` reuses without its ReLU. It maps a
student map [B, s_H, s_W, s_C] to the teacher's [B, t_H, t_W, t_C] with one of three layers,
chosen from the spatial sizes:

  s_H = 2·t_H:  Conv2d(3×3, stride 2, padding 1)
  2·s_H = t_H:  ConvTranspose2d(4×4, stride 2, padding 1)
  s_H ≥ t_H:    Conv2d(kernel (1 + s_H − t_H) × (1 + s_W − t_W), stride 1, no padding)

followed by BatchNorm and ReLU. Also here: a PyTorch-faithful `ConvTranspose` and the
`adaptive_avg_pool2d` / `pool_to_smaller` with which AT, NST, FSP, VID and FT shrink the larger
of two maps.

Layouts are NHWC, kernels HWIO. A transposed convolution's kernel is stored as
(kH, kW, out, in) = torch's (in, out, kH, kW) weight transposed (2, 3, 1, 0), the same
transposition as a Conv2d weight (OIHW → HWIO); with this layout PyTorch's default init,
U(±1/sqrt(fan_in)) with fan_in = out·kH·kW, is `layers.torch_default_kernel`.
"""

from typing import Optional, Sequence

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from jaxkd.models import layers


def torch_conv2d(features: int, kernel_size: Sequence[int], in_features: int, stride: int = 1,
                 padding: int = 0, name: Optional[str] = None) -> nn.Conv:
  """`torch.nn.Conv2d(in_features, features, kernel_size, stride, padding)` with its bias and its
  default init: kernel and bias U(±1/sqrt(fan_in)), fan_in = in_features·kH·kW.

  Kernel (kH, kW, in_features, features). Call it inside a compact method or `setup()`.
  """
  kh, kw = kernel_size
  return nn.Conv(features, (kh, kw), strides=(stride, stride),
                 padding=layers.torch_padding(padding), use_bias=True,
                 param_dtype=layers.PARAM_DTYPE, kernel_init=layers.torch_default_kernel,
                 bias_init=layers.torch_default_bias(in_features * kh * kw), name=name,
                 conv_general_dilated=layers.conv_general_dilated)


class ConvTranspose(nn.Module):
  """`torch.nn.ConvTranspose2d(in, features, kernel_size, stride, padding)` (output_padding 0).

  Output size (H − 1)·stride − 2·padding + kernel_size. Computed as a regular convolution of the
  input dilated by `stride` (zeros between the pixels), padded by kernel_size − 1 − padding on
  each side, with the kernel flipped in space and its channel axes swapped:

    y = conv(dilate_s(x), K[::-1, ::-1].swapaxes(2, 3)) + bias

  Params: `kernel` (k, k, features, in) = torch weight (in, features, k, k) transposed
  (2, 3, 1, 0); `bias` (features,). Init as PyTorch's: both U(±1/sqrt(features·k²)).
  """
  features: int
  kernel_size: int
  stride: int = 1
  padding: int = 0
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, s, p = self.kernel_size, self.stride, self.padding
    if k - 1 - p < 0:
      raise ValueError(f"padding {p} larger than kernel_size - 1 = {k - 1}")
    kernel = self.param("kernel", layers.torch_default_kernel,
                        (k, k, self.features, x.shape[-1]), layers.PARAM_DTYPE)
    x = x.astype(jnp.float32)
    hwio = jnp.swapaxes(kernel[::-1, ::-1], 2, 3)
    y = layers.conv_general_dilated(
        x, hwio, (1, 1), ((k - 1 - p, k - 1 - p),) * 2, lhs_dilation=(s, s),
        rhs_dilation=(1, 1), dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=1, precision=None)
    if self.use_bias:
      bias = self.param("bias", layers.torch_default_bias(self.features * k * k),
                        (self.features,), layers.PARAM_DTYPE)
      y = y + bias
    return y


def conv_reg_layer(s_hw: Sequence[int], t_hw: Sequence[int]
                   ) -> tuple[str, tuple[int, int], int, int]:
  """Which layer `ConvReg` uses between spatial sizes s_hw = (s_H, s_W) and t_hw = (t_H, t_W):
  (kind 'conv' or 'transpose', kernel (kH, kW), stride, padding), decided on the heights as
  the reference decides it (see the module docstring). Raises ValueError when s_H < t_H is not
  a factor 2 (the reference has no layer for it either)."""
  (s_h, s_w), (t_h, t_w) = s_hw, t_hw
  if s_h == 2 * t_h:
    return "conv", (3, 3), 2, 1
  if 2 * s_h == t_h:
    return "transpose", (4, 4), 2, 1
  if s_h >= t_h:
    return "conv", (1 + s_h - t_h, 1 + s_w - t_w), 1, 0
  raise ValueError(f"no ConvReg layer from student size {s_h} to teacher size {t_h}")


class ConvReg(nn.Module):
  """RepDistiller's ConvReg: y = ReLU(BN(layer(x))) (without the ReLU if not `use_relu`).

  Called as `regress(x, target_shape, train)` with x the student map [B, s_H, s_W, s_C] and
  `target_shape` the teacher map's NHWC shape (only its last three entries (t_H, t_W, t_C) are
  read); `layer` is chosen by `conv_reg_layer`. Returns [B, t_H, t_W, t_C] (for the 3×3 stride-2
  branch the width follows from the height rule, as in the reference).

  Submodules `conv` (kernel, bias; PyTorch default init, the transposed layout of
  `ConvTranspose` in the 2·s_H = t_H branch) and `bn` (`layers.BatchNorm`, batch statistics
  when `train`, PyTorch momentum 0.1).
  """
  use_relu: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, target_shape: Sequence[int], train: bool = False
               ) -> jax.Array:
    t_h, t_w, t_c = (int(d) for d in tuple(target_shape)[-3:])
    x = x.astype(jnp.float32)
    kind, kernel, stride, pad = conv_reg_layer(x.shape[1:3], (t_h, t_w))
    if kind == "transpose":
      y = ConvTranspose(t_c, kernel[0], stride, pad, name="conv")(x)
    else:
      y = torch_conv2d(t_c, kernel, x.shape[-1], stride, pad, name="conv")(x)
    y = layers.BatchNorm(name="bn")(y, use_running_average=not train)
    return nn.relu(y) if self.use_relu else y


def _pool_matrix(size_in: int, size_out: int) -> jax.Array:
  """P [size_out, size_in]: row i averages input positions floor(i·n/o) .. ceil((i+1)·n/o) − 1."""
  rows = []
  for i in range(size_out):
    start = (i * size_in) // size_out
    end = -((-(i + 1) * size_in) // size_out)
    rows.append([1.0 / (end - start) if start <= j < end else 0.0 for j in range(size_in)])
  return jnp.asarray(rows, jnp.float32)


def adaptive_avg_pool2d(x: jax.Array, out_hw: Sequence[int]) -> jax.Array:
  """torch's `F.adaptive_avg_pool2d` on NHWC: output cell (i, j) is the mean of rows
  floor(i·H/o_H) .. ceil((i+1)·H/o_H) − 1 and the columns likewise.

  When the sizes divide, that is the mean over non-overlapping (H/o_H)×(W/o_W) blocks.
  """
  b, h, w, c = x.shape
  oh, ow = (int(d) for d in out_hw)
  if (oh, ow) == (h, w):
    return x
  if h % oh == 0 and w % ow == 0:
    return x.reshape(b, oh, h // oh, ow, w // ow, c).mean(axis=(2, 4))
  return jnp.einsum("ih,bhwc,jw->bijc", _pool_matrix(h, oh), x, _pool_matrix(w, ow),
                    precision=lax.Precision.HIGHEST)


def pool_to_smaller(f_a: jax.Array, f_b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Pools whichever of two NHWC maps is spatially larger to the other's size (RepDistiller's
  rule for AT, NST, FSP, VID and FT).

  The reference compares heights only and pools to (H_small, H_small), i.e. it assumes square
  maps; here the smaller map's (H, W) is used, which is the same for square maps.
  """
  h_a, h_b = f_a.shape[1], f_b.shape[1]
  if h_a > h_b:
    f_a = adaptive_avg_pool2d(f_a, f_b.shape[1:3])
  elif h_a < h_b:
    f_b = adaptive_avg_pool2d(f_b, f_a.shape[1:3])
  return f_a, f_b