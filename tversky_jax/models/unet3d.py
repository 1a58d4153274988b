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

Arrays are channels-last, ``[batch, x, y, z, channels]``: the spatial axes are
in NIfTI voxel order (the order nibabel returns), with the channels (e.g. T1,
T2, FLAIR) appended last.

Example::

  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> model = UNet3D(in_channels=3, depth=3, rngs=nnx.Rngs(0))
  >>> model(jnp.zeros((1, 16, 16, 16, 3))).shape
  (1, 16, 16, 16, 2)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn.dtypes import promote_dtype
from jax import lax

Array = jax.Array
Normalization = Literal["none", "group", "instance", "batch"]
ConvImpl = Literal["native", "2d_sum"]

NORMALIZATIONS: tuple[str, ...] = ("none", "group", "instance", "batch")
CONV_IMPLS: tuple[str, ...] = ("native", "2d_sum")

# Upper bound on the number of groups of the "group" normalization (Wu & He
# 2018 use 32 groups for 2D nets with >= 64 channels; U-Net levels here start
# at 16 channels, so 8 keeps >= 2 channels per group).
_MAX_GROUPS = 8

_NDHWC = ("NDHWC", "DHWIO", "NDHWC")


def required_divisor(depth: int) -> int:
  """Returns the number every spatial size must be divisible by: ``2**depth``.

  Each of the ``depth`` max-poolings halves the grid, and the transposed
  convolutions must restore exactly the size of the skip connection.
  """
  if depth < 0:
    raise ValueError(f"depth must be >= 0, got {depth}.")
  return 2**depth


def count_params(model: nnx.Module) -> int:
  """Returns the number of trainable parameters (``nnx.Param`` entries).

  BatchNorm running statistics (``nnx.BatchStat``) are not counted.
  """
  return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def conv3d_as_2d_sum(
    lhs: Array,
    rhs: Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
    **kwargs: Any,
) -> Array:
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
  is_plain = (
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
  if not is_plain:
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
        dimension_numbers, feature_group_count, batch_group_count, precision,
        preferred_element_type, **kwargs)

  b, _, y, z, c = lhs.shape
  kx = rhs.shape[0]
  if isinstance(padding, str):
    pads = lax.padtype_to_pads(lhs.shape[1:4], rhs.shape[:3], (1, 1, 1), padding)
  else:
    pads = [tuple(p) for p in padding]
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


def _max_pool_2x(x: Array) -> Array:
  """2x2x2 max-pooling, stride 2: ``[b, x, y, z, c] -> [b, x/2, y/2, z/2, c]``.

  A reshape + max; on XLA:CPU 2-6x faster forward+backward than
  ``lax.reduce_window`` and its ``select_and_scatter`` gradient. Same values;
  the gradient differs only at ties (shared among the tied maxima instead of
  going to one), which after a ReLU are zeros that get no gradient anyway.
  Sizes must be even.
  """
  b, sx, sy, sz, c = x.shape
  x = x.reshape(b, sx // 2, 2, sy // 2, 2, sz // 2, 2, c)
  return jnp.max(x, axis=(2, 4, 6))


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


def conv_transpose_2x(x: Array, kernel: Array) -> Array:
  """2x2x2 transposed convolution with stride 2, as one einsum.

  Equals ``lax.conv_transpose(x, kernel, (2, 2, 2), "SAME",
  dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))`` for
  ``x: [b, x, y, z, in]``, ``kernel: [2, 2, 2, in, out]``; returns
  ``[b, 2x, 2y, 2z, out]``. Since the kernel equals the stride the output
  blocks do not overlap: ``out[2v + (i, j, k)] = x[v] @ kernel[1 - i, 1 - j,
  1 - k]`` (``lax.conv_transpose`` does not flip the kernel, hence the
  ``1 - i``). Exact, and 40-80x faster forward+backward than
  ``lax.conv_transpose`` on XLA:CPU (``bench/bench_conv3d.py``).
  """
  b, sx, sy, sz, _ = x.shape
  y = jnp.einsum("bxyzc,ijkcd->bxiyjzkd", x, kernel[::-1, ::-1, ::-1])
  return y.reshape(b, 2 * sx, 2 * sy, 2 * sz, kernel.shape[-1])


class UpConv(nnx.Module):
  """2x2x2 transposed convolution with stride 2, computed as one matmul.

  ``[b, x, y, z, in_features] -> [b, 2x, 2y, 2z, out_features]``.

  Same parameters (``kernel: [2, 2, 2, in, out]``, ``bias: [out]``), same
  initialisation and same output as ``nnx.ConvTranspose(in, out,
  kernel_size=(2, 2, 2), strides=(2, 2, 2), padding="SAME")``, computed by
  ``conv_transpose_2x``.
  """

  def __init__(
      self,
      in_features: int,
      out_features: int,
      *,
      dtype: Any = jnp.float32,
      param_dtype: Any = jnp.float32,
      rngs: nnx.Rngs,
  ):
    self.in_features = in_features
    self.out_features = out_features
    self.dtype = dtype
    # nnx.ConvTranspose's default initialisers.
    self.kernel = nnx.Param(nnx.initializers.lecun_normal()(
        rngs.params(), (2, 2, 2, in_features, out_features), param_dtype))
    self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype))

  def __call__(self, x: Array) -> Array:
    x, kernel, bias = promote_dtype(
        (x, self.kernel[...], self.bias[...]), dtype=self.dtype)
    return conv_transpose_2x(x, kernel) + bias


