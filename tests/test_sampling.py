"""Tests for tversky_jax.data.sampling: padding, patches, flips."""

import hashlib
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


def test_padding_argument_errors():
  image, label = coordinate_volume((4, 4, 4))
  with pytest.raises(ValueError, match="multiple"):
    sampling.round_up_shape(image.shape[:3], 0)
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


def test_sample_patch_of_a_small_volume_equals_pad_then_crop():
  # A volume smaller than the patch along two axes: the patch is cropped
  # from the unpadded volume, as if padded first (only the box is copied).
  image, label = coordinate_volume((5, 9, 4), channels=2)
  label = (np.arange(label.size).reshape(label.shape) % 7).astype(np.uint8)
  widths = sampling.center_pad_widths(label.shape, (8, 6, 7))
  padded = np.pad(image, (*widths, (0, 0)))
  padded_label = np.pad(label, widths)
  seen = set()
  rng = np.random.default_rng(0)
  for _ in range(60):
    patch, patch_label = sampling.sample_patch(image, label, (8, 6, 7), rng, 0.0)
    matches = [(y,) for y in range(padded.shape[1] - 5)
               if np.array_equal(patch, padded[:, y:y + 6, :])
               and np.array_equal(patch_label, padded_label[:, y:y + 6, :])]
    assert len(matches) == 1
    seen.add(matches[0])
  assert len(seen) == padded.shape[1] - 5  # every valid corner was drawn


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


@pytest.mark.parametrize("channels", [1, 3])
def test_random_flip_equals_np_flip_channel_by_channel(channels):
  # Several channels are flipped as one item per voxel: their order and
  # values must survive, for every subset of axes and for a strided input.
  rng = np.random.default_rng(0)
  image = rng.normal(size=(4, 5, 6, channels)).astype(np.float32)
  label = rng.integers(0, 3, size=(4, 5, 6)).astype(np.uint8)
  for source in (image, image[:, ::-1]):  # contiguous and not
    for axes in [(0,), (1,), (2,), (0, 2), (0, 1, 2)]:
      img, lab = sampling.random_flip(source, label, rng, axes=axes, probability=1.0)
      np.testing.assert_array_equal(img, np.flip(source, axes))
      np.testing.assert_array_equal(lab, np.flip(label, axes))
      assert img.flags.c_contiguous and img.dtype == np.float32


@pytest.mark.parametrize("channels", [1, 3])
def test_random_flip_into_out_equals_new_arrays(channels):
  # The pipeline writes each sample into its batch: float32 image, int32 label.
  image = np.random.default_rng(1).normal(size=(4, 5, 6, channels)).astype(np.float32)
  label = np.random.default_rng(2).integers(0, 3, size=(4, 5, 6)).astype(np.uint8)
  for source in (image, image[:, ::-1]):
    for seed in range(6):
      expected = sampling.random_flip(source, label, np.random.default_rng(seed))
      batch = (np.zeros((2, *image.shape), np.float32), np.zeros((2, 4, 5, 6), np.int32))
      out = (batch[0][1], batch[1][1])
      got = sampling.random_flip(source, label, np.random.default_rng(seed), out=out)
      assert got[0] is out[0] and got[1] is out[1]
      np.testing.assert_array_equal(batch[0][1], expected[0])
      np.testing.assert_array_equal(batch[1][1], expected[1])
      assert not batch[0][0].any() and not batch[1][0].any()
  with pytest.raises(ValueError, match="out must have the shapes"):
    sampling.random_flip(image, label, np.random.default_rng(0),
                         out=(np.zeros(image.shape), np.zeros((4, 5, 5))))


def test_crop_padded_into_zeros_equals_a_new_array():
  image, _ = coordinate_volume((6, 5, 4))
  label = (image[..., 0] % 5 + 1).astype(np.uint8)  # no zeros: padding shows
  widths = sampling.center_pad_widths(label.shape, (8, 8, 4))  # x 1+1, y 1+2
  padded, padded_label = sampling.pad_to_shape(image, label, (8, 8, 4))
  for start in [(0, 0, 0), (2, 3, 0), (1, 1, 1)]:
    size = (6, 5, 3)
    box = tuple(slice(s, s + p) for s, p in zip(start, size))
    new = sampling.crop_padded(image, widths, start, size)
    np.testing.assert_array_equal(new, padded[box])
    out = np.zeros((2, *size), np.int32)  # one sample of a batch, another dtype
    assert sampling.crop_padded(label, widths, start, size, out=out[0]) is not None
    np.testing.assert_array_equal(out[0], padded_label[box])
    assert not out[1].any()
  with pytest.raises(ValueError, match="out must have shape"):
    sampling.crop_padded(label, widths, (0, 0, 0), (6, 5, 3), out=np.zeros((6, 5, 4)))


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
  for fn in (sampling.pad_to_shape, sampling.sample_patch,
             sampling.random_flip, sampling.foreground_voxels):
    assert pickle.loads(pickle.dumps(fn)) is fn


