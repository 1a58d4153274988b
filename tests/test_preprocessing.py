"""Tests of tversky_jax.data.preprocessing (tiny hand-made volumes)."""

import dataclasses
import os

import numpy as np
import pytest
from scipy import ndimage

from tests.test_planning import make_dataset
from tversky_jax.data import nifti
from tversky_jax.data import planning
from tversky_jax.data import preprocessing


def make_plan(target_spacing=(1.0, 1.0, 1.0), normalization=("zscore",), intensity=None,
              **overrides):
  """A Plan with only the preprocessing fields meaningful."""
  stats = planning.IntensityStats(0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1)
  fields = dict(
      dataset_name="Dataset000_Test", channel_names=("T1",) * len(normalization),
      labels={"background": 0, "a": 1, "b": 2}, num_classes=3, num_training=1,
      median_spacing=target_spacing, target_spacing=target_spacing, anisotropic_axis=None,
      normalization=normalization, intensity=intensity or (stats,) * len(normalization),
      median_shape=(8, 8, 8), resampled_median_shape=(8, 8, 8), patch_size=(8, 8, 8),
      batch_size=2, num_pool_per_axis=(1, 1, 1), pool_strides=((2, 2, 2),),
      features_per_stage=(4, 8), base_features=4, estimated_memory_bytes=1,
      memory_budget_bytes=1, memory_source="test", conv_impl="native",
      class_frequencies={"background": 1.0, "a": 0.0, "b": 0.0}, image_order=3,
      label_order=1, order_z=0, anisotropy_threshold=3.0, input_hash="")
  fields.update(overrides)
  return planning.Plan(**fields)


def smooth_volume(shape, spacing):
  """A smooth function of the world position (mm) sampled on a grid."""
  axes = [(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing)]
  x, y, z = np.meshgrid(*axes, indexing="ij")
  return np.sin(x / 7.0) * np.cos(y / 9.0) + 0.02 * z


