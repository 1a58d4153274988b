"""Synthetic MS-lesion phantoms written as a real nnU-Net v2 NIfTI dataset.

Each case is a head (ellipsoid) with cortical grey matter (with sulci), white
matter, deep grey matter, an outer CSF rim and two lateral ventricles, imaged
with three contrasts (T1-, T2- and FLAIR-like, relative to white matter) or,
with ``modality="CT"``, as one Hounsfield-unit channel. The defaults
(:class:`PhantomOptions`) aim at the difficulty of real MS MRI, where a single
intensity threshold fails and a network must use shape, location and all
channels:

* lesions: unions of 2-4 rotated ellipsoids with soft (partial-volume)
  boundaries, mostly periventricular, otherwise deep white matter; 2 to ~8 mm
  across. The label is the fuzzy membership > 0.5. FLAIR contrast 10-60 %
  above white matter, varying by case and by lesion (some are faint), T2
  brighter still, T1 slightly darker. Together they cover 0.1-0.5 % of the
  voxels (the paper's >500:1 imbalance); cases cycle through low (1-2
  lesions), medium and high lesion load.
* unlabelled look-alikes: grey matter is brighter than white matter on FLAIR
  and T2 (with brighter cortical patches), thin FLAIR-bright caps at the
  ventricle horns, FLAIR/T1-bright vessels, CSF-like perivascular spaces
  (T2-bright) and FLAIR flow artefacts in the ventricles.
* scanner effects: a smooth multiplicative bias field per channel (+-20-30 %),
  a point-spread blur, Rician noise (the magnitude of complex Gaussian noise)
  with an SNR varying by case, and an arbitrary gain per channel.

MR background outside the head is exactly 0 (skull-stripped); CT cases keep
skull (~+1000 HU), scalp and air (-1000 HU). Voxels may be anisotropic
(``spacing``): anatomy is defined in millimetres and sampled on the grid, and
the spacing is written into the affine and the header zooms. Geometry and
intensities depend only on the given random generator.

Usage::

  python -m tversky_jax.data.synthetic --out data/Dataset900_Phantoms --cases 12
  python -m tversky_jax.data.synthetic --out /tmp/ct --modality CT --spacing 1 1 3 --shape 48 48 16
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import nibabel as nib
import numpy as np
from scipy import ndimage, special

MR_CHANNELS = ("T1", "T2", "FLAIR")
CT_CHANNELS = ("CT",)
CHANNEL_NAMES = MR_CHANNELS  # the default (MR) channels
MODALITIES = {"MR": MR_CHANNELS, "CT": CT_CHANNELS}
LESION_FRACTION_RANGE = (0.001, 0.005)
FILE_ENDING = ".nii.gz"

# Tissue codes of `Phantom.tissue`.
AIR, CSF, GM, WM, DEEP_GM, VENTRICLE, SKULL, SCALP = range(8)
# Distractor codes of `Phantom.distractors` (0: none). None is labelled.
VESSEL, PERIVASCULAR, FLOW_ARTEFACT, VENTRICLE_CAP, CALCIFICATION = range(1, 6)

# MR intensity per tissue (rows, by code) and contrast (T1, T2, FLAIR), relative
# to white matter; jittered per case. Air, skull and scalp are outside the
# (skull-stripped) MR head.
_MR_LEVELS = np.array(
    [
        [0.00, 0.00, 0.00],  # air
        [0.30, 2.50, 0.25],  # CSF
        [0.72, 1.30, 1.16],  # grey matter (brighter than WM on T2 and FLAIR)
        [1.00, 1.00, 1.00],  # white matter
        [0.85, 1.12, 1.08],  # deep grey matter
        [0.30, 2.50, 0.22],  # ventricle
        [0.00, 0.00, 0.00],  # skull
        [0.00, 0.00, 0.00],  # scalp
    ],
    dtype=np.float32,
)
# CT: Hounsfield units per tissue, jittered per case.
_CT_LEVELS = np.array([-1000.0, 8.0, 38.0, 28.0, 35.0, 6.0, 1000.0, 35.0], np.float32)

# Lesion load per category: (min, max) number of lesions, (min, max) fraction.
_LOADS = {
    "low": ((1, 2), (0.0010, 0.0014)),
    "medium": ((3, 5), (0.0018, 0.0030)),
    "high": ((5, 8), (0.0032, 0.0048)),
}


@dataclasses.dataclass(frozen=True)
class PhantomOptions:
  """How hard and how realistic the phantoms are.

  All randomness comes from the case's random generator, so a dataset seed
  fixes every draw. The defaults aim at real MS MRI: even the best FLAIR
  threshold per case (an oracle) reaches a Dice of only ~0.02-0.3 on 48^3
  cases, while the demo U-Net reaches ~0.65; :meth:`easy` gives clean,
  high-contrast phantoms (oracle threshold Dice > 0.9) for smoke tests.

  Attributes:
    bias_range: per channel, the largest deviation of the multiplicative bias
      field from 1 inside the head is drawn uniformly from this range (a
      random cubic polynomial in the exponent). CT gets an additive
      "cupping" of this fraction times 10 HU instead.
    snr_range: MR signal-to-noise ratio (white-matter level over the noise
      sigma), drawn log-uniformly per case (and jittered +-20 % per channel).
    noise: ``"rician"`` (magnitude of complex Gaussian noise), ``"gaussian"``
      or ``"none"``. CT noise is always Gaussian, with sigma drawn from
      ``ct_noise_hu``.
    ct_noise_hu: range of the CT noise sigma in HU.
    lesion_contrast: range of the FLAIR lesion contrast, ``lesion / WM - 1``.
      Each case draws a typical contrast in it, each lesion varies around that
      (clipped to the range), so some cases and lesions are faint. T2 contrast
      is 1.5-2.5 times the FLAIR one; T1 is darker by 0.3-0.8 times it; CT
      lesions are 12-40 HU times it hypodense.
    lesion_lobes: (min, max) number of ellipsoids whose union forms a lesion.
    lesion_diameter_mm: the lesion diameters are drawn (log-uniformly) in this
      range and then scaled together to the case's lesion fraction, so small
      volumes get smaller lesions.
    lesion_softness_mm: width of the partial-volume boundary of a lesion
      (logistic scale of its fuzzy membership, in mm).
    periventricular_fraction: share of lesions centred within 6 mm of a
      ventricle; the others sit anywhere in white matter.
    distractors: how many unlabelled look-alikes (vessels, perivascular
      spaces, flow artefacts, ventricle caps, cortical patches;
      calcifications on CT) relative to the default; 0 turns them off.
    psf_mm: sigma of the Gaussian point-spread blur in mm (thick slices add
      their slab profile).
  """

  bias_range: tuple[float, float] = (0.20, 0.30)
  snr_range: tuple[float, float] = (6.0, 20.0)
  noise: str = "rician"
  ct_noise_hu: tuple[float, float] = (3.0, 7.0)
  lesion_contrast: tuple[float, float] = (0.10, 0.60)
  lesion_lobes: tuple[int, int] = (2, 4)
  lesion_diameter_mm: tuple[float, float] = (2.0, 8.0)
  lesion_softness_mm: float = 0.5
  periventricular_fraction: float = 0.6
  distractors: float = 1.0
  psf_mm: float = 0.5

  def __post_init__(self):
    def check_range(name, lo_min, hi_max=math.inf):
      lo, hi = getattr(self, name)
      if not lo_min <= lo <= hi <= hi_max:
        raise ValueError(f"PhantomOptions.{name} must be a range within "
                         f"[{lo_min}, {hi_max}], got {(lo, hi)}")
    check_range("bias_range", 0.0, 0.9)
    check_range("snr_range", 1e-3)
    check_range("ct_noise_hu", 0.0)
    check_range("lesion_contrast", 0.0)
    check_range("lesion_lobes", 1, 16)
    check_range("lesion_diameter_mm", 0.5)
    if self.noise not in ("rician", "gaussian", "none"):
      raise ValueError(f"PhantomOptions.noise must be rician, gaussian or none, got {self.noise!r}")
    for name in ("lesion_softness_mm", "distractors", "psf_mm"):
      if getattr(self, name) < 0:
        raise ValueError(f"PhantomOptions.{name} must be >= 0, got {getattr(self, name)}")
    if not 0.0 <= self.periventricular_fraction <= 1.0:
      raise ValueError("PhantomOptions.periventricular_fraction must be in [0, 1]")

  @classmethod
  def easy(cls) -> PhantomOptions:
    """Clean phantoms: strong contrast, high SNR, mild bias, no look-alikes."""
    return cls(bias_range=(0.05, 0.10), snr_range=(40.0, 60.0), ct_noise_hu=(1.0, 2.0),
               lesion_contrast=(0.9, 1.0), lesion_lobes=(1, 1), lesion_softness_mm=0.2,
               distractors=0.0)


DIFFICULTIES = {"realistic": PhantomOptions(), "easy": PhantomOptions.easy()}


class Phantom(NamedTuple):
  """One simulated case.

  Attributes:
    image: ``float32 [x, y, z, c]``: T1, T2, FLAIR (MR; 0 outside the head)
      or CT in HU.
    label: ``uint8 [x, y, z]``, 1 = lesion (fuzzy lesion membership > 0.5).
    tissue: ``int8 [x, y, z]`` tissue codes (``AIR`` ... ``SCALP``); lesions
      lie in ``WM`` and are not marked here.
    distractors: ``uint8 [x, y, z]``: the unlabelled look-alike (``VESSEL``
      ... ``CALCIFICATION``) whose membership exceeds 0.5, else 0.
    spacing: voxel size in mm.
  """

  image: np.ndarray
  label: np.ndarray
  tissue: np.ndarray
  distractors: np.ndarray
  spacing: tuple[float, float, float]


def phantom_affine(shape: Sequence[int], spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
  """``[4, 4]`` affine of the phantoms.

  Voxels of ``spacing`` mm, x flipped (LAS), origin near the centre; with
  the default spacing it is the affine of the original 1 mm phantoms.
  """
  sx, sy, sz = (float(s) for s in spacing)
  affine = np.diag([-sx, sy, sz, 1.0])
  affine[:3, 3] = [sx * (shape[0] - 1) / 2 + 0.5, -sy * (shape[1] - 1) / 2 - 3.0,
                   -sz * (shape[2] - 1) / 2 + 7.0]
  return affine


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
  shape = tuple(int(s) for s in shape)
  if len(shape) != 3 or min(shape) < 16:
    raise ValueError(f"shape must be 3 sizes >= 16, got {shape}")
  return shape  # type: ignore[return-value]


def _check_spacing(spacing: Sequence[float]) -> tuple[float, float, float]:
  spacing = tuple(float(s) for s in spacing)
  if len(spacing) != 3 or not all(0.0 < s <= 10.0 for s in spacing):
    raise ValueError(f"spacing must be 3 sizes in (0, 10] mm, got {spacing}")
  return spacing  # type: ignore[return-value]


def _check_modality(modality: str) -> str:
  if modality not in MODALITIES:
    raise ValueError(f"modality must be one of {sorted(MODALITIES)}, got {modality!r}")
  return modality


def make_phantom(
    shape: Sequence[int], rng: np.random.Generator, load: str = "medium", *,
    spacing: Sequence[float] = (1.0, 1.0, 1.0), modality: str = "MR",
    options: PhantomOptions | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Generates one phantom case in memory.

  Args:
    shape: spatial shape ``(x, y, z)``, each at least 16.
    rng: the only source of randomness.
    load: ``"low"``, ``"medium"`` or ``"high"`` lesion load.
    spacing: voxel size in mm; the head fills the field of view
      ``shape * spacing``, lesions and look-alikes have sizes in mm.
    modality: ``"MR"`` (T1, T2, FLAIR) or ``"CT"`` (one channel, HU).
    options: difficulty settings; None for the defaults.

  Returns:
    ``(image, label)``: image ``float32 [x, y, z, c]`` (MR: 0 outside the
    head), label ``uint8 [x, y, z]`` (1 = lesion) with a lesion fraction in
    ``LESION_FRACTION_RANGE``. See :func:`simulate_phantom` for the tissue
    and look-alike maps.
  """
  phantom = simulate_phantom(shape, rng, load, spacing=spacing, modality=modality, options=options)
  return phantom.image, phantom.label


