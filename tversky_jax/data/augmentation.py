"""nnU-Net-style data augmentation in JAX, for the jitted train step.

Everything here is a pure function of a PRNG key and the batch, so it runs on
the accelerator inside ``jax.jit`` and a batch is augmented identically
whenever the same key is used (e.g. after resuming from a checkpoint)::

  config = AugmentConfig()                      # nnU-Net v2 defaults
  image, label = augment(key, batch["image"], batch["label"], config)

Arrays are channels last in NIfTI axis order: images ``[b, x, y, z, c]``
(float32 or bfloat16), labels ``[b, x, y, z]`` (integer). Every sample of the
batch draws its own parameters (:func:`sample_batch_params`); sample ``i``'s
draws depend on ``(key, i)`` only, not on the batch size or sharding.

The transforms and their order follow nnU-Net v2's default training pipeline
(``nnUNetTrainer.get_training_transforms``; batchgenerators v2):

1. Spatial: one affine (rotation about x, y and z, then isotropic scaling)
   about the patch centre; p(rotation) 0.2 with angles uniform in +-30 deg
   about each axis, p(scaling) 0.2 with factor uniform in [0.7, 1.4]. A factor
   s multiplies the sampling coordinates (as in batchgenerators): s > 1 shows
   a larger region, so structures get smaller. The image is interpolated
   trilinearly; the label either as one-hot probabilities interpolated
   trilinearly then argmax (``label_interpolation="linear"``, nnU-Net v2's
   default, smooth boundaries) or nearest neighbour (``"nearest"``). Both read
   the very same coordinate arrays, so they stay aligned. Outside the input
   volume the image is 0 and the label 0 (background).
2. Gaussian noise (p 0.1), std uniform in [0, 0.1], the same std for every
   channel. (batchgenerators calls this range ``noise_variance`` but uses the
   drawn value as the standard deviation; so does this module.)
3. Gaussian blur (p 0.2), each channel with probability 0.5, sigma uniform in
   [0.5, 1] per channel and per axis; separable, mirrored boundaries.
4. Multiplicative brightness (p 0.15), factor per channel in [0.75, 1.25].
5. Contrast (p 0.15), factor per channel in [0.75, 1.25] about the channel
   mean, clipped to the channel's original [min, max].
6. Inverted gamma (p 0.1) then gamma (p 0.3), gamma per channel in [0.7, 1.5],
   applied to the channel rescaled to [0, 1]; by default the channel's mean
   and standard deviation are restored afterwards (nnU-Net's
   ``p_retain_stats=1``).
7. Mirroring: each axis of ``mirror_axes`` flipped with p 0.5, image and label
   together.

Factors drawn "in [lo, hi]" with lo < 1 < hi use nnU-Net's ``BGContrast``
rule: with probability 1/2 uniform in [lo, 1], otherwise in [1, hi].
nnU-Net's ``SimulateLowResolutionTransform`` and elastic deformation (off by
default in nnU-Net v2) are not implemented.

Exactness: a transform that a sample does not draw leaves it bit-identical
(``jnp.where`` on the per-sample flag, never resampling with an identity
matrix), and a transform whose probability is 0 is not even traced. A
transform that no sample of the batch draws is skipped with ``lax.cond``.
Images are processed in float32 and cast back to their dtype at the end.

Unlike nnU-Net, the patch is not cropped from a larger rotated region unless
``augment(..., output_shape=...)`` is given a smaller shape than the input:
then the output is the centre of the transformed input (and a plain centre
crop for samples without a spatial transform), so rotated corners keep image
content instead of zeros.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

Params = dict[str, jax.Array]
Shape3 = tuple[int, int, int]

_PROBABILITIES = ("p_rotation", "p_scaling", "p_noise", "p_blur",
                  "p_blur_per_channel", "p_brightness", "p_contrast",
                  "p_inverted_gamma", "p_gamma", "p_mirror")
_RANGES = ("scaling", "noise_std", "blur_sigma", "brightness", "contrast",
           "gamma")
_LABEL_INTERPOLATIONS = ("linear", "nearest")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Probabilities and ranges of the augmentation (defaults: nnU-Net v2).

  Every ``p_*`` is a per-sample probability; 0 turns that transform off (it is
  then not computed at all), ``enabled=False`` turns everything off. Ranges
  are ``(low, high)`` and drawn uniformly unless noted. Frozen and hashable,
  so it can be a static argument of ``jax.jit``.

  Attributes:
    enabled: False makes :func:`augment` return its inputs unchanged.
    p_rotation: probability of a rotation (all three angles drawn together).
    rotation_degrees: maximum absolute angle about the x, y and z axes.
    p_scaling: probability of a scaling.
    scaling: range of the scale factor (> 1 zooms out).
    independent_scale_per_axis: one factor per axis instead of one for all.
    label_interpolation: "linear" (one-hot, trilinear, argmax) or "nearest".
    num_classes: label classes for "linear" (labels >= it become 0).
    p_noise: probability of additive Gaussian noise.
    noise_std: range of its standard deviation.
    p_blur: probability of a Gaussian blur.
    p_blur_per_channel: probability that a channel of a blurred sample is
      blurred.
    blur_sigma: range of the blur sigma (voxels), drawn per channel and axis.
    p_brightness: probability of a multiplicative brightness change.
    brightness: range of the multiplier (BGContrast rule).
    p_contrast: probability of a contrast change.
    contrast: range of the contrast factor (BGContrast rule).
    p_inverted_gamma: probability of a gamma on the negated image.
    p_gamma: probability of a gamma.
    gamma: range of the gamma exponent (BGContrast rule).
    gamma_retain_stats: restore each channel's mean and std after gamma;
      False keeps its [min, max] range instead.
    p_mirror: per-axis flip probability.
    mirror_axes: spatial axes (0, 1, 2 = x, y, z) that may be flipped.
  """

  enabled: bool = True
  p_rotation: float = 0.2
  rotation_degrees: tuple[float, float, float] = (30.0, 30.0, 30.0)
  p_scaling: float = 0.2
  scaling: tuple[float, float] = (0.7, 1.4)
  independent_scale_per_axis: bool = False
  label_interpolation: str = "linear"
  num_classes: int = 2
  p_noise: float = 0.1
  noise_std: tuple[float, float] = (0.0, 0.1)
  p_blur: float = 0.2
  p_blur_per_channel: float = 0.5
  blur_sigma: tuple[float, float] = (0.5, 1.0)
  p_brightness: float = 0.15
  brightness: tuple[float, float] = (0.75, 1.25)
  p_contrast: float = 0.15
  contrast: tuple[float, float] = (0.75, 1.25)
  p_inverted_gamma: float = 0.1
  p_gamma: float = 0.3
  gamma: tuple[float, float] = (0.7, 1.5)
  gamma_retain_stats: bool = True
  p_mirror: float = 0.5
  mirror_axes: tuple[int, ...] = (0, 1, 2)

  def __post_init__(self):
    for name in _PROBABILITIES:
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
    for name in _RANGES:
      low, high = getattr(self, name)
      if not 0.0 <= low <= high:
        raise ValueError(f"{name} must be (low, high), 0 <= low <= high, "
                         f"got {getattr(self, name)}")
    if min(self.scaling) <= 0 or min(self.blur_sigma) <= 0 or min(self.gamma) <= 0:
      raise ValueError("scaling, blur_sigma and gamma must be positive")
    if len(self.rotation_degrees) != 3:
      raise ValueError(f"rotation_degrees must be 3 angles, got {self.rotation_degrees}")
    if self.label_interpolation not in _LABEL_INTERPOLATIONS:
      raise ValueError(f"label_interpolation must be one of "
                       f"{_LABEL_INTERPOLATIONS}, got {self.label_interpolation!r}")
    if self.num_classes < 2:
      raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
    axes = tuple(self.mirror_axes)
    if not set(axes) <= {0, 1, 2} or len(set(axes)) != len(axes):
      raise ValueError(f"mirror_axes must be distinct axes in (0, 1, 2), got {axes}")

  @property
  def is_identity(self) -> bool:
    """Whether no transform can be drawn (disabled or all probabilities 0)."""
    return not self.enabled or not any((
        self.p_rotation, self.p_scaling, self.p_noise,
        self.p_blur * self.p_blur_per_channel, self.p_brightness,
        self.p_contrast, self.p_inverted_gamma, self.p_gamma,
        self.p_mirror * len(self.mirror_axes)))

  @classmethod
  def identity(cls, **overrides: Any) -> AugmentConfig:
    """Every probability 0 (no transform), then `overrides` applied.

    ``AugmentConfig.identity(p_mirror=0.5)`` is mirroring only.
    """
    return cls(**{**{name: 0.0 for name in _PROBABILITIES}, **overrides})

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> AugmentConfig:
    """From a mapping (e.g. an ``ml_collections.ConfigDict``); lists become
    tuples, an unknown key is a ``ValueError``."""
    values = dict(values)
    unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"unknown augmentation settings: {sorted(unknown)}")
    return cls(**{k: tuple(v) if isinstance(v, (list, tuple)) else v
                  for k, v in values.items()})


