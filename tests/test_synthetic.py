"""Tests for tversky_jax.data.synthetic: phantoms written as a real NIfTI dataset."""

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from tversky_jax.data import nifti, synthetic

LO, HI = synthetic.LESION_FRACTION_RANGE


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  root = tmp_path_factory.mktemp("synth") / "Dataset900_Phantoms"
  synthetic.make_synthetic_dataset(root, num_cases=6, shape=(32, 32, 32), seed=0, num_test_cases=2)
  return nifti.read_dataset(root)


def load_all(ds, split="train"):
  return [nifti.load_case(ds, c, split) for c in ds.cases(split)]


def test_dataset_layout_and_json(dataset):
  root = dataset.root
  meta = json.loads((root / "dataset.json").read_text())
  assert meta["channel_names"] == {"0": "T1", "1": "T2", "2": "FLAIR"}
  assert meta["labels"] == {"background": 0, "lesion": 1}
  assert meta["numTraining"] == 6 and meta["file_ending"] == ".nii.gz"
  assert dataset.training_cases == tuple(f"case_{i:03d}" for i in range(6))
  assert dataset.test_cases == ("test_000", "test_001")
  assert len(list((root / "imagesTr").iterdir())) == 18
  assert len(list((root / "labelsTs").iterdir())) == 2
  assert not [p for p in root.parent.iterdir() if p.name.startswith(".")]  # no temp dir left


def test_dataset_passes_validation(dataset):
  nifti.validate_dataset(dataset, "train")
  nifti.validate_dataset(dataset, "test")


def test_non_identity_affine_and_codes(dataset):
  img = nib.load(dataset.image_paths("case_000")[0])
  expected = synthetic.phantom_affine((32, 32, 32))
  assert not np.allclose(expected, np.eye(4))
  np.testing.assert_allclose(img.affine, expected)
  assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
  assert img.get_data_dtype() == np.float32
  assert nib.load(dataset.label_path("case_000")).get_data_dtype() == np.uint8


def test_lesion_fraction_and_varied_load(dataset):
  cases = load_all(dataset) + load_all(dataset, "test")
  fractions = np.array([c.label.mean() for c in cases])
  assert np.all((fractions >= LO) & (fractions <= HI)), fractions
  assert fractions.max() / fractions.min() > 2.0, fractions
  num_lesions = [ndimage.label(c.label)[1] for c in cases]
  assert min(num_lesions) <= 2, num_lesions  # a low-load case: 1-2 tiny lesions
  assert max(num_lesions) >= 3, num_lesions
  for c in cases:
    assert set(np.unique(c.label)) == {0, 1}


@pytest.mark.parametrize("shape", [(16, 16, 16), (32, 32, 32), (48, 48, 48), (24, 40, 32)])
@pytest.mark.parametrize("load", ["low", "medium", "high"])
def test_phantom_lesion_fraction_at_small_shapes(shape, load):
  for seed in range(3):
    image, label = synthetic.make_phantom(shape, np.random.default_rng(seed), load)
    assert image.shape == (*shape, 3) and image.dtype == np.float32
    assert label.shape == shape and label.dtype == np.uint8
    assert LO <= label.mean() <= HI, (shape, load, seed, label.mean())


def test_phantom_anatomy_and_contrasts():
  image, label = synthetic.make_phantom((48, 48, 48), np.random.default_rng(1), "high")
  lesion = label.astype(bool)
  head = nifti.nonzero_mask(image)
  assert np.all(image[~head] == 0)
  assert 0.2 < head.mean() < 0.6
  assert np.all(image[head] >= 0)
  assert lesion[~head].sum() == 0
  # Compare lesions with the tissue right around them (white matter).
  ring = ndimage.binary_dilation(lesion, iterations=2) & ~lesion & head
  t1, t2, flair = (image[..., c] for c in range(3))
  assert t1[lesion].mean() < 0.8 * t1[ring].mean()  # T1-dark
  assert t2[lesion].mean() > 1.3 * t2[ring].mean()  # T2-bright
  assert flair[lesion].mean() > 1.3 * flair[ring].mean()  # FLAIR-bright
  # Bias field and noise: white matter is not a constant.
  assert t1[ring].std() > 0