# ----------------------------------------------------- per-class foreground


def digest(arrays):
  """Short sha256 of arrays (dtype, shape and bytes), to pin a sample stream."""
  h = hashlib.sha256()
  for a in arrays:
    a = np.ascontiguousarray(a)
    h.update(str(a.dtype).encode())
    h.update(str(a.shape).encode())
    h.update(a.tobytes())
  return h.hexdigest()[:16]


def patch_stream(max_label, **kwargs):
  """120 patches of a random volume with labels in [0, max_label], as a digest."""
  rng = np.random.default_rng(99)
  image = rng.normal(size=(18, 20, 22, 2)).astype(np.float32)
  label = ((rng.random((18, 20, 22)) < 0.02).astype(np.uint8)
           * rng.integers(1, max_label + 1, (18, 20, 22)).astype(np.uint8))
  if "foreground" in kwargs:
    kwargs["foreground"] = sampling.foreground_voxels(label, kwargs.pop("foreground"))
  r = np.random.default_rng(5)
  out = []
  for fraction in (0.0, 0.33, 1.0):
    for _ in range(20):
      out += sampling.sample_patch(image, label, (8, 12, 24), r, fraction, **kwargs)
  return digest(out)


def test_binary_sample_stream_is_unchanged():
  # Digests of the stream before per-class sampling existed (numpy 2.4 Generator
  # streams); binary labels give it pooled and per class.
  assert patch_stream(1) == "25dc2d3f0c299119"
  assert patch_stream(1, num_classes=2) == "25dc2d3f0c299119"
  assert patch_stream(1, num_classes=5) == "25dc2d3f0c299119"
  assert patch_stream(1, foreground=2) == "25dc2d3f0c299119"
  assert patch_stream(1, foreground=None) == "25dc2d3f0c299119"
  # Multi-class labels without num_classes keep the pooled stream.
  assert patch_stream(2) == "a7dfb80f9bb8b18b"
  assert patch_stream(2, num_classes=3) != "a7dfb80f9bb8b18b"


def three_class_volume():
  """32^3: class 1 the box [6, 26)^3 (8000 voxels), class 2 one voxel inside it."""
  image, label = coordinate_volume((32, 32, 32))
  label[6:26, 6:26, 6:26] = 1
  label[16, 17, 18] = 2
  return image, label


@pytest.mark.parametrize("fraction", [1.0, 0.33])
def test_per_class_sampling_centres_a_rare_class_as_often_as_a_large_one(fraction):
  image, label = three_class_volume()
  foreground = sampling.foreground_voxels(label, 3)
  n = 800
  rng = np.random.default_rng(0)
  # No patch is clipped (centres in [6, 26), patch 8): the centre voxel is the drawn one.
  centres = np.array([sampling.sample_patch(image, label, (8, 8, 8), rng, fraction,
                                            foreground)[1][4, 4, 4] for _ in range(n)])
  assert abs(np.mean(centres == 2) - fraction / 2) < 0.05, np.mean(centres == 2)
  assert np.mean(centres == 1) > fraction / 2 - 0.05
  # Pooled sampling finds the rare voxel 1 in 8001 times.
  rng = np.random.default_rng(0)
  pooled = [sampling.sample_patch(image, label, (8, 8, 8), rng, fraction)[1][4, 4, 4]
            for _ in range(n)]
  assert np.mean(np.array(pooled) == 2) < 0.01


