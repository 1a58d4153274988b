"""Tests for tversky_jax.data.sampling: padding, patches, flips."""

import pickle

import numpy as np
import pytest

from tversky_jax.data import sampling


def coordinate_volume(shape, channels=2):
  """Image whose channel 0 encodes the voxel position; label all zero."""
  x, y, z = np.indices(shape)
  code = 10000.0 * (x + 1) + 100.0 * (y + 1) + (z + 1)
  image = np.stack([code] * channels, axis=-1).astype(np.float32)
  return image, np.zeros(shape, np.uint8)


def position(value):
  """Inverse of coordinate_volume: voxel index of an encoded value (0 = padding)."""
  v = int(round(float(value)))
  return (v // 10000 - 1, (v // 100) % 100 - 1, v % 100 - 1)


# --------------------------------------------------------------------- padding


def test_center_pad_widths():
  assert sampling.center_pad_widths((10, 16, 20), (16, 16, 16)) == ((3, 3), (0, 0), (0, 0))
  assert sampling.center_pad_widths((9, 4, 1), (12, 5, 4)) == ((1, 2), (0, 1), (1, 2))


def test_pad_to_shape_centres_and_zero_fills():
  image, label = coordinate_volume((5, 8, 3))
  label[2, 3, 1] = 1
  padded, padded_label = sampling.pad_to_shape(image, label, (8, 6, 7))
  assert padded.shape == (8, 8, 7, 2) and padded_label.shape == (8, 8, 7)
  assert padded.dtype == image.dtype and padded_label.dtype == label.dtype
  np.testing.assert_array_equal(padded[1:6, :, 2:5], image)  # (1, 2) and (2, 2) padding
  np.testing.assert_array_equal(padded_label[1:6, :, 2:5], label)
  assert padded.sum() == image.sum() and padded_label.sum() == 1


def test_pad_to_shape_no_op_and_none_label():
  image, label = coordinate_volume((8, 8, 8))
  same_image, same_label = sampling.pad_to_shape(image, label, (4, 8, 6))
  assert same_image is image and same_label is label
  padded, none = sampling.pad_to_shape(image, None, (10, 8, 8))
  assert padded.shape == (10, 8, 8, 2) and none is None


@pytest.mark.parametrize("depth", [1, 3, 4])
def test_pad_to_multiple(depth):
  image, label = coordinate_volume((17, 32, 5))
  padded, padded_label = sampling.pad_to_multiple(image, label, 2**depth)
  assert all(s % 2**depth == 0 for s in padded.shape[:3])
  assert all(0 <= p - s < 2**depth for p, s in zip(padded.shape[:3], image.shape[:3]))
  assert padded_label.shape == padded.shape[:3]
  assert padded.sum() == image.sum()


def test_padding_argument_errors():
  image, label = coordinate_volume((4, 4, 4))
  with pytest.raises(ValueError, match="multiple"):
    sampling.pad_to_multiple(image, label, 0)
  with pytest.raises(ValueError, match="label shape"):
    sampling.pad_to_shape(image, label[:3], (4, 4, 4))
  with pytest.raises(ValueError, match=r"\[x, y, z, channels\]"):
    sampling.pad_to_shape(image[..., 0], label, (4, 4, 4))
  with pytest.raises(ValueError, match="target_shape"):
    sampling.pad_to_shape(image, label, (4, 4))


# ---------------------------------------------------------------- sample_patch


def test_sample_patch_shapes_dtypes_and_content():
  image, label = coordinate_volume((20, 24, 16), channels=3)
  rng = np.random.default_rng(0)
  for _ in range(20):
    patch, patch_label = sampling.sample_patch(image, label, (8, 6, 4), rng, 0.0)
    assert patch.shape == (8, 6, 4, 3) and patch_label.shape == (8, 6, 4)
    assert patch.dtype == np.float32 and patch_label.dtype == np.uint8
    assert patch.flags.c_contiguous
    x, y, z = position(patch[0, 0, 0, 0])
    np.testing.assert_array_equal(patch, image[x:x + 8, y:y + 6, z:z + 4])


def test_sample_patch_foreground_centring_frequency():
  image, label = coordinate_volume((24, 24, 24))
  label[11, 12, 13] = 1  # one interior lesion voxel
  patch_shape = (8, 8, 8)
  center = (4, 4, 4)
  for fraction in (0.0, 0.3, 1.0):
    rng = np.random.default_rng(42)
    n = 1000
    centred = sum(
        sampling.sample_patch(image, label, patch_shape, rng, fraction)[1][center] == 1
        for _ in range(n)
    )
    # Random crops put the voxel at the centre with probability 1/17^3.
    assert abs(centred / n - fraction) < 0.05, (fraction, centred)


def test_sample_patch_clips_to_bounds_near_edges():
  image, label = coordinate_volume((16, 16, 16))
  label[0, 15, 7] = 1
  rng = np.random.default_rng(0)
  for _ in range(10):
    patch, patch_label = sampling.sample_patch(image, label, (8, 8, 8), rng, 1.0)
    assert position(patch[0, 0, 0, 0]) == (0, 8, 3)
    assert patch_label[0, 7, 4] == 1


def test_sample_patch_draws_among_all_foreground_voxels():
  image, label = coordinate_volume((32, 32, 32))
  voxels = [(5, 5, 5), (20, 10, 25), (26, 26, 6)]
  for v in voxels:
    label[v] = 1
  rng = np.random.default_rng(1)
  seen = set()
  for _ in range(60):
    patch, _ = sampling.sample_patch(image, label, (6, 6, 6), rng, 1.0)
    seen.add(position(patch[3, 3, 3, 0]))
  assert seen == set(voxels)


def test_sample_patch_without_foreground_falls_back_to_random_crop():
  image, label = coordinate_volume((16, 16, 16))
  rng = np.random.default_rng(0)
  corners = {position(sampling.sample_patch(image, label, (4, 4, 4), rng, 1.0)[0][0, 0, 0, 0])
             for _ in range(50)}
  assert len(corners) > 10


def test_sample_patch_pads_small_volumes():
  image, label = coordinate_volume((6, 16, 3))
  label[3, 8, 1] = 1
  rng = np.random.default_rng(0)
  patch, patch_label = sampling.sample_patch(image, label, (8, 8, 8), rng, 1.0)
  assert patch.shape == (8, 8, 8, 2) and patch_label.shape == (8, 8, 8)
  assert patch_label.sum() == 1
  assert np.all(patch[0] == 0) and np.all(patch[7] == 0)  # x padded (1, 1)
  assert np.all(patch[:, :, :2] == 0) and np.all(patch[:, :, 5:] == 0)  # z padded (2, 3)


def test_sample_patch_precomputed_foreground_and_determinism():
  rng = np.random.default_rng(7)
  image = rng.normal(size=(20, 20, 20, 3)).astype(np.float32)
  label = (rng.random((20, 20, 20)) < 0.002).astype(np.uint8)
  foreground = sampling.foreground_voxels(label)
  assert foreground.shape == (label.sum(), 3)

  def draws(seed, fg):
    r = np.random.default_rng(seed)
    return [sampling.sample_patch(image, label, (8, 8, 8), r, 0.5, fg) for _ in range(10)]

  a, b, c, other = draws(3, None), draws(3, foreground), draws(3, None), draws(4, None)
  for (pa, la), (pb, lb), (pc, lc) in zip(a, b, c):
    np.testing.assert_array_equal(pa, pb)
    np.testing.assert_array_equal(pa, pc)
    np.testing.assert_array_equal(la, lb)
  assert any(not np.array_equal(pa, po) for (pa, _), (po, _) in zip(a, other))


def test_sample_patch_argument_errors():
  image, label = coordinate_volume((8, 8, 8))
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match="foreground_fraction"):
    sampling.sample_patch(image, label, (4, 4, 4), rng, 1.5)
  with pytest.raises(ValueError, match="patch_shape"):
    sampling.sample_patch(image, label, (4, 0, 4), rng)
  with pytest.raises(ValueError, match="foreground must be"):
    sampling.sample_patch(image, label, (4, 4, 4), rng, 0.5, np.zeros((3,), int))