def test_same_seed_identical_different_seed_different(tmp_path, dataset):
  again = synthetic.make_synthetic_dataset(
      tmp_path / "again", 6, (32, 32, 32), seed=0, num_test_cases=2)
  other = synthetic.make_synthetic_dataset(tmp_path / "other", 6, (32, 32, 32), seed=1)
  fewer = synthetic.make_synthetic_dataset(tmp_path / "fewer", 2, (32, 32, 32), seed=0)
  again, other, fewer = (nifti.read_dataset(p) for p in (again, other, fewer))
  both_splits = lambda ds: load_all(ds) + load_all(ds, "test")
  for a, b in zip(both_splits(dataset), both_splits(again)):
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
  for a, b in zip(load_all(dataset), load_all(other)):
    assert not np.array_equal(a.image, b.image)
    assert not np.array_equal(a.label, b.label)
  for a, b in zip(load_all(dataset)[:2], load_all(fewer)):  # case i depends on (seed, i) only
    np.testing.assert_array_equal(a.image, b.image)


def test_existing_output_and_overwrite(tmp_path):
  out = synthetic.make_synthetic_dataset(tmp_path / "ds", 1, (16, 16, 16))
  with pytest.raises(ValueError, match="already exists"):
    synthetic.make_synthetic_dataset(out, 1, (16, 16, 16))
  synthetic.make_synthetic_dataset(out, 2, (16, 16, 16), overwrite=True)
  assert nifti.read_dataset(out).training_cases == ("case_000", "case_001")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_failure_leaves_no_partial_dataset(tmp_path, monkeypatch):
  calls = []

  def failing_write(*args):
    calls.append(args)
    if len(calls) == 2:
      raise RuntimeError("disk full")
    return original(*args)

  original = synthetic._write_case
  monkeypatch.setattr(synthetic, "_write_case", failing_write)
  with pytest.raises(RuntimeError, match="disk full"):
    synthetic.make_synthetic_dataset(tmp_path / "ds", 3, (16, 16, 16))
  assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_cases": 0}, "num_cases"),
        ({"num_test_cases": -1}, "num_test_cases"),
        ({"seed": -1}, "seed"),
        ({"shape": (8, 32, 32)}, "shape"),
        ({"shape": (32, 32)}, "shape"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, message):
  with pytest.raises(ValueError, match=message):
    synthetic.make_synthetic_dataset(tmp_path / "ds", **{"num_cases": 1, **kwargs})
  assert not (tmp_path / "ds").exists()


def test_make_phantom_bad_arguments():
  with pytest.raises(ValueError, match="load"):
    synthetic.make_phantom((16, 16, 16), np.random.default_rng(0), "huge")
  with pytest.raises(ValueError, match="shape"):
    synthetic.make_phantom((16, 16, 8), np.random.default_rng(0))


def run_cli(*args):
  return subprocess.run(
      [sys.executable, "-m", "tversky_jax.data.synthetic", *args],
      capture_output=True, text=True, timeout=120,
  )


def test_cli(tmp_path):
  out = tmp_path / "cli_ds"
  result = run_cli("--out", str(out), "--cases", "2", "--shape", "16", "20", "24",
                   "--seed", "3", "--test-cases", "1")
  assert result.returncode == 0, result.stderr
  assert "wrote 2 training and 1 test case(s)" in result.stdout
  ds = nifti.read_dataset(out)
  assert ds.training_cases == ("case_000", "case_001") and ds.test_cases == ("test_000",)
  nifti.validate_dataset(ds)
  assert nifti.load_case(ds, "case_001").image.shape == (16, 20, 24, 3)
  # Same as the library call with the same arguments.
  lib = nifti.read_dataset(
      synthetic.make_synthetic_dataset(tmp_path / "lib", 2, (16, 20, 24), seed=3))
  np.testing.assert_array_equal(
      nifti.load_case(ds, "case_001").image, nifti.load_case(lib, "case_001").image)

  again = run_cli("--out", str(out), "--cases", "1")
  assert again.returncode == 2 and "already exists" in again.stderr


def test_cli_help():
  result = run_cli("--help")
  assert result.returncode == 0
  for flag in ("--out", "--cases", "--shape", "--seed", "--test-cases"):
    assert flag in result.stdout
