"""Tests for tversky_jax.data.synthetic: phantoms written as a real NIfTI dataset."""

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from tversky_jax.data import nifti, planning, synthetic

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


def _ring(label, head, tissue, width=2):
  """White matter within `width` voxels of the lesions, outside them."""
  lesion = label.astype(bool)
  near = ndimage.binary_dilation(lesion, iterations=width)
  return near & ~lesion & head & (tissue == synthetic.WM)


def test_phantom_anatomy_and_contrasts():
  for seed, load in [(1, "high"), (2, "medium"), (3, "low")]:
    p = synthetic.simulate_phantom((48, 48, 48), np.random.default_rng(seed), load)
    image, lesion = p.image, p.label.astype(bool)
    head = nifti.nonzero_mask(image)
    assert np.all(image[~head] == 0)
    assert 0.2 < head.mean() < 0.6
    assert np.all(image[head] >= 0)
    assert lesion[~head].sum() == 0
    assert np.all(p.tissue[lesion] == synthetic.WM)
    # Labels sit where the lesion signal is: on average T1-darker, T2- and
    # FLAIR-brighter than the white matter right around them.
    ring = _ring(p.label, head, p.tissue)
    t1, t2, flair = (image[..., c] for c in range(3))
    assert t1[lesion].mean() < t1[ring].mean(), (seed, load)
    assert t2[lesion].mean() > t2[ring].mean(), (seed, load)
    assert flair[lesion].mean() > flair[ring].mean(), (seed, load)
    # ... but by at most ~60 % (plus noise), not the old 2x.
    assert flair[lesion].mean() < 1.8 * flair[ring].mean(), (seed, load)


def test_lesions_mostly_periventricular_with_varied_contrast():
  near, total, contrasts = 0, 0, []
  for seed in range(4):
    p = synthetic.simulate_phantom((48, 48, 48), np.random.default_rng(seed), "high")
    vent_dist = ndimage.distance_transform_edt(p.tissue != synthetic.VENTRICLE)
    components, n = ndimage.label(p.label)
    for i in range(1, n + 1):
      total += 1
      near += vent_dist[components == i].min() <= 6.0
    ring = _ring(p.label, p.image[..., 0] > 0, p.tissue)
    flair = p.image[..., 2]
    contrasts.append(flair[p.label > 0].mean() / flair[ring].mean())
  assert near / total >= 0.5, (near, total)
  assert max(contrasts) - min(contrasts) > 0.1, contrasts  # varies across cases


def test_lesion_boundaries_are_partial_volume():
  quiet = synthetic.PhantomOptions(noise="none", bias_range=(0.0, 0.0), distractors=0.0, psf_mm=0.0)
  p = synthetic.simulate_phantom((32, 32, 32), np.random.default_rng(1), "high", options=quiet)
  flair, lesion = p.image[..., 2], p.label.astype(bool)
  wm = p.tissue == synthetic.WM
  far = wm & ~ndimage.binary_dilation(lesion, iterations=4)
  excess = flair / np.median(flair[far]) - 1.0
  outside = ndimage.binary_dilation(lesion) & ~lesion & wm
  # Unlabelled voxels next to a lesion carry part of its signal (soft
  # boundary, fuzzy membership < 0.5), labelled ones at least half of it.
  assert np.mean(excess[outside] > 0.01) > 0.5
  assert np.median(excess[outside]) < np.median(excess[lesion])


def _best_threshold_dsc(flair, label, head):
  """Dice of the best single threshold on `flair` inside the head (an oracle)."""
  values, truth = flair[head], label.astype(bool)[head]
  hits = np.cumsum(truth[np.argsort(-values)])
  return float(np.max(2 * hits / (np.arange(1, len(values) + 1) + truth.sum())))


def _threshold_baseline(options, num_cases=4, shape=(40, 40, 40)):
  scores = []
  for i in range(num_cases):
    image, label = synthetic.make_phantom(
        shape, np.random.default_rng([7, i]), ("low", "medium", "high")[i % 3], options=options)
    head = nifti.nonzero_mask(image)
    scores.append(_best_threshold_dsc(image[..., 2], label, head))
  return np.array(scores)


