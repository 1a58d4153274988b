"""Tests for tversky_jax.data.nifti: dataset.json, validation, loading, writing."""

import json
import pickle

import nibabel as nib
import numpy as np
import pytest

from tversky_jax.data import nifti
from tversky_jax.data.nifti import DatasetError

SHAPE = (16, 16, 16)
AFFINE = np.array(
    [[-1.0, 0.0, 0.0, 8.0], [0.0, 1.0, 0.0, -9.5], [0.0, 0.0, 1.2, 4.0], [0.0, 0.0, 0.0, 1.0]]
)
CHANNELS = ("T1", "T2", "FLAIR")


def save(path, data, affine=AFFINE):
  img = nib.Nifti1Image(data, affine)
  img.header.set_qform(affine, code=1)
  img.header.set_sform(affine, code=2)
  nib.save(img, path)


def case_arrays(seed):
  """(channels, label): channel c is about 100 * (c + 1) inside a ball, 0 outside."""
  rng = np.random.default_rng(seed)
  grid = np.indices(SHAPE) - 7.5
  head = (grid**2).sum(0) < 7**2
  channels = [
      np.where(head, 100.0 * (c + 1) + rng.normal(0, 5, SHAPE), 0).astype(np.float32)
      for c in range(len(CHANNELS))
  ]
  label = np.zeros(SHAPE, np.uint8)
  label[6:9, 7:9, 5:8] = 1
  return channels, label


def make_dataset(root, num_cases=3, num_test=0, test_labels=True, meta=None):
  """Writes a small valid dataset; returns its root."""
  for folder in ("imagesTr", "labelsTr"):
    (root / folder).mkdir(parents=True)
  meta = meta or {
      # Keys deliberately out of order: the channel order comes from the key.
      "channel_names": {"2": "FLAIR", "0": "T1", "1": "T2"},
      "labels": {"background": 0, "lesion": 1},
      "numTraining": num_cases,
      "file_ending": ".nii.gz",
  }
  (root / "dataset.json").write_text(json.dumps(meta))
  splits = [("imagesTr", "labelsTr", "case", num_cases)]
  if num_test:
    (root / "imagesTs").mkdir()
    if test_labels:
      (root / "labelsTs").mkdir()
    splits.append(("imagesTs", "labelsTs", "test", num_test))
  for images, labels, prefix, count in splits:
    for i in range(count):
      channels, label = case_arrays(i)
      for c, data in enumerate(channels):
        save(root / images / f"{prefix}{i:02d}_{c:04d}.nii.gz", data)
      if (root / labels).is_dir():
        save(root / labels / f"{prefix}{i:02d}.nii.gz", label)
  return root


# ---------------------------------------------------------------- read_dataset


def test_read_dataset_parses_json_and_discovers_cases(tmp_path):
  root = make_dataset(tmp_path / "ds", num_cases=3, num_test=2)
  ds = nifti.read_dataset(root)
  assert ds.root == root
  assert ds.channel_names == CHANNELS
  assert ds.num_channels == 3
  assert dict(ds.labels) == {"background": 0, "lesion": 1}
  assert ds.label_values == (0, 1)
  assert ds.file_ending == ".nii.gz"
  assert ds.num_training == 3
  assert ds.training_cases == ("case00", "case01", "case02")
  assert ds.test_cases == ("test00", "test01")
  assert ds.image_paths("case01") == tuple(
      root / "imagesTr" / f"case01_{c:04d}.nii.gz" for c in range(3)
  )
  assert ds.label_path("test01", "test") == root / "labelsTs" / "test01.nii.gz"
  assert pickle.loads(pickle.dumps(ds)) == ds


def test_read_dataset_without_test_split(tmp_path):
  ds = nifti.read_dataset(make_dataset(tmp_path / "ds", num_cases=1))
  assert ds.test_cases == ()
  assert not ds.has_labels("test")


def test_read_dataset_region_labels(tmp_path):
  meta = {"channel_names": {"0": "T1"}, "labels": {"background": 0, "whole": [1, 2], "core": 2},
          "numTraining": 0, "file_ending": ".nii.gz"}
  root = tmp_path / "ds"
  (root / "imagesTr").mkdir(parents=True)
  (root / "dataset.json").write_text(json.dumps(meta))
  assert nifti.read_dataset(root).label_values == (0, 1, 2)


