"""Preprocessing of cases to a plan's grid, its on-disk cache, and the way back.

One case, training or new scan (:func:`preprocess_case`)::

  crop to the non-zero box -> normalise (plan.normalization) -> resample to
  plan.target_spacing

in nnU-Net's order: normalising before resampling keeps the non-zero mask of
the z-score exact. :func:`resample_to_original` undoes it for softmax
probabilities, so prediction can argmax or threshold on the scan's own grid.

Resampling (:func:`resample`) maps voxel *edges* onto each other: output voxel
``i`` of an axis resampled from ``n`` to ``m`` voxels samples the input at
``(i + 0.5) * n / m - 0.5`` (skimage's ``resize`` convention, which nnU-Net
uses), so the field of view is kept and resampling there and back is exact
in geometry. It is separable: one scipy.ndimage spline interpolation matrix
per axis (exactly ``scipy.ndimage.affine_transform`` with ``mode="nearest"``,
the spline prefilter included), applied with a matrix product, so each axis
has its own order:

* images: spline order ``plan.image_order`` (3, cubic) on every axis, except
  the coarse axis of an anisotropic case (its original or target spacing
  ratio above ``plan.anisotropy_threshold``), which gets ``plan.order_z``
  (0, nearest): as nnU-Net, interpolating across thick slices adds
  artefacts rather than detail.
* labels: ``plan.label_order`` 1: each label value one-hot, resampled
  linearly (``order_z`` on the coarse axis), then the argmax (nnU-Net
  thresholds each one-hot map at 0.5 instead, which can leave holes; argmax
  labels every voxel). ``label_order`` 0: nearest neighbour.
* probabilities back to the original grid: linear on every axis (rows of the
  linear matrix are convex weights, so probabilities stay in [0, 1] and sum
  to 1).

Cache layout (:func:`preprocess_dataset`), in ``<out_dir>/cases/``::

  CASE_image.npy   float32 [x, y, z, c]   (np.load(..., mmap_mode="r"))
  CASE_label.npy   uint8 [x, y, z]
  CASE.json        CaseMeta: original shape, spacing, affine, crop box,
                   preprocessed shape and affine, and the case's input hash

A case is rebuilt when its hash changes: one of its files (name, size, mtime)
or a plan field that changes the arrays (target spacing, normalisation and,
for "ct" channels, the intensity statistics, resampling orders).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from tversky_jax.data import nifti
from tversky_jax.data import planning

CASES_DIR = "cases"
PREPROCESS_VERSION = 1
_EPS = 1e-8


@dataclasses.dataclass(frozen=True)
class CaseMeta:
  """Where a preprocessed case came from; enough to map predictions back.

  Attributes:
    case_id: the case identifier.
    original_shape: ``(X, Y, Z)`` of the scan.
    original_spacing: ``(sx, sy, sz)`` in mm of the scan.
    affine: ``[4, 4]`` voxel-to-world affine of the scan (nested tuples).
    bbox: ``((lo, hi),) * 3`` crop box in scan voxels (half-open).
    shape_after_crop: ``hi - lo`` per axis.
    preprocessed_shape: ``(x, y, z)`` on the target spacing.
    preprocessed_affine: ``[4, 4]`` voxel-to-world affine of that grid.
    input_hash: the cache key of the case ("" when not cached).
  """

  case_id: str
  original_shape: tuple[int, int, int]
  original_spacing: tuple[float, float, float]
  affine: tuple[tuple[float, ...], ...]
  bbox: tuple[tuple[int, int], ...]
  shape_after_crop: tuple[int, int, int]
  preprocessed_shape: tuple[int, int, int]
  preprocessed_affine: tuple[tuple[float, ...], ...]
  input_hash: str = ""

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=1)

  @classmethod
  def from_json(cls, text: str) -> CaseMeta:
    """Parses :meth:`to_json` output; ValueError if it is not one."""
    try:
      data = json.loads(text)
      return cls(**{k: _tuplify(v) for k, v in data.items()})
    except (json.JSONDecodeError, TypeError) as e:
      raise ValueError(f"not a case meta file ({e})") from None


def _tuplify(value):
  return tuple(_tuplify(v) for v in value) if isinstance(value, list) else value


@dataclasses.dataclass(frozen=True)
class CacheSummary:
  """What :func:`preprocess_dataset` did.

  Attributes:
    folder: the cases folder.
    built: cases (re)computed.
    reused: cases whose cache was valid.
    seconds: per built case, wall seconds (load + preprocess + write).
  """

  folder: Path
  built: tuple[str, ...]
  reused: tuple[str, ...]
  seconds: Mapping[str, float] = dataclasses.field(hash=False)


# --------------------------------------------------------------------------
# Resampling


@functools.lru_cache(maxsize=256)
def interpolation_matrix(n_in: int, n_out: int, order: int) -> np.ndarray:
  """``float32 [n_out, n_in]``: 1D resampling as a matrix (read-only).

  Row ``i`` holds the weights of the spline of `order` (scipy.ndimage,
  ``mode="nearest"``, prefilter included) at input coordinate
  ``(i + 0.5) * n_in / n_out - 0.5``.
  """
  if n_in < 1 or n_out < 1 or not 0 <= order <= 5:
    raise ValueError(f"need sizes >= 1 and order in [0, 5], got {n_in}, {n_out}, {order}")
  scale = n_in / n_out
  matrix = ndimage.affine_transform(
      np.eye(n_in), [scale, 1.0], offset=[(scale - 1) / 2, 0.0], output_shape=(n_out, n_in),
      order=order, mode="nearest").astype(np.float32)
  matrix.flags.writeable = False
  return matrix


def axis_orders(spacing: Sequence[float], target: Sequence[float], order: int, order_z: int,
                anisotropy_threshold: float = planning.ANISOTROPY_THRESHOLD
                ) -> tuple[int, int, int]:
  """Per-axis interpolation orders: `order_z` on the coarse axis of an anisotropic case.

  The case is anisotropic when its own spacing (max / min) exceeds
  `anisotropy_threshold`; then its coarsest axis is the coarse one. Otherwise,
  if the target spacing is anisotropic, its coarsest axis is. Else no axis.
  """
  orders = [order] * 3
  for grid in (spacing, target):
    if max(grid) / min(grid) > anisotropy_threshold:
      orders[int(np.argmax(grid))] = order_z
      break
  return tuple(orders)  # type: ignore[return-value]


def resample(array: np.ndarray, shape: Sequence[int], orders: Sequence[int]) -> np.ndarray:
  """Resamples the spatial axes of ``[x, y, z]`` or ``[x, y, z, c]`` to `shape`.

  Separable: axis ``a`` goes through :func:`interpolation_matrix` with order
  ``orders[a]``; axes whose size does not change are untouched.

  Returns:
    ``float32`` array of spatial shape `shape` (channels kept).
  """
  out = np.asarray(array, np.float32)
  for axis, (n_in, n_out, order) in enumerate(zip(out.shape[:3], shape, orders)):
    if n_in != n_out:
      matrix = interpolation_matrix(int(n_in), int(n_out), int(order))
      out = np.moveaxis(np.tensordot(matrix, out, axes=(1, axis)), 0, axis)
  return np.ascontiguousarray(out)


def resample_label(label: np.ndarray, shape: Sequence[int], orders: Sequence[int]) -> np.ndarray:
  """Resamples a ``[x, y, z]`` label map to `shape`.

  Args:
    label: integer labels.
    shape: output spatial shape.
    orders: per axis 0 (nearest) or 1 (linear); with any 1 each label value
      is resampled as a one-hot map and the voxel takes the value of the
      largest (ties: the smaller value).

  Returns:
    ``uint8 [x, y, z]``.
  """
  if max(orders) > 1:
    raise ValueError(f"label orders must be 0 or 1, got {tuple(orders)}")
  if max(orders) == 0:
    index = [interpolation_matrix(int(n), int(m), 0).argmax(axis=1)
             for n, m in zip(label.shape, shape)]
    return np.ascontiguousarray(label[np.ix_(*index)], dtype=np.uint8)
  best = np.full(tuple(shape), -1.0, np.float32)
  out = np.zeros(tuple(shape), np.uint8)
  for value in np.unique(label):
    prob = resample((label == value).astype(np.float32), shape, orders)
    better = prob > best
    out[better] = value
    best = np.where(better, prob, best)
  return out


def preprocessed_affine(affine: np.ndarray, bbox: Sequence[Sequence[int]],
                        shape_after_crop: Sequence[int], shape: Sequence[int]) -> np.ndarray:
  """``[4, 4]`` voxel-to-world affine of the cropped and resampled grid."""
  scale = np.asarray(shape_after_crop, np.float64) / np.asarray(shape, np.float64)
  to_crop = np.eye(4)
  to_crop[:3, :3] = np.diag(scale)
  to_crop[:3, 3] = np.asarray([lo for lo, _ in bbox]) + (scale - 1) / 2
  return np.asarray(affine, np.float64) @ to_crop


# --------------------------------------------------------------------------
# Normalisation and one case


def normalize(image: np.ndarray, plan: planning.Plan) -> np.ndarray:
  """Normalises ``[x, y, z, c]`` channel by channel per ``plan.normalization``.

  * ``"ct"``: clip to the dataset's foreground 0.5 / 99.5 percentiles, then
    subtract the foreground mean and divide by the foreground std.
  * ``"zscore"``: per case, inside the non-zero region (voxels where any
    channel is non-zero, :func:`nifti.nonzero_mask`) zero mean and unit std;
    0 outside (as :func:`nifti.normalize_image`).
  * ``"none"``: unchanged.

  Returns:
    ``float32 [x, y, z, c]``.
  """
  if image.ndim != 4 or image.shape[-1] != plan.num_channels:
    raise ValueError(f"image must be [x, y, z, {plan.num_channels}], got shape {image.shape}")
  out = np.asarray(image, np.float32).copy()
  mask = nifti.nonzero_mask(image) if "zscore" in plan.normalization else None
  for c, (scheme, stats) in enumerate(zip(plan.normalization, plan.intensity)):
    channel = out[..., c]
    if scheme == "ct":
      np.clip(channel, stats.percentile_00_5, stats.percentile_99_5, out=channel)
      channel -= stats.mean
      channel /= max(stats.std, _EPS)
    elif scheme == "zscore":
      inside = channel[mask].astype(np.float64)
      channel[...] = 0.0
      if inside.size:
        channel[mask] = (inside - inside.mean()) / max(inside.std(), _EPS)
  return out


def preprocess_case(
    image: np.ndarray, spacing: Sequence[float], affine: np.ndarray, plan: planning.Plan,
    label: np.ndarray | None = None, case_id: str = "",
) -> tuple[np.ndarray, np.ndarray | None, CaseMeta]:
  """Crops, normalises and resamples one case to the plan's grid.

  Args:
    image: ``[X, Y, Z, c]`` as read (:func:`nifti.load_case`), not normalised.
    spacing: ``(sx, sy, sz)`` in mm (:func:`planning.case_spacing`).
    affine: ``[4, 4]`` voxel-to-world affine of the scan.
    plan: from :func:`planning.plan_dataset`.
    label: ``[X, Y, Z]`` or None (a new scan).
    case_id: stored in the meta.

  Returns:
    ``(image float32 [x, y, z, c], label uint8 [x, y, z] or None, meta)``.
  """
  if image.ndim != 4 or (label is not None and label.shape != image.shape[:3]):
    raise ValueError(f"case {case_id!r}: need image [x, y, z, c] and label [x, y, z], got "
                     f"{image.shape} and {None if label is None else label.shape}")
  bbox = planning.nonzero_bbox(image)
  box = tuple(slice(lo, hi) for lo, hi in bbox)
  cropped = normalize(image[box], plan)
  shape_after_crop = cropped.shape[:3]
  shape = planning.resampled_shape(shape_after_crop, spacing, plan.target_spacing)
  orders = axis_orders(spacing, plan.target_spacing, plan.image_order, plan.order_z,
                       plan.anisotropy_threshold)
  out_image = resample(cropped, shape, orders)
  out_label = None
  if label is not None:
    label_orders = tuple(min(o, plan.label_order) for o in orders)
    out_label = resample_label(label[box], shape, label_orders)
  meta = CaseMeta(
      case_id=case_id, original_shape=tuple(int(s) for s in image.shape[:3]),
      original_spacing=tuple(float(s) for s in spacing),
      affine=tuple(tuple(float(v) for v in row) for row in np.asarray(affine)),
      bbox=bbox, shape_after_crop=tuple(int(s) for s in shape_after_crop),
      preprocessed_shape=shape,
      preprocessed_affine=tuple(tuple(float(v) for v in row) for row in preprocessed_affine(
          affine, bbox, shape_after_crop, shape)))
  return out_image, out_label, meta


def resample_to_original(probabilities: np.ndarray, meta: CaseMeta) -> np.ndarray:
  """Puts softmax probabilities back on the scan's own grid.

  Linear interpolation from the preprocessed grid to the crop box, then the
  crop is undone by padding with background (class 0 probability 1).

  Args:
    probabilities: ``[x, y, z, classes]`` on ``meta.preprocessed_shape``.
    meta: the case's :class:`CaseMeta`.

  Returns:
    ``float32 [X, Y, Z, classes]`` on ``meta.original_shape``.
  """
  probabilities = np.asarray(probabilities)
  if probabilities.ndim != 4 or probabilities.shape[:3] != tuple(meta.preprocessed_shape):
    raise ValueError(f"probabilities must be [{', '.join(map(str, meta.preprocessed_shape))}, "
                     f"classes] for case {meta.case_id!r}, got shape {probabilities.shape}")
  inside = resample(probabilities, meta.shape_after_crop, (1, 1, 1))
  out = np.zeros((*meta.original_shape, probabilities.shape[-1]), np.float32)
  out[..., 0] = 1.0
  out[tuple(slice(lo, hi) for lo, hi in meta.bbox)] = inside
  return out


# --------------------------------------------------------------------------
# The cache


def preprocessing_key(plan: planning.Plan) -> dict:
  """The plan fields that change preprocessed arrays (part of every case hash)."""
  return {
      "version": PREPROCESS_VERSION,
      "target_spacing": plan.target_spacing,
      "normalization": plan.normalization,
      "ct_intensity": [dataclasses.asdict(s) for s, n in zip(plan.intensity, plan.normalization)
                       if n == "ct"],
      "orders": (plan.image_order, plan.label_order, plan.order_z),
      "anisotropy_threshold": plan.anisotropy_threshold,
  }


def cache_paths(folder: Path, case_id: str) -> tuple[Path, Path, Path]:
  """``(image .npy, label .npy, meta .json)`` of a case in a cases folder."""
  return (folder / f"{case_id}_image.npy", folder / f"{case_id}_label.npy",
          folder / f"{case_id}.json")


def _save_npy(path: Path, array: np.ndarray) -> None:
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
  try:
    with open(tmp, "wb") as f:
      np.save(f, array)
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def _cached_meta(folder: Path, case_id: str, case_hash: str) -> CaseMeta | None:
  image_path, label_path, meta_path = cache_paths(folder, case_id)
  try:
    meta = CaseMeta.from_json(meta_path.read_text())
  except (OSError, ValueError):
    return None
  if meta.input_hash != case_hash or not (image_path.is_file() and label_path.is_file()):
    return None
  return meta


def _build_case(dataset: nifti.Dataset, case_id: str, plan: planning.Plan, folder: Path,
                case_hash: str) -> float:
  """Preprocesses and writes one case; returns its wall seconds."""
  start = time.perf_counter()
  case = nifti.load_case(dataset, case_id)
  image, label, meta = preprocess_case(
      case.image, planning.case_spacing(case.header), case.affine, plan, case.label, case_id)
  image_path, label_path, meta_path = cache_paths(folder, case_id)
  meta_path.unlink(missing_ok=True)  # The meta file, written last, marks a complete case.
  _save_npy(image_path, image)
  _save_npy(label_path, label)
  planning.write_text_atomic(meta_path, dataclasses.replace(meta, input_hash=case_hash).to_json())
  return time.perf_counter() - start


def _remove_stale(folder: Path, keep: Sequence[str]) -> None:
  """Deletes cached cases that are no longer training cases."""
  keep = set(keep)
  for meta_path in folder.glob("*.json"):
    if meta_path.stem not in keep:
      for path in cache_paths(folder, meta_path.stem):
        path.unlink(missing_ok=True)


def preprocess_dataset(
    data: str | os.PathLike[str] | nifti.Dataset,
    plan: planning.Plan,
    out_dir: str | os.PathLike[str] | None = None,
    force: bool = False,
    num_workers: int | None = None,
    progress: bool = True,
) -> CacheSummary:
  """Preprocesses every training case into ``<out_dir>/cases/``, reusing valid ones.

  Args:
    data: the dataset folder or a :class:`nifti.Dataset`.
    plan: from :func:`planning.plan_dataset` for this dataset.
    out_dir: the preprocessed folder; default :func:`planning.default_output_dir`.
    force: rebuild every case.
    num_workers: threads; default ``min(4, os.cpu_count())`` (the heavy
      parts, zlib and BLAS, release the GIL).
    progress: show a tqdm progress bar.

  Returns:
    A :class:`CacheSummary`.

  Raises:
    nifti.DatasetError: a broken case; ValueError: an unwritable folder or a
      plan for other channels.
  """
  dataset = data if isinstance(data, nifti.Dataset) else nifti.read_dataset(data)
  if dataset.channel_names != plan.channel_names:
    raise ValueError(f"plan is for channels {list(plan.channel_names)}, dataset "
                     f"{dataset.root} has {list(dataset.channel_names)}: re-plan")
  folder = planning.prepare_output_dir(
      Path(out_dir or planning.default_output_dir(dataset.root)) / CASES_DIR)
  key = preprocessing_key(plan)
  hashes = {}
  for case_id in dataset.training_cases:
    files = [*dataset.image_paths(case_id), dataset.label_path(case_id)]
    hashes[case_id] = planning.digest(key, planning.file_signature(files, dataset.root))
  todo = [c for c in dataset.training_cases
          if force or _cached_meta(folder, c, hashes[c]) is None]
  workers = num_workers or min(4, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    timings = pool.map(lambda c: _build_case(dataset, c, plan, folder, hashes[c]), todo)
    seconds = dict(zip(todo, planning.progress_bar(timings, len(todo), "preprocess", progress)))
  _remove_stale(folder, dataset.training_cases)
  reused = tuple(c for c in dataset.training_cases if c not in seconds)
  return CacheSummary(folder, tuple(todo), reused, seconds)


def load_preprocessed(
    folder: str | os.PathLike[str], case_id: str
) -> tuple[np.ndarray, np.ndarray, CaseMeta]:
  """Memory-maps one cached case.

  Args:
    folder: the cases folder (``CacheSummary.folder``, ``<out_dir>/cases``).
    case_id: the case.

  Returns:
    ``(image float32 [x, y, z, c], label uint8 [x, y, z], meta)``, the arrays
    read-only memory maps (``np.load(mmap_mode="r")``).

  Raises:
    ValueError: the case is not (completely) cached.
  """
  image_path, label_path, meta_path = cache_paths(Path(folder), case_id)
  try:
    meta = CaseMeta.from_json(meta_path.read_text())
    return np.load(image_path, mmap_mode="r"), np.load(label_path, mmap_mode="r"), meta
  except (OSError, ValueError) as e:
    raise ValueError(f"case {case_id!r} is not cached in {folder} ({e}): run "
                     "python -m tversky_jax.plan --preprocess") from None