def test_flair_threshold_baseline_is_poor_by_default():
  # Even the per-case best FLAIR threshold (an oracle) cannot segment the
  # default phantoms; on the easy ones it nearly can, so the measure works.
  hard = _threshold_baseline(None)
  assert hard.mean() < 0.35 and hard.max() < 0.5, hard
  easy = _threshold_baseline(synthetic.PhantomOptions.easy())
  assert easy.mean() > 0.75, easy


def test_distractors_are_unlabelled_look_alikes():
  found = set()
  for seed in range(4):
    p = synthetic.simulate_phantom((48, 48, 48), np.random.default_rng(seed), "medium")
    assert not np.any(p.label.astype(bool) & (p.distractors > 0))
    flair, t2 = p.image[..., 2], p.image[..., 1]
    wm = (p.tissue == synthetic.WM) & (p.distractors == 0) & (p.label == 0)
    for code in np.unique(p.distractors[p.distractors > 0]):
      found.add(int(code))
      where = p.distractors == code
      if code in (synthetic.VESSEL, synthetic.VENTRICLE_CAP):
        assert flair[where].mean() > flair[wm].mean(), code  # FLAIR-bright
      if code == synthetic.PERIVASCULAR:
        assert t2[where].mean() > t2[wm].mean()  # T2-bright, CSF-like
    # Grey matter is brighter than white matter on FLAIR, as in real scans.
    assert flair[p.tissue == synthetic.GM].mean() > flair[wm].mean()
  assert {synthetic.VESSEL, synthetic.PERIVASCULAR, synthetic.VENTRICLE_CAP} <= found, found
  none = synthetic.simulate_phantom((32, 32, 32), np.random.default_rng(0),
                                    options=synthetic.PhantomOptions(distractors=0.0))
  assert not none.distractors.any()


def test_bias_field_and_noise_vary():
  grid = synthetic._Grid((32, 32, 32), (1.0, 1.0, 1.0))
  head = np.ones(grid.shape, bool)
  field = synthetic._bias_field(grid, head, np.random.default_rng(0), 0.25)
  assert np.isclose(max(field.max(), 1 / field.min()), 1.25, rtol=1e-4)  # +-25 %
  assert np.abs(np.diff(field, axis=0)).max() < 0.1  # smooth
  # Relative noise in white matter changes from case to case (SNR varies).
  spreads = []
  for seed in range(6):
    p = synthetic.simulate_phantom((32, 32, 32), np.random.default_rng(seed), "low")
    wm = ndimage.binary_erosion(p.tissue == synthetic.WM, iterations=2) & (p.distractors == 0)
    t1 = p.image[..., 0]
    spreads.append(np.std(t1[wm] - ndimage.uniform_filter(t1, 3)[wm]) / t1[wm].mean())
  assert max(spreads) > 1.5 * min(spreads), spreads
  quiet = synthetic.PhantomOptions(noise="none", bias_range=(0.0, 0.0), distractors=0.0)
  p = synthetic.simulate_phantom((32, 32, 32), np.random.default_rng(0), "low", options=quiet)
  core = (ndimage.binary_erosion(p.tissue == synthetic.WM, iterations=3)
          & ~ndimage.binary_dilation(p.label, iterations=3))
  assert p.image[..., 0][core].std() < 1e-3 * p.image[..., 0][core].mean()


def test_phantom_deterministic_by_seed_for_every_variant():
  for kwargs in [{}, {"modality": "CT"}, {"spacing": (1.0, 1.0, 3.0)}]:
    a = synthetic.simulate_phantom((24, 24, 24), np.random.default_rng(5), "high", **kwargs)
    b = synthetic.simulate_phantom((24, 24, 24), np.random.default_rng(5), "high", **kwargs)
    c = synthetic.simulate_phantom((24, 24, 24), np.random.default_rng(6), "high", **kwargs)
    for x, y in zip(a[:4], b[:4]):
      np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.image, c.image)


