"""3D U-Net of Salehi et al. 2017 (Sec. 2.1), in Flax NNX.

The network follows the paper's description (itself the 3D U-Net of Çiçek et
al. 2016, with padded convolutions so input and output grids coincide):

* contracting path: per level two 'SAME'-padded 3x3x3 convolutions, each
  followed by a ReLU, then 2x2x2 max-pooling with stride 2; the number of
  features doubles after every pooling;
* expanding path: per level a 2x2x2 transposed convolution with stride 2 that
  halves the number of features, concatenation with the contracting-path
  features of the same resolution, then two 3x3x3 convolutions + ReLU;
* a final 1x1x1 convolution to ``num_classes`` logits.

The paper puts a softmax after the last convolution; here the model returns
the logits (always float32) and the losses apply the softmax themselves.

Beyond the paper (all off by default, so the default network and its
parameter tree are the paper's): per-stage pooling strides for anisotropic
data (``strides``, e.g. ``((2, 2, 1), (2, 2, 2), ...)``: a coarse z axis is
not pooled until the others have caught up, as in nnU-Net; the max-pooling
window and the transposed convolution's kernel equal the stage's strides),
explicit features per stage (``features_per_stage``), He initialisation
(``init="he"``), a leaky ReLU (``activation="leaky_relu"``), a chosen
initial bias of the last convolution (``head_bias_init``) and nnU-Net's deep
supervision (``deep_supervision``: a 1x1x1 head on every coarser decoder
stage, read by ``UNet3D.multi_scale``).

Arrays are channels-last, ``[batch, x, y, z, channels]``: the spatial axes are
in NIfTI voxel order (the order nibabel returns), with the channels (e.g. T1,
T2, FLAIR) appended last.

Example::

  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> model = UNet3D(in_channels=3, depth=3, rngs=nnx.Rngs(0))
  >>> model(jnp.zeros((1, 16, 16, 16, 3))).shape
  (1, 16, 16, 16, 2)
  >>> model = UNet3D(in_channels=1, strides=((2, 2, 1), (2, 2, 2)),
  ...                rngs=nnx.Rngs(0))
  >>> model(jnp.zeros((1, 16, 16, 4, 1))).shape
  (1, 16, 16, 4, 2)
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn.dtypes import promote_dtype
from jax import lax

from tversky_jax.models import onednn_conv

Array = jax.Array
Normalization = Literal["none", "group", "instance", "batch"]
ConvImpl = Literal["native", "2d_sum", "onednn"]
Init = Literal["lecun", "he"]
Activation = Literal["relu", "leaky_relu"]
Strides = tuple[tuple[int, int, int], ...]

NORMALIZATIONS: tuple[str, ...] = ("none", "group", "instance", "batch")
CONV_IMPLS: tuple[str, ...] = ("native", "2d_sum", "onednn")
INITS: tuple[str, ...] = ("lecun", "he")
ACTIVATIONS: tuple[str, ...] = ("relu", "leaky_relu")

# Negative slope of activation="leaky_relu" (nnU-Net's).
LEAKY_RELU_SLOPE = 0.01

# Defaults of UNet3D when neither ``strides`` nor ``features_per_stage`` says
# otherwise.
DEFAULT_DEPTH = 4
DEFAULT_BASE_FEATURES = 16

# Upper bound on the number of groups of the "group" normalization (Wu & He
# 2018 use 32 groups for 2D nets with >= 64 channels; U-Net levels here start
# at 16 channels, so 8 keeps >= 2 channels per group).
_MAX_GROUPS = 8

_NDHWC = ("NDHWC", "DHWIO", "NDHWC")
_AXES = ("x", "y", "z")


def required_divisor(depth: int) -> int:
  """Returns the number every spatial size must be divisible by: ``2**depth``.

  For the default strides (``depth`` stages of ``(2, 2, 2)``): each of the
  ``depth`` max-poolings halves the grid, and the transposed convolutions
  must restore exactly the size of the skip connection. With per-stage
  strides use ``required_divisors(strides)``.
  """
  if depth < 0:
    raise ValueError(f"depth must be >= 0, got {depth}.")
  return 2**depth


def default_strides(depth: int) -> Strides:
  """The paper's pooling: ``depth`` stages of ``(2, 2, 2)``."""
  if depth < 0:
    raise ValueError(f"depth must be >= 0, got {depth}.")
  return ((2, 2, 2),) * depth


def validate_strides(strides: Sequence[Sequence[int]]) -> Strides:
  """Checks per-stage pooling strides and returns them as a tuple of tuples.

  Args:
    strides: one ``(sx, sy, sz)`` per pooling stage, finest first (e.g.
      ``Plan.pool_strides``); each entry 1 (that axis is not pooled at the
      stage) or 2, and every stage pools at least one axis. ``[]`` is a
      U-Net without pooling.

  Returns:
    ``((sx, sy, sz), ...)`` as Python ints.

  Raises:
    ValueError: naming the first bad stage.
  """
  try:
    if isinstance(strides, (str, bytes)):
      raise TypeError
    strides = list(strides)  # also a numpy array
  except TypeError:
    raise ValueError(
        f"strides must be a sequence of (sx, sy, sz) per pooling stage, got "
        f"{strides!r}.") from None
  result = []
  for stage, stride in enumerate(strides):
    try:
      values = [int(s) for s in stride]
      ok = len(values) == 3 and all(
          v == s and v in (1, 2) for v, s in zip(values, stride))
    except (TypeError, ValueError):
      ok = False
    if not ok:
      raise ValueError(
          f"strides[{stage}]={stride!r}: expected 3 strides (x, y, z), each 1 "
          "or 2.")
    if values == [1, 1, 1]:
      raise ValueError(
          f"strides[{stage}]={stride!r}: a stage must pool at least one axis "
          "(stride 2).")
    result.append(tuple(values))
  return tuple(result)


def required_divisors(strides: Sequence[Sequence[int]]) -> tuple[int, int, int]:
  """Per axis ``(x, y, z)``, the number the spatial size must be divisible by.

  The product over the stages of that axis's strides: every max-pooling must
  see an exact multiple of its window, and the transposed convolutions must
  restore exactly the size of the skip connections. E.g.
  ``required_divisors([[2, 2, 1], [2, 2, 2]]) == (4, 4, 2)``;
  ``required_divisors(default_strides(d)) == (2**d,) * 3``.
  """
  divisors = [1, 1, 1]
  for stride in validate_strides(strides):
    for axis, s in enumerate(stride):
      divisors[axis] *= s
  return tuple(divisors)  # type: ignore[return-value]