def test_read_dataset_missing_json(tmp_path):
  with pytest.raises(DatasetError, match="dataset.json: not found"):
    nifti.read_dataset(tmp_path)


def test_read_dataset_bad_json(tmp_path):
  (tmp_path / "dataset.json").write_text('{"channel_names": {"0": "T1"},')
  with pytest.raises(DatasetError, match="dataset.json: invalid JSON"):
    nifti.read_dataset(tmp_path)


def test_read_dataset_lists_all_missing_keys(tmp_path):
  meta = {"channel_names": {"0": "T1"}, "labels": {"bg": 0}}
  (tmp_path / "dataset.json").write_text(json.dumps(meta))
  with pytest.raises(DatasetError) as info:
    nifti.read_dataset(tmp_path)
  assert info.value.problems == ("missing key 'numTraining'", "missing key 'file_ending'")
  assert "dataset.json" in str(info.value)
  assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("channel_names", {"0": "T1", "2": "T2"}, "channel_names keys"),
        ("channel_names", [], "channel_names must be"),
        ("labels", {"background": 0, "lesion": "one"}, "label 'lesion'"),
        ("labels", {"background": 0, "lesion": 300}, "label 'lesion'"),
        ("numTraining", -1, "numTraining"),
        ("file_ending", ".png", "file_ending"),
    ],
)
def test_read_dataset_malformed_values(tmp_path, key, value, message):
  meta = {"channel_names": {"0": "T1"}, "labels": {"background": 0, "lesion": 1},
          "numTraining": 1, "file_ending": ".nii.gz", key: value}
  (tmp_path / "dataset.json").write_text(json.dumps(meta))
  with pytest.raises(DatasetError, match=message):
    nifti.read_dataset(tmp_path)


def test_read_dataset_missing_images_folder(tmp_path):
  meta = {"channel_names": {"0": "T1"}, "labels": {"background": 0}, "numTraining": 0,
          "file_ending": ".nii.gz"}
  (tmp_path / "dataset.json").write_text(json.dumps(meta))
  with pytest.raises(DatasetError, match="imagesTr: folder not found"):
    nifti.read_dataset(tmp_path)


# ------------------------------------------------------------- validate_dataset


def test_validate_dataset_accepts_valid_dataset(tmp_path):
  ds = nifti.read_dataset(make_dataset(tmp_path / "ds", num_cases=3, num_test=2))
  assert nifti.validate_dataset(ds) is None
  assert nifti.validate_dataset(ds, "test") is None