def simulate_phantom(
    shape: Sequence[int], rng: np.random.Generator, load: str = "medium", *,
    spacing: Sequence[float] = (1.0, 1.0, 1.0), modality: str = "MR",
    options: PhantomOptions | None = None,
) -> Phantom:
  """Like :func:`make_phantom`, with the tissue and look-alike maps."""
  shape = _check_shape(shape)
  spacing = _check_spacing(spacing)
  modality = _check_modality(modality)
  if load not in _LOADS:
    raise ValueError(f"load must be one of {sorted(_LOADS)}, got {load!r}")
  options = PhantomOptions() if options is None else options
  ct = modality == "CT"
  grid = _Grid(shape, spacing)

  tissue, head = _anatomy(grid, rng, ct)
  lesion, label, contrast = _lesions(grid, tissue, rng, load, options)
  members = _distractors(grid, tissue, lesion, rng, options, ct)
  distractors = np.zeros(shape, np.uint8)
  for code, m in members.items():
    distractors[(m > 0.5) & (distractors == 0)] = code
  if ct:
    image = _render_ct(grid, tissue, lesion, contrast, members, rng, options)
  else:
    image = _render_mr(grid, tissue, head, lesion, contrast, members, rng, options)
  return Phantom(image, label.astype(np.uint8), tissue, distractors, spacing)