def ball_labels(shape, spacing):
  """Label 1: a ball of radius 15 mm; label 2: a ball of radius 8 mm inside it."""
  axes = [(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing)]
  x, y, z = np.meshgrid(*axes, indexing="ij")
  centre = [n * s / 2 for n, s in zip(shape, spacing)]
  r = np.sqrt((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2)
  return np.where(r < 8, 2, np.where(r < 15, 1, 0)).astype(np.uint8)


def dice(a, b):
  return 2 * np.sum(a & b) / (np.sum(a) + np.sum(b))


# --------------------------------------------------------------------------
# Resampling


def test_separable_resampling_equals_scipy_affine_transform():
  x = np.random.default_rng(0).normal(size=(9, 7, 5)).astype(np.float32)
  shape = (13, 4, 8)
  scale = np.array(x.shape) / np.array(shape)
  for order in (0, 1, 3):
    expected = ndimage.affine_transform(x.astype(np.float64), scale, offset=(scale - 1) / 2,
                                        output_shape=shape, order=order, mode="nearest")
    np.testing.assert_allclose(preprocessing.resample(x, shape, (order,) * 3), expected,
                               atol=1e-5)


def test_coarse_axis_of_an_anisotropic_case_gets_order_z():
  assert preprocessing.axis_orders((1.0, 1.0, 4.0), (1.5, 1.5, 1.5), 3, 0) == (3, 3, 0)
  assert preprocessing.axis_orders((0.5, 0.5, 1.0), (1.0, 1.0, 3.5), 3, 0) == (3, 3, 0)
  assert preprocessing.axis_orders((1.0, 2.0, 1.0), (1.0, 1.0, 1.0), 3, 0) == (3, 3, 3)


def test_smooth_volume_survives_the_round_trip():
  spacing, target = (1.0, 1.2, 3.0), (1.5, 1.5, 1.5)
  original = smooth_volume((30, 26, 10), spacing).astype(np.float32)
  image = original[..., None] + 5.0  # Non-zero everywhere: no crop.
  plan = make_plan(target, normalization=("none",), image_order=3, order_z=3)
  out, _, meta = preprocessing.preprocess_case(image, spacing, np.eye(4), plan)
  assert out.shape == (20, 21, 20, 1) == (*meta.preprocessed_shape, 1)
  back = preprocessing.resample(out, meta.shape_after_crop, (3, 3, 3))[..., 0] - 5.0
  assert back.shape == original.shape
  assert np.abs(back - original)[1:-1, 1:-1, 1:-1].max() < 0.03


def test_shapes_and_affines_are_exact():
  image = np.zeros((20, 16, 10, 1), np.float32)
  image[3:17, 2:14, 1:9] = 1.0  # Crop box (3, 17), (2, 14), (1, 9): 14 x 12 x 8.
  affine = np.array([[2.0, 0, 0, 10], [0, 2.0, 0, 20], [0, 0, 3.0, 30], [0, 0, 0, 1]])
  plan = make_plan((1.4, 1.5, 2.0))
  _, _, meta = preprocessing.preprocess_case(image, (2.0, 2.0, 3.0), affine, plan)
  assert meta.bbox == ((3, 17), (2, 14), (1, 9)) and meta.shape_after_crop == (14, 12, 8)
  # round(14 * 2 / 1.4) = 20, round(12 * 2 / 1.5) = 16, round(8 * 3 / 2) = 12.
  assert meta.preprocessed_shape == (20, 16, 12)
  # New voxel 0 sits at crop voxel (s - 1) / 2, s = 14/20, 12/16, 8/12.
  scale = np.array([14 / 20, 12 / 16, 8 / 12])
  start = np.array([3, 2, 1]) + (scale - 1) / 2
  expected = np.eye(4)
  expected[:3, :3] = np.diag([2.0, 2.0, 3.0] * scale)
  expected[:3, 3] = np.array([10, 20, 30]) + np.array([2.0, 2.0, 3.0]) * start
  np.testing.assert_allclose(np.array(meta.preprocessed_affine), expected, atol=1e-12)
  np.testing.assert_array_equal(np.array(meta.affine), affine)


def test_resampled_values_sit_where_the_affine_says():
  """A linear ramp in world x, linearly resampled, equals world x at the new voxel centres."""
  affine = np.array([[1.5, 0, 0, -7], [0, 1.0, 0, 3], [0, 0, 2.5, 1], [0, 0, 0, 1]])
  shape = (17, 11, 9)
  world_x = affine[0, 0] * np.arange(shape[0]) + affine[0, 3]
  image = np.broadcast_to(world_x[:, None, None, None], (*shape, 1)) + 100.0
  plan = make_plan((1.0, 1.0, 1.0), normalization=("none",), image_order=1)
  out, _, meta = preprocessing.preprocess_case(image.astype(np.float32), (1.5, 1.0, 2.5),
                                               affine, plan)
  new_affine = np.array(meta.preprocessed_affine)
  expected = new_affine[0, 0] * np.arange(out.shape[0]) + new_affine[0, 3] + 100.0
  np.testing.assert_allclose(out[2:-2, 5, 5, 0], expected[2:-2], atol=1e-4)


@pytest.mark.parametrize("label_order", [0, 1])
def test_label_map_survives_the_round_trip(label_order):
  spacing = (1.0, 1.0, 3.0)
  label = ball_labels((36, 36, 12), spacing)
  image = np.ones((*label.shape, 1), np.float32)
  plan = make_plan((1.5, 1.5, 1.5), label_order=label_order)
  _, out_label, meta = preprocessing.preprocess_case(image, spacing, np.eye(4), plan, label)
  assert out_label.dtype == np.uint8 and out_label.shape == meta.preprocessed_shape
  probabilities = np.eye(3, dtype=np.float32)[out_label]
  back = preprocessing.resample_to_original(probabilities, meta)
  assert back.shape == (*label.shape, 3)
  np.testing.assert_allclose(back.sum(-1), 1.0, atol=1e-5)
  restored = back.argmax(-1)
  for value in (1, 2):  # 0.968 / 0.955 (nearest), 0.978 / 0.977 (one-hot linear).
    assert dice(restored == value, label == value) > 0.94


def test_resample_to_original_pads_the_crop_with_background():
  image = np.zeros((12, 10, 8, 1), np.float32)
  image[2:10, 3:9, 1:7] = 5.0
  plan = make_plan((2.0, 2.0, 2.0))
  _, _, meta = preprocessing.preprocess_case(image, (1.0, 1.0, 1.0), np.eye(4), plan)
  probabilities = np.full((*meta.preprocessed_shape, 2), 0.5, np.float32)
  back = preprocessing.resample_to_original(probabilities, meta)
  assert back.shape == (12, 10, 8, 2)
  np.testing.assert_allclose(back[2:10, 3:9, 1:7], 0.5, atol=1e-6)
  outside = np.ones((12, 10, 8), bool)
  outside[2:10, 3:9, 1:7] = False
  np.testing.assert_array_equal(back[outside], [[1.0, 0.0]] * int(outside.sum()))
  with pytest.raises(ValueError, match="probabilities must be"):
    preprocessing.resample_to_original(probabilities[:-1], meta)


# --------------------------------------------------------------------------
# Normalisation


def test_ct_normalization_matches_numpy():
  rng = np.random.default_rng(1)
  image = rng.normal(40, 300, (10, 9, 8, 1)).astype(np.float32)
  foreground = image[2:8, 2:7, 2:6, 0].astype(np.float64).ravel()
  stats = planning.IntensityStats.from_samples(foreground)
  plan = make_plan(normalization=("ct",), intensity=(stats,))
  lo, hi = np.percentile(foreground, [0.5, 99.5])
  expected = (np.clip(image, lo, hi) - foreground.mean()) / foreground.std()
  np.testing.assert_allclose(preprocessing.normalize(image, plan), expected, rtol=1e-5, atol=1e-5)


def test_zscore_is_computed_inside_the_nonzero_region():
  rng = np.random.default_rng(2)
  image = np.zeros((10, 10, 10, 2), np.float32)
  image[2:8, 3:9, 1:6] = rng.normal(500, 80, (6, 6, 5, 2))
  plan = make_plan(normalization=("zscore", "zscore"))
  out = preprocessing.normalize(image, plan)
  inside = nifti.nonzero_mask(image)
  np.testing.assert_allclose(out[inside].mean(0), 0.0, atol=1e-5)
  np.testing.assert_allclose(out[inside].std(0), 1.0, atol=1e-5)
  assert not out[~inside].any()
  np.testing.assert_allclose(out, nifti.normalize_image(image), atol=1e-6)


def test_channels_follow_their_own_scheme():
  image = np.zeros((6, 6, 6, 2), np.float32)
  image[1:5, 1:5, 1:5, 0] = np.arange(1, 65).reshape(4, 4, 4)
  image[1:5, 1:5, 1:5, 1] = 7.0
  plan = make_plan(normalization=("zscore", "none"))
  out = preprocessing.normalize(image, plan)
  np.testing.assert_array_equal(out[..., 1], image[..., 1])
  assert out[1:5, 1:5, 1:5, 0].mean() == pytest.approx(0.0, abs=1e-6)
  assert out[1:5, 1:5, 1:5, 0].std() == pytest.approx(1.0, abs=1e-6)


# --------------------------------------------------------------------------
# The cache


def test_cache_is_reused_and_rebuilt_when_a_file_changes(tmp_path):
  root = make_dataset(tmp_path / "Dataset991_Cache", [(1.0, 1.0, 1.0), (1.0, 1.0, 2.0)],
                      [(14, 14, 14), (14, 14, 10)])
  out = tmp_path / "out"
  plan, _ = planning.plan_dataset(root, out, planning.PlanOptions(memory_bytes=2**30),
                                  progress=False)
  first = preprocessing.preprocess_dataset(root, plan, out, progress=False)
  assert first.built == ("case00", "case01") and first.reused == ()
  image, label, meta = preprocessing.load_preprocessed(first.folder, "case01")
  assert isinstance(image, np.memmap) and image.dtype == np.float32 and image.ndim == 4
  assert label.dtype == np.uint8 and label.shape == image.shape[:3] == meta.preprocessed_shape

  again = preprocessing.preprocess_dataset(root, plan, out, progress=False)
  assert again.built == () and again.reused == ("case00", "case01")

  path = root / "imagesTr" / "case01_0000.nii.gz"
  os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
  touched = preprocessing.preprocess_dataset(root, plan, out, progress=False)
  assert touched.built == ("case01",) and touched.reused == ("case00",)

  replanned = dataclasses.replace(plan, target_spacing=(2.0, 2.0, 2.0))
  assert preprocessing.preprocess_dataset(root, replanned, out, progress=False).built == (
      "case00", "case01")
  assert preprocessing.preprocess_dataset(root, replanned, out, force=True,
                                          progress=False).reused == ()


def test_cache_reports_missing_cases_on_one_line(tmp_path):
  with pytest.raises(ValueError, match="not cached"):
    preprocessing.load_preprocessed(tmp_path, "nothing")