def test_validate_dataset_reports_every_problem_at_once(tmp_path):
  root = make_dataset(tmp_path / "ds", num_cases=10)
  images, labels = root / "imagesTr", root / "labelsTr"
  # case00 stays valid; each other case gets one problem.
  (images / "case01_0001.nii.gz").unlink()  # missing channel
  channels, label = case_arrays(2)
  save(images / "case02_0002.nii.gz", channels[2][:, :, :15])  # shape mismatch
  shifted = AFFINE.copy()
  shifted[0, 3] += 0.5
  save(images / "case03_0001.nii.gz", channels[1], shifted)  # affine mismatch
  bad_label = label.copy()
  bad_label[0, 0, 0] = 3
  save(labels / "case04.nii.gz", bad_label)  # label value not in dataset.json
  nan_image = channels[0].copy()
  nan_image[3, 3, 3] = np.nan
  save(images / "case05_0000.nii.gz", nan_image)  # NaN voxel
  save(images / "case06_0002.nii.gz", np.ones((16, 16), np.float32))  # 2D image
  raw = (images / "case07_0000.nii.gz").read_bytes()
  (images / "case07_0000.nii.gz").write_bytes(raw[: len(raw) // 2])  # truncated gzip
  (labels / "case08.nii.gz").unlink()  # missing label
  save(images / "case09_0001.nii.gz", np.zeros(SHAPE, np.float32))  # blank

  with pytest.raises(DatasetError) as info:
    nifti.validate_dataset(nifti.read_dataset(root))
  problems = info.value.problems
  expected = {
      "imagesTr/case01_0001.nii.gz": "file not found",
      "imagesTr/case02_0002.nii.gz": "shape (16, 16, 15) differs",
      "imagesTr/case03_0001.nii.gz": "affine differs",
      "labelsTr/case04.nii.gz": "label value(s) 3 not in dataset.json labels [0, 1]",
      "imagesTr/case05_0000.nii.gz": "1 NaN/Inf voxel(s)",
      "imagesTr/case06_0002.nii.gz": "expected a 3D volume, got shape (16, 16)",
      "imagesTr/case07_0000.nii.gz": "cannot read (EOFError",
      "labelsTr/case08.nii.gz": "file not found",
      "imagesTr/case09_0001.nii.gz": "every voxel is 0 (a blank scan)",
  }
  assert len(problems) == len(expected), problems
  for name, message in expected.items():
    matching = [p for p in problems if p.startswith(name + ":")]
    assert len(matching) == 1 and message in matching[0], (name, problems)
  assert not any("case00" in p for p in problems)
  # The message itself lists every problem, not only the attribute.
  assert all(p in str(info.value) for p in problems)
  assert str(root) in str(info.value)


def test_validate_dataset_missing_first_channel_reports_only_that(tmp_path):
  root = make_dataset(tmp_path / "ds", num_cases=1)
  (root / "imagesTr" / "case00_0000.nii.gz").unlink()
  with pytest.raises(DatasetError) as info:
    nifti.validate_dataset(nifti.read_dataset(root))
  assert info.value.problems == ("imagesTr/case00_0000.nii.gz: file not found",)


def test_validate_dataset_squeezes_trailing_singleton_and_tolerates_tiny_affine_noise(tmp_path):
  root = make_dataset(tmp_path / "ds", num_cases=1)
  channels, _ = case_arrays(0)
  save(root / "imagesTr" / "case00_0001.nii.gz", channels[1][..., None])
  save(root / "imagesTr" / "case00_0002.nii.gz", channels[2], AFFINE + 1e-6)
  ds = nifti.read_dataset(root)
  nifti.validate_dataset(ds)
  case = nifti.load_case(ds, "case00")
  assert case.image.shape == (*SHAPE, 3)


def test_validate_dataset_rejects_4d_with_several_frames(tmp_path):
  root = make_dataset(tmp_path / "ds", num_cases=1)
  save(root / "imagesTr" / "case00_0001.nii.gz", np.ones((*SHAPE, 2), np.float32))
  message = r"case00_0001.nii.gz: expected a 3D volume, got shape \(16, 16, 16, 2\)"
  with pytest.raises(DatasetError, match=message):
    nifti.validate_dataset(nifti.read_dataset(root))


def test_validate_dataset_reports_layout_problems(tmp_path):
  root = make_dataset(tmp_path / "ds", num_cases=2)
  meta = json.loads((root / "dataset.json").read_text())
  meta["numTraining"] = 5
  (root / "dataset.json").write_text(json.dumps(meta))
  channels, _ = case_arrays(0)
  save(root / "imagesTr" / "case00_0003.nii.gz", channels[0])  # 4th channel of 3
  save(root / "imagesTr" / "notacase.nii.gz", channels[0])
  (root / "imagesTr" / "README.txt").write_text("ignored: not a NIfTI file ending")
  with pytest.raises(DatasetError) as info:
    nifti.validate_dataset(nifti.read_dataset(root))
  problems = info.value.problems
  assert len(problems) == 3, problems
  assert any(p.startswith("imagesTr/case00_0003.nii.gz: channel 0003") for p in problems)
  assert any(p.startswith("imagesTr/notacase.nii.gz: name is not CASE_XXXX") for p in problems)
  assert any("numTraining is 5 but 2" in p for p in problems)


def test_validate_dataset_label_without_images(tmp_path):
  root = make_dataset(tmp_path / "ds", num_cases=1)
  _, label = case_arrays(0)
  save(root / "labelsTr" / "orphan.nii.gz", label)
  meta = json.loads((root / "dataset.json").read_text())
  meta["numTraining"] = 2
  (root / "dataset.json").write_text(json.dumps(meta))
  ds = nifti.read_dataset(root)
  assert ds.training_cases == ("case00", "orphan")
  with pytest.raises(DatasetError) as info:
    nifti.validate_dataset(ds)
  assert info.value.problems == tuple(
      f"imagesTr/orphan_{c:04d}.nii.gz: file not found" for c in range(3)
  )


def test_test_split_without_labels(tmp_path):
  ds = nifti.read_dataset(make_dataset(tmp_path / "ds", num_cases=1, num_test=2, test_labels=False))
  nifti.validate_dataset(ds, "test")
  case = nifti.load_case(ds, "test01", "test")
  assert case.label is None
  assert case.image.shape == (*SHAPE, 3)


def test_bad_split_name(tmp_path):
  ds = nifti.read_dataset(make_dataset(tmp_path / "ds", num_cases=1))
  with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
    nifti.validate_dataset(ds, "val")


def test_dataset_error_pickles_with_problems():
  error = DatasetError("2 problems:", ["a.nii.gz: x", "b.nii.gz: y"])
  clone = pickle.loads(pickle.dumps(error))
  assert clone.problems == error.problems
  assert str(clone) == str(error)


# ------------------------------------------------------------------- load_case


def test_load_case_shapes_dtypes_channel_order_and_grid(tmp_path):
  ds = nifti.read_dataset(make_dataset(tmp_path / "ds", num_cases=2))
  case = nifti.load_case(ds, "case01")
  channels, label = case_arrays(1)
  assert case.case_id == "case01"
  assert case.image.shape == (*SHAPE, 3) and case.image.dtype == np.float32
  for c in range(3):  # channel c of the file _000c lands at image[..., c]
    np.testing.assert_array_equal(case.image[..., c], channels[c])
  assert case.label.shape == SHAPE and case.label.dtype == np.uint8
  np.testing.assert_array_equal(case.label, label)
  np.testing.assert_allclose(case.affine, AFFINE, atol=1e-6)
  assert int(case.header["qform_code"]) == 1 and int(case.header["sform_code"]) == 2


def test_load_case_converts_integer_images_to_float32(tmp_path):
  root = make_dataset(tmp_path / "ds", num_cases=1)
  data = np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE)
  save(root / "imagesTr" / "case00_0000.nii.gz", data)
  case = nifti.load_case(nifti.read_dataset(root), "case00")
  assert case.image.dtype == np.float32
  np.testing.assert_array_equal(case.image[..., 0], data)


def test_load_case_errors_name_the_file(tmp_path):
  root = make_dataset(tmp_path / "ds", num_cases=1)
  ds = nifti.read_dataset(root)
  with pytest.raises(DatasetError, match="case 'nope' not found"):
    nifti.load_case(ds, "nope")
  (root / "imagesTr" / "case00_0002.nii.gz").write_bytes(b"not a nifti file")
  with pytest.raises(DatasetError, match=r"imagesTr/case00_0002.nii.gz: cannot read"):
    nifti.load_case(ds, "case00")


def test_load_image_files_matches_load_case(tmp_path):
  ds = nifti.read_dataset(make_dataset(tmp_path / "ds", num_cases=1))
  case = nifti.load_case(ds, "case00")
  image, affine, header = nifti.load_image_files([str(p) for p in ds.image_paths("case00")])
  np.testing.assert_array_equal(image, case.image)
  np.testing.assert_array_equal(affine, case.affine)
  assert header["sform_code"] == case.header["sform_code"]


def test_load_image_files_errors(tmp_path):
  ds = nifti.read_dataset(make_dataset(tmp_path / "ds", num_cases=1))
  paths = list(ds.image_paths("case00"))
  other = tmp_path / "other.nii.gz"
  save(other, np.arange(512, dtype=np.float32).reshape(8, 8, 8))
  with pytest.raises(DatasetError) as info:
    nifti.load_image_files([paths[0], other, tmp_path / "missing.nii.gz"])
  assert len(info.value.problems) == 2
  assert "other.nii.gz: shape (8, 8, 8) differs" in info.value.problems[0]
  assert "missing.nii.gz: file not found" in info.value.problems[1]
  with pytest.raises(ValueError, match="at least one"):
    nifti.load_image_files([])


# -------------------------------------------------------------- normalize_image


def test_normalize_image_zscore_inside_mask_zero_outside():
  rng = np.random.default_rng(0)
  image = np.zeros((12, 12, 12, 3), np.float32)
  image[2:10, 2:10, 2:10, 0] = rng.normal(500, 80, (8, 8, 8))
  image[2:10, 2:10, 2:10, 1] = rng.normal(-20, 3, (8, 8, 8))
  image[2:10, 2:10, 2:10, 2] = rng.normal(1, 0.1, (8, 8, 8))
  image[2:10, 2:10, 2:6, 2] = 0.0  # zero in one channel only: still inside the head
  out = nifti.normalize_image(image)
  assert out.shape == image.shape and out.dtype == np.float32
  mask = np.zeros((12, 12, 12), bool)
  mask[2:10, 2:10, 2:10] = True
  np.testing.assert_array_equal(nifti.nonzero_mask(image), mask)
  np.testing.assert_allclose(out[mask].mean(axis=0), 0.0, atol=1e-5)
  np.testing.assert_allclose(out[mask].std(axis=0), 1.0, atol=1e-5)
  assert np.all(out[~mask] == 0)
  # Affine in each channel: z-scoring is invariant to scale and shift.
  np.testing.assert_allclose(nifti.normalize_image(image * 3.0), out, atol=1e-5)


def test_normalize_image_constant_channel_and_empty_image():
  image = np.zeros((6, 6, 6, 2), np.float32)
  image[1:5, 1:5, 1:5, 0] = 7.0  # constant inside the head
  image[1:5, 1:5, 1:5, 1] = np.arange(64).reshape(4, 4, 4)
  out = nifti.normalize_image(image)
  assert np.all(np.isfinite(out))
  assert np.all(out[..., 0] == 0)
  assert abs(out[1:5, 1:5, 1:5, 1].std() - 1) < 1e-5
  empty = nifti.normalize_image(np.zeros((4, 4, 4, 3)))
  assert np.all(empty == 0) and empty.dtype == np.float32


def test_normalize_image_rejects_wrong_rank():
  with pytest.raises(ValueError, match=r"\[x, y, z, channels\]"):
    nifti.normalize_image(np.ones((4, 4, 4)))


# ----------------------------------------------------------------- write_nifti


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_write_nifti_round_trip_keeps_grid(tmp_path, dtype):
  ds = nifti.read_dataset(make_dataset(tmp_path / "ds", num_cases=1))
  case = nifti.load_case(ds, "case00")
  array = (case.label * 2).astype(dtype)
  out = nifti.write_nifti(tmp_path / "pred.nii.gz", array, case.affine, case.header, dtype)
  assert out == tmp_path / "pred.nii.gz"
  img = nib.load(out)
  assert img.shape == SHAPE
  assert img.get_data_dtype() == dtype
  np.testing.assert_allclose(img.affine, AFFINE, atol=1e-6)
  assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 2
  np.testing.assert_allclose(img.header.get_qform(), AFFINE, atol=1e-5)
  np.testing.assert_array_equal(np.asanyarray(img.dataobj), array)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "pred.nii.gz"]  # no temp file


