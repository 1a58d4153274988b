"""Dataset fingerprint and experiment plan, in the manner of nnU-Net v2.

Two steps, each cached as JSON in the preprocessed folder::

  plan, fingerprint = plan_dataset("data/Dataset800_MNILesions")
  plan.target_spacing, plan.patch_size, plan.batch_size, plan.pool_strides

1. :func:`compute_fingerprint` reads every training case once: voxel spacing
   (NIfTI header zooms, axis order ``x, y, z``), shape, shape after cropping
   to the non-zero region, foreground (``label > 0``) intensity samples per
   channel (at most ``num_samples`` voxels per case, without replacement,
   seeded by case id, so deterministic) summarised as mean, std, median,
   min, max and the 0.5 / 99.5 percentiles, and voxel counts per
   dataset.json label.
2. :func:`make_plan` turns a fingerprint into a :class:`Plan`:

   * target spacing: the per-axis median spacing. If the coarsest median
     axis is more than ``anisotropy_threshold`` (3) times the finest, that
     axis takes the 10th percentile of its spacings instead (never finer than
     the other axes' median), as nnU-Net's
     ``determine_fullres_target_spacing`` does. (nnU-Net also requires that
     axis to have 3x fewer voxels; here the spacing alone decides.)
   * normalisation per channel from ``channel_names``: "CT" (any case) ->
     ``"ct"`` (clip to the dataset foreground 0.5 / 99.5 percentiles, z-score
     with the foreground mean / std), anything else -> ``"zscore"`` (per-case
     z-score inside the non-zero region). ``"none"`` leaves a channel as is.
   * patch size, batch size and pooling: nnU-Net's search. The patch starts
     with the aspect ratio of the target spacing and the volume of 256^3
     voxels, clipped to the resampled median shape; :func:`pool_topology`
     gives the per-axis poolings; while :func:`estimate_memory_bytes` for a
     batch of ``MIN_BATCH_SIZE`` exceeds the budget, the axis largest
     relative to the median shape shrinks by its divisor. The batch then
     grows into the remaining budget, capped so one batch covers at most 5 %
     of the dataset's voxels (never below ``MIN_BATCH_SIZE``).

The plan is written to ``<dataset>/../<dataset folder name>_preprocessed/``
(:func:`default_output_dir`) or a folder given, with a hash of its inputs
(file names, sizes and modification times, and the plan arguments), so
:func:`plan_dataset` recomputes it only when the data or the arguments change.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import math
import os
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tversky_jax.data import nifti

PLANS_FILE = "plans.json"
FINGERPRINT_FILE = "dataset_fingerprint.json"
PLAN_VERSION = 1
FINGERPRINT_VERSION = 1

NORMALIZATION_SCHEMES = ("ct", "zscore", "none")
ANISOTROPY_THRESHOLD = 3.0
# Feature maps are not pooled below this edge length (nnU-Net's value).
MIN_FEATURE_MAP_SIZE = 4
MIN_BATCH_SIZE = 2
# One batch covers at most this fraction of the dataset's voxels.
MAX_DATASET_FRACTION = 0.05
# The starting patch has this many voxels (before clipping to the median shape).
INITIAL_PATCH_VOXELS = 256**3
# Default memory budgets: fractions of host RAM (CPU) and of the memory jax
# reports for an accelerator (``memory_stats()["bytes_limit"]``).
HOST_MEMORY_FRACTION = 0.25
DEVICE_MEMORY_FRACTION = 0.9

# Memory of one train step (forward, backward, Adam update of the U-Net in
# tversky_jax.models.unet3d), per element of the contracting-path feature maps
# ``sum over stages of voxels x features`` and per byte of the compute dtype.
# Measured from ``jax.jit(step).lower(...).compile().memory_analysis()``
# (temp_size_in_bytes) on XLA:CPU, float32, base features 8-32, depth 3-5,
# patches 32^3 to 128^3, batch 1-2: 49-55 bytes per element with the native
# 3D convolution (12.5 float32 copies: the encoder and decoder activations
# kept for the backward pass, their gradients, the skip concatenations) and
# 115-118 bytes with conv_impl="2d_sum" (its shifted slabs; 29 copies). The
# whole estimate (with the parameter state) came within 1-4 % of temp +
# argument bytes; ``python bench/bench_preprocess.py --check-memory`` repeats
# the check. With conv_impl="onednn" (the CPU default for one device, whose
# layers keep less for the backward pass) 6.6-7.1 copies without
# normalisation and 10.6-15.0 with instance norm (the default recipe;
# patches 32^3 and 64^3, batch 1-2): 15 covers both. Not measured on GPU
# (cuDNN workspaces come on top) nor for bfloat16.
ACTIVATION_COPIES = {"native": 12.5, "2d_sum": 29.0, "onednn": 15.0}
# float32 parameters, their gradients and Adam's two moments.
PARAMETER_COPIES = 4


class MemoryBudgetError(ValueError):
  """The memory budget does not fit even the smallest patch and batch."""


# --------------------------------------------------------------------------
# Dataclasses


@dataclasses.dataclass(frozen=True)
class IntensityStats:
  """Foreground intensity statistics of one channel over the whole dataset."""

  mean: float
  std: float
  median: float
  min: float
  max: float
  percentile_00_5: float
  percentile_99_5: float
  num_samples: int

  @classmethod
  def from_samples(cls, samples: np.ndarray) -> IntensityStats:
    """Summarises ``[n]`` intensity samples (n >= 1)."""
    samples = np.asarray(samples, np.float64)
    lo, median, hi = np.percentile(samples, [0.5, 50.0, 99.5])
    return cls(float(samples.mean()), float(samples.std()), float(median),
               float(samples.min()), float(samples.max()), float(lo), float(hi),
               int(samples.size))


@dataclasses.dataclass(frozen=True)
class Fingerprint:
  """What planning needs to know about the training cases.

  Attributes:
    case_ids: the training cases, sorted.
    spacings: per case ``(sx, sy, sz)`` in mm from the header zooms.
    shapes: per case ``(x, y, z)``.
    shapes_after_crop: per case, the shape of the non-zero bounding box.
    intensity: per channel, foreground :class:`IntensityStats`.
    class_voxels: dataset.json label name -> voxel count over all cases.
    total_voxels: voxels over all cases.
    num_samples: foreground samples drawn per case and channel (at most).
    input_hash: hash of the files and fingerprint arguments.
  """

  case_ids: tuple[str, ...]
  spacings: tuple[tuple[float, float, float], ...]
  shapes: tuple[tuple[int, int, int], ...]
  shapes_after_crop: tuple[tuple[int, int, int], ...]
  intensity: tuple[IntensityStats, ...]
  class_voxels: Mapping[str, int] = dataclasses.field(hash=False)
  total_voxels: int
  num_samples: int
  input_hash: str

  def to_json(self) -> str:
    return json.dumps({"version": FINGERPRINT_VERSION, **dataclasses.asdict(self)}, indent=1)

  @classmethod
  def from_json(cls, text: str) -> Fingerprint:
    """Parses :meth:`to_json` output; ValueError if it is not one."""
    data = _parse_json(text, FINGERPRINT_VERSION, cls, "fingerprint")
    data["intensity"] = tuple(IntensityStats(**s) for s in data["intensity"])
    return cls(**_tuplify(data, ("case_ids", "spacings", "shapes", "shapes_after_crop")))


@dataclasses.dataclass(frozen=True)
class Plan:
  """How to preprocess a dataset and which patch, batch and pooling to train with.

  Spatial triples are in NIfTI axis order ``(x, y, z)``.

  Attributes:
    dataset_name: the dataset folder name.
    channel_names: dataset.json channel names, in channel order.
    labels: dataset.json labels (name -> value or tuple of values).
    num_classes: ``len(labels)``: the network's output channels.
    num_training: training cases planned on.
    median_spacing: per-axis median of the case spacings (mm).
    target_spacing: the spacing every case is resampled to (mm).
    anisotropic_axis: the axis that took the 10th-percentile rule, or None.
    normalization: per channel ``"ct"``, ``"zscore"`` or ``"none"``.
    intensity: per channel foreground statistics (used by ``"ct"``).
    median_shape: median shape after cropping, at the original spacing.
    resampled_median_shape: median shape after cropping and resampling.
    patch_size: training patch; divisible by ``2**num_pool_per_axis``.
    batch_size: patches per step (global batch).
    num_pool_per_axis: poolings per axis.
    pool_strides: per pooling stage, the stride per axis (1 or 2).
    features_per_stage: U-Net features per resolution stage.
    base_features: features of the finest stage.
    estimated_memory_bytes: :func:`estimate_memory_bytes` of the plan.
    memory_budget_bytes: the budget it was fitted to.
    memory_source: where the budget came from.
    conv_impl: convolution implementation the estimate assumes.
    class_frequencies: label name -> fraction of all voxels.
    image_order: spline order of image resampling.
    label_order: 0: nearest; 1: one-hot linear then argmax.
    order_z: order along the coarse axis of anisotropic cases.
    anisotropy_threshold: spacing ratio above which a case is anisotropic.
    input_hash: hash of the files and plan arguments.
  """

  dataset_name: str
  channel_names: tuple[str, ...]
  labels: Mapping[str, int | tuple[int, ...]] = dataclasses.field(hash=False)
  num_classes: int
  num_training: int
  median_spacing: tuple[float, float, float]
  target_spacing: tuple[float, float, float]
  anisotropic_axis: int | None
  normalization: tuple[str, ...]
  intensity: tuple[IntensityStats, ...]
  median_shape: tuple[int, int, int]
  resampled_median_shape: tuple[int, int, int]
  patch_size: tuple[int, int, int]
  batch_size: int
  num_pool_per_axis: tuple[int, int, int]
  pool_strides: tuple[tuple[int, int, int], ...]
  features_per_stage: tuple[int, ...]
  base_features: int
  estimated_memory_bytes: int
  memory_budget_bytes: int
  memory_source: str
  conv_impl: str
  class_frequencies: Mapping[str, float] = dataclasses.field(hash=False)
  image_order: int
  label_order: int
  order_z: int
  anisotropy_threshold: float
  input_hash: str

  @property
  def num_channels(self) -> int:
    return len(self.channel_names)

  def to_json(self) -> str:
    data = dataclasses.asdict(self)
    data["labels"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.labels.items()}
    return json.dumps({"version": PLAN_VERSION, **data}, indent=1)

  @classmethod
  def from_json(cls, text: str) -> Plan:
    """Parses :meth:`to_json` output; ValueError if it is not one."""
    data = _parse_json(text, PLAN_VERSION, cls, "plan")
    data["intensity"] = tuple(IntensityStats(**s) for s in data["intensity"])
    data["labels"] = {k: tuple(v) if isinstance(v, list) else v for k, v in data["labels"].items()}
    return cls(**_tuplify(data, (
        "channel_names", "median_spacing", "target_spacing", "normalization", "median_shape",
        "resampled_median_shape", "patch_size", "num_pool_per_axis", "pool_strides",
        "features_per_stage")))


@dataclasses.dataclass(frozen=True)
class PlanOptions:
  """The arguments of a plan (all part of its input hash).

  Attributes:
    memory_bytes: memory budget for one train step; None: see
      :func:`default_memory_budget`.
    base_features: U-Net features of the finest stage.
    max_features: cap on the features per stage (nnU-Net: 320); None: no cap,
      features double per stage as in tversky_jax.models.unet3d.
    conv_impl: ``"native"``, ``"2d_sum"``, ``"onednn"`` or ``"auto"`` (what
      the trainer's ``model.conv_impl="auto"`` picks for all of jax's
      devices: ``"native"`` off the CPU; on the CPU ``"onednn"`` for one
      device where it can be built, else ``"2d_sum"``; see
      ``tversky_jax.models.unet3d.default_conv_impl``).
    bytes_per_element: 4 (float32) or 2 (bfloat16 compute).
    normalization: per-channel override of the schemes, or None.
    image_order: spline order (0-5) of image resampling; nnU-Net uses 3.
    label_order: 0 (nearest) or 1 (one-hot linear then argmax, nnU-Net).
    order_z: order along the coarse axis of anisotropic cases (nnU-Net: 0).
    anisotropy_threshold: spacing ratio that makes a dataset or case anisotropic.
    max_num_pool: cap on poolings per axis, None: no cap (nnU-Net).
    num_samples: foreground intensity samples per case (nnU-Net: 10000).
    seed: seed of the intensity sampling.
  """

  memory_bytes: int | None = None
  base_features: int = 16
  max_features: int | None = None
  conv_impl: str = "auto"
  bytes_per_element: int = 4
  normalization: tuple[str, ...] | None = None
  image_order: int = 3
  label_order: int = 1
  order_z: int = 0
  anisotropy_threshold: float = ANISOTROPY_THRESHOLD
  max_num_pool: int | None = None
  num_samples: int = 10_000
  seed: int = 1234

  def __post_init__(self):
    problems = []
    if self.memory_bytes is not None and self.memory_bytes <= 0:
      problems.append(f"memory_bytes must be > 0, got {self.memory_bytes}")
    if self.base_features < 1 or (self.max_features is not None and self.max_features < 1):
      problems.append("base_features and max_features must be >= 1")
    if self.conv_impl not in ("auto", *ACTIVATION_COPIES):
      problems.append(f"conv_impl must be auto or one of {tuple(ACTIVATION_COPIES)}, "
                      f"got {self.conv_impl!r}")
    if self.normalization is not None and not set(self.normalization) <= set(NORMALIZATION_SCHEMES):
      problems.append(f"normalization schemes must be in {NORMALIZATION_SCHEMES}, "
                      f"got {list(self.normalization)}")
    if not (0 <= self.image_order <= 5 and self.label_order in (0, 1) and 0 <= self.order_z <= 5):
      problems.append("image_order and order_z must be in [0, 5], label_order 0 or 1")
    if self.anisotropy_threshold <= 1 or self.num_samples < 1 or self.bytes_per_element < 1:
      problems.append("anisotropy_threshold must be > 1, num_samples and bytes_per_element >= 1")
    if problems:
      raise ValueError("; ".join(problems))


def _parse_json(text: str, version: int, cls: type, what: str) -> dict[str, Any]:
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{what} file is not valid JSON ({e})") from None
  if not isinstance(data, dict) or data.pop("version", None) != version:
    raise ValueError(f"{what} file is not a version-{version} {what}: re-plan")
  expected = {f.name for f in dataclasses.fields(cls)}
  if set(data) != expected:
    raise ValueError(f"{what} file has keys {sorted(set(data) ^ expected)} missing or unknown")
  return data


def _tuplify(data: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
  """Nested lists -> tuples for `keys` (JSON has no tuples)."""
  def convert(value):
    return tuple(convert(v) for v in value) if isinstance(value, list) else value
  return {k: convert(v) if k in keys else v for k, v in data.items()}


# --------------------------------------------------------------------------
# Fingerprint


def nonzero_bbox(image: np.ndarray) -> tuple[tuple[int, int], ...]:
  """``((lo, hi),) * 3``: the box of voxels where any channel is non-zero.

  Args:
    image: ``[x, y, z, c]``.

  Returns:
    Half-open bounds per spatial axis; the whole volume if all voxels are 0.
  """
  mask = nifti.nonzero_mask(image)
  box = []
  for axis in range(3):
    other = tuple(a for a in range(3) if a != axis)
    hits = np.flatnonzero(mask.any(axis=other))
    box.append((int(hits[0]), int(hits[-1]) + 1) if hits.size else (0, mask.shape[axis]))
  return tuple(box)


def case_spacing(header) -> tuple[float, float, float]:
  """``(sx, sy, sz)`` in mm: the first three header zooms.

  The zooms are float32 in the header; each is returned as the shortest
  decimal that reads back as that float32 (1.2, not 1.2000000476837158).
  """
  zooms = header.get_zooms()[:3]
  return tuple(float(str(np.float32(z))) for z in zooms)  # type: ignore[return-value]


def _case_fingerprint(dataset: nifti.Dataset, case_id: str, num_samples: int,
                      seed: int) -> dict[str, Any]:
  case = nifti.load_case(dataset, case_id)
  box = nonzero_bbox(case.image)
  foreground = np.flatnonzero(case.label > 0)
  rng = np.random.default_rng([seed, zlib.crc32(case_id.encode())])
  if foreground.size > num_samples:
    foreground = np.sort(rng.choice(foreground, num_samples, replace=False))
  return {
      "spacing": case_spacing(case.header),
      "shape": tuple(int(s) for s in case.label.shape),
      "shape_after_crop": tuple(hi - lo for lo, hi in box),
      "samples": case.image.reshape(-1, case.image.shape[-1])[foreground],  # [n, c]
      "counts": np.bincount(case.label.ravel(), minlength=256),
  }


def compute_fingerprint(
    dataset: nifti.Dataset,
    num_samples: int = 10_000,
    seed: int = 1234,
    input_hash: str = "",
    num_workers: int | None = None,
    progress: bool = True,
) -> Fingerprint:
  """Reads every training case once and summarises it (see the module docstring).

  Args:
    dataset: from :func:`tversky_jax.data.nifti.read_dataset`.
    num_samples: foreground voxels sampled per case (without replacement).
    seed: seed of the sampling (combined with a hash of the case id).
    input_hash: stored in the result (see :func:`plan_dataset`).
    num_workers: reading threads; default ``min(4, os.cpu_count())``.
    progress: show a tqdm progress bar.

  Returns:
    The :class:`Fingerprint`.

  Raises:
    nifti.DatasetError: no training cases, a broken case, or no foreground
      voxel in any case.
  """
  cases = dataset.training_cases
  if not cases:
    raise nifti.DatasetError(f"{dataset.root}: no training cases in imagesTr/")
  workers = num_workers or min(4, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    results = pool.map(lambda c: _case_fingerprint(dataset, c, num_samples, seed), cases)
    results = list(progress_bar(results, len(cases), "fingerprint", progress))
  samples = np.concatenate([r["samples"] for r in results])
  if not samples.size:
    raise nifti.DatasetError(f"{dataset.root}: no foreground (label > 0) voxel in any "
                             "training case: cannot plan a segmentation")
  counts = np.sum([r["counts"] for r in results], axis=0)
  class_voxels = {
      name: int(counts[list(value) if isinstance(value, tuple) else value].sum())
      for name, value in dataset.labels.items()
  }
  return Fingerprint(
      case_ids=tuple(cases),
      spacings=tuple(r["spacing"] for r in results),
      shapes=tuple(r["shape"] for r in results),
      shapes_after_crop=tuple(r["shape_after_crop"] for r in results),
      intensity=tuple(IntensityStats.from_samples(samples[:, c])
                      for c in range(samples.shape[1])),
      class_voxels=class_voxels, total_voxels=int(counts.sum()),
      num_samples=num_samples, input_hash=input_hash)


def progress_bar(iterable, total: int, desc: str, enabled: bool):
  """`iterable` wrapped in a tqdm bar of `total` cases when `enabled`."""
  if not enabled:
    return iterable
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(iterable, total=total, desc=desc, unit="case")


# --------------------------------------------------------------------------
# Spacing, normalisation, topology, memory


def target_spacing(
    spacings: Sequence[Sequence[float]], anisotropy_threshold: float = ANISOTROPY_THRESHOLD
) -> tuple[tuple[float, float, float], int | None]:
  """The spacing to resample to (see the module docstring).

  Args:
    spacings: ``[cases, 3]`` voxel spacings in mm.
    anisotropy_threshold: coarsest / finest median spacing above which the
      coarsest axis takes the 10th percentile of its spacings.

  Returns:
    ``(target, axis)``: the target spacing and the axis that took the
    10th-percentile rule (None when the median is kept on every axis).
  """
  spacings = np.asarray(spacings, np.float64)
  if spacings.ndim != 2 or spacings.shape[1] != 3 or not len(spacings) or np.any(spacings <= 0):
    raise ValueError(f"spacings must be [cases, 3] positive values, got shape {spacings.shape}")
  target = np.median(spacings, axis=0)
  coarse = int(np.argmax(target))
  if target[coarse] <= anisotropy_threshold * target.min():
    return tuple(float(s) for s in target), None  # type: ignore[return-value]
  others = max(target[a] for a in range(3) if a != coarse)
  target[coarse] = max(float(np.percentile(spacings[:, coarse], 10)), others)
  return tuple(float(s) for s in target), coarse  # type: ignore[return-value]


def normalization_schemes(
    channel_names: Sequence[str], override: Sequence[str] | None = None
) -> tuple[str, ...]:
  """Per channel ``"ct"`` for a channel named CT (any case), else ``"zscore"``.

  Args:
    channel_names: dataset.json channel names.
    override: one scheme per channel (``"ct"``, ``"zscore"``, ``"none"``) to
      use instead.
  """
  if override is None:
    return tuple("ct" if n.strip().lower() == "ct" else "zscore" for n in channel_names)
  override = tuple(override)
  if len(override) != len(channel_names) or not set(override) <= set(NORMALIZATION_SCHEMES):
    raise ValueError(f"normalization must name one of {NORMALIZATION_SCHEMES} for each of the "
                     f"{len(channel_names)} channel(s), got {list(override)}")
  return override


def pool_topology(
    spacing: Sequence[float], patch_size: Sequence[int],
    min_feature_map_size: int = MIN_FEATURE_MAP_SIZE, max_num_pool: int | None = None,
) -> tuple[tuple[int, int, int], tuple[tuple[int, int, int], ...], tuple[int, int, int]]:
  """Per-axis poolings of a U-Net for a patch (nnU-Net's get_pool_and_conv_props).

  Stages are added while some axis can be pooled. An axis is pooled in a stage
  when its feature map has at least ``2 * min_feature_map_size`` voxels and its
  current spacing (spacing times the poolings so far) is less than twice the
  finest current spacing among such axes; so a coarse axis waits until the
  others have caught up. A stage that would pool one axis alone needs
  ``3 * min_feature_map_size`` voxels on it.

  Args:
    spacing: ``(sx, sy, sz)`` of the data.
    patch_size: ``(px, py, pz)``.
    min_feature_map_size: smallest edge of the bottleneck feature map.
    max_num_pool: cap on poolings per axis (None: none).

  Returns:
    ``(num_pool_per_axis, strides, patch)``: strides per stage, e.g.
    ``((2, 2, 1), (2, 2, 2), ...)``, and the patch rounded up per axis to a
    multiple of ``2**num_pool_per_axis``.
  """
  current_spacing = [float(s) for s in spacing]
  size = [int(p) for p in patch_size]
  num_pool = [0, 0, 0]
  strides = []
  while True:
    valid = [a for a in range(3) if size[a] >= 2 * min_feature_map_size
             and (max_num_pool is None or num_pool[a] < max_num_pool)]
    if not valid:
      break
    finest = min(current_spacing[a] for a in valid)
    valid = [a for a in valid if current_spacing[a] / finest < 2]
    if len(valid) == 1 and size[valid[0]] < 3 * min_feature_map_size:
      break
    for a in valid:
      num_pool[a] += 1
      current_spacing[a] *= 2
      size[a] = math.ceil(size[a] / 2)
    strides.append(tuple(2 if a in valid else 1 for a in range(3)))
  patch = tuple(-(-int(p) // 2**n) * 2**n for p, n in zip(patch_size, num_pool))
  return tuple(num_pool), tuple(strides), patch  # type: ignore[return-value]


def stage_strides(spacing: Sequence[float], depth: int
                  ) -> tuple[tuple[int, int, int], ...]:
  """Per-axis pooling strides of a U-Net of ``depth`` stages for ``spacing``.

  The rule of :func:`pool_topology` for a fixed number of stages: a stage
  pools (stride 2) every axis whose current spacing is less than twice the
  finest current spacing, and leaves the others (stride 1), so the coarse
  axis of anisotropic data waits until the others have caught up. Isotropic
  data gives ``((2, 2, 2),) * depth``.

  Args:
    spacing: ``(sx, sy, sz)`` in mm.
    depth: number of poolings.
  """
  current = [float(s) for s in spacing]
  strides = []
  for _ in range(depth):
    finest = min(current)
    stage = tuple(2 if c / finest < 2 else 1 for c in current)
    current = [c * s for c, s in zip(current, stage)]
    strides.append(stage)
  return tuple(strides)  # type: ignore[return-value]


def features_per_stage(num_stages: int, base_features: int,
                       max_features: int | None = None) -> tuple[int, ...]:
  """``base * 2**stage``, capped at `max_features` when given."""
  cap = max_features or math.inf
  return tuple(int(min(base_features * 2**s, cap)) for s in range(num_stages))


def unet_param_count(in_channels: int, num_classes: int, features: Sequence[int],
                     strides: Sequence[Sequence[int]]) -> int:
  """Parameters of tversky_jax.models.unet3d's U-Net generalised to per-stage strides.

  Per stage two 3x3x3 convolutions with bias, per up-step a transposed
  convolution with kernel = stride, and a 1x1x1 head. Exact for the current
  model (normalization="none", strides all 2).
  """
  def block(fin: int, fout: int) -> int:
    return 27 * fin * fout + 27 * fout * fout + 2 * fout

  total = sum(block(in_channels if s == 0 else features[s - 1], f) for s, f in enumerate(features))
  for s, stride in enumerate(strides):
    f, coarser = features[s], features[s + 1]
    total += int(np.prod(stride)) * coarser * f + f + block(2 * f, f)
  return total + features[0] * num_classes + num_classes


def estimate_memory_bytes(
    patch_size: Sequence[int], strides: Sequence[Sequence[int]], batch_size: int,
    in_channels: int, num_classes: int, base_features: int = 16,
    max_features: int | None = None, conv_impl: str = "native", bytes_per_element: int = 4,
) -> int:
  """Bytes one train step of the U-Net needs (activations + parameter state).

  ``batch * sum_stages(voxels * features) * ACTIVATION_COPIES[conv_impl] *
  bytes_per_element + PARAMETER_COPIES * 4 * params``; the constant is
  measured (see ``ACTIVATION_COPIES``), good to about 10 % on XLA:CPU.
  """
  if conv_impl not in ACTIVATION_COPIES:
    raise ValueError(f"conv_impl must be one of {tuple(ACTIVATION_COPIES)}, got {conv_impl!r}")
  features = features_per_stage(len(strides) + 1, base_features, max_features)
  voxels = np.asarray(patch_size, np.float64)
  elements = voxels.prod() * features[0]
  for stride, f in zip(strides, features[1:]):
    voxels = voxels / np.asarray(stride)
    elements += voxels.prod() * f
  params = unet_param_count(in_channels, num_classes, features, strides)
  activations = batch_size * elements * ACTIVATION_COPIES[conv_impl] * bytes_per_element
  return int(activations + PARAMETER_COPIES * 4 * params)


def default_memory_budget() -> tuple[int, str]:
  """``(bytes, source)``: the budget when none is given.

  An accelerator's memory when jax reports it
  (``jax.devices()[0].memory_stats()["bytes_limit"]``) times
  ``DEVICE_MEMORY_FRACTION``; otherwise host RAM times
  ``HOST_MEMORY_FRACTION``. The source starts with ``"host"`` for the latter.
  """
  try:
    import jax  # pylint: disable=import-outside-toplevel
    device = jax.devices()[0]
    if device.platform != "cpu":
      limit = (device.memory_stats() or {}).get("bytes_limit")
      if limit:
        return (int(limit * DEVICE_MEMORY_FRACTION),
                f"{device.device_kind} memory x {DEVICE_MEMORY_FRACTION}")
  except Exception:  # pylint: disable=broad-except  # no usable backend: use host RAM
    pass
  host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  return int(host * HOST_MEMORY_FRACTION), f"host RAM x {HOST_MEMORY_FRACTION}"


# --------------------------------------------------------------------------
# Patch, batch and plan


def _shrink_patch(patch: list[int], median_shape: Sequence[int], spacing: Sequence[float],
                  num_pool: Sequence[int], max_num_pool: int | None) -> bool:
  """Shrinks, in place, the axis largest relative to the median shape.

  The step is the divisor ``2**poolings`` that axis keeps after shrinking
  (nnU-Net's two-step reduction, which does not skip valid sizes). Axes at
  ``2 * MIN_FEATURE_MAP_SIZE`` voxels or less are left alone.

  Returns:
    False when no axis can shrink.
  """
  ratios = np.asarray(patch, np.float64) / np.maximum(np.asarray(median_shape, np.float64), 1)
  for axis in np.argsort(-ratios, kind="stable"):
    if patch[axis] <= 2 * MIN_FEATURE_MAP_SIZE:
      continue
    trial = list(patch)
    trial[axis] = max(patch[axis] - 2 ** num_pool[axis], 1)
    step = 2 ** pool_topology(spacing, trial, max_num_pool=max_num_pool)[0][axis]
    patch[axis] = max(patch[axis] - step, 1)
    return True
  return False


def fit_patch_and_batch(
    spacing: Sequence[float], median_shape: Sequence[int], num_cases: int, in_channels: int,
    num_classes: int, memory_bytes: int, options: PlanOptions = PlanOptions(),
    conv_impl: str = "native",
) -> dict[str, Any]:
  """nnU-Net's patch / batch / pooling search under a memory budget.

  Args:
    spacing: target spacing ``(sx, sy, sz)``.
    median_shape: resampled median shape.
    num_cases: training cases (for the 5 %-of-the-dataset batch cap).
    in_channels: image channels.
    num_classes: network outputs.
    memory_bytes: the budget for one train step.
    options: base_features, max_features, bytes_per_element, max_num_pool.
    conv_impl: a key of ``ACTIVATION_COPIES``.

  Returns:
    ``{"patch_size", "batch_size", "num_pool_per_axis", "pool_strides",
    "estimated_memory_bytes"}``.

  Raises:
    MemoryBudgetError: even the smallest patch with ``MIN_BATCH_SIZE`` exceeds it.
  """
  def estimate(patch, strides, batch):
    return estimate_memory_bytes(
        patch, strides, batch, in_channels, num_classes, options.base_features,
        options.max_features, conv_impl, options.bytes_per_element)

  median_shape = [max(int(s), 1) for s in median_shape]
  aspect = 1.0 / np.asarray(spacing, np.float64)
  initial = np.round(aspect * (INITIAL_PATCH_VOXELS / aspect.prod()) ** (1 / 3)).astype(int)
  patch = [int(min(p, m)) for p, m in zip(initial, median_shape)]
  num_pool, strides, padded = pool_topology(spacing, patch, max_num_pool=options.max_num_pool)
  while estimate(padded, strides, MIN_BATCH_SIZE) > memory_bytes:
    patch = list(padded)
    if not _shrink_patch(patch, median_shape, spacing, num_pool, options.max_num_pool):
      raise MemoryBudgetError(
          f"memory budget {memory_bytes / 2**30:.2f} GiB is too small: patch {tuple(padded)} "
          f"with batch {MIN_BATCH_SIZE} needs ~"
          f"{estimate(padded, strides, MIN_BATCH_SIZE) / 2**30:.2f} GiB")
    num_pool, strides, padded = pool_topology(spacing, patch, max_num_pool=options.max_num_pool)
  fixed = estimate(padded, strides, 0)
  per_sample = estimate(padded, strides, 1) - fixed
  batch = (memory_bytes - fixed) // max(per_sample, 1)
  cap = round(np.prod(median_shape, dtype=np.float64) * num_cases * MAX_DATASET_FRACTION
              / np.prod(padded, dtype=np.float64))
  batch = int(max(min(batch, cap), MIN_BATCH_SIZE))
  return {"patch_size": tuple(int(p) for p in padded), "batch_size": batch,
          "num_pool_per_axis": num_pool, "pool_strides": strides,
          "estimated_memory_bytes": estimate(padded, strides, batch)}


def resampled_shape(shape: Sequence[int], spacing: Sequence[float],
                    target: Sequence[float]) -> tuple[int, int, int]:
  """``round(shape * spacing / target)`` per axis, at least 1."""
  return tuple(max(int(round(n * s / t)), 1)  # type: ignore[return-value]
               for n, s, t in zip(shape, spacing, target))


def _resolve_memory(options: PlanOptions) -> tuple[int, str, str]:
  """``(bytes, source, conv_impl)`` with the defaults of `options` filled in."""
  if options.memory_bytes is not None:
    memory, source = int(options.memory_bytes), "given"
  else:
    memory, source = default_memory_budget()
  conv_impl = options.conv_impl
  if conv_impl == "auto":
    conv_impl = "native"
    if _default_backend() == "cpu":
      from tversky_jax.models import unet3d  # pylint: disable=import-outside-toplevel
      conv_impl = unet3d.default_conv_impl()
  return memory, source, conv_impl


def _default_backend() -> str:
  """jax's default backend ("cpu", "gpu", "tpu"); "cpu" if jax cannot start one."""
  try:
    import jax  # pylint: disable=import-outside-toplevel
    return jax.default_backend()
  except Exception:  # pylint: disable=broad-except
    return "cpu"


def make_plan(dataset: nifti.Dataset, fingerprint: Fingerprint,
              options: PlanOptions = PlanOptions(), input_hash: str = "") -> Plan:
  """Plans preprocessing and training from a fingerprint (see the module docstring).

  Args:
    dataset: from :func:`tversky_jax.data.nifti.read_dataset`.
    fingerprint: from :func:`compute_fingerprint` (or made by hand).
    options: the plan arguments.
    input_hash: stored in the plan (see :func:`plan_dataset`).

  Raises:
    ValueError: bad options or fingerprint; MemoryBudgetError when the budget
      is too small.
  """
  target, aniso_axis = target_spacing(fingerprint.spacings, options.anisotropy_threshold)
  new_shapes = [resampled_shape(shape, spacing, target)
                for shape, spacing in zip(fingerprint.shapes_after_crop, fingerprint.spacings)]
  median_resampled = tuple(int(round(s)) for s in np.median(new_shapes, axis=0))
  memory, source, conv_impl = _resolve_memory(options)
  fitted = fit_patch_and_batch(target, median_resampled, len(fingerprint.case_ids),
                               dataset.num_channels, len(dataset.labels), memory, options,
                               conv_impl)
  total = max(fingerprint.total_voxels, 1)
  return Plan(
      dataset_name=dataset.root.name, channel_names=dataset.channel_names,
      labels=dict(dataset.labels), num_classes=len(dataset.labels),
      num_training=len(fingerprint.case_ids),
      median_spacing=tuple(float(s) for s in np.median(fingerprint.spacings, axis=0)),
      target_spacing=target, anisotropic_axis=aniso_axis,
      normalization=normalization_schemes(dataset.channel_names, options.normalization),
      intensity=fingerprint.intensity,
      median_shape=tuple(int(round(s)) for s in np.median(fingerprint.shapes_after_crop, axis=0)),
      resampled_median_shape=median_resampled,
      features_per_stage=features_per_stage(
          len(fitted["pool_strides"]) + 1, options.base_features, options.max_features),
      base_features=options.base_features, memory_budget_bytes=memory,
      memory_source=source, conv_impl=conv_impl,
      class_frequencies={k: v / total for k, v in fingerprint.class_voxels.items()},
      image_order=options.image_order, label_order=options.label_order,
      order_z=options.order_z, anisotropy_threshold=options.anisotropy_threshold,
      input_hash=input_hash, **fitted)


# --------------------------------------------------------------------------
# Caching on disk


def default_output_dir(dataset_root: str | os.PathLike[str]) -> Path:
  """``<dataset>/../<dataset folder name>_preprocessed``."""
  root = Path(dataset_root).resolve()
  return root.parent / f"{root.name}_preprocessed"


def file_signature(paths: Sequence[Path], root: Path) -> list[str]:
  """One ``"relative/path size mtime_ns"`` line per file (``missing`` if absent)."""
  lines = []
  for path in paths:
    try:
      st = path.stat()
      lines.append(f"{path.relative_to(root)} {st.st_size} {st.st_mtime_ns}")
    except FileNotFoundError:
      lines.append(f"{path.relative_to(root)} missing")
  return lines


def digest(*parts: Any) -> str:
  """sha256 (hex, 16 characters) of the JSON of `parts`."""
  text = json.dumps(parts, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def dataset_signature(dataset: nifti.Dataset) -> list[str]:
  """File signature of dataset.json and every training image and label."""
  paths = [dataset.root / "dataset.json"]
  for case_id in dataset.training_cases:
    paths += [*dataset.image_paths(case_id), dataset.label_path(case_id)]
  return file_signature(paths, dataset.root)


def write_text_atomic(path: Path, text: str) -> None:
  """Writes `text` to `path` through a temporary file and a rename."""
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
  try:
    tmp.write_text(text)
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def _read_cached(path: Path, parse, input_hash: str):
  """The object in `path` if it parses and carries `input_hash`, else None."""
  try:
    cached = parse(path.read_text())
  except (OSError, ValueError, TypeError):
    return None
  return cached if cached.input_hash == input_hash else None


def prepare_output_dir(out_dir: str | os.PathLike[str]) -> Path:
  """Creates `out_dir`; a ValueError names it when that is not possible."""
  out_dir = Path(out_dir)
  try:
    out_dir.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise ValueError(f"cannot create output folder {out_dir}: {e.strerror} "
                     "(choose another one)") from None
  if not os.access(out_dir, os.W_OK):
    raise ValueError(f"output folder {out_dir} is not writable (choose another one)")
  return out_dir


def plan_dataset(
    data: str | os.PathLike[str] | nifti.Dataset,
    out_dir: str | os.PathLike[str] | None = None,
    options: PlanOptions = PlanOptions(),
    force: bool = False,
    num_workers: int | None = None,
    progress: bool = True,
) -> tuple[Plan, Fingerprint]:
  """Fingerprints and plans a dataset, reusing the cached files when valid.

  Writes ``dataset_fingerprint.json`` and ``plans.json`` into `out_dir`. The
  fingerprint is recomputed when dataset.json or a training file changes
  (name, size or mtime) or ``num_samples`` / ``seed`` change; the plan when
  the fingerprint or any other option (including the resolved memory budget)
  changes.

  Args:
    data: the dataset folder or a :class:`nifti.Dataset`.
    out_dir: where to write; default :func:`default_output_dir`.
    options: the plan arguments.
    force: recompute both even if the cache is valid.
    num_workers: threads reading cases for the fingerprint.
    progress: show a progress bar while fingerprinting.

  Returns:
    ``(plan, fingerprint)``.

  Raises:
    nifti.DatasetError: a dataset problem; ValueError: bad options or an
      unwritable `out_dir`; MemoryBudgetError.
  """
  dataset = data if isinstance(data, nifti.Dataset) else nifti.read_dataset(data)
  out_dir = prepare_output_dir(out_dir or default_output_dir(dataset.root))
  fp_hash = digest("fingerprint", FINGERPRINT_VERSION, dataset_signature(dataset),
                   options.num_samples, options.seed)
  fp_path = out_dir / FINGERPRINT_FILE
  fingerprint = None if force else _read_cached(fp_path, Fingerprint.from_json, fp_hash)
  if fingerprint is None:
    fingerprint = compute_fingerprint(dataset, options.num_samples, options.seed, fp_hash,
                                      num_workers, progress)
    write_text_atomic(fp_path, fingerprint.to_json())
  memory, _, _ = _resolve_memory(options)
  resolved = dataclasses.replace(options, memory_bytes=memory)
  plan_hash = digest("plan", PLAN_VERSION, fp_hash, dataclasses.asdict(resolved))
  plan_path = out_dir / PLANS_FILE
  plan = None if force else _read_cached(plan_path, Plan.from_json, plan_hash)
  if plan is None:
    plan = make_plan(dataset, fingerprint, options, plan_hash)
    write_text_atomic(plan_path, plan.to_json())
  return plan, fingerprint


def load_plan(path: str | os.PathLike[str]) -> Plan:
  """Reads a plans.json (or the one in a folder); ValueError if unreadable."""
  path = Path(path)
  if path.is_dir():
    path = path / PLANS_FILE
  try:
    text = path.read_text()
  except OSError as e:
    raise ValueError(f"{path}: cannot read plan ({e.strerror})") from None
  try:
    return Plan.from_json(text)
  except (ValueError, TypeError) as e:
    raise ValueError(f"{path}: {e}") from None
