"""NIfTI I/O for datasets in the nnU-Net v2 "raw" layout.

Layout::

  Dataset001_Lesions/
    dataset.json   {"channel_names": {"0": "T1", "1": "T2", "2": "FLAIR"},
                    "labels": {"background": 0, "lesion": 1},
                    "numTraining": 15, "file_ending": ".nii.gz"}
    imagesTr/CASE_0000.nii.gz ... CASE_{C-1:04d}.nii.gz   one file per channel
    labelsTr/CASE.nii.gz
    imagesTs/, labelsTs/                                   optional

Conventions used throughout the package:

* Arrays keep the NIfTI voxel axis order ``[x, y, z]`` (no transposition, no
  reorientation); images are channels-last ``[x, y, z, channels]`` with the
  channels in ``dataset.json`` order; labels are ``uint8 [x, y, z]``.
* Every case keeps the affine and header of its first channel, so outputs can
  be written back on the same grid with :func:`write_nifti`.
* Problems a user can cause (bad ``dataset.json``, missing or broken files,
  mismatched grids) raise :class:`DatasetError`, a ``ValueError`` that names
  every offending file.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
import numpy.typing as npt

Split = Literal["train", "test"]

SUPPORTED_FILE_ENDINGS = (".nii.gz", ".nii")
AFFINE_ATOL = 1e-4
_REQUIRED_KEYS = ("channel_names", "labels", "numTraining", "file_ending")
_SPLIT_DIRS = {"train": ("imagesTr", "labelsTr"), "test": ("imagesTs", "labelsTs")}


class DatasetError(ValueError):
  """A dataset problem a user can fix; ``problems`` lists each one by file."""

  def __init__(self, message: str, problems: Sequence[str] = ()):
    self.problems = tuple(problems)
    if self.problems:
      message = "\n  - ".join([message, *self.problems])
    super().__init__(message)
    self._message = message

  def __reduce__(self):
    # Keeps `problems` across pickling (grain worker processes re-raise it).
    return (_rebuild_dataset_error, (self._message, self.problems))


def _rebuild_dataset_error(message: str, problems: tuple[str, ...]) -> DatasetError:
  error = DatasetError(message)
  error.problems = problems
  return error


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A dataset in the nnU-Net v2 raw layout, as described by its dataset.json.

  Attributes:
    root: the dataset folder (holds dataset.json).
    channel_names: channel names in channel order (``_0000`` first).
    labels: label name -> value (or tuple of values for nnU-Net regions).
    file_ending: ``".nii.gz"`` or ``".nii"``.
    num_training: ``numTraining`` as declared in dataset.json.
    training_cases: sorted ids found in imagesTr/ or labelsTr/.
    test_cases: sorted ids found in imagesTs/ or labelsTs/ (empty if absent).
  """

  root: Path
  channel_names: tuple[str, ...]
  labels: Mapping[str, int | tuple[int, ...]] = dataclasses.field(hash=False)
  file_ending: str
  num_training: int
  training_cases: tuple[str, ...]
  test_cases: tuple[str, ...]

  @property
  def num_channels(self) -> int:
    return len(self.channel_names)

  @property
  def label_values(self) -> tuple[int, ...]:
    """Sorted voxel values a label file may contain."""
    values: set[int] = set()
    for value in self.labels.values():
      values.update((value,) if isinstance(value, int) else value)
    return tuple(sorted(values))

  def cases(self, split: Split = "train") -> tuple[str, ...]:
    _check_split(split)
    return self.training_cases if split == "train" else self.test_cases

  def image_paths(self, case_id: str, split: Split = "train") -> tuple[Path, ...]:
    """Channel files of one case, in channel order."""
    images_dir = self.root / _SPLIT_DIRS[_check_split(split)][0]
    return tuple(
        images_dir / f"{case_id}_{c:04d}{self.file_ending}"
        for c in range(self.num_channels)
    )

  def label_path(self, case_id: str, split: Split = "train") -> Path:
    return self.root / _SPLIT_DIRS[_check_split(split)][1] / f"{case_id}{self.file_ending}"

  def has_labels(self, split: Split = "train") -> bool:
    """Training labels are mandatory; test labels exist only if labelsTs/ does."""
    return split == "train" or (self.root / _SPLIT_DIRS["test"][1]).is_dir()