def test_write_nifti_without_header_and_4d(tmp_path):
  probs = np.random.default_rng(0).random((*SHAPE, 2)).astype(np.float32)
  out = nifti.write_nifti(tmp_path / "probs.nii", probs, AFFINE)
  img = nib.load(out)
  assert img.shape == (*SHAPE, 2)
  assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
  np.testing.assert_allclose(img.affine, AFFINE, atol=1e-6)
  np.testing.assert_array_equal(np.asanyarray(img.dataobj), probs)


def test_write_nifti_rejects_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match="must end in"):
    nifti.write_nifti(tmp_path / "x.png", np.zeros(SHAPE), AFFINE)
  with pytest.raises(ValueError, match="affine must be"):
    nifti.write_nifti(tmp_path / "x.nii.gz", np.zeros(SHAPE), np.eye(3))


def test_write_nifti_keeps_a_qform_that_differs_from_the_sform(tmp_path):
  qform = np.diag([1.0, 1.0, 1.0, 1.0])
  qform[:3, 3] = [-10.0, 5.0, 2.0]
  sform = AFFINE
  ref = nib.Nifti1Image(np.zeros(SHAPE, np.float32), sform)
  ref.header.set_qform(qform, code=1)
  ref.header.set_sform(sform, code=2)
  out = nifti.write_nifti(tmp_path / "mask.nii.gz", np.ones(SHAPE, np.uint8),
                          sform, ref.header, np.uint8)
  img = nib.load(out)
  np.testing.assert_allclose(img.header.get_qform(), qform, atol=1e-5)
  np.testing.assert_allclose(img.header.get_sform(), sform, atol=1e-6)
  assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 2