# ----------------------------------------------------------------- random_flip


def test_random_flip_keeps_image_and_label_aligned():
  rng = np.random.default_rng(0)
  image, _ = coordinate_volume((6, 7, 8))
  label = (image[..., 0] % 7 == 0).astype(np.uint8)  # a label that is a function of the image
  flipped_axes = []
  for _ in range(40):
    img, lab = sampling.random_flip(image, label, rng)
    assert img.shape == image.shape and lab.shape == label.shape
    assert img.dtype == image.dtype and lab.dtype == label.dtype
    assert img.flags.c_contiguous and lab.flags.c_contiguous
    np.testing.assert_array_equal(lab, (img[..., 0] % 7 == 0))
    x, y, z = position(img[0, 0, 0, 0])
    flipped_axes.append((x != 0, y != 0, z != 0))
  frequency = np.mean(flipped_axes, axis=0)
  assert np.all((frequency > 0.2) & (frequency < 0.8)), frequency


def test_random_flip_probability_one_and_zero_and_axes():
  image, label = coordinate_volume((4, 5, 6))
  label[0, 1, 2] = 1
  rng = np.random.default_rng(0)
  img, lab = sampling.random_flip(image, label, rng, probability=1.0)
  np.testing.assert_array_equal(img, image[::-1, ::-1, ::-1])
  np.testing.assert_array_equal(lab, label[::-1, ::-1, ::-1])
  img, lab = sampling.random_flip(image, label, rng, probability=0.0)
  np.testing.assert_array_equal(img, image)
  img, lab = sampling.random_flip(image, label, rng, axes=(1,), probability=1.0)
  np.testing.assert_array_equal(img, image[:, ::-1])
  np.testing.assert_array_equal(lab, label[:, ::-1])
  img, none = sampling.random_flip(image, None, rng, probability=1.0)
  assert none is None
  with pytest.raises(ValueError, match="axes"):
    sampling.random_flip(image, label, rng, axes=(3,))
  with pytest.raises(ValueError, match="axes"):
    sampling.random_flip(image, label, rng, axes=(0, 0))


def test_random_flip_deterministic_given_seed():
  image, label = coordinate_volume((5, 5, 5))
  a = [sampling.random_flip(image, label, np.random.default_rng(s))[0] for s in range(8)]
  b = [sampling.random_flip(image, label, np.random.default_rng(s))[0] for s in range(8)]
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert len({position(x[0, 0, 0, 0]) for x in a}) > 1


def test_functions_are_picklable():
  for fn in (sampling.pad_to_shape, sampling.pad_to_multiple, sampling.sample_patch,
             sampling.random_flip, sampling.foreground_voxels):
    assert pickle.loads(pickle.dumps(fn)) is fn