def test_per_class_num_classes_equals_precomputed_foreground():
  image, label = three_class_volume()
  a, b = np.random.default_rng(3), np.random.default_rng(3)
  for _ in range(10):
    pa = sampling.sample_patch(image, label, (8, 8, 8), a, 0.5, num_classes=3)
    pb = sampling.sample_patch(image, label, (8, 8, 8), b, 0.5,
                               sampling.foreground_voxels(label, 3))
    np.testing.assert_array_equal(pa[0], pb[0])
    np.testing.assert_array_equal(pa[1], pb[1])


def test_foreground_voxels_per_class():
  label = np.zeros((12, 10, 8), np.uint8)
  label[1:4, 2:9, 3:5] = 1
  label[7, 7, 7] = 3
  voxels = sampling.foreground_voxels(label, 4)
  assert list(voxels) == [1, 3]  # present classes only, in order
  for k, v in voxels.items():
    assert v.dtype == np.int32 and v.shape[1] == 3
    np.testing.assert_array_equal(v, np.argwhere(label == k))
  np.testing.assert_array_equal(sampling.foreground_voxels(label), np.argwhere(label > 0))
  assert sampling.foreground_voxels(np.zeros((4, 4, 4), np.uint8), 2) == {}


def test_foreground_voxels_keeps_a_fixed_random_subset_of_large_classes():
  label = np.zeros((20, 20, 20), np.uint8)
  label[2:18, 2:18, 2:18] = 1  # 4096 voxels
  label[0, 0, 0] = 2
  subset = sampling.foreground_voxels(label, 3, max_per_class=100)
  assert len(subset[1]) == 100 and len(subset[2]) == 1
  rows = subset[1].astype(np.int64) @ [400, 20, 1]
  assert np.all(np.diff(rows) > 0)  # distinct, in raster order
  assert np.all(label[tuple(subset[1].T)] == 1)
  assert rows.max() - rows.min() > 4000  # spread over the class, not its first voxels
  again = sampling.foreground_voxels(label.copy(), 3, max_per_class=100)
  np.testing.assert_array_equal(subset[1], again[1])
  assert len(sampling.foreground_voxels(label, 3, max_per_class=None)[1]) == 4096
  with pytest.raises(ValueError, match="max_per_class"):
    sampling.foreground_voxels(label, 3, max_per_class=0)


def test_label_values_outside_the_classes_are_errors():
  label = np.zeros((6, 6, 6), np.int16)
  label[1, 1, 1], label[2, 2, 2], label[3, 3, 3] = 1, 3, 7
  with pytest.raises(ValueError, match=r"label value\(s\) 3, 7 .*num_classes=3"):
    sampling.foreground_voxels(label, 3)
  label[2, 2, 2] = -1
  with pytest.raises(ValueError, match=r"value\(s\) -1, 7 .*num_classes=3"):
    sampling.check_label_values(label, 3)
  image = np.zeros((6, 6, 6, 1), np.float32)
  with pytest.raises(ValueError, match=r"value\(s\) -1, 7 .*num_classes=2"):
    sampling.sample_patch(image, label, (4, 4, 4), np.random.default_rng(0), num_classes=2)
  label[2, 2, 2] = 0
  sampling.check_label_values(label, 8)
  for bad in (1, 0, 257, True, 2.0):
    with pytest.raises(ValueError, match="num_classes"):
      sampling.check_label_values(label, bad)


def test_foreground_mapping_errors():
  image, label = coordinate_volume((8, 8, 8))
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match="foreground must be"):
    sampling.sample_patch(image, label, (4, 4, 4), rng, 0.5, {1: np.zeros((2, 2), int)})
  # Empty classes are skipped; no class at all falls back to a random crop.
  patch, _ = sampling.sample_patch(image, label, (4, 4, 4), rng, 1.0, {1: np.zeros((0, 3), int)})
  assert patch.shape == (4, 4, 4, 2)


# ---------------------------------------------------------- per-axis padding


def test_round_up_shape_per_axis():
  assert sampling.round_up_shape((17, 32, 5), (4, 8, 2)) == (20, 32, 6)
  assert sampling.round_up_shape((17, 32, 5), 4) == (20, 32, 8)
  for bad in (0, (2, 2), (2, 0, 2), (2, 2.0, 2), (2, True, 2)):
    with pytest.raises(ValueError, match="multiple"):
      sampling.round_up_shape((17, 32, 5), bad)


def test_new_functions_are_picklable():
  for fn in (sampling.check_label_values, sampling.round_up_shape):
    assert pickle.loads(pickle.dumps(fn)) is fn