class ConvBlock(nnx.Module):
  """Two 3x3x3 'SAME' convolutions, each followed by [normalization and] ReLU.

  ``[b, x, y, z, in_features] -> [b, x, y, z, out_features]``.
  """

  def __init__(
      self,
      in_features: int,
      out_features: int,
      *,
      normalization: str,
      dtype: Any,
      conv_impl: str,
      rngs: nnx.Rngs,
  ):
    conv_fn = conv3d_as_2d_sum if conv_impl == "2d_sum" else lax.conv_general_dilated
    # A bias in front of a normalization is cancelled by its mean subtraction.
    use_bias = normalization == "none"

    def conv(fin: int) -> nnx.Conv:
      return nnx.Conv(
          fin, out_features, kernel_size=(3, 3, 3), padding="SAME",
          use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
          conv_general_dilated=conv_fn, rngs=rngs)

    self.conv1 = conv(in_features)
    self.norm1 = _make_norm(normalization, out_features, dtype, rngs)
    self.conv2 = conv(out_features)
    self.norm2 = _make_norm(normalization, out_features, dtype, rngs)

  def __call__(self, x: Array) -> Array:
    x = self.conv1(x)
    if self.norm1 is not None:
      x = self.norm1(x)
    x = nnx.relu(x)
    x = self.conv2(x)
    if self.norm2 is not None:
      x = self.norm2(x)
    return nnx.relu(x)


class UpBlock(nnx.Module):
  """Expanding-path level: upsample, concatenate the skip, two convolutions.

  ``x: [b, x, y, z, 2f]``, ``skip: [b, 2x, 2y, 2z, f]`` ->
  ``[b, 2x, 2y, 2z, f]`` with ``f = features``. The 2x2x2 stride-2 transposed
  convolution (``UpConv``) halves the features; the skip is concatenated
  after it (upsampled features first, then the skip).
  """

  def __init__(
      self,
      features: int,
      *,
      normalization: str,
      dtype: Any,
      conv_impl: str,
      rngs: nnx.Rngs,
  ):
    self.up = UpConv(2 * features, features, dtype=dtype, rngs=rngs)
    self.block = ConvBlock(
        2 * features, features, normalization=normalization, dtype=dtype,
        conv_impl=conv_impl, rngs=rngs)

  def __call__(self, x: Array, skip: Array) -> Array:
    x = self.up(x)
    return self.block(jnp.concatenate([x, skip.astype(x.dtype)], axis=-1))