def kernel_initializer(
    init: str, activation: str = "relu"
) -> nnx.Initializer:
  """The initialiser of a convolution kernel ``[kx, ky, kz, in, out]``.

  "lecun": ``nnx.Conv``'s default, LeCun normal (truncated normal, variance
  ``1 / fan_in``, ``fan_in = kx * ky * kz * in``). "he": He et al. 2015
  (Kaiming normal, fan-in mode, truncated normal rescaled to the same
  variance), variance ``2 / fan_in`` for a ReLU and ``2 / ((1 + slope**2)
  fan_in)`` for a leaky ReLU.
  """
  if init == "lecun":
    return truncated_normal_fan_in(1.0)
  if init == "he":
    return truncated_normal_fan_in(_he_scale(activation))
  raise ValueError(f"Unknown init {init!r}; expected one of {INITS}.")


def upconv_kernel_initializer(
    init: str, activation: str = "relu"
) -> nnx.Initializer:
  """The initialiser of a transposed-convolution kernel ``[sx, sy, sz, in, out]``.

  "lecun": ``nnx.ConvTranspose``'s default (LeCun normal with ``fan_in = sx *
  sy * sz * in``). "he": variance ``2 / in`` (leaky ReLU: ``2 / ((1 +
  slope**2) in)``): with kernel = stride the output blocks do not overlap,
  so every output voxel sums exactly ``in`` products and ``in`` is the true
  fan-in (the kernel's spatial axes are excluded from it).
  """
  if init == "lecun":
    return truncated_normal_fan_in(1.0)
  if init == "he":
    return truncated_normal_fan_in(_he_scale(activation), spatial_in_fan=False)
  raise ValueError(f"Unknown init {init!r}; expected one of {INITS}.")


def truncated_normal_fan_in(scale: float, spatial_in_fan: bool = True
                            ) -> nnx.Initializer:
  """``nnx.initializers.variance_scaling(scale, "fan_in", "truncated_normal")``
  for a kernel ``[kx, ky, kz, in, out]``, with the same values bit for bit.

  ``fan_in = kx * ky * kz * in`` (``spatial_in_fan=False``: ``in``, i.e.
  ``batch_axis=(0, 1, 2)``). ``scale=1`` is ``lecun_normal``, ``scale=2``
  He (Kaiming) normal.

  The values are drawn as the start of a flat vector whose length is the
  next power of two, then reshaped. Partitionable threefry (JAX's default,
  ``jax_threefry_partitionable``) counts in row-major order, so they are
  the same; but XLA:CPU compiles a 5-D draw in 3-11 s per kernel shape, a
  flat one in about 0.4 s per length, and the power-of-two lengths are
  shared by most kernels of a network and by every network of a process
  (the tests build many).
  """

  def init(key: Array, shape: Sequence[int], dtype: Any = jnp.float32) -> Array:
    shape = tuple(int(n) for n in shape)
    fan_in = math.prod(shape[:-1]) if spatial_in_fan else shape[-2]
    variance = jnp.array(scale / fan_in, dtype=dtype)
    # The standard deviation of a standard normal truncated to (-2, 2).
    stddev = jnp.sqrt(variance) / jnp.array(.87962566103423978, dtype)
    size = math.prod(shape)
    drawn = jax.random.truncated_normal(
        key, -2, 2, (max(1024, 1 << (size - 1).bit_length()),), dtype)
    return drawn[:size].reshape(shape) * stddev

  return init


def _he_scale(activation: str) -> float:
  if activation == "relu":
    return 2.0
  if activation == "leaky_relu":
    return 2.0 / (1.0 + LEAKY_RELU_SLOPE**2)
  raise ValueError(
      f"Unknown activation {activation!r}; expected one of {ACTIVATIONS}.")


def _constant_init(values: Sequence[float]) -> nnx.Initializer:
  """An initialiser returning ``values`` (for a bias of ``len(values)``)."""

  def init(key: Array, shape: Sequence[int], dtype: Any = jnp.float32) -> Array:
    del key
    return jnp.broadcast_to(jnp.asarray(values, dtype), shape)

  return init


def _lean_backward(conv_impl: str) -> bool:
  """Whether the layers around the convolutions keep less for the backward
  pass through custom VJPs (reverse mode only): with "onednn", whose
  convolutions are reverse-mode only already. Then the ReLU's and the
  pooling's gradients come from their outputs, instance norm + activation
  keep only input and output, the decoder's concatenation is not built and
  the transposed convolutions run in oneDNN too."""
  return conv_impl == "onednn"


def _slope(activation: str) -> float:
  """The negative slope of ``activation``: 0 for a ReLU."""
  return LEAKY_RELU_SLOPE if activation == "leaky_relu" else 0.0


def _leaky(x: Array, slope: float) -> Array:
  """``where(x > 0, x, slope * x)``."""
  return jnp.where(x > 0, x, x * jnp.asarray(slope, x.dtype))


def _leaky_grad_from_output(y: Array, g: Array, slope: float) -> Array:
  """The gradient through ``y = _leaky(x, slope)``, from ``y``."""
  return jnp.where(y > 0, g, g * jnp.asarray(slope, g.dtype))