def test_anisotropic_spacing_in_header(tmp_path):
  root = synthetic.make_synthetic_dataset(tmp_path / "aniso", 2, (32, 32, 16), seed=1,
                                          spacing=(1.0, 1.0, 3.0))
  ds = nifti.read_dataset(root)
  nifti.validate_dataset(ds)
  for path in (*ds.image_paths("case_000"), ds.label_path("case_000")):
    img = nib.load(path)
    np.testing.assert_allclose(img.header.get_zooms()[:3], (1.0, 1.0, 3.0))
    np.testing.assert_allclose(img.affine, synthetic.phantom_affine((32, 32, 16), (1, 1, 3)))
  assert planning.case_spacing(nib.load(ds.label_path("case_001")).header) == (1.0, 1.0, 3.0)
  meta = json.loads((root / "dataset.json").read_text())
  assert meta["synthetic"]["spacing"] == [1.0, 1.0, 3.0]
  # The head fills the field of view in mm, so it stays round: 32 mm in x,
  # 48 mm in z, both ~85 % covered.
  case = nifti.load_case(ds, "case_000")
  head = nifti.nonzero_mask(case.image)
  extent_x = np.ptp(np.nonzero(head.any(axis=(1, 2)))[0]) + 1
  extent_z = (np.ptp(np.nonzero(head.any(axis=(0, 1)))[0]) + 1) * 3
  assert 0.7 * 32 < extent_x <= 32 and 0.7 * 48 < extent_z <= 48
  assert LO <= case.label.mean() <= HI


def test_ct_variant(tmp_path):
  root = synthetic.make_synthetic_dataset(tmp_path / "ct", 2, (32, 32, 32), seed=2,
                                          modality="CT", num_test_cases=1)
  meta = json.loads((root / "dataset.json").read_text())
  assert meta["channel_names"] == {"0": "CT"}
  assert meta["labels"] == {"background": 0, "lesion": 1}
  ds = nifti.read_dataset(root)
  nifti.validate_dataset(ds, "train")
  assert sorted(p.name for p in (root / "imagesTr").iterdir()) == [
      "case_000_0000.nii.gz", "case_001_0000.nii.gz"]
  assert planning.normalization_schemes(ds.channel_names) == ("ct",)
  p = synthetic.simulate_phantom((32, 32, 32), np.random.default_rng(0), "high", modality="CT")
  hu = p.image[..., 0]
  assert p.image.shape == (32, 32, 32, 1) and p.image.dtype == np.float32
  assert -1024 <= hu.min() and hu.max() <= 3071
  assert np.median(hu[p.tissue == synthetic.AIR]) < -950  # air outside the head
  assert np.median(hu[p.tissue == synthetic.SKULL]) > 500  # bone around it
  brain = np.isin(p.tissue, (synthetic.GM, synthetic.WM))
  assert 20 < np.median(hu[brain]) < 45
  ring = _ring(p.label, p.tissue != synthetic.AIR, p.tissue)
  assert hu[p.label > 0].mean() < hu[ring].mean()  # lesions are hypodense
  assert LO <= p.label.mean() <= HI


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"spacing": (1.0, 0.0, 1.0)}, "spacing"),
        ({"spacing": (1.0, 1.0)}, "spacing"),
        ({"modality": "PET"}, "modality"),
    ],
)
def test_bad_variant_arguments(tmp_path, kwargs, message):
  with pytest.raises(ValueError, match=message):
    synthetic.make_synthetic_dataset(tmp_path / "ds", 1, (16, 16, 16), **kwargs)
  assert not (tmp_path / "ds").exists()


@pytest.mark.parametrize(
    "kwargs",
    [{"bias_range": (0.3, 0.2)}, {"snr_range": (0.0, 5.0)}, {"noise": "poisson"},
     {"lesion_lobes": (0, 2)}, {"distractors": -1.0}, {"periventricular_fraction": 2.0}],
)
def test_bad_options(kwargs):
  with pytest.raises(ValueError, match="PhantomOptions"):
    synthetic.PhantomOptions(**kwargs)


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


def test_cli_ct_anisotropic_easy(tmp_path):
  out = tmp_path / "ct"
  result = run_cli("--out", str(out), "--cases", "1", "--shape", "24", "24", "16",
                   "--spacing", "1", "1", "2", "--modality", "CT", "--difficulty", "easy")
  assert result.returncode == 0, result.stderr
  ds = nifti.read_dataset(out)
  assert ds.channel_names == ("CT",)
  case = nifti.load_case(ds, "case_000")
  assert case.image.shape == (24, 24, 16, 1)
  np.testing.assert_allclose(case.header.get_zooms()[:3], (1.0, 1.0, 2.0))


def test_cli_help():
  result = run_cli("--help")
  assert result.returncode == 0
  for flag in ("--out", "--cases", "--shape", "--seed", "--test-cases", "--spacing",
               "--modality", "--difficulty"):
    assert flag in result.stdout