@dataclasses.dataclass(frozen=True, eq=False)
class Case:
  """One loaded case.

  Attributes:
    case_id: the case identifier (file name without channel suffix/ending).
    image: ``float32 [x, y, z, channels]``, channels in dataset.json order.
    label: ``uint8 [x, y, z]``, or None when the case has no label file.
    affine: ``float64 [4, 4]`` voxel-to-world affine of the first channel.
    header: NIfTI header of the first channel (a copy).
  """

  case_id: str
  image: np.ndarray
  label: np.ndarray | None
  affine: np.ndarray
  header: nib.Nifti1Header


def _check_split(split: str) -> Split:
  if split not in _SPLIT_DIRS:
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")
  return split  # type: ignore[return-value]


# --------------------------------------------------------------------------
# dataset.json and case discovery


def read_dataset(root: str | os.PathLike[str]) -> Dataset:
  """Parses ``root/dataset.json`` and discovers the training and test cases.

  Only the layout is checked here (cheap); call :func:`validate_dataset` to
  check the files themselves.

  Args:
    root: the dataset folder.

  Returns:
    The :class:`Dataset`.

  Raises:
    DatasetError: dataset.json is missing, not valid JSON, lacks a required key
      or has a malformed value, or imagesTr/ is missing.
  """
  root = Path(root)
  json_path = root / "dataset.json"
  if not json_path.is_file():
    raise DatasetError(f"{json_path}: not found (is {root} an nnU-Net raw dataset?)")
  try:
    meta = json.loads(json_path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise DatasetError(f"{json_path}: invalid JSON ({e})") from None
  if not isinstance(meta, dict):
    raise DatasetError(f"{json_path}: expected a JSON object, got {type(meta).__name__}")

  problems = [f"missing key {k!r}" for k in _REQUIRED_KEYS if k not in meta]
  if not problems:
    channel_names, p1 = _parse_channel_names(meta["channel_names"])
    labels, p2 = _parse_labels(meta["labels"])
    problems += p1 + p2
    num_training, file_ending = meta["numTraining"], meta["file_ending"]
    if not isinstance(num_training, int) or isinstance(num_training, bool) or num_training < 0:
      problems.append(f"numTraining must be a non-negative integer, got {num_training!r}")
    if file_ending not in SUPPORTED_FILE_ENDINGS:
      problems.append(
          f"file_ending must be one of {SUPPORTED_FILE_ENDINGS}, got {file_ending!r}"
      )
  if problems:
    raise DatasetError(f"{json_path}: malformed dataset.json:", problems)

  images_dir = root / "imagesTr"
  if not images_dir.is_dir():
    raise DatasetError(f"{images_dir}: folder not found")
  return Dataset(
      root=root,
      channel_names=channel_names,
      labels=labels,
      file_ending=file_ending,
      num_training=num_training,
      training_cases=_discover_cases(root, "train", file_ending),
      test_cases=_discover_cases(root, "test", file_ending),
  )


def _parse_channel_names(value: object) -> tuple[tuple[str, ...], list[str]]:
  if not isinstance(value, dict) or not value:
    return (), [f"channel_names must be a non-empty object, got {value!r}"]
  expected = [str(i) for i in range(len(value))]
  if sorted(value, key=lambda k: (len(k), k)) != expected:
    return (), [f"channel_names keys must be '0'..'{len(value) - 1}', got {sorted(value)}"]
  return tuple(str(value[k]) for k in expected), []


def _parse_labels(value: object) -> tuple[dict[str, int | tuple[int, ...]], list[str]]:
  if not isinstance(value, dict) or not value:
    return {}, [f"labels must be a non-empty object, got {value!r}"]

  def is_label(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255

  labels: dict[str, int | tuple[int, ...]] = {}
  problems = []
  for name, v in value.items():
    if is_label(v):
      labels[name] = v
    elif isinstance(v, list) and v and all(is_label(x) for x in v):
      labels[name] = tuple(v)
    else:
      problems.append(
          f"label {name!r} must be an integer in [0, 255] (or a list of them), got {v!r}"
      )
  return labels, problems


_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def _listdir(folder: Path, file_ending: str) -> list[str]:
  """File names in `folder` ending in `file_ending`, hidden files skipped."""
  if not folder.is_dir():
    return []
  return sorted(
      p.name for p in folder.iterdir()
      if p.name.endswith(file_ending) and not p.name.startswith(".")
  )


def _split_channel_file(name: str, file_ending: str) -> tuple[str, int] | None:
  match = _CHANNEL_RE.match(name[: -len(file_ending)])
  return (match["case"], int(match["channel"])) if match else None


def _discover_cases(root: Path, split: Split, file_ending: str) -> tuple[str, ...]:
  images_dir, labels_dir = (root / d for d in _SPLIT_DIRS[split])
  cases = {
      parsed[0] for name in _listdir(images_dir, file_ending)
      if (parsed := _split_channel_file(name, file_ending))
  }
  cases.update(name[: -len(file_ending)] for name in _listdir(labels_dir, file_ending))
  return tuple(sorted(cases))


# --------------------------------------------------------------------------
# Reading and checking volumes


def _read_volume(
    path: Path, display: str
) -> tuple[np.ndarray | None, nib.Nifti1Image | None, list[str]]:
  """Reads one NIfTI volume as ``[x, y, z]``; returns (data, image, problems)."""
  if not path.is_file():
    return None, None, [f"{display}: file not found"]
  try:
    img = nib.load(path)
    data = np.asanyarray(img.dataobj)
  except Exception as e:  # nibabel/gzip/zlib raise many types on bad files.
    return None, None, [f"{display}: cannot read ({type(e).__name__}: {e})"]
  if data.ndim == 4 and data.shape[3] == 1:
    data = data[..., 0]
  if data.ndim != 3:
    return None, None, [f"{display}: expected a 3D volume, got shape {data.shape}"]
  if data.dtype.kind == "f":
    bad = int(data.size - np.count_nonzero(np.isfinite(data)))
    if bad:
      return None, None, [f"{display}: {bad} NaN/Inf voxel(s)"]
  return data, img, []


def _blank_problems(data: np.ndarray, display: str) -> list[str]:
  """A channel whose voxels all have one value carries no image."""
  if data.size and data.min() == data.max():
    return [f"{display}: every voxel is {data.flat[0]:g} (a blank scan); "
            "remove the case or replace the file"]
  return []


def _grid_problems(
    display: str, img: nib.Nifti1Image, shape: tuple[int, ...],
    ref_display: str, ref_img: nib.Nifti1Image, ref_shape: tuple[int, ...],
) -> list[str]:
  if shape != ref_shape:
    return [f"{display}: shape {shape} differs from {ref_display} {ref_shape}"]
  if not np.allclose(img.affine, ref_img.affine, atol=AFFINE_ATOL):
    return [
        f"{display}: affine differs from {ref_display} (max abs diff "
        f"{np.max(np.abs(img.affine - ref_img.affine)):.3g} > {AFFINE_ATOL})"
    ]
  return []


def _load_channels(paths: Sequence[Path], displays: Sequence[str]):
  """Reads channel files.

  Returns:
    ``(image, ref, problems)``: image ``float32 [x, y, z, c]`` (None if there
    are problems); ref ``(display, nibabel image, shape)`` of the first
    readable channel, the grid the others are compared with (None if none is
    readable).
  """
  channels, problems = [], []
  ref = None
  for path, display in zip(paths, displays):
    data, img, p = _read_volume(path, display)
    problems += p
    if data is None:
      continue
    problems += _blank_problems(data, display)
    if ref is None:
      ref = (display, img, data.shape)
    else:
      problems += _grid_problems(display, img, data.shape, *ref)
    channels.append(data)
  if problems:
    return None, ref, problems
  return np.stack([c.astype(np.float32, copy=False) for c in channels], axis=-1), ref, []


def _load_checked(dataset: Dataset, case_id: str, split: Split) -> tuple[Case | None, list[str]]:
  """Loads one case and checks it; returns (case or None, problems)."""
  root = dataset.root
  image_paths = dataset.image_paths(case_id, split)
  image, ref, problems = _load_channels(
      image_paths, [str(p.relative_to(root)) for p in image_paths]
  )
  label = None
  label_path = dataset.label_path(case_id, split)
  if dataset.has_labels(split):
    display = str(label_path.relative_to(root))
    data, img, p = _read_volume(label_path, display)
    problems += p
    if data is not None:
      if ref is not None:
        problems += _grid_problems(display, img, data.shape, *ref)
      allowed = np.asarray(dataset.label_values)
      bad = np.unique(data[~np.isin(data, allowed)])
      if bad.size:
        shown = ", ".join(f"{v:g}" for v in bad[:10]) + (", ..." if bad.size > 10 else "")
        problems.append(
            f"{display}: label value(s) {shown} not in dataset.json labels "
            f"{list(dataset.label_values)}"
        )
      label = data.astype(np.uint8)
  if problems:
    return None, problems
  first = ref[1]
  return Case(case_id, image, label, first.affine.copy(), first.header.copy()), []


# --------------------------------------------------------------------------
# Public API


def validate_dataset(
    dataset: Dataset, split: Split = "train", num_workers: int | None = None
) -> None:
  """Reads every voxel of every case of `split` and reports all problems at once.

  Checked: file names in images/labels folders, numTraining (train split),
  missing channel or label files, unreadable or truncated files, non-3D images
  (``[x, y, z, 1]`` is accepted), NaN/Inf voxels, blank channels (every
  voxel the same value), shape or affine mismatch
  against the case's first channel (affine with ``atol=1e-4``), and label
  values not listed in dataset.json.

  Args:
    dataset: from :func:`read_dataset`.
    split: ``"train"`` (imagesTr/labelsTr) or ``"test"`` (imagesTs, labelsTs if present).
    num_workers: threads reading files (zlib decompression releases the GIL);
      default ``min(8, os.cpu_count())``.

  Raises:
    DatasetError: one error whose ``problems`` lists every problem, each
      prefixed with the file name relative to the dataset root.
  """
  cases = dataset.cases(split)
  problems = _layout_problems(dataset, split)
  workers = num_workers or min(8, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    for _, case_problems in pool.map(lambda c: _load_checked(dataset, c, split), cases):
      problems += case_problems
  if problems:
    raise DatasetError(
        f"{len(problems)} problem(s) in {split} split of dataset {dataset.root}:", problems
    )


def _layout_problems(dataset: Dataset, split: Split) -> list[str]:
  problems = []
  images_name, labels_name = _SPLIT_DIRS[split]
  for name in _listdir(dataset.root / images_name, dataset.file_ending):
    parsed = _split_channel_file(name, dataset.file_ending)
    if parsed is None:
      problems.append(f"{images_name}/{name}: name is not CASE_XXXX{dataset.file_ending}")
    elif parsed[1] >= dataset.num_channels:
      problems.append(
          f"{images_name}/{name}: channel {parsed[1]:04d} but dataset.json lists "
          f"{dataset.num_channels} channel(s)"
      )
  if split == "train":
    if not dataset.training_cases:
      problems.append(f"{images_name}: no cases found")
    elif len(dataset.training_cases) != dataset.num_training:
      problems.append(
          f"dataset.json: numTraining is {dataset.num_training} but "
          f"{len(dataset.training_cases)} training case(s) were found"
      )
  return problems


def load_case(dataset: Dataset, case_id: str, split: Split = "train") -> Case:
  """Loads one case; the same checks as :func:`validate_dataset` apply.

  Args:
    dataset: from :func:`read_dataset`.
    case_id: one of ``dataset.cases(split)``.
    split: ``"train"`` or ``"test"``.

  Returns:
    A :class:`Case`: image ``float32 [x, y, z, channels]`` (NIfTI axis order,
    channels in dataset.json order, not normalised), label ``uint8 [x, y, z]``
    or None when the split has no labels, and the first channel's affine and
    header.

  Raises:
    DatasetError: the case is unknown or any of its files has a problem.
  """
  if case_id not in dataset.cases(split):
    raise DatasetError(f"case {case_id!r} not found in the {split} split of {dataset.root}")
  case, problems = _load_checked(dataset, case_id, split)
  if problems:
    raise DatasetError(f"case {case_id!r} of {dataset.root} cannot be loaded:", problems)
  return case


def load_image_files(
    paths: Sequence[str | os.PathLike[str]],
) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Header]:
  """Loads the channel files of one case, e.g. a new scan to predict.

  Args:
    paths: one NIfTI file per channel, in the dataset.json channel order.

  Returns:
    ``(image, affine, header)``: image ``float32 [x, y, z, len(paths)]`` in
    NIfTI axis order; ``float64 [4, 4]`` affine and header of the first file.

  Raises:
    DatasetError: a file is missing, unreadable, not 3D, holds NaN/Inf, or its
      shape/affine differs from the first file's.
  """
  if not paths:
    raise ValueError("paths must name at least one channel file")
  paths = [Path(p) for p in paths]
  image, ref, problems = _load_channels(paths, [str(p) for p in paths])
  if problems:
    raise DatasetError("cannot load image files:", problems)
  first = ref[1]
  return image, first.affine.copy(), first.header.copy()


def nonzero_mask(image: np.ndarray) -> np.ndarray:
  """``bool [x, y, z]``: voxels where any channel of ``[x, y, z, c]`` is non-zero."""
  return np.any(image != 0, axis=-1)


def normalize_image(image: np.ndarray, eps: float = 1e-8) -> np.ndarray:
  """Per-channel z-score inside the head; the one normalisation used everywhere.

  The head is :func:`nonzero_mask` (voxels where any channel is non-zero; the
  background of skull-stripped scans is 0). Inside it each channel gets zero
  mean and unit standard deviation; outside it the result is 0. A channel that
  is constant inside the mask (std 0) becomes 0 there, not NaN. An all-zero
  image stays all zero.

  Args:
    image: ``[x, y, z, channels]``, channels-last, any real dtype.
    eps: lower bound on the standard deviation.

  Returns:
    ``float32 [x, y, z, channels]``.
  """
  if image.ndim != 4:
    raise ValueError(f"image must be [x, y, z, channels], got shape {image.shape}")
  mask = nonzero_mask(image)
  out = np.zeros(image.shape, np.float32)
  if not mask.any():
    return out
  inside = image[mask].astype(np.float64)  # [n, channels]
  mean = inside.mean(axis=0)
  std = inside.std(axis=0)
  out[mask] = ((inside - mean) / np.maximum(std, eps)).astype(np.float32)
  return out


def write_nifti(
    path: str | os.PathLike[str],
    array: np.ndarray,
    affine: np.ndarray,
    header: nib.Nifti1Header | None = None,
    dtype: npt.DTypeLike = np.float32,
) -> Path:
  """Writes `array` on the grid of a reference image (atomically).

  Args:
    path: output file, ``.nii.gz`` or ``.nii``.
    array: ``[x, y, z]`` or ``[x, y, z, ...]`` in NIfTI axis order, e.g. a
      ``uint8`` label map or a ``float32`` probability map.
    affine: ``[4, 4]`` voxel-to-world affine of the reference image.
    header: header of the reference image (e.g. ``Case.header``); its
      qform/sform codes, units and description are kept. None: qform and
      sform codes are set to 1 (scanner).
    dtype: on-disk data type; scaling slope/intercept are reset.

  Returns:
    The written path.
  """
  path = Path(path)
  if not path.name.endswith(SUPPORTED_FILE_ENDINGS):
    raise ValueError(f"{path}: output must end in one of {SUPPORTED_FILE_ENDINGS}")
  affine = np.asarray(affine, dtype=np.float64)
  if affine.shape != (4, 4):
    raise ValueError(f"affine must be [4, 4], got shape {affine.shape}")
  if header is None:
    header, qform_code, sform_code = nib.Nifti1Header(), 1, 1
    qform = affine
  else:
    header = header.copy()
    qform_code, sform_code = int(header["qform_code"]), int(header["sform_code"])
    # The qform is a rigid transform and may differ from the sform; keep the
    # reference's own when it has one.
    qform = header.get_qform() if qform_code > 0 else affine
  img = nib.Nifti1Image(np.asarray(array).astype(dtype, copy=False), affine, header=header)
  img.set_data_dtype(dtype)
  img.header.set_slope_inter(None, None)
  img.header.set_qform(qform, code=qform_code)
  img.header.set_sform(affine, code=sform_code)
  ending = ".nii.gz" if path.name.endswith(".nii.gz") else ".nii"
  tmp = path.with_name(f".{path.name[: -len(ending)]}.tmp{os.getpid()}{ending}")
  try:
    nib.save(img, tmp)
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)
  return path