# --------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------


def rotation_matrix(angles: jax.Array) -> jax.Array:
  """``[3, 3]`` rotation by ``angles`` (radians) about x, then y, then z.

  Args:
    angles: ``[3]`` angles about the x, y and z axes (right-handed).

  Returns:
    ``R_z @ R_y @ R_x``, float32.
  """
  angles = jnp.asarray(angles, jnp.float32)
  c, s = jnp.cos(angles), jnp.sin(angles)
  one, zero = jnp.ones_like(c[0]), jnp.zeros_like(c[0])
  rx = jnp.array([[one, zero, zero], [zero, c[0], -s[0]], [zero, s[0], c[0]]])
  ry = jnp.array([[c[1], zero, s[1]], [zero, one, zero], [-s[1], zero, c[1]]])
  rz = jnp.array([[c[2], -s[2], zero], [s[2], c[2], zero], [zero, zero, one]])
  return rz @ ry @ rx


def _sample_coordinates(matrix: jax.Array, in_shape: Shape3,
                        out_shape: Shape3) -> list[jax.Array]:
  """Input-voxel coordinates ``[x', y', z']`` per axis of each output voxel.

  Output voxel ``o`` samples input position ``c + offset + matrix @ (o - c)``
  with ``c`` the output centre and ``offset`` the (integer) centre-crop
  offset, so the identity matrix is a plain centre crop.
  """
  centre = [(n - 1) / 2.0 for n in out_shape]
  offset = [(i - o) // 2 for i, o in zip(in_shape, out_shape)]
  axes = [jnp.arange(n, dtype=jnp.float32) - c
          for n, c in zip(out_shape, centre)]
  grids = [axes[0][:, None, None], axes[1][None, :, None],
           axes[2][None, None, :]]
  return [centre[d] + offset[d] + sum(matrix[d, j] * grids[j] for j in range(3))
          for d in range(3)]


def _corners(coordinate: jax.Array, size: int
             ) -> tuple[jax.Array, jax.Array]:
  """Lower-corner index into a 1-voxel zero-padded axis, and the fraction.

  Coordinates outside ``[-1, size]`` are clamped there (the padding ring), so
  both corners ``start, start + 1`` are inside the padded axis and points far
  outside read zeros.
  """
  q = jnp.clip(coordinate, -1.0, float(size))
  lower = jnp.clip(jnp.floor(q), -1.0, float(size - 1))
  return (lower + 1).astype(jnp.int32), q - lower


def _trilinear(volume: jax.Array, coords: Sequence[jax.Array]) -> jax.Array:
  """Trilinear samples of ``volume [x, y, z]`` (0 outside) at `coords`.

  Eight scalar gathers from the zero-padded volume, weighted and summed; XLA
  fuses the index arithmetic, the gathers and the sum into one loop over the
  output voxels.
  """
  padded = jnp.pad(volume, 1)
  starts, fractions = zip(*(_corners(q, n)
                            for q, n in zip(coords, volume.shape)))
  total = 0.0
  for corner in itertools.product((0, 1), repeat=3):
    weight = functools.reduce(operator.mul, (
        f if c else 1.0 - f for f, c in zip(fractions, corner)))
    index = tuple(s + c for s, c in zip(starts, corner))
    total = total + weight * padded.at[index].get(mode="promise_in_bounds")
  return total


def _nearest(volume: jax.Array, coords: Sequence[jax.Array]) -> jax.Array:
  """Nearest-neighbour samples of ``volume [x, y, z]`` (0 outside)."""
  padded = jnp.pad(volume, 1)
  index = tuple(
      (jnp.round(jnp.clip(q, -1.0, float(n))) + 1).astype(jnp.int32)
      for q, n in zip(coords, volume.shape))
  return padded.at[index].get(mode="promise_in_bounds")


def _label_volumes(label: jax.Array, interpolation: str,
                   num_classes: int) -> list[jax.Array]:
  """What is resampled for the label: itself, or its one-hot foreground."""
  if interpolation == "nearest":
    return [label]
  return [(label == k).astype(jnp.float32) for k in range(1, num_classes)]


def _label_from_samples(samples: list[jax.Array], dtype: Any) -> jax.Array:
  """Argmax over (1 - sum(foreground), *foreground); ties go to the lower
  class, so exactly 0.5 in a binary label is background."""
  if len(samples) == 1:
    return (samples[0] > 0.5).astype(dtype)
  background = 1.0 - sum(samples)
  return jnp.argmax(jnp.stack([background, *samples], -1),
                    axis=-1).astype(dtype)


def affine_transform(image: jax.Array, label: jax.Array, matrix: jax.Array,
                     output_shape: Sequence[int] | None = None,
                     label_interpolation: str = "linear",
                     num_classes: int = 2) -> tuple[jax.Array, jax.Array]:
  """Resamples one image and its label through an affine about the centre.

  The sampling coordinates are computed once and every image channel and
  label channel reads the same values, so image and label stay aligned.
  Outside the input the image is 0 and the label 0.

  Performance: each channel gets its own copy of the coordinates through an
  ``optimization_barrier``. Without it XLA shares the gather indices between
  the channels (and the label), materialises them, and the resampling runs
  5-6x slower on CPU; with it each channel is one fused loop (index
  arithmetic, 8 gathers, weighted sum) reading the stored coordinates.

  Args:
    image: ``float32 [x, y, z, c]``.
    label: ``int [x, y, z]``.
    matrix: ``[3, 3]``; output voxel ``o`` reads input position
      ``centre + matrix @ (o - centre)`` (see :func:`_sample_coordinates`).
    output_shape: spatial output shape, at most the input's (centre crop);
      default the input's.
    label_interpolation: "linear" (one-hot trilinear then argmax, labels
      ``>= num_classes`` become 0) or "nearest".
    num_classes: number of label classes for "linear".

  Returns:
    ``(image [x', y', z', c] float32, label [x', y', z'] label.dtype)``.
  """
  in_shape = image.shape[:3]
  out_shape = tuple(output_shape or in_shape)
  coords = tuple(jnp.broadcast_to(q, out_shape) for q in _sample_coordinates(
      jnp.asarray(matrix, jnp.float32), in_shape, out_shape))
  image = image.astype(jnp.float32)
  images = [image[..., k] for k in range(image.shape[-1])]
  labels = _label_volumes(label, label_interpolation, num_classes)
  copies = lax.optimization_barrier((coords,) * (len(images) + len(labels)))
  new_image = jnp.stack([_trilinear(v, c) for v, c in zip(images, copies)], -1)
  copies = copies[len(images):]
  if label_interpolation == "nearest":
    new_label = _nearest(label, copies[0])
  else:
    new_label = _label_from_samples(
        [_trilinear(v, c) for v, c in zip(labels, copies)], label.dtype)
  return new_image, new_label.astype(label.dtype)


def _centre_crop(x: jax.Array, out_shape: Shape3) -> jax.Array:
  """Centre crop of ``[b, x, y, z, ...]`` to spatial ``out_shape``."""
  starts = [(n - o) // 2 for n, o in zip(x.shape[1:4], out_shape)]
  return x[:, starts[0]:starts[0] + out_shape[0],
           starts[1]:starts[1] + out_shape[1],
           starts[2]:starts[2] + out_shape[2]]


# --------------------------------------------------------------------------
# Intensity transforms of one sample: x [x, y, z, c] float32
# --------------------------------------------------------------------------

_SPATIAL_AXES = (0, 1, 2)


def _gaussian_noise(x: jax.Array, std: jax.Array, key: jax.Array) -> jax.Array:
  """``x + std * N(0, 1)``. The noise is drawn flat and reshaped: the same
  values as drawing ``x.shape`` (partitionable threefry counts in row-major
  order), but XLA:CPU compiles the 1-D draw ~4x faster."""
  noise = jax.random.normal(key, (x.size,), jnp.float32).reshape(x.shape)
  return x + std * noise


def _gaussian_blur(x: jax.Array, sigma: jax.Array, radius: int) -> jax.Array:
  """Separable Gaussian blur, ``sigma [c, 3]`` per channel and axis.

  Three 1-D passes of ``2 * radius + 1`` taps with mirrored boundaries
  (scipy's "reflect"), each a weighted sum of shifted slices.
  """
  taps = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  for axis in _SPATIAL_AXES:
    weights = jnp.exp(-0.5 * (taps / sigma[:, axis, None]) ** 2)  # [c, t]
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    pad = [(0, 0)] * 4
    pad[axis] = (radius, radius)
    padded = jnp.pad(x, pad, mode="symmetric")
    n = x.shape[axis]
    x = sum(weights[:, t] * lax.slice_in_dim(padded, t, t + n, axis=axis)
            for t in range(2 * radius + 1))
  return x


def _min_max(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-channel ``(min, max)``, each ``[c]``, in one variadic reduction.

  (XLA:CPU fuses separate ``jnp.min``/``jnp.max`` reductions into a ``clip``
  consumer in a way that runs ~15x slower on a 64^3 patch.)
  """
  inf = jnp.asarray(jnp.inf, x.dtype)
  return lax.reduce((x, x), (inf, -inf),
                    lambda a, b: (jnp.minimum(a[0], b[0]),
                                  jnp.maximum(a[1], b[1])), _SPATIAL_AXES)


def _mean_std(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-channel ``(mean, std)``, each ``[c]``."""
  mean = jnp.mean(x, _SPATIAL_AXES)
  return mean, jnp.sqrt(jnp.mean(jnp.square(x - mean), _SPATIAL_AXES))


def _brightness(x: jax.Array, factor: jax.Array) -> jax.Array:
  return x * factor


def _contrast(x: jax.Array, factor: jax.Array) -> jax.Array:
  """``(x - mean) * factor + mean``, clipped to the channel's [min, max]."""
  mean = jnp.mean(x, _SPATIAL_AXES)
  low, high = _min_max(x)
  return jnp.clip((x - mean) * factor + mean, low, high)


def _gamma(x: jax.Array, gamma: jax.Array, invert: bool,
           retain_stats: bool) -> jax.Array:
  """Gamma on each channel rescaled to [0, 1], then rescaled back.

  With `invert` the gamma is applied to ``-x`` (and negated back). With
  `retain_stats` the channel's mean and std are restored afterwards;
  otherwise its [min, max] is kept.
  """
  sign = -1.0 if invert else 1.0
  x = sign * x
  low, high = _min_max(x)
  extent = high - low
  # v ** gamma as exp(gamma * log(v)): 3x faster than pow on XLA:CPU, within
  # an ulp, and 0 ** gamma = exp(-inf) = 0.
  unit = (x - low) / jnp.maximum(extent, 1e-7)
  y = jnp.exp(gamma * jnp.log(unit)) * extent + low
  if retain_stats:
    mean, std = _mean_std(x)
    new_mean, new_std = _mean_std(y)
    y = (y - new_mean) / (new_std + 1e-7) * std + mean
  return sign * y


def _mirror(x: jax.Array, flips: jax.Array, axes: Sequence[int]) -> jax.Array:
  """Flips ``x [x, y, z, ...]`` along each axis ``a`` with ``flips[a]``."""
  for axis in axes:
    x = jnp.where(flips[axis], jnp.flip(x, axis), x)
  return x


# --------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------


def _bg_contrast(below: jax.Array, u: jax.Array,
                 value_range: tuple[float, float]) -> jax.Array:
  """nnU-Net's BGContrast from two uniforms: if ``low < 1 < high``, values in
  [low, 1] when ``below < 0.5`` and in [1, high] otherwise."""
  low, high = value_range
  if low < 1.0 < high:
    return jnp.where(below < 0.5, low + u * (1.0 - low), 1.0 + u * (high - 1.0))
  return low + u * (high - low)


def _scaled(u: jax.Array, value_range: tuple[float, float]) -> jax.Array:
  low, high = value_range
  return low + u * (high - low)


def _reader(values: jax.Array) -> Callable[..., jax.Array]:
  """``take(*shape)`` returns the next ``prod(shape)`` of `values`."""
  offset = 0

  def take(*shape: int) -> jax.Array:
    nonlocal offset
    size = math.prod(shape)
    out = values[offset:offset + size].reshape(shape)
    offset += size
    return out

  return take


def _num_uniforms(num_channels: int) -> int:
  """Length of the uniform vector :func:`_params_from_uniforms` reads."""
  return 18 + 12 * num_channels


def _spatial_params(take: Callable[..., jax.Array],
                    config: AugmentConfig) -> Params:
  """Whether one sample gets a spatial transform, and its ``[3, 3]`` matrix."""
  rotate = take() < config.p_rotation
  limits = jnp.deg2rad(jnp.asarray(config.rotation_degrees, jnp.float32))
  angles = (2.0 * take(3) - 1.0) * limits
  scale = take() < config.p_scaling
  factors = _scaled(take(3), config.scaling)
  if not config.independent_scale_per_axis:
    factors = jnp.full((3,), factors[0])
  matrix = (jnp.where(rotate, rotation_matrix(angles), jnp.eye(3)) @
            jnp.diag(jnp.where(scale, factors, 1.0)))
  return {"spatial": rotate | scale, "matrix": matrix}


def _params_from_uniforms(uniforms: jax.Array, config: AugmentConfig,
                          num_channels: int) -> Params:
  """One sample's parameters from ``uniforms [_num_uniforms(c)]`` in [0, 1).

  The layout is fixed (it does not depend on `config`), so changing one
  transform's settings does not change the draws of the others.
  """
  c = num_channels
  take = _reader(uniforms)
  params = _spatial_params(take, config)
  params.update(noise=take() < config.p_noise,
                noise_std=_scaled(take(), config.noise_std))
  blur = take() < config.p_blur
  params.update(blur=blur & (take(c) < config.p_blur_per_channel),
                blur_sigma=_scaled(take(c, 3), config.blur_sigma))
  for name, value_name, value_range in (
      ("brightness", "brightness_factor", config.brightness),
      ("contrast", "contrast_factor", config.contrast),
      ("inverted_gamma", "inverted_gamma_value", config.gamma),
      ("gamma", "gamma_value", config.gamma)):
    params[name] = take() < getattr(config, f"p_{name}")
    params[value_name] = _bg_contrast(take(c), take(c), value_range)
  allowed = jnp.asarray([a in config.mirror_axes for a in _SPATIAL_AXES])
  params["mirror"] = (take(3) < config.p_mirror) & allowed
  return params


def sample_batch_params(key: jax.Array, config: AugmentConfig,
                        batch_size: int, num_channels: int) -> Params:
  """Draws the random parameters of every sample of a batch.

  One uniform draw ``[batch_size, n]`` holds all the scalars and one split
  gives a noise key per sample (few PRNG calls: threefry is slow to compile
  on CPU). With JAX's default partitionable threefry, sample ``i``'s values
  depend on ``(key, i)`` only, not on the batch size or the sharding.

  Args:
    key: PRNG key (typed or raw).
    config: the augmentation settings.
    batch_size: ``b``.
    num_channels: image channels ``c``.

  Returns:
    Per sample (leading axis ``b``), flags (bool) and values: ``spatial,
    matrix [3, 3]``, ``noise, noise_std, noise_key``, ``blur [c],
    blur_sigma [c, 3]``, ``brightness, brightness_factor [c]``, ``contrast,
    contrast_factor [c]``, ``inverted_gamma, inverted_gamma_value [c]``,
    ``gamma, gamma_value [c]``, ``mirror [3]``.
  """
  uniform_key, noise_key = jax.random.split(key)
  size = _num_uniforms(num_channels)
  uniforms = jax.random.uniform(uniform_key, (batch_size * size,)).reshape(
      batch_size, size)  # flat: compiles faster, same values
  params = jax.vmap(functools.partial(
      _params_from_uniforms, config=config, num_channels=num_channels))(
          uniforms)
  params["noise_key"] = jax.random.split(noise_key, batch_size)
  return params


# --------------------------------------------------------------------------
# The batch
# --------------------------------------------------------------------------


def _where_drawn(drawn: jax.Array, fn: Callable, image: jax.Array,
                 *args: jax.Array) -> jax.Array:
  """``fn`` (one sample) on the samples/channels where `drawn`, else as is.

  Args:
    drawn: ``bool [b]`` or ``[b, c]``.
    fn: ``fn(image [x, y, z, c], *args_i) -> [x, y, z, c]``.
    image: ``float32 [b, x, y, z, c]``.
    *args: per-sample arguments, leading axis ``b``.

  Returns:
    ``[b, x, y, z, c]``; samples not drawn are bit-identical. Skipped with
    ``lax.cond`` when nothing is drawn.
  """
  mask = drawn.reshape(drawn.shape[0], 1, 1, 1, -1)

  def run(image):
    return jnp.where(mask, jax.vmap(fn)(image, *args), image)

  return lax.cond(jnp.any(drawn), run, lambda image: image, image)


def _spatial(params: Params, image: jax.Array, label: jax.Array,
             config: AugmentConfig, out_shape: Shape3
             ) -> tuple[jax.Array, jax.Array]:
  """The spatial transform of the samples that drew one; centre crop else."""
  if config.p_rotation == 0 and config.p_scaling == 0:
    return _centre_crop(image, out_shape), _centre_crop(label, out_shape)
  transform = functools.partial(
      affine_transform, output_shape=out_shape,
      label_interpolation=config.label_interpolation,
      num_classes=config.num_classes)
  drawn = params["spatial"]

  def run(operands):
    image, label = operands
    new_image, new_label = jax.vmap(transform)(image, label, params["matrix"])
    return (jnp.where(drawn[:, None, None, None, None], new_image,
                      _centre_crop(image, out_shape)),
            jnp.where(drawn[:, None, None, None], new_label,
                      _centre_crop(label, out_shape)))

  def skip(operands):
    return tuple(_centre_crop(x, out_shape) for x in operands)

  return lax.cond(jnp.any(drawn), run, skip, (image, label))


def _intensity(params: Params, image: jax.Array,
               config: AugmentConfig) -> jax.Array:
  """Noise, blur, brightness, contrast, inverted gamma, gamma (that order)."""
  if config.p_noise > 0:
    image = _where_drawn(params["noise"], _gaussian_noise, image,
                         params["noise_std"], params["noise_key"])
  if config.p_blur > 0 and config.p_blur_per_channel > 0:
    radius = max(1, int(4.0 * config.blur_sigma[1] + 0.5))
    blur = functools.partial(_gaussian_blur, radius=radius)
    image = _where_drawn(params["blur"], blur, image, params["blur_sigma"])
  if config.p_brightness > 0:
    image = _where_drawn(params["brightness"], _brightness, image,
                         params["brightness_factor"])
  if config.p_contrast > 0:
    image = _where_drawn(params["contrast"], _contrast, image,
                         params["contrast_factor"])
  for invert, name in ((True, "inverted_gamma"), (False, "gamma")):
    if getattr(config, f"p_{name}") > 0:
      gamma = functools.partial(_gamma, invert=invert,
                                retain_stats=config.gamma_retain_stats)
      image = _where_drawn(params[name], gamma, image, params[f"{name}_value"])
  return image


def apply_params(params: Params, image: jax.Array, label: jax.Array,
                 config: AugmentConfig,
                 output_shape: Sequence[int] | None = None
                 ) -> tuple[jax.Array, jax.Array]:
  """Applies per-sample parameters (:func:`sample_batch_params`) to a batch.

  Args:
    params: :func:`sample_batch_params` output (leading batch axis ``b``).
    image: ``float [b, x, y, z, c]``.
    label: ``int [b, x, y, z]``.
    config: the augmentation settings (which transforms are traced).
    output_shape: spatial output shape ``(x', y', z')``, each at most the
      input's: the centre of the transformed input. Default the input's.

  Returns:
    ``(image [b, x', y', z', c] image.dtype, label [b, x', y', z']
    label.dtype)``.
  """
  out_shape = _check_batch(image, label, output_shape)
  dtype = image.dtype
  image, label = _spatial(params, image.astype(jnp.float32), label, config,
                          out_shape)
  image = _intensity(params, image, config)
  if config.p_mirror > 0 and config.mirror_axes:
    mirror = functools.partial(_mirror, axes=config.mirror_axes)
    image = jax.vmap(mirror)(image, params["mirror"])
    label = jax.vmap(mirror)(label, params["mirror"])
  return image.astype(dtype), label


def _check_batch(image: jax.Array, label: jax.Array,
                 output_shape: Sequence[int] | None) -> Shape3:
  if image.ndim != 5:
    raise ValueError(f"image must be [b, x, y, z, c], got shape {image.shape}")
  if label.shape != image.shape[:4]:
    raise ValueError(f"label shape {label.shape} must be image shape "
                     f"{image.shape} without channels")
  if not jnp.issubdtype(image.dtype, jnp.floating):
    raise ValueError(f"image must be floating point, got {image.dtype}")
  if not jnp.issubdtype(label.dtype, jnp.integer):
    raise ValueError(f"label must be integer, got {label.dtype}")
  out_shape = tuple(int(n) for n in (output_shape or image.shape[1:4]))
  if len(out_shape) != 3 or not all(
      0 < o <= n for o, n in zip(out_shape, image.shape[1:4])):
    raise ValueError(f"output_shape {out_shape} must be 3 sizes within the "
                     f"input's {image.shape[1:4]}")
  return out_shape  # type: ignore[return-value]


def augment(key: jax.Array, image: jax.Array, label: jax.Array,
            config: AugmentConfig = AugmentConfig(),
            output_shape: Sequence[int] | None = None
            ) -> tuple[jax.Array, jax.Array]:
  """nnU-Net-style random augmentation of a batch (see the module docstring).

  Per-sample parameters come from :func:`sample_batch_params`. Jittable
  (`config` and `output_shape` static) and vmappable.

  Args:
    key: PRNG key (typed or raw uint32).
    image: ``float32/bfloat16 [b, x, y, z, c]``.
    label: ``int [b, x, y, z]``.
    config: probabilities and ranges; with ``config.is_identity`` (e.g.
      ``enabled=False``) the inputs are returned (centre-cropped).
    output_shape: spatial output shape (centre of the transformed input),
      each at most the input's; default the input's.

  Returns:
    ``(image [b, x', y', z', c], label [b, x', y', z'])`` with the input
    dtypes.
  """
  out_shape = _check_batch(image, label, output_shape)
  if config.is_identity:
    if out_shape == tuple(image.shape[1:4]):
      return image, label
    return _centre_crop(image, out_shape), _centre_crop(label, out_shape)
  params = sample_batch_params(key, config, image.shape[0], image.shape[-1])
  return apply_params(params, image, label, config, out_shape)