def _activate(x: Array, activation: str, from_output: bool = False) -> Array:
  """The activation; ``from_output``: its gradient from its output
  (``_rectify``, less memory, reverse mode only), else Flax's functions."""
  slope = _slope(activation)
  if from_output:
    return _rectify(x, slope)
  if activation == "leaky_relu":
    return nnx.leaky_relu(x, negative_slope=slope)
  return nnx.relu(x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _rectify(x: Array, slope: float) -> Array:
  """ReLU (``slope`` 0) or leaky ReLU, ``where(x > 0, x, slope * x)``, whose
  gradient is computed from its output, not its input.

  The output is kept for the backward pass anyway (it is the next
  convolution's input), so the pre-activation need not be: one activation
  per layer is kept instead of two, as PyTorch does with in-place ReLUs.
  Same values and gradients as ``nnx.relu`` / ``nnx.leaky_relu`` (gradient
  ``slope`` at 0, where ``nnx.relu``'s is 0 too).
  """
  return _leaky(x, slope)


def _rectify_forward(x, slope):
  y = _rectify(x, slope)
  return y, y


def _rectify_backward(slope, y, g):
  return (_leaky_grad_from_output(y, g, slope),)


_rectify.defvjp(_rectify_forward, _rectify_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _instance_norm_activate(x: Array, scale: Array, bias: Array,
                            epsilon: float, slope: float) -> Array:
  """``_rectify(nnx.InstanceNorm(x), slope)`` with the gradient written out.

  ``x: [b, x, y, z, c]``; ``scale``, ``bias``: ``[c]``. Per sample and
  channel, ``x_hat = (x - mean) / sqrt(var + epsilon)`` over the spatial
  axes (the variance as ``E[x^2] - mean^2``, clipped at 0, as Flax
  computes it; statistics in float32), then ``x_hat * scale + bias`` and
  the (leaky) ReLU. Same values as ``nnx.InstanceNorm`` followed by
  ``nnx.relu`` / ``nnx.leaky_relu`` up to float rounding.

  Automatic differentiation keeps ``x``, the centred ``x - mean`` and the
  normalised output for the backward pass; this keeps ``x`` and the
  output, which is the next convolution's input and kept anyway: one
  tensor per layer less, as PyTorch's instance norm. The gradient of the
  input is ``r * scale * (dz - mean(dz) - x_hat * mean(dz * x_hat))`` with
  ``r = 1 / sqrt(var + epsilon)`` and ``dz`` the gradient behind the
  activation. Reverse mode only (a custom VJP).
  """
  return _instance_norm_activate_forward(x, scale, bias, epsilon, slope)[0]


def _instance_stats(x: Array, epsilon: float) -> tuple[Array, Array]:
  """Per sample and channel: the mean and ``1 / sqrt(var + epsilon)``,
  ``[b, 1, 1, 1, c]`` float32."""
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
  mean_sq = jnp.mean(jnp.square(x), axis=(1, 2, 3), keepdims=True)
  var = jnp.maximum(0.0, mean_sq - jnp.square(mean))
  return mean, lax.rsqrt(var + epsilon)


def _instance_norm_activate_forward(x, scale, bias, epsilon, slope):
  mean, r = _instance_stats(x, epsilon)
  z = ((x - mean) * (r * scale) + bias).astype(x.dtype)
  y = _leaky(z, slope)
  return y, (x, mean, r, scale, y)


def _instance_norm_activate_backward(epsilon, slope, residuals, g):
  del epsilon
  x, mean, r, scale, y = residuals
  dz = _leaky_grad_from_output(y, g, slope).astype(jnp.float32)
  # Written without x - mean: XLA would share that tensor with the forward
  # pass's and keep it from there until here, one more tensor per layer
  # (the default recipe's 1 x 64^3 step: 321 -> 236 MB of temporaries).
  sum_dz = jnp.sum(dz, axis=(1, 2, 3), keepdims=True)
  sum_dz_x = jnp.sum(dz * x, axis=(1, 2, 3), keepdims=True)
  sum_dz_x_hat = r * (sum_dz_x - mean * sum_dz)
  n = x.shape[1] * x.shape[2] * x.shape[3]
  # d_x = r * scale * (dz - sum_dz / n - x_hat * sum_dz_x_hat / n)
  #     = a * dz + c * x + b, per sample and channel:
  a = r * scale
  c = -a * r * sum_dz_x_hat / n
  b = -a * sum_dz / n - c * mean
  d_x = a * dz + c * x + b
  d_scale = jnp.sum(sum_dz_x_hat, axis=(0, 1, 2, 3)).astype(scale.dtype)
  d_bias = jnp.sum(sum_dz, axis=(0, 1, 2, 3)).astype(scale.dtype)
  return d_x.astype(x.dtype), d_scale, d_bias


_instance_norm_activate.defvjp(_instance_norm_activate_forward,
                               _instance_norm_activate_backward)


def count_params(model: nnx.Module) -> int:
  """Returns the number of trainable parameters (``nnx.Param`` entries).

  BatchNorm running statistics (``nnx.BatchStat``) are not counted.
  """
  return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _is_plain_3d(lhs: Array, rhs: Array, window_strides: Sequence[int],
                 lhs_dilation: Sequence[int] | None,
                 rhs_dilation: Sequence[int] | None, dimension_numbers: Any,
                 feature_group_count: int, batch_group_count: int,
                 kwargs: dict[str, Any]) -> bool:
  """Whether a ``conv_general_dilated`` call is a channels-last 3D
  convolution with stride and dilation 1, no groups and no sharding."""
  return (
      lhs.ndim == 5
      and rhs.ndim == 5
      and kwargs.get("out_sharding") is None
      and all(s == 1 for s in window_strides)
      and all(d == 1 for d in (lhs_dilation or (1,) * 3))
      and all(d == 1 for d in (rhs_dilation or (1,) * 3))
      and feature_group_count == 1
      and batch_group_count == 1
      and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
      == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NDHWC)
  )


def _pads(lhs: Array, rhs: Array, padding: str | Sequence[tuple[int, int]]
          ) -> tuple[tuple[int, int], ...]:
  """Explicit ``(lo, hi)`` per spatial axis of a stride-1 3D convolution."""
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:4], rhs.shape[:3], (1, 1, 1),
                                  padding)
  return tuple((int(lo), int(hi)) for lo, hi in padding)


def _drop_in(plain_conv: Callable[..., Array]) -> Callable[..., Array]:
  """``plain_conv(lhs, rhs, pads, precision, preferred_element_type)``, a
  stride-1 channels-last 3D convolution with explicit ``(lo, hi)`` padding
  per spatial axis, as a drop-in replacement for
  ``jax.lax.conv_general_dilated`` (the signature ``nnx.Conv`` calls it
  with): every other convolution (``_is_plain_3d``) goes to lax."""

  def conv(lhs, rhs, window_strides, padding, lhs_dilation=None,
           rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
           batch_group_count=1, precision=None, preferred_element_type=None,
           **kwargs):
    if not _is_plain_3d(lhs, rhs, window_strides, lhs_dilation, rhs_dilation,
                        dimension_numbers, feature_group_count,
                        batch_group_count, kwargs):
      return lax.conv_general_dilated(
          lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
          dimension_numbers, feature_group_count, batch_group_count,
          precision, preferred_element_type, **kwargs)
    return plain_conv(lhs, rhs, _pads(lhs, rhs, padding), precision,
                      preferred_element_type)

  conv.__name__ = conv.__qualname__ = plain_conv.__name__.lstrip("_")
  conv.__doc__ = plain_conv.__doc__
  return conv