class _Grid:
  """Voxel-centre coordinates of a volume in mm (0 at the centre), broadcastable."""

  def __init__(self, shape: tuple[int, int, int], spacing: tuple[float, float, float]):
    self.shape = shape
    self.spacing = np.asarray(spacing, np.float64)
    self.mm = [((np.arange(n) - (n - 1) / 2) * s).astype(np.float32).reshape(
        [-1 if a == axis else 1 for a in range(3)])
               for axis, (n, s) in enumerate(zip(shape, spacing))]
    self.half_fov = np.asarray(shape) * self.spacing / 2
    self.unit = [m / h for m, h in zip(self.mm, self.half_fov)]  # in (-1, 1)

  def sigma_voxels(self, sigma_mm: float) -> np.ndarray:
    """Per-axis Gaussian sigma in voxels for a blur of `sigma_mm`."""
    return sigma_mm / self.spacing

  def to_index(self, points_mm: np.ndarray) -> np.ndarray:
    """``int [n, 3]`` voxel indices of mm points (rounded, not clipped)."""
    return np.rint(points_mm / self.spacing + (np.asarray(self.shape) - 1) / 2).astype(int)

  def to_mm(self, index: np.ndarray) -> np.ndarray:
    return (index - (np.asarray(self.shape) - 1) / 2) * self.spacing


def _smooth_noise(grid: _Grid, scale_mm: float, rng: np.random.Generator) -> np.ndarray:
  """Gaussian-smoothed white noise with correlation length ~`scale_mm`, unit std."""
  noise = rng.standard_normal(grid.shape, dtype=np.float32)
  noise = ndimage.gaussian_filter(noise, np.maximum(grid.sigma_voxels(scale_mm), 0.5),
                                  truncate=2.5, mode="wrap")
  return noise / max(float(noise.std()), 1e-6)


def _ellipsoid_rho(grid: _Grid, center: Sequence[float], radii: Sequence[float]) -> np.ndarray:
  """Normalised ellipsoidal radius in unit (field-of-view) coordinates."""
  x, y, z = grid.unit
  return np.sqrt(((x - center[0]) / radii[0]) ** 2 + ((y - center[1]) / radii[1]) ** 2
                 + ((z - center[2]) / radii[2]) ** 2)


