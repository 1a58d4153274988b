"""Tests of tversky_jax.data.augmentation (nnU-Net-style, on device).

Small 16^3 volumes; every jitted configuration is compiled once per session
(:func:`jitted`), since compiling dominates the run time on CPU.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from tversky_jax.data import augmentation as aug

N = 16
ONLY = aug.AugmentConfig.identity
SPATIAL = ONLY(p_rotation=1.0, p_scaling=1.0, label_interpolation="nearest")
INTENSITY = ONLY(p_noise=1.0, p_blur=1.0, p_blur_per_channel=1.0,
                 p_brightness=1.0, p_contrast=1.0, p_inverted_gamma=1.0,
                 p_gamma=1.0)
# Each sample draws a rotation and a gamma with probability 1/2.
HALF = ONLY(p_rotation=0.5, p_gamma=0.5)
CROP = (12, 12, 12)


@functools.lru_cache(maxsize=None)
def jitted(config, output_shape=None):
  """``jit(augment)`` for one static configuration, compiled once."""
  return jax.jit(functools.partial(aug.augment, config=config,
                                   output_shape=output_shape))


@functools.lru_cache(maxsize=None)
def jitted_params(config, batch_size, num_channels):
  return jax.jit(functools.partial(aug.sample_batch_params, config=config,
                                   batch_size=batch_size,
                                   num_channels=num_channels))


@functools.lru_cache(maxsize=None)
def jitted_half():
  """``(params, image, label)`` of HALF with the CROP output, one compile."""

  def fn(key, image, label):
    params = aug.sample_batch_params(key, HALF, image.shape[0], image.shape[-1])
    return (params, *aug.augment(key, image, label, HALF, CROP))

  return jax.jit(fn)


@functools.lru_cache(maxsize=None)
def jitted_affine(label_interpolation):
  """``jit(affine_transform)``; "linear" with 3 label classes."""
  return jax.jit(functools.partial(aug.affine_transform,
                                   label_interpolation=label_interpolation,
                                   num_classes=3))


def sphere(shape=(N, N, N), centre=(7.0, 8.5, 6.0), radius=5.0):
  """``int32`` ball label."""
  grid = np.indices(shape, dtype=np.float32)
  distance = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre)))
  return (distance <= radius).astype(np.int32)


def random_batch(batch=2, channels=1, seed=0):
  rng = np.random.default_rng(seed)
  image = rng.normal(size=(batch, N, N, N, channels)).astype(np.float32)
  label = (rng.random((batch, N, N, N)) < 0.2).astype(np.int32)
  return jnp.asarray(image), jnp.asarray(label)


# ---------------------------------------------------------------- spatial


def test_spatial_transform_keeps_image_and_label_aligned():
  """Image == label as float; nearest-neighbour label vs trilinear image."""
  label = np.stack([sphere(centre=(7.5, 7.5, 7.5), radius=6.0)] * 4)
  image = label[..., None].astype(np.float32)
  new_image, new_label = jitted(SPATIAL)(jax.random.key(3), image, label)
  for i in range(4):
    foreground = np.asarray(new_label[i]) > 0
    values = np.asarray(new_image[i, ..., 0])
    assert 0 < foreground.sum() and not np.array_equal(foreground, label[i] > 0)
    assert np.mean(values[foreground] > 0.5) >= 0.95
    assert np.mean(foreground[values > 0.5]) >= 0.95
    # The nearest of the 8 corners weighs >= 1/8 in the trilinear value.
    assert values[foreground].min() >= 0.125 - 1e-6
    assert values[~foreground].max() <= 0.875 + 1e-6


def test_linear_label_is_the_thresholded_interpolated_label():
  """One-hot trilinear + argmax == image-interpolated label > 0.5, exactly."""
  label = jnp.asarray(sphere())
  image = label[..., None].astype(jnp.float32)
  matrix = aug.rotation_matrix(jnp.array([0.4, -0.3, 0.2])) * 1.2
  new_image, new_label = jitted_affine("linear")(image, label, matrix)
  np.testing.assert_array_equal(new_label, new_image[..., 0] > 0.5)
  assert 0 < int(new_label.sum()) < int(label.sum())  # zoomed out by 1.2


@pytest.mark.parametrize("axis, angle, rot90_axes", [
    (2, np.pi / 2, (1, 0)), (0, np.pi / 2, (2, 1)), (1, -np.pi / 2, (2, 0))])
@pytest.mark.parametrize("interpolation", ["linear", "nearest"])
def test_rotation_by_90_degrees_is_rot90(axis, angle, rot90_axes,
                                         interpolation):
  rng = np.random.default_rng(1)
  image = rng.normal(size=(N, N, N, 1)).astype(np.float32)
  label = rng.integers(0, 3, (N, N, N)).astype(np.int32)  # 3 classes
  angles = np.zeros(3, np.float32)
  angles[axis] = angle
  new_image, new_label = jitted_affine(interpolation)(
      image, label, aug.rotation_matrix(angles))
  np.testing.assert_allclose(new_image, np.rot90(image, 1, rot90_axes),
                             atol=1e-5)
  np.testing.assert_array_equal(new_label, np.rot90(label, 1, rot90_axes))


def test_rotation_about_z_moves_a_marked_corner():
  image = np.zeros((N, N, N, 1), np.float32)
  label = np.zeros((N, N, N), np.int32)
  image[0, 0, 3], label[0, 0, 3] = 1.0, 1
  new_image, new_label = jitted_affine("nearest")(
      image, label, aug.rotation_matrix(jnp.array([0.0, 0.0, np.pi / 2])))
  # Output voxel o reads centre + R (o - centre): (0, 0) comes from (0, 15).
  corner = np.unravel_index(np.argmax(new_image), new_image.shape)
  assert corner == (0, N - 1, 3, 0)
  assert np.argwhere(np.asarray(new_label)).tolist() == [[0, N - 1, 3]]


def test_outside_the_volume_is_zero_image_and_background():
  image = jnp.ones((N, N, N, 1))
  label = jnp.ones((N, N, N), jnp.int32)
  new_image, new_label = jitted_affine("linear")(
      image, label, 2.0 * jnp.eye(3))  # samples twice the volume's extent
  assert float(new_image[0, 0, 0, 0]) == 0.0 and int(new_label[0, 0, 0]) == 0
  assert float(new_image[N // 2, N // 2, N // 2, 0]) == 1.0


# --------------------------------------------------------- identity, keys


def test_all_probabilities_zero_is_the_identity():
  image, label = random_batch()
  for config in (ONLY(), aug.AugmentConfig(enabled=False)):
    new_image, new_label = aug.augment(jax.random.key(0), image, label, config)
    np.testing.assert_array_equal(new_image, image)
    np.testing.assert_array_equal(new_label, label)
  new_image, new_label = aug.augment(jax.random.key(0), image, label, ONLY(),
                                     output_shape=(8, 10, 12))
  np.testing.assert_array_equal(new_image, image[:, 4:12, 3:13, 2:14])
  np.testing.assert_array_equal(new_label, label[:, 4:12, 3:13, 2:14])


def test_samples_that_draw_nothing_are_bit_identical():
  image, label = random_batch(batch=8)
  key = jax.random.key(5)
  params, new_image, new_label = jitted_half()(key, image, label)
  drawn = np.asarray(params["spatial"] | params["gamma"])
  assert drawn.any() and not drawn.all()
  assert new_image.shape == (8, *CROP, 1) and new_label.shape == (8, *CROP)
  for i in np.flatnonzero(~drawn):
    np.testing.assert_array_equal(new_image[i], image[i, 2:14, 2:14, 2:14])
    np.testing.assert_array_equal(new_label[i], label[i, 2:14, 2:14, 2:14])
  for i in np.flatnonzero(drawn):
    assert not np.array_equal(new_image[i], image[i, 2:14, 2:14, 2:14])


def test_intensity_transforms_deterministic_per_key_and_per_sample():
  image, label = random_batch(batch=3, channels=2)
  image = jnp.repeat(image[:1], 3, axis=0)  # three identical samples
  fn = jitted(INTENSITY)
  first = fn(jax.random.key(7), image, label)
  second = fn(jax.random.key(7), image, label)
  other = fn(jax.random.key(8), image, label)
  np.testing.assert_array_equal(first[0], second[0])
  assert not np.allclose(first[0], other[0])
  for i, j in ((0, 1), (0, 2), (1, 2)):
    assert not np.allclose(first[0][i], first[0][j])


def test_parameters_per_sample_and_their_ranges():
  config = aug.AugmentConfig()
  params = jitted_params(config, 512, 1)(jax.random.key(5))
  params["noise_key"] = jax.random.key_data(params["noise_key"])
  spatial = np.asarray(params["spatial"])
  for name in ("matrix", "gamma_value", "contrast_factor", "blur_sigma",
               "noise_std", "noise_key"):
    values = np.asarray(params[name])[spatial if name == "matrix" else ...]
    values = values.reshape(len(values), -1)
    assert len({tuple(v) for v in values}) == len(values) > 50, name
  # Sample i's draws depend on (key, i) only: not on the batch size, nor on
  # the other transforms' settings (HALF: batch 8, other probabilities).
  small, _, _ = jitted_half()(jax.random.key(5), *random_batch(batch=8))
  small["noise_key"] = jax.random.key_data(small["noise_key"])
  for name in ("gamma_value", "blur_sigma", "contrast_factor", "noise_key"):
    np.testing.assert_array_equal(small[name], params[name][:8])

  def rate(name):
    return float(np.mean(params[name]))

  assert abs(rate("gamma") - 0.3) < 0.07 and abs(rate("noise") - 0.1) < 0.05
  assert abs(rate("mirror") - 0.5) < 0.05
  assert abs(rate("spatial") - (1 - 0.8 * 0.8)) < 0.07
  for name, (low, high) in (("gamma_value", config.gamma),
                            ("brightness_factor", config.brightness),
                            ("blur_sigma", config.blur_sigma)):
    values = np.asarray(params[name])
    assert low <= values.min() and values.max() <= high, name
  scales = np.linalg.svd(np.asarray(params["matrix"]), compute_uv=False)
  assert 0.7 - 1e-5 <= scales.min() and scales.max() <= 1.4 + 1e-5


# ----------------------------------------------------------- mirroring


def test_mirroring_flips_image_and_label_together():
  image, label = random_batch()
  new_image, new_label = jitted(ONLY(p_mirror=1.0))(jax.random.key(0), image,
                                                    label)
  np.testing.assert_array_equal(new_image, np.flip(image, (1, 2, 3)))
  np.testing.assert_array_equal(new_label, np.flip(label, (1, 2, 3)))
  flips = jnp.array([False, True, False])
  mirror = aug._mirror  # pylint: disable=protected-access
  np.testing.assert_array_equal(mirror(label[0], flips, (0, 1, 2)),
                                np.flip(label[0], 1))


# ----------------------------------------------------------- intensity


def test_intensity_transforms_leave_the_label_and_stay_finite():
  image, label = random_batch(batch=3, channels=2)
  image = image.at[1, ..., 1].set(3.0)  # a constant channel
  new_image, new_label = jitted(INTENSITY)(jax.random.key(2), image, label)
  np.testing.assert_array_equal(new_label, label)
  assert np.all(np.isfinite(new_image))
  assert not np.allclose(new_image[0], image[0])


@pytest.mark.parametrize("invert", [False, True])
def test_gamma_keeps_range_or_mean_and_std(invert):
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(N, N, N, 2)) * [1.0, 3.0] + [0.0, 5.0],
                  jnp.float32)
  gamma = jnp.array([0.7, 1.5])
  fn = jax.jit(aug._gamma, static_argnums=(2, 3))  # pylint: disable=protected-access
  kept = fn(x, gamma, invert, False)
  axes = (0, 1, 2)
  np.testing.assert_allclose(kept.min(axes), x.min(axes), atol=1e-4)
  np.testing.assert_allclose(kept.max(axes), x.max(axes), atol=1e-4)
  assert not np.allclose(kept, x)
  stats = fn(x, gamma, invert, True)
  np.testing.assert_allclose(stats.mean(axes), x.mean(axes), atol=1e-4)
  np.testing.assert_allclose(stats.std(axes), x.std(axes), rtol=1e-4)


def test_contrast_preserves_the_channel_range():
  x = jnp.asarray(np.random.default_rng(6).normal(size=(N, N, N, 1)),
                  jnp.float32)
  y = aug._contrast(x, jnp.array([1.25]))  # pylint: disable=protected-access
  assert float(y.min()) >= float(x.min()) and float(y.max()) <= float(x.max())
  assert float(y.std()) > float(x.std())


# ----------------------------------------------------- jit, vmap, dtypes


def test_bfloat16_under_vmap():
  """bf16 images through ``jit(vmap(augment))`` match the float32 result."""
  image, label = random_batch(batch=8)
  image16 = image.astype(jnp.bfloat16)
  keys = jnp.stack([jax.random.key(5), jax.random.key(6)])
  batched = jax.jit(jax.vmap(functools.partial(
      aug.augment, config=HALF, output_shape=CROP)))(
          keys, jnp.stack([image16] * 2), jnp.stack([label] * 2))
  assert batched[0].dtype == jnp.bfloat16 and batched[1].dtype == jnp.int32
  assert batched[0].shape == (2, 8, *CROP, 1)
  _, image32, label32 = jitted_half()(keys[0], image16.astype(jnp.float32),
                                      label)
  np.testing.assert_allclose(np.asarray(batched[0][0], np.float32), image32,
                             rtol=1e-2, atol=1e-2)
  np.testing.assert_array_equal(batched[1][0], label32)
  assert not np.array_equal(batched[1][0], batched[1][1])


def test_sharded_batch_gives_the_same_result():
  """As in the data-parallel train step (``AxisType.Auto`` mesh)."""
  assert jax.device_count() >= 2  # conftest simulates four CPU devices
  devices = jax.devices()[:math.gcd(jax.device_count(), 8)]
  mesh = jax.make_mesh((len(devices),), ("data",), devices=devices,
                       axis_types=(AxisType.Auto,))
  sharding = NamedSharding(mesh, PartitionSpec("data"))
  image, label = random_batch(batch=8)
  key = jax.random.key(5)
  _, *expected = jitted_half()(key, image, label)
  sharded = jax.jit(functools.partial(aug.augment, config=HALF,
                                      output_shape=CROP),
                    out_shardings=sharding)(
      key, jax.device_put(image, sharding), jax.device_put(label, sharding))
  np.testing.assert_allclose(sharded[0], expected[0], atol=1e-5)
  np.testing.assert_array_equal(sharded[1], expected[1])


# --------------------------------------------------------------- config


def test_config_validation_and_from_dict():
  with pytest.raises(ValueError, match="p_gamma"):
    aug.AugmentConfig(p_gamma=1.5)
  with pytest.raises(ValueError, match="scaling"):
    aug.AugmentConfig(scaling=(1.4, 0.7))
  with pytest.raises(ValueError, match="label_interpolation"):
    aug.AugmentConfig(label_interpolation="cubic")
  config = aug.AugmentConfig.from_dict({"p_gamma": 0.5, "gamma": [0.8, 1.2],
                                        "mirror_axes": [0, 1]})
  assert config == dataclasses.replace(aug.AugmentConfig(), p_gamma=0.5,
                                       gamma=(0.8, 1.2), mirror_axes=(0, 1))
  assert hash(config) == hash(dataclasses.replace(config))
  with pytest.raises(ValueError, match="unknown"):
    aug.AugmentConfig.from_dict({"p_elastic": 0.1})
  with pytest.raises(ValueError, match="label"):
    aug.augment(jax.random.key(0), jnp.zeros((1, 4, 4, 4, 1)),
                jnp.zeros((1, 4, 4, 3), jnp.int32))
