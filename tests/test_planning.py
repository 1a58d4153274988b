"""Tests of tversky_jax.data.planning and the plan command line (tiny hand-made volumes)."""

import json
import os
import warnings

import nibabel as nib
import numpy as np
import pytest

from tversky_jax import plan as plan_cli
from tversky_jax.data import nifti
from tversky_jax.data import planning


def write_volume(path, array, spacing, origin=(0.0, 0.0, 0.0)):
  affine = np.diag([*spacing, 1.0])
  affine[:3, 3] = origin
  img = nib.Nifti1Image(array, affine)
  img.header.set_qform(affine, code=1)
  img.header.set_sform(affine, code=1)
  nib.save(img, path)


def make_case(shape, seed):
  """``(image float32 [x, y, z, 1], label uint8 [x, y, z])``: a zero-padded 'head'.

  The head is the box ``[2, -2)`` on every axis with smooth intensities
  100-200; label 1 is its inner half, label 2 a 2x2x2 cube at its centre.
  """
  rng = np.random.default_rng(seed)
  grid = np.stack(np.meshgrid(*[np.linspace(0, 1, s) for s in shape], indexing="ij"))
  image = (150 + 40 * np.sin(3 * grid[0]) * np.cos(2 * grid[1]) + 10 * grid[2]
           + rng.normal(0, 2, shape)).astype(np.float32)
  head = np.zeros(shape, bool)
  head[2:-2, 2:-2, 2:-2] = True
  image[~head] = 0
  label = np.zeros(shape, np.uint8)
  quarter = [s // 4 for s in shape]
  label[tuple(slice(q, s - q) for q, s in zip(quarter, shape))] = 1
  centre = [s // 2 for s in shape]
  label[tuple(slice(c - 1, c + 1) for c in centre)] = 2
  return image[..., None], label


def make_dataset(root, spacings, shapes, channel_names=("T1",), seed=0):
  """Writes an nnU-Net raw dataset with one case per (spacing, shape)."""
  os.makedirs(root / "imagesTr")
  os.makedirs(root / "labelsTr")
  for i, (spacing, shape) in enumerate(zip(spacings, shapes)):
    image, label = make_case(shape, seed + i)
    for c in range(len(channel_names)):
      write_volume(root / "imagesTr" / f"case{i:02d}_{c:04d}.nii.gz", image[..., 0] * (c + 1),
                   spacing)
    write_volume(root / "labelsTr" / f"case{i:02d}.nii.gz", label, spacing)
  (root / "dataset.json").write_text(json.dumps({
      "channel_names": {str(c): n for c, n in enumerate(channel_names)},
      "labels": {"background": 0, "tissue": 1, "lesion": 2},
      "numTraining": len(spacings), "file_ending": ".nii.gz"}))
  return root


# --------------------------------------------------------------------------
# Target spacing


def test_target_spacing_is_the_median_per_axis():
  spacings = [(1.0, 0.8, 2.0), (1.2, 0.8, 2.5), (0.9, 1.0, 1.0), (1.1, 0.9, 2.0)]
  target, axis = planning.target_spacing(spacings)
  assert target == pytest.approx((1.05, 0.85, 2.0))
  assert axis is None


def test_anisotropic_axis_takes_the_10th_percentile_of_its_spacings():
  z = [2.5, 5.0, 5.0, 5.0, 5.0, 6.0, 6.0, 6.0, 6.0, 6.0]  # median 5.5 > 3 x 1.0
  spacings = [(1.0, 1.0, s) for s in z]
  target, axis = planning.target_spacing(spacings)
  # np.percentile, linear: position 0.1 * 9 = 0.9 between 2.5 and 5.0.
  assert target == pytest.approx((1.0, 1.0, 2.5 + 0.9 * 2.5))
  assert axis == 2


def test_anisotropic_axis_never_gets_finer_than_the_others():
  z = [0.2, 0.2, 4, 4, 4, 4, 4, 4, 4, 4]
  target, axis = planning.target_spacing([(1.0, 1.2, s) for s in z])
  assert target == pytest.approx((1.0, 1.2, 1.2)) and axis == 2


def test_three_times_the_finest_is_not_yet_anisotropic():
  target, axis = planning.target_spacing([(1.0, 1.0, 3.0), (1.0, 1.0, 3.0), (1.0, 1.0, 0.5)])
  assert target == pytest.approx((1.0, 1.0, 3.0)) and axis is None


def test_target_spacing_rejects_bad_input():
  with pytest.raises(ValueError, match="spacings"):
    planning.target_spacing([(1.0, 1.0)])


# --------------------------------------------------------------------------
# Pooling topology and memory


def test_pooling_skips_the_coarse_axis_until_the_others_catch_up():
  num_pool, strides, patch = planning.pool_topology((1.0, 1.0, 3.0), (64, 64, 16))
  # Spacing (1, 1, 3): pool x, y -> (2, 2, 3); then all -> (4, 4, 6) with
  # sizes (16, 16, 8); all again -> sizes (8, 8, 4); z is then too small.
  assert strides == ((2, 2, 1), (2, 2, 2), (2, 2, 2), (2, 2, 1))
  assert num_pool == (4, 4, 2)
  assert patch == (64, 64, 16)


def test_twice_the_finest_spacing_is_not_pooled():
  _, strides, _ = planning.pool_topology((1.0, 1.0, 2.0), (32, 32, 32))
  assert strides[0] == (2, 2, 1) and strides[1] == (2, 2, 2)


def test_pooling_stops_at_the_minimum_feature_map_and_pads_the_patch():
  num_pool, strides, patch = planning.pool_topology((1.0, 1.0, 1.0), (25, 8, 7))
  # x: 25 -> 13 -> 7 (alone it needs >= 12); y: 8 -> 4; z (7 < 8) never.
  assert strides == ((2, 2, 1), (2, 1, 1))
  assert num_pool == (2, 1, 0)
  assert patch == (28, 8, 7)
  _, strides, patch = planning.pool_topology((1.0, 1.0, 1.0), (21, 8, 7))
  assert strides == ((2, 2, 1),) and patch == (22, 8, 7)  # 11 alone < 12: stop.


def test_param_count_matches_the_unet3d_formula():
  # UNet3D(in_channels=1, num_classes=4, base_features=16, depth=3):
  # count_params() == 1400612 (checked against the model).
  features = planning.features_per_stage(4, 16)
  assert planning.unet_param_count(1, 4, features, [(2, 2, 2)] * 3) == 1_400_612


def test_memory_estimate_grows_with_patch_batch_and_features():
  strides = [(2, 2, 2)] * 3
  small = planning.estimate_memory_bytes((32, 32, 32), strides, 1, 1, 2)
  assert planning.estimate_memory_bytes((64, 32, 32), strides, 1, 1, 2) > small
  assert planning.estimate_memory_bytes((32, 32, 32), strides, 2, 1, 2) > small
  assert planning.estimate_memory_bytes((32, 32, 32), strides, 1, 1, 2, base_features=32) > small
  assert (planning.estimate_memory_bytes((32, 32, 32), strides, 1, 1, 2, conv_impl="2d_sum")
          > small)


def test_patch_and_batch_fit_the_budget():
  args = dict(spacing=(1.0, 1.0, 1.0), median_shape=(160, 160, 160), num_cases=100,
              in_channels=1, num_classes=2)
  large = planning.fit_patch_and_batch(memory_bytes=8 * 2**30, **args)
  small = planning.fit_patch_and_batch(memory_bytes=2**30, **args)
  for fitted, budget in ((large, 8 * 2**30), (small, 2**30)):
    assert fitted["estimated_memory_bytes"] <= budget
    assert fitted["batch_size"] >= planning.MIN_BATCH_SIZE
    divisor = [2**n for n in fitted["num_pool_per_axis"]]
    assert all(p % d == 0 for p, d in zip(fitted["patch_size"], divisor))
  assert np.prod(small["patch_size"]) < np.prod(large["patch_size"])
  with pytest.raises(planning.MemoryBudgetError, match="too small"):
    planning.fit_patch_and_batch(memory_bytes=2**20, **args)


def test_anisotropic_patch_follows_the_spacing():
  fitted = planning.fit_patch_and_batch(
      (0.8, 0.8, 4.0), (300, 300, 60), num_cases=50, in_channels=1, num_classes=2,
      memory_bytes=4 * 2**30)
  px, py, pz = fitted["patch_size"]
  assert px == py and pz < px / 2
  assert fitted["pool_strides"][0] == (2, 2, 1)
  assert fitted["num_pool_per_axis"][2] < fitted["num_pool_per_axis"][0]


def test_normalization_schemes_from_channel_names_and_override():
  assert planning.normalization_schemes(["T1", "ct", " CT ", "FLAIR"]) == (
      "zscore", "ct", "ct", "zscore")
  assert planning.normalization_schemes(["T1", "CT"], ["none", "zscore"]) == ("none", "zscore")
  with pytest.raises(ValueError, match="one of"):
    planning.normalization_schemes(["T1"], ["minmax"])


# --------------------------------------------------------------------------
# Fingerprint and the whole plan on hand-made files


@pytest.fixture(name="hand_dataset")
def fixture_hand_dataset(tmp_path):
  spacings = [(1.0, 1.0, 1.0), (1.0, 1.0, 2.0), (2.0, 2.0, 2.0)]
  shapes = [(20, 20, 20), (20, 20, 12), (12, 12, 12)]
  return make_dataset(tmp_path / "Dataset990_Hand", spacings, shapes, ("T1", "Ct"))


def test_plan_numbers_on_hand_made_spacings(hand_dataset, tmp_path):
  options = planning.PlanOptions(memory_bytes=2**30, conv_impl="native")
  plan, fingerprint = planning.plan_dataset(hand_dataset, tmp_path / "out", options,
                                            progress=False)
  assert fingerprint.spacings == ((1.0, 1.0, 1.0), (1.0, 1.0, 2.0), (2.0, 2.0, 2.0))
  assert fingerprint.shapes_after_crop == ((16, 16, 16), (16, 16, 8), (8, 8, 8))
  assert plan.median_spacing == (1.0, 1.0, 2.0) and plan.target_spacing == (1.0, 1.0, 2.0)
  # Resampled crops: (16, 16, 8), (16, 16, 8), (16, 16, 8).
  assert plan.resampled_median_shape == (16, 16, 8)
  assert plan.normalization == ("zscore", "ct")
  assert plan.num_classes == 3 and plan.num_training == 3
  labels = [nib.load(hand_dataset / "labelsTr" / f"case{i:02d}.nii.gz").get_fdata()
            for i in range(3)]
  total = sum(lb.size for lb in labels)
  for name, value in (("background", 0), ("tissue", 1), ("lesion", 2)):
    expected = sum(np.sum(lb == value) for lb in labels) / total
    assert plan.class_frequencies[name] == pytest.approx(expected)
  # Spacing (1, 1, 2): x, y first; then sizes (8, 8, 8) at (2, 2, 2) pool together.
  assert plan.patch_size == (16, 16, 8) and plan.pool_strides == ((2, 2, 1), (2, 2, 2))
  assert plan.num_pool_per_axis == (2, 2, 1)
  assert plan.estimated_memory_bytes <= plan.memory_budget_bytes


def test_foreground_intensity_stats_match_numpy(hand_dataset):
  dataset = nifti.read_dataset(hand_dataset)
  fingerprint = planning.compute_fingerprint(dataset, num_samples=10**6, progress=False)
  for c, stats in enumerate(fingerprint.intensity):
    values = []
    for case_id in dataset.training_cases:
      case = nifti.load_case(dataset, case_id)
      values.append(case.image[..., c][case.label > 0])
    values = np.concatenate(values).astype(np.float64)
    assert stats.num_samples == values.size
    assert stats.mean == pytest.approx(values.mean())
    assert stats.std == pytest.approx(values.std())
    assert stats.median == pytest.approx(np.median(values))
    assert stats.percentile_00_5 == pytest.approx(np.percentile(values, 0.5))
    assert stats.percentile_99_5 == pytest.approx(np.percentile(values, 99.5))


def test_intensity_sampling_is_capped_and_deterministic(hand_dataset):
  dataset = nifti.read_dataset(hand_dataset)
  first = planning.compute_fingerprint(dataset, num_samples=50, progress=False)
  again = planning.compute_fingerprint(dataset, num_samples=50, num_workers=1, progress=False)
  assert first.intensity[0].num_samples == 150
  assert first == again


def test_plan_and_fingerprint_round_trip_through_json(hand_dataset, tmp_path):
  plan, fingerprint = planning.plan_dataset(
      hand_dataset, tmp_path / "out", planning.PlanOptions(memory_bytes=2**30), progress=False)
  assert planning.Plan.from_json(plan.to_json()) == plan
  assert planning.Fingerprint.from_json(fingerprint.to_json()) == fingerprint
  assert planning.load_plan(tmp_path / "out") == plan
  with pytest.raises(ValueError, match="version"):
    planning.Plan.from_json(json.dumps({"version": 99}))


def test_plan_is_reused_until_data_or_arguments_change(hand_dataset, tmp_path, monkeypatch):
  calls = []
  real = planning.compute_fingerprint
  monkeypatch.setattr(planning, "compute_fingerprint",
                      lambda *a, **k: calls.append(1) or real(*a, **k))
  out = tmp_path / "out"
  options = planning.PlanOptions(memory_bytes=2**30)
  first, _ = planning.plan_dataset(hand_dataset, out, options, progress=False)
  again, _ = planning.plan_dataset(hand_dataset, out, options, progress=False)
  assert again == first and len(calls) == 1
  other, _ = planning.plan_dataset(hand_dataset, out, planning.PlanOptions(memory_bytes=2**29),
                                   progress=False)
  assert other.input_hash != first.input_hash and len(calls) == 1  # Same fingerprint.
  label = hand_dataset / "labelsTr" / "case00.nii.gz"
  os.utime(label, ns=(label.stat().st_atime_ns, label.stat().st_mtime_ns + 10**9))
  changed, _ = planning.plan_dataset(hand_dataset, out, options, progress=False)
  assert changed.input_hash != first.input_hash and len(calls) == 2


# --------------------------------------------------------------------------
# Command line


def test_cli_prints_and_writes_the_plan(hand_dataset, tmp_path, capsys):
  out = tmp_path / "out"
  status = plan_cli.main(["--data", str(hand_dataset), "--out", str(out), "--memory-gb", "1",
                          "--no-progress", "--preprocess"])
  printed = capsys.readouterr().out
  assert status == 0
  assert "target spacing:        1 x 1 x 2" in printed
  assert "T1: zscore, Ct: ct" in printed and "pool strides:          [2,2,1], [2,2,2]" in printed
  assert (out / planning.PLANS_FILE).is_file()
  assert len(list((out / "cases").glob("*.json"))) == 3


def test_cli_reports_a_missing_dataset_on_one_line(tmp_path, capsys):
  assert plan_cli.main(["--data", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 1
  err = capsys.readouterr().err
  assert err.startswith("error:") and "dataset.json" in err and err.count("\n") == 1


def test_stage_strides_wait_for_the_coarse_axis():
  assert planning.stage_strides((1.0, 1.0, 1.0), 3) == ((2, 2, 2),) * 3
  assert planning.stage_strides((1.0, 1.0, 3.0), 4) == (
      (2, 2, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2))
  assert planning.stage_strides((1.0, 1.0, 5.0), 3) == (
      (2, 2, 1), (2, 2, 1), (2, 2, 2))
  assert planning.stage_strides((2.0, 1.0, 1.0), 2) == ((1, 2, 2), (2, 2, 2))


def test_auto_plans_for_the_convolution_the_trainer_picks(monkeypatch):
  from tversky_jax.models import onednn_conv, unet3d  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(planning, "_default_backend", lambda: "cpu")
  options = planning.PlanOptions(memory_bytes=2**30)
  # The tests' four simulated CPU devices: "2d_sum"; one device: "onednn"
  # where it can be built (else "2d_sum", with a warning).
  assert planning._resolve_memory(options)[2] == unet3d.default_conv_impl() == "2d_sum"
  monkeypatch.setattr(unet3d.jax, "device_count", lambda: 1)
  one_device = "onednn" if onednn_conv.available() else "2d_sum"
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    assert planning._resolve_memory(options)[2] == one_device
  monkeypatch.setattr(planning, "_default_backend", lambda: "gpu")
  assert planning._resolve_memory(options)[2] == "native"
  for conv_impl in planning.ACTIVATION_COPIES:
    assert planning._resolve_memory(
        planning.PlanOptions(memory_bytes=2**30, conv_impl=conv_impl))[2] == conv_impl