def _anatomy(grid: _Grid, rng: np.random.Generator, ct: bool) -> tuple[np.ndarray, np.ndarray]:
  """``(tissue int8 [x, y, z], head bool)``; the MR head is brain plus CSF rim."""
  x, y, z = grid.unit
  # CT keeps room for skull and scalp around the brain.
  scale = 0.85 if ct else 1.0
  head_center = rng.uniform(-0.04, 0.04, 3)
  rho = _ellipsoid_rho(grid, head_center, scale * rng.uniform(0.82, 0.92, 3))
  # Gyri: a smooth random wobble of the grey/white boundary.
  k = rng.uniform(3.0, 6.0, 3)
  phase = rng.uniform(0, 2 * np.pi, 3)
  wobble = 0.04 * (np.sin(k[0] * x + phase[0]) * np.sin(k[1] * y + phase[1])
                   + np.sin(k[2] * z + phase[2]))
  offset = rng.uniform(0.10, 0.14) * scale
  vent_radii = scale * np.array(
      [rng.uniform(0.07, 0.09), rng.uniform(0.22, 0.30), rng.uniform(0.10, 0.14)])
  vent_shift = np.array([offset, 0.05 * scale, 0.05 * scale])
  vent_rho = np.minimum(
      _ellipsoid_rho(grid, head_center + vent_shift, vent_radii),
      _ellipsoid_rho(grid, head_center + vent_shift * [-1, 1, 1], vent_radii))
  deep_radii = scale * np.array([0.07, 0.12, 0.09]) * rng.uniform(0.85, 1.15, 3)
  deep_offset = offset + 0.14 * scale
  deep_rho = np.minimum(
      _ellipsoid_rho(grid, head_center + np.array([deep_offset, 0.0, -0.12 * scale]), deep_radii),
      _ellipsoid_rho(grid, head_center + np.array([-deep_offset, 0.0, -0.12 * scale]), deep_radii))
  sulci = np.abs(_smooth_noise(grid, 3.0, rng)) < 0.2  # thin CSF clefts in the cortex

  head = rho <= 1.0
  tissue = np.full(grid.shape, AIR, np.int8)
  if ct:
    tissue[rho <= 1.15] = SCALP
    tissue[rho <= 1.10] = SKULL
  tissue[head] = CSF
  tissue[(rho <= 0.9) & ~(sulci & (rho > 0.76 + wobble))] = GM
  tissue[(rho <= 0.72 + wobble) & (deep_rho <= 1.0)] = DEEP_GM
  tissue[(rho <= 0.72 + wobble) & (deep_rho > 1.0)] = WM
  tissue[vent_rho <= 1.0] = VENTRICLE
  return tissue, head


