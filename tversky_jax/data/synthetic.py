"""Synthetic MS-lesion phantoms written as a real nnU-Net v2 NIfTI dataset.

Each case is a head (ellipsoid) with cortical grey matter, white matter, an
outer CSF rim and two lateral ventricles, imaged with three contrasts
(T1-, T2- and FLAIR-like), a smooth multiplicative bias field per channel and
Gaussian noise; the background outside the head is exactly 0. A few
ellipsoidal lesions sit in white matter (T1-dark, T2-bright, FLAIR-bright) and
cover 0.1-0.5 % of the voxels (the paper's >500:1 imbalance). Cases cycle
through low (1-2 tiny lesions), medium and high lesion load.

Usage::

  python -m tversky_jax.data.synthetic --out data/Dataset900_Phantoms --cases 12
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

CHANNEL_NAMES = ("T1", "T2", "FLAIR")
LESION_FRACTION_RANGE = (0.001, 0.005)
FILE_ENDING = ".nii.gz"

# Mean intensity per tissue (rows) and contrast (columns: T1, T2, FLAIR).
_CSF, _GM, _WM, _LESION = range(4)
_CONTRAST = np.array(
    [
        [0.25, 1.00, 0.15],  # CSF
        [0.60, 0.65, 0.55],  # grey matter
        [0.85, 0.40, 0.45],  # white matter
        [0.45, 0.85, 1.00],  # lesion
    ],
    dtype=np.float32,
)
# Lesion load per category: (min, max) number of lesions, (min, max) fraction.
_LOADS = {
    "low": ((1, 2), (0.0010, 0.0014)),
    "medium": ((3, 5), (0.0018, 0.0030)),
    "high": ((5, 8), (0.0032, 0.0048)),
}


def phantom_affine(shape: Sequence[int]) -> np.ndarray:
  """``[4, 4]`` affine of the phantoms: 1 mm voxels, x flipped (LAS), origin near the centre."""
  affine = np.diag([-1.0, 1.0, 1.0, 1.0])
  affine[:3, 3] = [(shape[0] - 1) / 2 + 0.5, -(shape[1] - 1) / 2 - 3.0, -(shape[2] - 1) / 2 + 7.0]
  return affine


def make_phantom(
    shape: Sequence[int], rng: np.random.Generator, load: str = "medium"
) -> tuple[np.ndarray, np.ndarray]:
  """Generates one phantom case in memory.

  Args:
    shape: spatial shape ``(x, y, z)``, each at least 16.
    rng: the only source of randomness.
    load: ``"low"``, ``"medium"`` or ``"high"`` lesion load.

  Returns:
    ``(image, label)``: image ``float32 [x, y, z, 3]`` (T1, T2, FLAIR; 0
    outside the head), label ``uint8 [x, y, z]`` (1 = lesion) with a lesion
    fraction in ``LESION_FRACTION_RANGE``.
  """
  shape = tuple(int(s) for s in shape)
  if len(shape) != 3 or min(shape) < 16:
    raise ValueError(f"shape must be 3 sizes >= 16, got {shape}")
  if load not in _LOADS:
    raise ValueError(f"load must be one of {sorted(_LOADS)}, got {load!r}")
  # Normalised coordinates in [-1, 1], broadcastable to `shape`.
  x, y, z = np.ogrid[tuple(slice(-1.0, 1.0, complex(0, n)) for n in shape)]
  x, y, z = (a.astype(np.float32) for a in (x, y, z))

  def ellipsoid_radius(center, radii):
    return np.sqrt(
        ((x - center[0]) / radii[0]) ** 2
        + ((y - center[1]) / radii[1]) ** 2
        + ((z - center[2]) / radii[2]) ** 2
    )

  head_center = rng.uniform(-0.04, 0.04, 3)
  rho = ellipsoid_radius(head_center, rng.uniform(0.82, 0.92, 3))
  # Gyri: a smooth random wobble of the grey/white boundary.
  k = rng.uniform(3.0, 6.0, 3)
  phase = rng.uniform(0, 2 * np.pi, 3)
  wobble = 0.04 * (np.sin(k[0] * x + phase[0]) * np.sin(k[1] * y + phase[1])
                   + np.sin(k[2] * z + phase[2]))
  offset = rng.uniform(0.10, 0.14)
  vent_radii = (rng.uniform(0.07, 0.09), rng.uniform(0.22, 0.30), rng.uniform(0.10, 0.14))
  vent = np.minimum(
      ellipsoid_radius(head_center + [offset, 0.05, 0.05], vent_radii),
      ellipsoid_radius(head_center + [-offset, 0.05, 0.05], vent_radii),
  )

  head = rho <= 1.0
  tissue = np.full(shape, _CSF, np.int8)
  tissue[rho <= 0.9] = _GM
  wm = (rho <= 0.72 + wobble) & (vent > 1.0)
  tissue[wm] = _WM
  label = _lesion_mask(shape, wm, (rho <= 0.62) & (vent > 1.4), rng, load)
  tissue[label] = _LESION

  image = np.empty((*shape, 3), np.float32)
  for c in range(3):
    channel = _CONTRAST[tissue, c]
    channel = ndimage.gaussian_filter(channel, 0.5, truncate=3.0)  # partial volume
    channel *= _bias_field(x, y, z, rng)
    channel += rng.normal(0.0, 0.03, shape).astype(np.float32)
    np.abs(channel, out=channel)  # magnitude images are non-negative
    channel *= rng.uniform(300.0, 1200.0)  # arbitrary scanner gain
    image[..., c] = np.where(head, channel, 0.0)
  return image, label.astype(np.uint8)


def _bias_field(x, y, z, rng: np.random.Generator) -> np.ndarray:
  """Smooth multiplicative field ``exp(quadratic polynomial)``, about +-15 %."""
  terms = (x, y, z, x * y, y * z, x * z, x * x, y * y, z * z)
  log_field = sum(rng.normal(0.0, 0.05) * t for t in terms)
  return np.exp(log_field).astype(np.float32)


def _lesion_mask(
    shape: tuple[int, int, int], wm: np.ndarray, centers_region: np.ndarray,
    rng: np.random.Generator, load: str,
) -> np.ndarray:
  """``bool [x, y, z]``: a few ellipsoidal lesions inside `wm`.

  Every lesion gets a random size, elongation and orientation; all are then
  grown together (the top-k voxels of ``max_i (1 - d_i)``, d_i the normalised
  ellipsoidal distance to lesion i) until exactly k voxels are lesion, so the
  lesion fraction is hit exactly even at 32^3, and each lesion keeps at least
  its centre voxel.
  """
  (n_min, n_max), (f_min, f_max) = _LOADS[load]
  num_voxels = math.prod(shape)
  lo = math.ceil(LESION_FRACTION_RANGE[0] * num_voxels)
  hi = math.floor(LESION_FRACTION_RANGE[1] * num_voxels)
  target = int(np.clip(round(rng.uniform(f_min, f_max) * num_voxels), lo, hi))

  candidates = np.argwhere(centers_region & wm)
  num_lesions = int(rng.integers(n_min, n_max + 1))
  centers = candidates[rng.choice(len(candidates), num_lesions, replace=False)]
  # Lesion i is {p : (p - c_i)^T A_i (p - c_i) <= (1 - t)^2}, A_i = R diag(r^-2) R^T.
  forms = []
  for _ in centers:
    rotation, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    radii = rng.lognormal(0.0, 0.35) * rng.uniform(0.6, 1.0, 3)
    forms.append(rotation @ np.diag(radii**-2.0) @ rotation.T)

  # The field is computed in a box around each centre; the box grows until it
  # holds the whole final ellipsoid, so the result equals the full-volume one.
  half = math.ceil(2.0 * (3.0 * target / (4.0 * math.pi)) ** (1 / 3) / 0.6) + 2
  while True:
    field = np.full(shape, -np.inf, np.float32)
    boxes = []
    for center, form in zip(centers, forms):
      lo, hi = np.maximum(center - half, 0), np.minimum(center + half + 1, shape)
      box = tuple(slice(a, b) for a, b in zip(lo, hi))
      offsets = np.ogrid[box]
      offsets = [(o - c).astype(np.float32) for o, c in zip(offsets, center)]
      q = sum(form[i, j] * offsets[i] * offsets[j] for i in range(3) for j in range(3))
      np.maximum(field[box], 1.0 - np.sqrt(q), out=field[box])
      boxes.append((lo, hi))
    field[~wm] = -np.inf
    flat = field.reshape(-1)
    chosen = np.argpartition(-flat, target - 1)[:target]
    rho = 1.0 - float(flat[chosen].min())
    if all(_ellipsoid_in_box(center, form, rho, lo, hi, shape)
           for center, form, (lo, hi) in zip(centers, forms, boxes)):
      break
    half *= 2
  mask = np.zeros(num_voxels, bool)
  mask[chosen] = True
  return mask.reshape(shape)


def _ellipsoid_in_box(center, form, rho, lo, hi, shape) -> bool:
  """Whether {p : (p-c)^T form (p-c) <= rho^2} lies inside the box [lo, hi)."""
  extent = rho * np.sqrt(np.diag(np.linalg.inv(form)))
  inside_lo = (lo == 0) | (center - extent > lo)
  inside_hi = (hi == np.asarray(shape)) | (center + extent < hi - 1)
  return bool(np.all(inside_lo & inside_hi))


def _write_case(
    folder: Path, images_dir: str, labels_dir: str, case_id: str,
    image: np.ndarray, label: np.ndarray, affine: np.ndarray,
) -> None:
  for c in range(image.shape[-1]):
    _save(image[..., c], affine, folder / images_dir / f"{case_id}_{c:04d}{FILE_ENDING}")
  _save(label, affine, folder / labels_dir / f"{case_id}{FILE_ENDING}")


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
  img = nib.Nifti1Image(array, affine)
  img.header.set_qform(affine, code=1)
  img.header.set_sform(affine, code=1)
  img.header.set_xyzt_units("mm", "sec")
  nib.save(img, path)


def _case_load(seed: int, split_key: int, index: int) -> str:
  """Cycles through the loads in a seed-dependent order, so any 3 consecutive cases differ."""
  order = np.random.default_rng([seed, split_key]).permutation(sorted(_LOADS))
  return str(order[index % len(order)])


def make_synthetic_dataset(
    out_dir: str | os.PathLike[str],
    num_cases: int = 12,
    shape: Sequence[int] = (32, 32, 32),
    seed: int = 0,
    num_test_cases: int = 0,
    overwrite: bool = False,
) -> Path:
  """Writes a synthetic MS-lesion dataset in the nnU-Net v2 raw layout.

  Writes ``dataset.json``, ``imagesTr/case_XXX_000{0,1,2}.nii.gz``,
  ``labelsTr/case_XXX.nii.gz`` and, if ``num_test_cases > 0``, ``imagesTs/`` and
  ``labelsTs/`` (ids ``test_XXX``). Images are float32, labels uint8, all on
  the grid of :func:`phantom_affine`. The dataset is built in a temporary
  sibling folder and renamed into place, so `out_dir` either is complete or
  does not exist.

  Case ``i`` depends only on ``(seed, split, i)``: the same seed gives
  identical files, and adding cases does not change earlier ones.

  Args:
    out_dir: the dataset folder to create.
    num_cases: number of training cases (>= 1).
    shape: spatial shape ``(x, y, z)`` of every case, each >= 16.
    seed: random seed.
    num_test_cases: number of test cases (>= 0).
    overwrite: replace an existing `out_dir`; otherwise it is an error.

  Returns:
    `out_dir` as a Path.
  """
  out_dir = Path(out_dir)
  shape = tuple(int(s) for s in shape)
  if num_cases < 1:
    raise ValueError(f"num_cases must be >= 1, got {num_cases}")
  if num_test_cases < 0:
    raise ValueError(f"num_test_cases must be >= 0, got {num_test_cases}")
  if seed < 0:
    raise ValueError(f"seed must be >= 0, got {seed}")
  if len(shape) != 3 or min(shape) < 16:
    raise ValueError(f"shape must be 3 sizes >= 16, got {shape}")
  if out_dir.exists() and not overwrite:
    raise ValueError(f"{out_dir} already exists (pass overwrite=True / --overwrite to replace it)")

  out_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp", dir=out_dir.parent))
  try:
    affine = phantom_affine(shape)
    splits = [("imagesTr", "labelsTr", "case", 1, num_cases)]
    if num_test_cases:
      splits.append(("imagesTs", "labelsTs", "test", 2, num_test_cases))
    for images_dir, labels_dir, prefix, split_key, count in splits:
      (tmp / images_dir).mkdir()
      (tmp / labels_dir).mkdir()
      for i in range(count):
        rng = np.random.default_rng([seed, split_key, i])
        image, label = make_phantom(shape, rng, _case_load(seed, split_key, i))
        _write_case(tmp, images_dir, labels_dir, f"{prefix}_{i:03d}", image, label, affine)
    meta = {
        "channel_names": {str(i): name for i, name in enumerate(CHANNEL_NAMES)},
        "labels": {"background": 0, "lesion": 1},
        "numTraining": num_cases,
        "file_ending": FILE_ENDING,
        "name": "SyntheticMSLesions",
        "description": "MS-lesion phantoms from tversky_jax.data.synthetic",
        "synthetic": {"seed": seed, "shape": list(shape), "num_test_cases": num_test_cases},
    }
    (tmp / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    if out_dir.exists():
      shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out_dir


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
      prog="python -m tversky_jax.data.synthetic",
      description="Write a synthetic MS-lesion dataset (nnU-Net v2 raw layout, NIfTI).",
  )
  parser.add_argument("--out", required=True, type=Path, help="dataset folder to create")
  parser.add_argument("--cases", type=int, default=12, help="number of training cases (default 12)")
  parser.add_argument("--shape", type=int, nargs=3, default=(32, 32, 32), metavar=("X", "Y", "Z"),
                      help="volume shape (default 32 32 32)")
  parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
  parser.add_argument("--test-cases", type=int, default=0, help="number of test cases (default 0)")
  parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
  args = parser.parse_args(argv)
  try:
    path = make_synthetic_dataset(args.out, args.cases, args.shape, args.seed,
                                  args.test_cases, args.overwrite)
  except ValueError as e:
    parser.error(str(e))
  print(f"wrote {args.cases} training and {args.test_cases} test case(s) to {path}")


if __name__ == "__main__":
  main()