def _conv3d_as_2d_sum(lhs: Array, rhs: Array,
                      pads: tuple[tuple[int, int], ...], precision: Any,
                      preferred_element_type: Any) -> Array:
  """A 3D convolution computed as a sum of 2D convolutions.

  Drop-in replacement for ``jax.lax.conv_general_dilated`` (the signature
  ``nnx.Conv`` calls it with) for channels-last 3D convolutions,
  ``lhs: [batch, x, y, z, in]``, ``rhs: [kx, ky, kz, in, out]``. With the
  first spatial axis padded, the result is::

    out[:, x] = sum_i conv2d(lhs_padded[:, x + i], rhs[i])   (i < kx)

  where every 2D convolution runs over ``(y, z)`` with ``batch`` and ``x``
  folded into one batch axis (folding the leading spatial axis needs no
  transpose). The result equals the 3D convolution up to float rounding, and
  the kernel layout is unchanged, so parameters (and checkpoints) are shared
  with the native implementation.

  Why: XLA:CPU runs 3D convolutions far slower than 2D ones; forward+backward
  this is 3-4x faster there, also for the whole U-Net
  (``bench/bench_conv3d.py``), at the cost of about 2.4x the temporary
  memory (the shifted slabs are kept for the backward pass). On GPU both go
  to cuDNN; prefer "native" there.

  Strided, dilated, grouped, sharded or non-channels-last convolutions fall
  back to ``lax.conv_general_dilated``.
  """
  b, _, y, z, c = lhs.shape
  kx = rhs.shape[0]
  lhs = jnp.pad(lhs, ((0, 0), pads[0], (0, 0), (0, 0), (0, 0)))
  out_x = lhs.shape[1] - kx + 1
  out = None
  for i in range(kx):
    slab = lhs[:, i : i + out_x].reshape(b * out_x, y, z, c)
    term = lax.conv_general_dilated(
        slab, rhs[i], (1, 1), pads[1:],
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=precision, preferred_element_type=preferred_element_type)
    out = term if out is None else out + term
  return out.reshape(b, out_x, *out.shape[1:])


def _conv3d_onednn(lhs: Array, rhs: Array, pads: tuple[tuple[int, int], ...],
                   precision: Any, preferred_element_type: Any) -> Array:
  """A 3D convolution computed by oneDNN (``onednn_conv.conv3d``) on CPU.

  Drop-in replacement for ``jax.lax.conv_general_dilated``, like
  ``conv3d_as_2d_sum``: ``lhs: [batch, x, y, z, in]``, ``rhs: [kx, ky, kz,
  in, out]``, same parameters, same result up to float rounding. On this
  project's CPU forward+backward of a 16-feature 3x3x3 convolution is 3-4x
  faster than ``conv3d_as_2d_sum`` and as fast as PyTorch
  (``bench/bench_conv3d.py``), with no extra temporary memory.

  Float32 only: bfloat16 convolutions, and every convolution where the
  library is not ``onednn_conv.available()``, go to ``conv3d_as_2d_sum``;
  strided, dilated, grouped, sharded or non-channels-last ones to
  ``lax.conv_general_dilated``.
  """
  if (lhs.dtype == jnp.float32 and rhs.dtype == jnp.float32
      and preferred_element_type in (None, jnp.float32)
      and onednn_conv.available()):
    return onednn_conv.conv3d(lhs, rhs, pads)
  return _conv3d_as_2d_sum(lhs, rhs, pads, precision, preferred_element_type)


conv3d_as_2d_sum = _drop_in(_conv3d_as_2d_sum)
conv3d_onednn = _drop_in(_conv3d_onednn)


def _pointwise_conv(lhs: Array, rhs: Array,
                    pads: tuple[tuple[int, int], ...], precision: Any,
                    preferred_element_type: Any) -> Array:
  """A 1x1x1 convolution as one matrix product over all voxels.

  ``lhs: [batch, x, y, z, in]``, ``rhs: [1, 1, 1, in, out]`` (same kernel
  layout as ``nnx.Conv``'s). XLA:CPU computes the kernel's gradient of a
  1x1x1 ``conv_general_dilated`` as a convolution with a whole-volume
  window over a transposed copy of ``lhs``; as a product of
  ``[voxels, in]`` and ``[voxels, out]`` it needs no copy and is 2-3x
  faster (a 16 -> 2 head at 1 x 64^3: 59 -> 19 ms forward + backward).
  """
  if rhs.shape[:3] != (1, 1, 1) or any(p != (0, 0) for p in pads):
    return lax.conv_general_dilated(
        lhs, rhs, (1, 1, 1), pads, dimension_numbers=_NDHWC,
        precision=precision, preferred_element_type=preferred_element_type)
  out = jnp.matmul(lhs.reshape(-1, lhs.shape[-1]),
                   rhs.reshape(rhs.shape[-2:]), precision=precision,
                   preferred_element_type=preferred_element_type)
  return out.reshape(*lhs.shape[:-1], rhs.shape[-1])


pointwise_conv = _drop_in(_pointwise_conv)

# What each ``conv_impl`` calls in place of ``lax.conv_general_dilated``.
CONV_FUNCTIONS = {"native": lax.conv_general_dilated,
                  "2d_sum": conv3d_as_2d_sum,
                  "onednn": conv3d_onednn}


def default_conv_impl(num_devices: int | None = None) -> str:
  """What ``conv_impl="auto"`` means for a mesh of ``num_devices`` devices
  (default: all of this process's backend).

  "native" (cuDNN) off the CPU. On the CPU "onednn" for a single device when
  ``onednn_conv.available()``, else "2d_sum": over several (simulated) CPU
  devices a oneDNN call is not partitioned, so every device would compute
  the whole batch. When oneDNN cannot be used on a single CPU device, a
  warning says why, once.
  """
  if jax.default_backend() != "cpu":
    return "native"
  if (jax.device_count() if num_devices is None else num_devices) > 1:
    return "2d_sum"
  if onednn_conv.available():
    return "onednn"
  _warn_once(f"conv_impl='auto' uses the slower '2d_sum' convolution: "
             f"{onednn_conv.unavailable_reason()}")
  return "2d_sum"


@functools.cache
def _warn_once(message: str) -> None:
  # A warning, not a log record: train.py silences absl/std logging below
  # ERROR, and a user should see why training is slower than it could be.
  warnings.warn(message, RuntimeWarning, stacklevel=3)