class UNet3D(nnx.Module):
  """The paper's 3D U-Net; returns float32 logits.

  Input ``[batch, x, y, z, in_channels]`` (channels-last, spatial axes in NIfTI
  voxel order); output ``[batch, x, y, z, num_classes]`` float32 logits, no
  softmax. Every spatial size must be divisible by
  ``required_divisor(depth) = 2**depth``.

  Level ``l`` (``0 <= l <= depth``; ``l = depth`` is the bottleneck) has
  ``base_features * 2**l`` features.

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
    head: the final 1x1x1 convolution.
  """

  def __init__(
      self,
      *,
      in_channels: int,
      num_classes: int = 2,
      base_features: int = 16,
      depth: int = 4,
      normalization: Normalization = "none",
      dtype: Any = jnp.float32,
      conv_impl: ConvImpl = "native",
      rngs: nnx.Rngs,
  ):
    """Builds the network.

    Args:
      in_channels: number of input channels (modalities), e.g. 3 for T1, T2
        and FLAIR.
      num_classes: number of output logits per voxel (2 in the paper).
      base_features: features of the finest level; doubled per pooling.
      depth: number of max-poolings (and of transposed convolutions).
      normalization: what follows each 3x3x3 convolution before its ReLU:
        "none" (the paper), "group" (GroupNorm, ``gcd(features, 8)`` groups),
        "instance" (InstanceNorm) or "batch" (BatchNorm, see the class
        docstring for train/eval mode).
      dtype: compute dtype, ``jnp.float32`` or ``jnp.bfloat16``. Parameters
        are always float32; the logits are cast to float32.
      conv_impl: how the 3x3x3 convolutions are computed: "native"
        (``lax.conv_general_dilated``) or "2d_sum" (``conv3d_as_2d_sum``,
        faster on CPU). Same parameters, same results up to float rounding.
      rngs: random streams for the parameter initialisation.

    Raises:
      ValueError: for an unknown ``normalization`` or ``conv_impl``, or
        non-positive sizes.
    """
    if normalization not in NORMALIZATIONS:
      raise ValueError(
          f"Unknown normalization {normalization!r}; expected one of "
          f"{NORMALIZATIONS}.")
    if conv_impl not in CONV_IMPLS:
      raise ValueError(
          f"Unknown conv_impl {conv_impl!r}; expected one of {CONV_IMPLS}.")
    for name, value, low in (("in_channels", in_channels, 1),
                             ("num_classes", num_classes, 1),
                             ("base_features", base_features, 1),
                             ("depth", depth, 0)):
      if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}.")

    self.in_channels = in_channels
    self.num_classes = num_classes
    self.base_features = base_features
    self.depth = depth
    self.normalization = normalization
    self.dtype = dtype
    self.conv_impl = conv_impl

    common = dict(normalization=normalization, dtype=dtype,
                  conv_impl=conv_impl, rngs=rngs)
    features = [base_features * 2**level for level in range(depth + 1)]
    self.encoder = nnx.List([
        ConvBlock(in_channels if level == 0 else features[level - 1],
                  features[level], **common)
        for level in range(depth)
    ])
    self.bottleneck = ConvBlock(
        in_channels if depth == 0 else features[depth - 1], features[depth],
        **common)
    self.decoder = nnx.List([
        UpBlock(features[level], **common)
        for level in reversed(range(depth))
    ])
    self.head = nnx.Conv(
        base_features, num_classes, kernel_size=(1, 1, 1), dtype=dtype,
        param_dtype=jnp.float32, rngs=rngs)

  def check_input_shape(self, shape: Sequence[int]) -> None:
    """Raises ``ValueError`` unless ``shape`` is ``[b, x, y, z, in_channels]``
    with ``x, y, z`` divisible by ``required_divisor(self.depth)``."""
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
    divisor = required_divisor(self.depth)
    if any(s % divisor for s in shape[1:4]):
      raise ValueError(
          f"Spatial size {shape[1:4]} of input shape {shape} is not divisible "
          f"by {divisor} = 2**depth (depth={self.depth}); pad or crop every "
          f"spatial axis to a multiple of {divisor}.")

  def __call__(self, x: Array) -> Array:
    """Computes the logits.

    Args:
      x: ``[batch, x, y, z, in_channels]`` images, channels-last, spatial
        axes in NIfTI voxel order; any float dtype (cast to ``dtype``).

    Returns:
      ``[batch, x, y, z, num_classes]`` float32 logits (no softmax).

    Raises:
      ValueError: if the rank or channel count is wrong or a spatial size is
        not divisible by ``2**depth`` (checked on the static shape, so also
        at trace time under ``jax.jit``).
    """
    self.check_input_shape(x.shape)
    x = x.astype(self.dtype)
    skips = []
    for block in self.encoder:
      x = block(x)
      skips.append(x)
      x = _max_pool_2x(x)
    x = self.bottleneck(x)
    for block, skip in zip(self.decoder, reversed(skips)):
      x = block(x, skip)
    return self.head(x).astype(jnp.float32)