def _lesions(
    grid: _Grid, tissue: np.ndarray, rng: np.random.Generator, load: str,
    options: PhantomOptions,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``(membership float32, label bool, contrast float32)`` of the lesions.

  Each lesion is the union of a few rotated ellipsoids; the union field
  ``u`` (about the signed distance to the union's surface in mm, positive
  inside) is computed in a box around each lesion. The label is the ``k``
  voxels of white matter with the largest ``u``, ``k`` being the case's
  lesion count (so the fraction is hit exactly at any size); the threshold
  ``t`` is then the 0.5 level of the fuzzy membership
  ``sigmoid((u - t) / softness)``, and every label voxel has membership > 0.5.
  `contrast` is each voxel's lesion FLAIR contrast (of the nearest lesion).
  All three are ``[x, y, z]``.
  """
  # The random draws happen in this order; changing it changes every phantom.
  num_lesions, target = _lesion_budget(grid.shape, load, rng)
  centers = _lesion_centers(grid, tissue, num_lesions, rng, options)
  radii = _lesion_radii(grid, target, num_lesions, rng, options)
  c_lo, c_hi = options.lesion_contrast
  typical = rng.uniform(c_lo, c_hi)
  contrasts = np.clip(typical * np.exp(rng.normal(0.0, 0.35, num_lesions)), c_lo, c_hi)
  lobes = [_lesion_lobes(r, rng, options) for r in radii]

  softness = max(options.lesion_softness_mm, 1e-3)
  field, owner, chosen, threshold = _lesion_field(
      grid, tissue == WM, centers, lobes, target, softness)
  label = np.zeros(field.size, bool)
  label[chosen] = True
  label = label.reshape(grid.shape)
  finite = np.isfinite(field)
  membership = np.zeros(grid.shape, np.float32)
  membership[finite] = special.expit((field[finite] - threshold) / softness)
  membership[label] = np.maximum(membership[label], 0.5 + 1e-3)
  membership[~label] = np.minimum(membership[~label], 0.5)
  # Within-lesion heterogeneity: +-25 % of the contrast.
  contrast = contrasts[owner].astype(np.float32)
  contrast *= np.clip(1.0 + 0.25 * _smooth_noise(grid, 1.5, rng), 0.4, 1.6)
  return membership, label, contrast


def _lesion_budget(shape: tuple[int, int, int], load: str,
                   rng: np.random.Generator) -> tuple[int, int]:
  """``(number of lesions, lesion voxels)`` of a case of lesion ``load``.

  The voxel count is a fraction drawn from the load's range, clipped to
  :data:`LESION_FRACTION_RANGE` of the volume.
  """
  (n_min, n_max), (f_min, f_max) = _LOADS[load]
  num_voxels = math.prod(shape)
  lo = math.ceil(LESION_FRACTION_RANGE[0] * num_voxels)
  hi = math.floor(LESION_FRACTION_RANGE[1] * num_voxels)
  target = int(np.clip(round(rng.uniform(f_min, f_max) * num_voxels), lo, hi))
  return int(rng.integers(n_min, n_max + 1)), target


def _lesion_centers(grid: _Grid, tissue: np.ndarray, num_lesions: int,
                    rng: np.random.Generator,
                    options: PhantomOptions) -> np.ndarray:
  """``[num_lesions, 3]`` voxel indices of lesion centres in white matter.

  A ``options.periventricular_fraction`` share lies within 6 mm of a
  ventricle, the others deeper (any white matter when a pool is empty).
  """
  wm = tissue == WM
  vent_dist = ndimage.distance_transform_edt(tissue != VENTRICLE, sampling=grid.spacing)
  peri = np.argwhere(wm & (vent_dist <= 6.0))
  deep = np.argwhere(wm & (vent_dist > 6.0))
  everywhere = np.argwhere(wm)
  centers = []
  for _ in range(num_lesions):
    pool = peri if rng.random() < options.periventricular_fraction else deep
    pool = pool if len(pool) else everywhere
    centers.append(pool[rng.integers(len(pool))])
  return np.array(centers)


def _lesion_radii(grid: _Grid, target: int, num_lesions: int,
                  rng: np.random.Generator, options: PhantomOptions) -> np.ndarray:
  """``[num_lesions]`` radii in mm of lesions of about ``target`` voxels in all.

  Diameters are log-uniform in ``options.lesion_diameter_mm``, then scaled
  together so that the spheres' volume is ``target`` voxels.
  """
  d_lo, d_hi = options.lesion_diameter_mm
  diam = np.exp(rng.uniform(math.log(d_lo), math.log(d_hi), num_lesions))
  voxel_mm3 = float(np.prod(grid.spacing))
  scale = (target * voxel_mm3 / np.sum(math.pi / 6 * diam**3)) ** (1 / 3)
  return diam * scale / 2


# A lobe: (offset from the lesion centre in mm [3], quadratic form [3, 3]
# whose unit level set is the ellipsoid, mean radius in mm).
_Lobe = tuple[np.ndarray, np.ndarray, float]


def _lesion_lobes(radius: float, rng: np.random.Generator,
                  options: PhantomOptions) -> list[_Lobe]:
  """The rotated ellipsoids of one lesion of ``radius`` mm.

  The main lobe is centred and has the volume of a ball of ``radius``; the
  ``options.lesion_lobes`` range gives the lobe count, the others are smaller
  and shifted outwards.
  """
  parts = []
  num_lobes = int(rng.integers(options.lesion_lobes[0], options.lesion_lobes[1] + 1))
  for j in range(num_lobes):
    rotation, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    if j == 0:
      axes = radius * rng.uniform(0.6, 1.0, 3)
      offset = np.zeros(3)
    else:
      axes = radius * rng.uniform(0.35, 0.7, 3)
      direction = rng.normal(size=3)
      offset = direction / np.linalg.norm(direction) * radius * rng.uniform(0.4, 0.9)
    axes /= np.prod(axes / radius) ** (1 / 3) if j == 0 else 1.0  # main lobe keeps volume r^3
    parts.append((offset, rotation @ np.diag(axes**-2.0) @ rotation.T,
                  float(np.prod(axes) ** (1 / 3))))
  return parts


def _lesion_field(
    grid: _Grid, wm: np.ndarray, centers: np.ndarray, lobes: list[list[_Lobe]],
    target: int, softness: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
  """``(field, owner, chosen, threshold)`` of the lesions' union field.

  ``field`` float32 ``[x, y, z]`` is the union field ``u`` (-inf outside
  white matter and the boxes), ``owner`` int16 ``[x, y, z]`` the lesion of
  the largest ``u``, ``chosen`` the flat indices of the ``target`` voxels of
  largest ``u`` and ``threshold`` the smallest ``u`` among them. The boxes
  grow until each holds its lesion's soft boundary.
  """
  margin = 3.0 * softness + 2.0 * float(np.max(grid.spacing))
  while True:
    field, owner, boxes = _union_field(grid, centers, lobes, margin)
    field[~wm] = -np.inf
    flat = field.reshape(-1)
    chosen = np.argpartition(-flat, target - 1)[:target]
    threshold = float(flat[chosen].min())
    # Every box must hold all of its lesion's soft boundary: its faces
    # (unless at the volume's border) stay well below the threshold.
    if all(_faces_below(field, box, threshold - 3.0 * softness) for box in boxes):
      return field, owner, chosen, threshold
    margin *= 2


def _union_field(
    grid: _Grid, centers: np.ndarray, lobes: list[list[_Lobe]], margin: float,
) -> tuple[np.ndarray, np.ndarray, list[tuple[slice, ...]]]:
  """``(field, owner, boxes)``: the union field of every lesion in its box
  (the lobes' reach plus ``margin`` mm), the lesion owning each voxel, the
  boxes."""
  shape = grid.shape
  field = np.full(shape, -np.inf, np.float32)
  owner = np.zeros(shape, np.int16)
  boxes = []
  for i, (center, parts) in enumerate(zip(centers, lobes)):
    reach = max(np.linalg.norm(o) + 1.0 / math.sqrt(np.linalg.eigvalsh(f)[0])
                for o, f, _ in parts) + margin
    half = np.ceil(reach / grid.spacing).astype(int)
    lo_i, hi_i = np.maximum(center - half, 0), np.minimum(center + half + 1, shape)
    box = tuple(slice(a, b) for a, b in zip(lo_i, hi_i))
    offsets = [((o - c) * s).astype(np.float32)
               for o, c, s in zip(np.ogrid[box], center, grid.spacing)]
    u = np.full(field[box].shape, -np.inf, np.float32)
    for lobe_offset, form, r_mean in parts:
      d = [o - v for o, v in zip(offsets, lobe_offset.astype(np.float32))]
      q = sum(form[a, b] * d[a] * d[b] for a in range(3) for b in range(3))
      np.maximum(u, r_mean * (1.0 - np.sqrt(q)), out=u)
    better = u > field[box]
    field[box] = np.where(better, u, field[box])
    owner[box] = np.where(better, i, owner[box])
    boxes.append(box)
  return field, owner, boxes


def _faces_below(field: np.ndarray, box: tuple[slice, ...], level: float) -> bool:
  for axis, s in enumerate(box):
    for index, at_border in ((s.start, s.start == 0), (s.stop - 1, s.stop == field.shape[axis])):
      if at_border:
        continue
      face = list(box)
      face[axis] = slice(index, index + 1)
      if np.any(field[tuple(face)] > level):
        return False
  return True


def _tubes(
    grid: _Grid, rng: np.random.Generator, starts_mm: np.ndarray, lengths_mm: np.ndarray,
) -> list[np.ndarray]:
  """Gently curved centre lines (``[n, 3]`` mm points every ~0.3 mm)."""
  lines = []
  for start, length in zip(starts_mm, lengths_mm):
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    bend = rng.normal(size=3)
    bend -= bend @ direction * direction
    bend /= max(np.linalg.norm(bend), 1e-6)
    t = np.linspace(-length / 2, length / 2, max(2, int(length / 0.3)))[:, None]
    wave = rng.uniform(0.5, 2.5) * np.sin(t / rng.uniform(3.0, 8.0) + rng.uniform(0, 2 * np.pi))
    lines.append(start + t * direction + wave * bend)
  return lines


def _distractors(
    grid: _Grid, tissue: np.ndarray, lesion: np.ndarray, rng: np.random.Generator,
    options: PhantomOptions, ct: bool,
) -> dict[int, np.ndarray]:
  """Membership maps (float32 [x, y, z] in [0, 1]) of the unlabelled look-alikes.

  Look-alikes are kept at least ~2 voxels away from any lesion, so none
  overlaps a label.
  """
  shape = grid.shape
  density = options.distractors
  if density <= 0:
    return {}
  brain = np.isin(tissue, (GM, WM, DEEP_GM))
  white = np.isin(tissue, (WM, DEEP_GM))
  ventricle = tissue == VENTRICLE
  counts = lambda lo, hi: int(rng.poisson(density * rng.uniform(lo, hi)))

  def random_points(region, n):
    where = np.argwhere(region)
    if not len(where) or n <= 0:
      return np.zeros((0, 3))
    return grid.to_mm(where[rng.integers(len(where), size=n)])

  # (code, start points, lengths mm, radius range mm, region where it may be)
  kinds = [
      (VESSEL, random_points(brain | (tissue == CSF), counts(2, 5)), (15.0, 40.0), (0.5, 0.9),
       np.isin(tissue, (CSF, GM, WM, DEEP_GM))),
      (PERIVASCULAR, random_points(white, counts(3, 8)), (1.5, 5.0), (0.6, 1.2), white),
  ]
  if ct:
    kinds.append((CALCIFICATION, random_points(tissue == DEEP_GM, counts(0, 3)), (0.5, 1.5),
                  (0.6, 1.2), brain))
  else:
    kinds.append((FLOW_ARTEFACT, random_points(ventricle, counts(1, 3)), (2.0, 6.0), (1.0, 2.0),
                  ventricle))
  skeleton = np.zeros(shape, np.int32)  # 1 + index into `radius`/`code`
  radius, code = [], []
  for kind, starts, (len_lo, len_hi), (r_lo, r_hi), _ in kinds:
    for line in _tubes(grid, rng, starts, rng.uniform(len_lo, len_hi, len(starts))):
      idx = grid.to_index(line)
      idx = idx[np.all((idx >= 0) & (idx < shape), axis=1)]
      if len(idx):
        radius.append(rng.uniform(r_lo, r_hi))
        code.append(kind)
        skeleton[tuple(idx.T)] = len(radius)
  near_lesion = ndimage.binary_dilation(lesion > 0.05, iterations=2)
  members: dict[int, np.ndarray] = {}
  if radius:
    dist, nearest = ndimage.distance_transform_edt(
        skeleton == 0, sampling=grid.spacing, return_indices=True)
    which = skeleton[tuple(nearest)] - 1
    tube = special.expit((np.asarray(radius)[which] - dist) / 0.3)
    kind_of = np.asarray(code)[which]
    for kind, *_, region in kinds:
      m = np.where((kind_of == kind) & region & ~near_lesion, tube, 0.0).astype(np.float32)
      if m.max() > 0:
        members[kind] = m
  if not ct:
    # Thin FLAIR-bright caps at the ventricle horns (ependymal "caps").
    vent_dist = ndimage.distance_transform_edt(~ventricle, sampling=grid.spacing)
    where = np.argwhere(ventricle)
    if len(where):
      y_mm = grid.mm[1]
      y_lo, y_hi = grid.to_mm(where)[:, 1].min(), grid.to_mm(where)[:, 1].max()
      horn = (y_mm < y_lo + 0.3 * (y_hi - y_lo)) | (y_mm > y_hi - 0.3 * (y_hi - y_lo))
      thickness = rng.uniform(1.0, 2.0)
      cap = special.expit((thickness - vent_dist) / 0.4)
      m = np.where(horn & white & (vent_dist > 0) & ~near_lesion, cap, 0.0).astype(np.float32)
      m *= min(1.0, density)
      if m.max() > 0:
        members[VENTRICLE_CAP] = m
  return members


def _bias_field(grid: _Grid, head: np.ndarray, rng: np.random.Generator,
                amplitude: float) -> np.ndarray:
  """A smooth multiplicative field ``exp(random cubic polynomial)``.

  The exponent is centred on the head and scaled so that the field spans
  ``[1 / (1 + amplitude), 1 + amplitude]`` there.
  """
  x, y, z = grid.unit
  terms = [x, y, z, x * y, y * z, x * z, x * x, y * y, z * z,
           x * y * z, x**3, y**3, z**3, x * x * y, x * x * z, y * y * x, y * y * z, z * z * x,
           z * z * y]
  weights = rng.normal(0.0, 1.0, len(terms)) / np.repeat([1.0, 1.5, 2.0], [3, 6, 10])
  log_field = sum(np.float32(w) * t for w, t in zip(weights, terms))
  log_field = np.broadcast_to(log_field, grid.shape).astype(np.float32)
  inside = log_field[head]
  log_field -= inside.mean()
  extent = max(float(np.abs(inside - inside.mean()).max()), 1e-6)
  # Stretch so the brightest/darkest point is `amplitude` away from 1.
  log_field *= math.log1p(amplitude) / extent
  return np.exp(log_field)


def _blur(grid: _Grid, volume: np.ndarray, psf_mm: float) -> np.ndarray:
  """Point-spread blur; an axis with thick slices adds its slab profile (width/sqrt(12))."""
  sigma_mm = np.sqrt(psf_mm**2 + np.maximum(grid.spacing**2 - 1.0, 0.0) / 12.0)
  sigma = sigma_mm / grid.spacing
  if not np.any(sigma > 0.05):
    return volume
  return ndimage.gaussian_filter(volume, np.where(sigma > 0.05, sigma, 0.0), truncate=3.0)


# Look-alike intensity ranges relative to white matter, per MR channel (T1, T2, FLAIR).
_MR_DISTRACTOR_LEVELS = {
    VESSEL: ((1.10, 1.35), (0.75, 1.00), (1.20, 1.60)),
    PERIVASCULAR: ((0.30, 0.50), (1.80, 2.50), (0.40, 0.75)),
    FLOW_ARTEFACT: ((0.30, 0.40), (2.20, 2.60), (1.10, 1.60)),
    VENTRICLE_CAP: ((0.88, 1.00), (1.20, 1.60), (1.15, 1.45)),
}


def _render_mr(
    grid: _Grid, tissue: np.ndarray, head: np.ndarray, lesion: np.ndarray,
    contrast: np.ndarray, members: dict[int, np.ndarray], rng: np.random.Generator,
    options: PhantomOptions,
) -> np.ndarray:
  """``float32 [x, y, z, 3]`` T1, T2, FLAIR; 0 outside `head`."""
  levels = _MR_LEVELS * rng.uniform(0.92, 1.08, _MR_LEVELS.shape).astype(np.float32)
  levels[WM] = 1.0
  levels[GM, 2] = rng.uniform(1.08, 1.25)  # FLAIR grey/white contrast varies by scanner
  gm = tissue == GM
  patch_gain = 0.25 * min(1.0, options.distractors)
  patches = np.clip(_smooth_noise(grid, 4.0, rng) - 0.8, 0.0, None) * patch_gain
  t1_drop, t2_gain = rng.uniform(0.3, 0.8), rng.uniform(1.5, 2.5)
  lesion_gain = (-t1_drop * contrast, t2_gain * contrast, contrast)  # relative to WM
  snr = math.exp(rng.uniform(*np.log(options.snr_range)))
  image = np.zeros((*grid.shape, 3), np.float32)
  for c in range(3):
    channel = levels[tissue, c]
    if c > 0:  # cortical patches brighter on T2 and FLAIR
      channel = np.where(gm, channel * (1.0 + patches), channel)
    for kind, m in members.items():
      lo, hi = _MR_DISTRACTOR_LEVELS[kind][c]
      channel = channel * (1.0 - m) + rng.uniform(lo, hi) * m
    channel = channel * (1.0 - lesion) + (1.0 + lesion_gain[c]) * lesion
    channel = _blur(grid, channel.astype(np.float32), options.psf_mm)
    channel *= _bias_field(grid, head, rng, rng.uniform(*options.bias_range))
    sigma = rng.uniform(0.8, 1.25) / snr
    if options.noise == "rician":
      real = channel + rng.normal(0.0, sigma, grid.shape).astype(np.float32)
      imag = rng.normal(0.0, sigma, grid.shape).astype(np.float32)
      channel = np.sqrt(real * real + imag * imag)
    elif options.noise == "gaussian":
      channel = np.abs(channel + rng.normal(0.0, sigma, grid.shape).astype(np.float32))
    channel *= rng.uniform(300.0, 1200.0)  # arbitrary scanner gain
    image[..., c] = np.where(head, channel, 0.0)
  return image


def _render_ct(
    grid: _Grid, tissue: np.ndarray, lesion: np.ndarray, contrast: np.ndarray,
    members: dict[int, np.ndarray], rng: np.random.Generator, options: PhantomOptions,
) -> np.ndarray:
  """``float32 [x, y, z, 1]`` in Hounsfield units (air -1000, bone ~+1000)."""
  levels = _CT_LEVELS + rng.normal(0.0, 2.0, len(_CT_LEVELS)).astype(np.float32)
  levels[AIR] = -1000.0
  levels[SKULL] = rng.uniform(800.0, 1200.0)
  hu = levels[tissue]
  # Diploe: the skull's spongy middle is less dense.
  skull = tissue == SKULL
  hu = np.where(skull, hu * np.clip(0.75 + 0.2 * _smooth_noise(grid, 2.0, rng), 0.4, 1.0), hu)
  ct_levels = {VESSEL: (45.0, 60.0), PERIVASCULAR: (5.0, 12.0), CALCIFICATION: (100.0, 300.0)}
  for kind, m in members.items():
    hu = hu * (1.0 - m) + rng.uniform(*ct_levels[kind]) * m
  drop = rng.uniform(12.0, 40.0) * contrast  # hypodense lesions
  hu = hu * (1.0 - lesion) + (levels[WM] - drop) * lesion
  hu = _blur(grid, hu.astype(np.float32), options.psf_mm)
  brain = tissue != AIR
  cupping = _bias_field(grid, brain, rng, rng.uniform(*options.bias_range)) - 1.0
  hu = hu + 10.0 * np.where(brain, cupping, 0.0)
  if options.noise != "none":
    hu = hu + rng.normal(0.0, rng.uniform(*options.ct_noise_hu), grid.shape).astype(np.float32)
  return np.clip(hu, -1024.0, 3071.0).astype(np.float32)[..., None]


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
    *,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    modality: str = "MR",
    options: PhantomOptions | None = None,
) -> Path:
  """Writes a synthetic MS-lesion dataset in the nnU-Net v2 raw layout.

  Writes ``dataset.json``, ``imagesTr/case_XXX_000{0,1,2}.nii.gz`` (MR: T1,
  T2, FLAIR; CT: ``_0000`` only), ``labelsTr/case_XXX.nii.gz`` and, if
  ``num_test_cases > 0``, ``imagesTs/`` and ``labelsTs/`` (ids
  ``test_XXX``). Images are float32, labels uint8, all on the grid of
  :func:`phantom_affine`. The dataset is built in a temporary sibling folder
  and renamed into place, so `out_dir` either is complete or does not exist.

  Case ``i`` depends only on ``(seed, split, i)`` and the settings: the same
  seed gives identical files, and adding cases does not change earlier ones.

  Args:
    out_dir: the dataset folder to create.
    num_cases: number of training cases (>= 1).
    shape: spatial shape ``(x, y, z)`` of every case, each >= 16.
    seed: random seed.
    num_test_cases: number of test cases (>= 0).
    overwrite: replace an existing `out_dir`; otherwise it is an error.
    spacing: voxel size in mm (e.g. ``(1, 1, 3)`` for thick slices), written
      into the affine and the header zooms.
    modality: ``"MR"`` (channels T1, T2, FLAIR) or ``"CT"`` (one channel
      named ``"CT"``, Hounsfield units, skull and air kept).
    options: difficulty settings (:class:`PhantomOptions`); None for the
      realistic defaults.

  Returns:
    `out_dir` as a Path.
  """
  out_dir = Path(out_dir)
  if num_cases < 1:
    raise ValueError(f"num_cases must be >= 1, got {num_cases}")
  if num_test_cases < 0:
    raise ValueError(f"num_test_cases must be >= 0, got {num_test_cases}")
  if seed < 0:
    raise ValueError(f"seed must be >= 0, got {seed}")
  shape = _check_shape(shape)
  spacing = _check_spacing(spacing)
  modality = _check_modality(modality)
  options = PhantomOptions() if options is None else options
  if out_dir.exists() and not overwrite:
    raise ValueError(f"{out_dir} already exists (pass overwrite=True / --overwrite to replace it)")

  out_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp", dir=out_dir.parent))
  try:
    affine = phantom_affine(shape, spacing)
    splits = [("imagesTr", "labelsTr", "case", 1, num_cases)]
    if num_test_cases:
      splits.append(("imagesTs", "labelsTs", "test", 2, num_test_cases))
    for images_dir, labels_dir, prefix, split_key, count in splits:
      (tmp / images_dir).mkdir()
      (tmp / labels_dir).mkdir()
      for i in range(count):
        rng = np.random.default_rng([seed, split_key, i])
        image, label = make_phantom(shape, rng, _case_load(seed, split_key, i),
                                    spacing=spacing, modality=modality, options=options)
        _write_case(tmp, images_dir, labels_dir, f"{prefix}_{i:03d}", image, label, affine)
    meta = {
        "channel_names": {str(i): name for i, name in enumerate(MODALITIES[modality])},
        "labels": {"background": 0, "lesion": 1},
        "numTraining": num_cases,
        "file_ending": FILE_ENDING,
        "name": "SyntheticMSLesions",
        "description": f"MS-lesion phantoms ({modality}) from tversky_jax.data.synthetic",
        "synthetic": {"seed": seed, "shape": list(shape), "num_test_cases": num_test_cases,
                      "spacing": list(spacing), "modality": modality,
                      "options": dataclasses.asdict(options)},
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
  parser.add_argument("--spacing", type=float, nargs=3, default=(1.0, 1.0, 1.0),
                      metavar=("SX", "SY", "SZ"), help="voxel size in mm (default 1 1 1)")
  parser.add_argument("--modality", choices=sorted(MODALITIES), default="MR",
                      help="MR (T1, T2, FLAIR) or CT (one channel in HU); default MR")
  parser.add_argument("--difficulty", choices=sorted(DIFFICULTIES), default="realistic",
                      help="realistic (default: bias, noise, faint lesions, look-alikes) or easy")
  parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
  args = parser.parse_args(argv)
  try:
    path = make_synthetic_dataset(args.out, args.cases, args.shape, args.seed,
                                  args.test_cases, args.overwrite, spacing=args.spacing,
                                  modality=args.modality, options=DIFFICULTIES[args.difficulty])
  except ValueError as e:
    parser.error(str(e))
  print(f"wrote {args.cases} training and {args.test_cases} test case(s) to {path}")


if __name__ == "__main__":
  main()