def _window_view(x: Array, window: Sequence[int]) -> tuple[Array, tuple[int, ...]]:
  """``x`` reshaped to ``[b, x / wx, wx, ...]`` (axes with window 1 kept
  whole) and the positions of the window axes."""
  b, *sizes, c = x.shape
  shape, axes = [b], []
  for size, w in zip(sizes, window):
    shape += [size] if w == 1 else [size // w, w]
    if w != 1:
      axes.append(len(shape) - 1)
  return x.reshape(*shape, c), tuple(axes)


def _max_pool(x: Array, window: Sequence[int]) -> Array:
  """Max-pooling with window = stride ``(wx, wy, wz)``, as a reshape + max.

  ``[b, x, y, z, c] -> [b, x/wx, y/wy, z/wz, c]``. On XLA:CPU 2-6x faster
  forward+backward than ``lax.reduce_window`` and its ``select_and_scatter``
  gradient (``bench/bench_conv3d.py``). Same values; the gradient differs
  only at ties (shared among the tied maxima instead of going to one), which
  after a ReLU are zeros that get no gradient anyway. Sizes must be
  multiples of the window; axes with window 1 are left alone.
  """
  view, axes = _window_view(x, window)
  return jnp.max(view, axis=axes) if axes else x


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max_pool_to_maxima(x: Array, window: tuple[int, ...]) -> Array:
  """``_max_pool`` whose gradient goes to every input equal to its window's
  maximum, computed from the input and the output in one pass.

  ``_max_pool``'s automatic gradient shares the gradient among tied maxima,
  for which XLA keeps a full-resolution float mask of the maxima and sums
  it per window. This one keeps nothing beyond ``x`` and the output, which
  the network keeps anyway (the skip connection and the next convolution's
  input). The two gradients differ only at ties, which after a ReLU are
  zeros whose gradient the ReLU stops. Reverse mode only (a custom VJP).
  """
  return _max_pool(x, window)


def _max_pool_to_maxima_forward(x, window):
  y = _max_pool(x, window)
  return y, (x, y)


def _max_pool_to_maxima_backward(window, residuals, g):
  x, y = residuals
  view, axes = _window_view(x, window)
  maxima = view == jnp.expand_dims(y, axes)
  d_x = jnp.where(maxima, jnp.expand_dims(g, axes), jnp.zeros((), g.dtype))
  return (d_x.reshape(x.shape),)


_max_pool_to_maxima.defvjp(_max_pool_to_maxima_forward,
                           _max_pool_to_maxima_backward)


def _make_norm(
    kind: str, features: int, dtype: Any, rngs: nnx.Rngs
) -> nnx.Module | None:
  if kind == "none":
    return None
  if kind == "group":
    return nnx.GroupNorm(
        features, num_groups=math.gcd(features, _MAX_GROUPS), dtype=dtype,
        param_dtype=jnp.float32, rngs=rngs)
  if kind == "instance":
    return nnx.InstanceNorm(
        features, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
  if kind == "batch":
    # momentum 0.9 as in the Flax examples: the paper's data set is small,
    # so the running averages must settle within a few hundred steps.
    return nnx.BatchNorm(
        features, momentum=0.9, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
  raise ValueError(
      f"Unknown normalization {kind!r}; expected one of {NORMALIZATIONS}.")


def conv_transpose_strided(x: Array, kernel: Array) -> Array:
  """Transposed convolution with kernel = stride, as one einsum.

  ``x: [b, x, y, z, in]``, ``kernel: [sx, sy, sz, in, out]`` (the strides are
  the kernel's spatial shape, each 1 or more); returns ``[b, sx * x, sy * y,
  sz * z, out]``. Equals ``lax.conv_transpose(x, kernel, (sx, sy, sz),
  "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))``. Since the kernel
  equals the stride the output blocks do not overlap: ``out[s * v + (i, j,
  k)] = x[v] @ kernel[sx - 1 - i, sy - 1 - j, sz - 1 - k]``
  (``lax.conv_transpose`` does not flip the kernel, hence the ``s - 1 - i``).
  Exact, and for (2, 2, 2) 40-80x faster forward+backward than
  ``lax.conv_transpose`` on XLA:CPU (``bench/bench_conv3d.py``).
  """
  b, nx, ny, nz, _ = x.shape
  sx, sy, sz = kernel.shape[:3]
  y = jnp.einsum("bxyzc,ijkcd->bxiyjzkd", x, kernel[::-1, ::-1, ::-1])
  return y.reshape(b, sx * nx, sy * ny, sz * nz, kernel.shape[-1])


class UpConv(nnx.Module):
  """Transposed convolution with kernel = stride, computed as one matmul.

  ``[b, x, y, z, in_features] -> [b, sx * x, sy * y, sz * z, out_features]``
  for ``strides = (sx, sy, sz)`` (default ``(2, 2, 2)``, the paper's).

  Same parameters (``kernel: [sx, sy, sz, in, out]``, ``bias: [out]``), same
  default initialisation and same output as ``nnx.ConvTranspose(in, out,
  kernel_size=strides, strides=strides, padding="SAME")``, computed by
  ``conv_transpose_strided``, or with ``onednn=True`` (float32, where
  ``onednn_conv.available()``) by oneDNN's deconvolution, which is
  reverse-mode only.
  """

  def __init__(
      self,
      in_features: int,
      out_features: int,
      *,
      strides: Sequence[int] = (2, 2, 2),
      kernel_init: nnx.Initializer | None = None,
      dtype: Any = jnp.float32,
      param_dtype: Any = jnp.float32,
      onednn: bool = False,
      rngs: nnx.Rngs,
  ):
    self.in_features = in_features
    self.out_features = out_features
    self.strides = tuple(int(s) for s in strides)
    self.dtype = dtype
    self.onednn = onednn
    # nnx.ConvTranspose's default initialisers.
    kernel_init = kernel_init or truncated_normal_fan_in(1.0)
    self.kernel = nnx.Param(kernel_init(
        rngs.params(), (*self.strides, in_features, out_features), param_dtype))
    self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype))

  def __call__(self, x: Array) -> Array:
    x, kernel, bias = promote_dtype(
        (x, self.kernel[...], self.bias[...]), dtype=self.dtype)
    if (self.onednn and x.dtype == jnp.float32
        and kernel.dtype == jnp.float32 and onednn_conv.available()):
      # oneDNN's deconvolution writes the interleaved output directly (the
      # einsum's output is transposed into place, and so is its gradient).
      y = onednn_conv.conv_transpose3d(x, kernel[::-1, ::-1, ::-1],
                                       self.strides)
    else:
      y = conv_transpose_strided(x, kernel)
    return y + bias


class ConvBlock(nnx.Module):
  """Two 3x3x3 'SAME' convolutions, each followed by [normalization and] ReLU.

  ``[b, x, y, z, in_features] -> [b, x, y, z, out_features]``. The activation
  is a ReLU or, with ``activation="leaky_relu"``, a leaky ReLU of slope
  ``LEAKY_RELU_SLOPE``. The input may also be a tuple of arrays whose
  features add up to ``in_features``, read as their concatenation along the
  features (see ``UpBlock``).
  """

  def __init__(
      self,
      in_features: int,
      out_features: int,
      *,
      normalization: str,
      dtype: Any,
      conv_impl: str,
      kernel_init: nnx.Initializer | None = None,
      activation: str = "relu",
      rngs: nnx.Rngs,
  ):
    conv_fn = CONV_FUNCTIONS[conv_impl]
    # A bias in front of a normalization is cancelled by its mean subtraction.
    use_bias = normalization == "none"
    kernel_init = kernel_init or truncated_normal_fan_in(1.0)
    self.activation = activation
    # Activations keep one tensor per layer, not two (_lean_backward).
    self.grad_from_output = _lean_backward(conv_impl)

    def conv(fin: int) -> nnx.Conv:
      return nnx.Conv(
          fin, out_features, kernel_size=(3, 3, 3), padding="SAME",
          use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
          kernel_init=kernel_init, conv_general_dilated=conv_fn, rngs=rngs)

    self.conv1 = conv(in_features)
    self.norm1 = _make_norm(normalization, out_features, dtype, rngs)
    self.conv2 = conv(out_features)
    self.norm2 = _make_norm(normalization, out_features, dtype, rngs)

  def __call__(self, x: Array | tuple[Array, ...]) -> Array:
    x = self._first_conv(x) if isinstance(x, tuple) else self.conv1(x)
    x = self._normalize_and_activate(x, self.norm1)
    x = self.conv2(x)
    return self._normalize_and_activate(x, self.norm2)

  def _normalize_and_activate(self, x: Array, norm: nnx.Module | None) -> Array:
    if self.grad_from_output and isinstance(norm, nnx.InstanceNorm):
      slope = _slope(self.activation)
      scale, bias = (v.astype(jnp.float32) for v in (norm.scale[...], norm.bias[...]))
      return _instance_norm_activate(x, scale, bias, norm.epsilon, slope)
    if norm is not None:
      x = norm(x)
    return _activate(x, self.activation, self.grad_from_output)

  def _first_conv(self, parts: tuple[Array, ...]) -> Array:
    """``conv1`` of the concatenation of ``parts``, as a sum of one
    convolution per part with its slice of the kernel: no concatenated copy
    is made, nor kept for the backward pass (1/5 of a decoder stage's
    activations). Same parameters; equal up to float rounding."""
    conv = self.conv1
    bias = conv.bias[...] if conv.bias is not None else None
    *parts, kernel, bias = promote_dtype(
        (*parts, conv.kernel[...], bias), dtype=conv.dtype)
    out, start = None, 0
    for part in parts:
      stop = start + part.shape[-1]
      term = conv.conv_general_dilated(
          part, kernel[..., start:stop, :], (1, 1, 1), "SAME",
          dimension_numbers=_NDHWC)
      out, start = term if out is None else out + term, stop
    return out if bias is None else out + bias

class UpBlock(nnx.Module):
  """Expanding-path level: upsample, concatenate the skip, two convolutions.

  ``x: [b, x, y, z, in_features]``, ``skip: [b, sx * x, sy * y, sz * z, f]``
  -> ``[b, sx * x, sy * y, sz * z, f]`` with ``f = features``,
  ``in_features`` (default ``2 * features``, the paper's) the features of
  the coarser stage and ``(sx, sy, sz) = strides`` (default ``(2, 2, 2)``)
  the pooling strides between the two stages. The transposed convolution
  (``UpConv``, kernel = stride) maps ``in_features`` to ``f``; the skip is
  concatenated after it (upsampled features first, then the skip), so the
  first convolution reads ``2 f`` features.
  """

  def __init__(
      self,
      features: int,
      *,
      normalization: str,
      dtype: Any,
      conv_impl: str,
      in_features: int | None = None,
      strides: Sequence[int] = (2, 2, 2),
      kernel_init: nnx.Initializer | None = None,
      up_kernel_init: nnx.Initializer | None = None,
      activation: str = "relu",
      rngs: nnx.Rngs,
  ):
    in_features = 2 * features if in_features is None else in_features
    self.up = UpConv(in_features, features, strides=strides,
                     kernel_init=up_kernel_init, dtype=dtype,
                     onednn=_lean_backward(conv_impl), rngs=rngs)
    self.block = ConvBlock(
        2 * features, features, normalization=normalization, dtype=dtype,
        conv_impl=conv_impl, kernel_init=kernel_init, activation=activation,
        rngs=rngs)
    # With _lean_backward the concatenation is not materialised
    # (ConvBlock._first_conv): less memory, same speed with oneDNN. Elsewhere
    # one convolution over it is faster.
    self.split_concat = _lean_backward(conv_impl)

  def __call__(self, x: Array, skip: Array) -> Array:
    x = self.up(x)
    if self.split_concat:
      return self.block((x, skip.astype(x.dtype)))
    return self.block(jnp.concatenate([x, skip.astype(x.dtype)], axis=-1))


def _stage_strides(strides: Sequence[Sequence[int]] | None,
                   depth: int | None) -> tuple[tuple[int, int, int], ...]:
  """The pooling strides per stage from ``strides`` and/or ``depth``."""
  if strides is None:
    depth = DEFAULT_DEPTH if depth is None else depth
    if depth < 0:
      raise ValueError(f"depth must be >= 0, got {depth}.")
    return default_strides(depth)
  strides = validate_strides(strides)
  if depth is not None and depth != len(strides):
    raise ValueError(
        f"depth={depth} disagrees with the {len(strides)} stages of "
        f"strides={strides}; pass only one of them.")
  return strides


def _stage_features(features_per_stage: Sequence[int] | None,
                    base_features: int | None, depth: int) -> tuple[int, ...]:
  """The features of each of the ``depth + 1`` stages, finest first."""
  if features_per_stage is None:
    base_features = (DEFAULT_BASE_FEATURES if base_features is None
                     else base_features)
    if base_features < 1:
      raise ValueError(f"base_features must be >= 1, got {base_features}.")
    return tuple(base_features * 2**level for level in range(depth + 1))
  features = tuple(int(f) for f in features_per_stage)
  if len(features) != depth + 1 or min(features) < 1:
    raise ValueError(
        f"features_per_stage={tuple(features_per_stage)}: expected "
        f"depth + 1 = {depth + 1} positive feature counts (one per stage, "
        "bottleneck included).")
  if base_features is not None and base_features != features[0]:
    raise ValueError(
        f"base_features={base_features} disagrees with "
        f"features_per_stage[0]={features[0]}; pass only one of them.")
  return features


def _head_conv(in_features: int, num_classes: int, *, dtype: Any,
               kernel_init: nnx.Initializer, bias_init: nnx.Initializer,
               rngs: nnx.Rngs) -> nnx.Conv:
  """A 1x1x1 convolution ``[b, x, y, z, in_features] -> [..., num_classes]``
  to logits (float32 parameters)."""
  return nnx.Conv(
      in_features, num_classes, kernel_size=(1, 1, 1), dtype=dtype,
      param_dtype=jnp.float32, kernel_init=kernel_init, bias_init=bias_init,
      conv_general_dilated=pointwise_conv, rngs=rngs)


def _head_bias_initializer(head_bias_init: Sequence[float] | None,
                           num_classes: int) -> nnx.Initializer:
  """Zeros, or the given per-class constants (checked)."""
  if head_bias_init is None:
    return nnx.initializers.zeros_init()
  head_bias = tuple(float(b) for b in head_bias_init)
  if len(head_bias) != num_classes or not all(map(math.isfinite, head_bias)):
    raise ValueError(
        f"head_bias_init={tuple(head_bias_init)}: expected "
        f"num_classes={num_classes} finite values (e.g. log class "
        "frequencies).")
  return _constant_init(head_bias)


class UNet3D(nnx.Module):
  """The paper's 3D U-Net; returns float32 logits.

  Input ``[batch, x, y, z, in_channels]`` (channels-last, spatial axes in NIfTI
  voxel order); output ``[batch, x, y, z, num_classes]`` float32 logits, no
  softmax. Every spatial size must be divisible by its axis's entry of
  ``required_divisors(strides)`` (``2**depth`` on every axis for the default
  strides).

  Stage ``l`` (``0 <= l <= depth``; ``l = depth`` is the bottleneck) has
  ``features_per_stage[l]`` features, by default ``base_features * 2**l``.
  Between stages ``l`` and ``l + 1`` the contracting path max-pools with
  window = stride ``strides[l]`` and the expanding path upsamples with a
  transposed convolution of kernel = stride ``strides[l]``; by default every
  stride is ``(2, 2, 2)``, the paper's network.

  With ``normalization="batch"`` the model has two modes, switched in place
  as usual in NNX: ``model.train()`` (the default after construction) uses
  batch statistics and updates the running averages (``nnx.BatchStat``
  variables, which then belong in the train state next to the params);
  ``model.eval()`` uses the running averages. The mode is a static attribute,
  so it is part of the ``GraphDef`` of ``nnx.split``: switch before splitting,
  or call ``model.eval()`` after ``nnx.merge`` inside the jitted function.
  Under ``jax.jit`` with the batch sharded over devices the statistics are
  those of the global batch. The other normalizations behave the same in
  both modes.

  Attributes:
    encoder: ``depth`` contracting-path ``ConvBlock`` s, finest level first.
    bottleneck: the ``ConvBlock`` at the coarsest level.
    decoder: ``depth`` ``UpBlock`` s, coarsest level first.
    head: the final 1x1x1 convolution (the finest logits).
    aux_heads: with ``deep_supervision``, the ``depth - 1`` 1x1x1
      convolutions of the coarser decoder stages, finest first
      (``aux_heads[i]`` reads stage ``i + 1``); None without it, so the
      parameter tree is then the one without deep supervision.
    depth: the number of poolings, ``len(strides)``.
    strides: ``((sx, sy, sz), ...)`` per pooling stage, finest first.
    features_per_stage: features per stage, finest first (``depth + 1``).
    base_features: ``features_per_stage[0]``.
  """

  def __init__(
      self,
      *,
      in_channels: int,
      num_classes: int = 2,
      base_features: int | None = None,
      depth: int | None = None,
      normalization: Normalization = "none",
      dtype: Any = jnp.float32,
      conv_impl: ConvImpl = "native",
      strides: Sequence[Sequence[int]] | None = None,
      features_per_stage: Sequence[int] | None = None,
      init: Init = "lecun",
      activation: Activation = "relu",
      head_bias_init: Sequence[float] | None = None,
      deep_supervision: bool = False,
      rngs: nnx.Rngs,
  ):
    """Builds the network.

    Args:
      in_channels: number of input channels (modalities), e.g. 3 for T1, T2
        and FLAIR.
      num_classes: number of output logits per voxel (2 in the paper).
      base_features: features of the finest level; doubled per pooling.
        Default 16, or ``features_per_stage[0]`` (giving both requires them
        to agree).
      depth: number of max-poolings (and of transposed convolutions).
        Default 4, or ``len(strides)`` (giving both requires them to agree).
      normalization: what follows each 3x3x3 convolution before its ReLU:
        "none" (the paper), "group" (GroupNorm, ``gcd(features, 8)`` groups),
        "instance" (InstanceNorm) or "batch" (BatchNorm, see the class
        docstring for train/eval mode).
      dtype: compute dtype, ``jnp.float32`` or ``jnp.bfloat16``. Parameters
        are always float32; the logits are cast to float32.
      conv_impl: how the 3x3x3 convolutions are computed: "native"
        (``lax.conv_general_dilated``), "2d_sum" (``conv3d_as_2d_sum``,
        faster on CPU) or "onednn" (``conv3d_onednn``, fastest on CPU where
        ``onednn_conv.available()``). Same parameters, same results up to
        float rounding. "onednn" is reverse-mode only (custom VJPs) and
        uses that to save memory: the transposed convolutions run in
        oneDNN too, the ReLU's and the pooling's gradients come from their
        outputs, instance norm and activation keep only their input and
        output, and the decoder's concatenation is never built.
      strides: pooling strides per stage, finest first, e.g.
        ``Plan.pool_strides = ((2, 2, 1), (2, 2, 2), ...)``: each ``(sx, sy,
        sz)`` entry 1 or 2, at least one 2 per stage (see
        ``validate_strides``). None: ``depth`` stages of ``(2, 2, 2)``, the
        paper's (and the same parameter tree as before strides existed).
      features_per_stage: features of each of the ``depth + 1`` stages,
        finest first (e.g. ``Plan.features_per_stage``, capped). None:
        ``base_features * 2**stage``.
      init: initialisation of every convolution kernel (3x3x3, transposed
        and the 1x1x1 head): "lecun" (Flax's default, LeCun normal, variance
        ``1 / fan_in``) or "he" (He et al. 2015, variance ``2 / fan_in``,
        for ReLU networks; see ``kernel_initializer`` and
        ``upconv_kernel_initializer``). Biases start at zero.
      activation: "relu" (the paper) or "leaky_relu" (negative slope
        ``LEAKY_RELU_SLOPE`` = 0.01, nnU-Net's).
      head_bias_init: the initial bias of the final 1x1x1 convolution, one
        value per class, e.g. ``log(class_frequencies)`` so the untrained
        network predicts the class priors instead of ``1 / num_classes``.
        None: zeros.
      deep_supervision: also build a 1x1x1 logits head on each decoder
        stage but the finest (nnU-Net's deep supervision; same kernel and
        bias initialisation as ``head``), for ``multi_scale``. ``__call__``
        ignores them. False: no extra parameters.
      rngs: random streams for the parameter initialisation.

    Raises:
      ValueError: for an unknown ``normalization``, ``conv_impl``, ``init``
        or ``activation``, non-positive sizes, bad ``strides`` or
        ``features_per_stage``, ``depth`` / ``base_features`` disagreeing
        with them, or a ``head_bias_init`` without ``num_classes`` finite
        values.
    """
    for name, value, options in (("normalization", normalization, NORMALIZATIONS),
                                 ("conv_impl", conv_impl, CONV_IMPLS),
                                 ("init", init, INITS),
                                 ("activation", activation, ACTIVATIONS)):
      if value not in options:
        raise ValueError(
            f"Unknown {name} {value!r}; expected one of {options}.")
    strides = _stage_strides(strides, depth)
    depth = len(strides)
    features = _stage_features(features_per_stage, base_features, depth)
    for name, value in (("in_channels", in_channels),
                        ("num_classes", num_classes)):
      if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}.")
    bias_init = _head_bias_initializer(head_bias_init, num_classes)

    self.in_channels = in_channels
    self.num_classes = num_classes
    self.base_features = features[0]
    self.depth = depth
    self.strides = strides
    self.features_per_stage = features
    self.normalization = normalization
    self.dtype = dtype
    self.conv_impl = conv_impl
    self.init = init
    self.activation = activation
    self.deep_supervision = bool(deep_supervision)

    kernel_init = kernel_initializer(init, activation)
    common = dict(normalization=normalization, dtype=dtype,
                  conv_impl=conv_impl, kernel_init=kernel_init,
                  activation=activation, rngs=rngs)
    self.encoder = nnx.List([
        ConvBlock(in_channels if level == 0 else features[level - 1],
                  features[level], **common)
        for level in range(depth)
    ])
    self.bottleneck = ConvBlock(
        in_channels if depth == 0 else features[depth - 1], features[depth],
        **common)
    self.decoder = nnx.List([
        UpBlock(features[level], in_features=features[level + 1],
                strides=strides[level],
                up_kernel_init=upconv_kernel_initializer(init, activation),
                **common)
        for level in reversed(range(depth))
    ])
    head = dict(dtype=dtype, kernel_init=kernel_init, bias_init=bias_init,
                rngs=rngs)
    self.head = _head_conv(features[0], num_classes, **head)
    self.aux_heads = nnx.List([
        _head_conv(features[stage], num_classes, **head)
        for stage in range(1, depth)
    ]) if deep_supervision else None

  def check_input_shape(self, shape: Sequence[int]) -> None:
    """Raises ``ValueError`` unless ``shape`` is ``[b, x, y, z, in_channels]``
    with ``x, y, z`` divisible by ``required_divisors(self.strides)``."""
    shape = tuple(shape)
    if len(shape) != 5:
      raise ValueError(
          f"UNet3D expects a 5-D input [batch, x, y, z, channels], got shape "
          f"{shape}.")
    if shape[-1] != self.in_channels:
      raise ValueError(
          f"UNet3D was built for in_channels={self.in_channels} but the input "
          f"of shape {shape} has {shape[-1]} channels (the last axis; inputs "
          "are channels-last [batch, x, y, z, channels]).")
    divisors = required_divisors(self.strides)
    bad = [f"{axis}={size} is not divisible by {d}"
           for axis, size, d in zip(_AXES, shape[1:4], divisors) if size % d]
    if bad:
      if self.strides == default_strides(self.depth):
        why = f"2**depth (depth={self.depth})"
      else:
        why = f"the product of the pooling strides {self.strides} per axis"
      raise ValueError(
          f"Spatial size {shape[1:4]} of input shape {shape} is not divisible "
          f"by {divisors} (x, y, z) = {why}: {', '.join(bad)}; pad or crop "
          "each spatial axis to a multiple of its divisor.")

  def __call__(self, x: Array) -> Array:
    """Computes the logits.

    Args:
      x: ``[batch, x, y, z, in_channels]`` images, channels-last, spatial
        axes in NIfTI voxel order; any float dtype (cast to ``dtype``).

    Returns:
      ``[batch, x, y, z, num_classes]`` float32 logits (no softmax); the
      auxiliary heads of ``deep_supervision`` are not evaluated.

    Raises:
      ValueError: if the rank or channel count is wrong or a spatial size is
        not divisible by its axis's ``required_divisors(strides)`` entry
        (checked on the static shape, so also at trace time under
        ``jax.jit``).
    """
    return self.head(self._decoder_stages(x)[0]).astype(jnp.float32)

  def multi_scale(self, x: Array) -> list[Array]:
    """The logits of every decoder stage, finest first (deep supervision).

    Args:
      x: as for ``__call__``.

    Returns:
      ``[logits_0, logits_1, ...]``, float32, no softmax: ``logits_0`` is
      ``self(x)``, ``[b, x, y, z, num_classes]``; ``logits_i`` (``1 <= i <
      depth``, from ``aux_heads[i - 1]``) is ``[b, x / fx, y / fy, z / fz,
      num_classes]`` with ``(fx, fy, fz)`` the per-axis product of
      ``strides[:i]``. Without ``deep_supervision`` only ``[logits_0]``.

    Raises:
      ValueError: as ``__call__``.
    """
    stages = self._decoder_stages(x)
    heads = [self.head, *(self.aux_heads or ())]
    return [head(stage).astype(jnp.float32)
            for head, stage in zip(heads, stages)]

  def _decoder_stages(self, x: Array) -> list[Array]:
    """The output features of every decoder stage, finest first.

    ``x: [b, x, y, z, in_channels]`` -> ``depth`` arrays, stage ``i`` of
    ``[b, x / fx, y / fy, z / fz, features_per_stage[i]]`` in ``dtype``
    (``(fx, fy, fz)`` the per-axis product of ``strides[:i]``); with
    ``depth = 0`` the bottleneck's output alone.
    """
    self.check_input_shape(x.shape)
    x = x.astype(self.dtype)
    pool = _max_pool_to_maxima if _lean_backward(self.conv_impl) else _max_pool
    skips = []
    for block, stride in zip(self.encoder, self.strides):
      x = block(x)
      skips.append(x)
      x = pool(x, tuple(stride))
    stages = [self.bottleneck(x)]
    for block, skip in zip(self.decoder, reversed(skips)):
      stages.insert(0, block(stages[0], skip))
    return stages[:max(self.depth, 1)]  # the bottleneck is no decoder stage
