"""Training-sample transforms: padding, patch sampling and flips.

Pure numpy, top-level functions (picklable for grain worker processes). All
randomness comes from the ``np.random.Generator`` passed in, so a sample is a
deterministic function of the inputs and the generator's state.

Images are channels-last ``[x, y, z, channels]``, labels ``[x, y, z]``, both in
NIfTI axis order (see :mod:`tversky_jax.data.nifti`).

Foreground sampling follows nnU-Net: :func:`foreground_voxels` with
``num_classes`` lists the voxels of each foreground class once per case (at
most ``max_per_class`` of them, a fixed random subset, like nnU-Net's
``class_locations``), and a foreground patch of :func:`sample_patch` first
draws a class uniformly among those present, then one of its voxels, so a rare
class is the centre as often as a large one. With one foreground class
present (binary labels) the draws are exactly those of pooled sampling.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

PadWidths = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
# Per-class voxel lists keep at most this many voxels (a fixed random subset).
MAX_VOXELS_PER_CLASS = 50_000
# Seed of those subsets (with the class value): a function of the label only.
_SUBSET_SEED = 20240917


def _check_pair(image: np.ndarray, label: np.ndarray | None) -> None:
  if image.ndim != 4:
    raise ValueError(f"image must be [x, y, z, channels], got shape {image.shape}")
  if label is not None and label.shape != image.shape[:3]:
    raise ValueError(f"label shape {label.shape} must equal image spatial shape {image.shape[:3]}")


def _check_shape(name: str, shape: Sequence[int]) -> tuple[int, int, int]:
  shape = tuple(int(s) for s in shape)
  if len(shape) != 3 or min(shape) < 1:
    raise ValueError(f"{name} must be 3 positive sizes, got {shape}")
  return shape  # type: ignore[return-value]


def center_pad_widths(spatial_shape: Sequence[int], target_shape: Sequence[int]) -> PadWidths:
  """``((before, after),) * 3`` growing `spatial_shape` to at least `target_shape`.

  Padding is centred (the odd voxel goes after); axes already large enough get
  ``(0, 0)``. Crop a padded prediction back with
  ``array[b0:b0 + x, b1:b1 + y, b2:b2 + z]``.
  """
  target_shape = _check_shape("target_shape", target_shape)
  widths = []
  for size, target in zip(spatial_shape, target_shape):
    total = max(target - size, 0)
    widths.append((total // 2, total - total // 2))
  return tuple(widths)  # type: ignore[return-value]


def crop_padded(array: np.ndarray, widths: PadWidths, start: Sequence[int],
                size: Sequence[int], out: np.ndarray | None = None) -> np.ndarray:
  """The box ``[start, start + size)`` of `array` zero-padded by `widths`.

  `array` is ``[x, y, z, ...]``; `widths` pads the 3 spatial axes and `start`
  is in padded coordinates. Only the box is read and written (one copy): the
  padded array is never built, which for a patch of a memory-mapped case
  means reading the patch, not the case.

  Args:
    array: ``[x, y, z, ...]``.
    widths: ``((before, after),) * 3``, e.g. :func:`center_pad_widths`.
    start: the box's corner, in padded coordinates.
    size: the box's spatial shape ``(px, py, pz)``.
    out: zeros of shape ``[px, py, pz, ...]`` (any dtype the values fit,
      e.g. one sample of a batch made with ``np.zeros``) to write the box
      into; only the part of the box inside `array` is written, so the
      padding keeps out's zeros. None: a new array of `array`'s dtype.

  Returns:
    `out`, or the new contiguous array.
  """
  shape = tuple(int(p) for p in size) + array.shape[3:]
  if out is None:
    out = np.zeros(shape, array.dtype)
  elif out.shape != shape:
    raise ValueError(f"out must have shape {shape}, got {out.shape}")
  source, target = [], []
  for n, (before, _), s, p in zip(array.shape[:3], widths, start, size):
    offset = int(s) - before  # where the box starts in `array`
    lo, hi = max(offset, 0), min(offset + int(p), n)
    source.append(slice(lo, hi))
    target.append(slice(lo - offset, hi - offset))
  out[tuple(target)] = array[tuple(source)]
  return out


def _pad(image: np.ndarray, label: np.ndarray | None, widths: PadWidths):
  if not any(b or a for b, a in widths):
    return image, label
  shape = [n + b + a for n, (b, a) in zip(image.shape[:3], widths)]
  image = crop_padded(image, widths, (0, 0, 0), shape)
  label = crop_padded(label, widths, (0, 0, 0), shape) if label is not None else None
  return image, label


def pad_to_shape(
    image: np.ndarray, label: np.ndarray | None, shape: Sequence[int]
) -> tuple[np.ndarray, np.ndarray | None]:
  """Zero-pads (centred) each spatial axis smaller than `shape`.

  Args:
    image: ``[x, y, z, c]``; padded with 0 (the normalised background value).
    label: ``[x, y, z]`` or None; padded with 0 (background).
    shape: minimum spatial shape ``(px, py, pz)``; larger axes are untouched.

  Returns:
    ``(image, label)`` with spatial shape ``max(shape, (x, y, z))`` per axis;
    the inputs themselves when nothing needs padding.
  """
  _check_pair(image, label)
  return _pad(image, label, center_pad_widths(image.shape[:3], shape))


def _check_multiple(name: str, multiple: int | Sequence[int]) -> tuple[int, int, int]:
  """`multiple` as 3 per-axis integers >= 1 (an integer applies to every axis)."""
  values = (multiple,) * 3 if np.ndim(multiple) == 0 else tuple(multiple)
  if (len(values) != 3 or any(isinstance(v, bool) or not isinstance(v, (int, np.integer))
                              or v < 1 for v in values)):
    raise ValueError(f"{name} must be an integer >= 1 or 3 of them (x, y, z), got {multiple!r}")
  return tuple(int(v) for v in values)  # type: ignore[return-value]


def round_up_shape(shape: Sequence[int], multiple: int | Sequence[int]) -> tuple[int, int, int]:
  """Each of the 3 sizes of `shape` rounded up to a multiple of `multiple` (per axis)."""
  multiple = _check_multiple("multiple", multiple)
  return tuple(-(-int(s) // m) * m for s, m in zip(shape, multiple))  # type: ignore[return-value]


def check_label_values(label: np.ndarray, num_classes: int) -> None:
  """Raises ValueError if a value of `label` is not a class in ``[0, num_classes)``.

  Args:
    label: ``[x, y, z]`` integer (or integer-valued) labels.
    num_classes: number of classes ``K``, background included (>= 2).
  """
  num_classes = _check_num_classes(num_classes)
  label = np.asarray(label)
  if label.size and (label.min() < 0 or label.max() >= num_classes):
    bad = np.unique(label[(label < 0) | (label >= num_classes)])
    shown = ", ".join(str(v) for v in bad[:10].tolist()) + (", ..." if len(bad) > 10 else "")
    raise ValueError(f"label value(s) {shown} outside [0, num_classes) with "
                     f"num_classes={num_classes}")


def _check_num_classes(num_classes: int) -> int:
  if (isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer))
      or not 2 <= num_classes <= 256):
    raise ValueError(f"num_classes must be an integer in [2, 256] (background included), "
                     f"got {num_classes!r}")
  return int(num_classes)


def foreground_voxels(
    label: np.ndarray,
    num_classes: int | None = None,
    max_per_class: int | None = MAX_VOXELS_PER_CLASS,
) -> np.ndarray | dict[int, np.ndarray]:
  """Foreground voxel indices of a label map, pooled or per class.

  Precompute once per case and pass to :func:`sample_patch` to avoid scanning
  the whole label for every patch.

  Args:
    label: ``[x, y, z]``.
    num_classes: None: all voxels with ``label > 0`` pooled as one class.
      ``K``: per class ``1..K-1``; a value outside ``[0, K)`` is a ValueError
      (:func:`check_label_values`).
    max_per_class: per class, keep at most this many voxels: a uniformly
      drawn subset, in raster order, fixed by the label alone (seeded by the
      class value); None keeps all. Ignored when `num_classes` is None.

  Returns:
    `num_classes` None: ``int64 [n, 3]``, ``np.argwhere(label > 0)``.
    Otherwise ``{k: int32 [n_k, 3]}`` for the classes ``k`` present in
    `label`, in increasing order; ``n_k <= max_per_class``; for one class the
    indices are those of the pooled form when ``n_1 <= max_per_class``.
  """
  if num_classes is None:
    return np.argwhere(label > 0)
  check_label_values(label, num_classes)
  if max_per_class is not None and (isinstance(max_per_class, bool) or max_per_class < 1):
    raise ValueError(f"max_per_class must be >= 1 or None, got {max_per_class!r}")
  voxels = {}
  for value in range(1, num_classes):
    where = np.argwhere(label == value)
    if not len(where):
      continue
    if max_per_class is not None and len(where) > max_per_class:
      keep = np.random.default_rng([_SUBSET_SEED, value]).choice(
          len(where), max_per_class, replace=False)
      where = where[np.sort(keep)]
    voxels[value] = where.astype(np.int32)
  return voxels


def _foreground_groups(
    foreground: np.ndarray | Mapping[int, np.ndarray],
) -> list[np.ndarray]:
  """The non-empty voxel lists of `foreground`, pooled form or per class (by class)."""
  if isinstance(foreground, Mapping):
    groups = [np.asarray(foreground[k]) for k in sorted(foreground)]
  else:
    groups = [np.asarray(foreground)]
  for group in groups:
    if group.ndim != 2 or group.shape[1] != 3:
      raise ValueError(f"foreground must be [n, 3] voxel indices (or a mapping class -> "
                       f"[n_k, 3]), got shape {group.shape}")
  return [g for g in groups if len(g)]


def sample_patch(
    image: np.ndarray,
    label: np.ndarray,
    patch_shape: Sequence[int],
    rng: np.random.Generator,
    foreground_fraction: float = 0.33,
    foreground: np.ndarray | Mapping[int, np.ndarray] | None = None,
    num_classes: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Crops a random patch, centred on a foreground voxel with probability `foreground_fraction`.

  With probability `foreground_fraction` (and if the case has foreground) the
  patch is centred on a foreground voxel, shifted as needed to stay inside
  the volume; otherwise its corner is uniform over all valid positions.
  Per-class foreground (`num_classes`, or `foreground` a mapping) first draws
  a class uniformly among the foreground classes present, then a voxel of it
  uniformly (nnU-Net); pooled foreground draws uniformly among all
  foreground voxels. Volumes smaller than the patch are zero-padded
  (centred, as :func:`pad_to_shape` does); only the patch is read and
  copied, never the whole (padded) volume.

  The draws from `rng`: one ``random()`` (foreground or not); for a
  foreground patch an ``integers(c)`` for the class only if ``c > 1``
  classes are present, then an ``integers(n_k)`` for the voxel; otherwise
  one ``integers`` for the corner. With a single foreground class the stream
  is thus the same per class and pooled.

  Args:
    image: ``[x, y, z, c]``.
    label: ``[x, y, z]``; foreground is ``label > 0``.
    patch_shape: ``(px, py, pz)``.
    rng: source of randomness; the result is a function of its state.
    foreground_fraction: probability in ``[0, 1]`` of a foreground-centred patch.
    foreground: optional precomputed :func:`foreground_voxels` of the
      *unpadded* label: pooled ``[n, 3]`` or per class ``{k: [n_k, 3]}``, to
      skip rescanning it.
    num_classes: used when `foreground` is None: None pools all foreground
      voxels, ``K`` samples per class (and checks the label values).

  Returns:
    ``(image_patch, label_patch)``: ``[px, py, pz, c]`` and ``[px, py, pz]``,
    contiguous copies with the input dtypes.
  """
  _check_pair(image, label)
  if foreground is None:
    foreground = foreground_voxels(label, num_classes)
  widths, start = draw_patch(label.shape, patch_shape, rng, foreground_fraction,
                             foreground)
  return (crop_padded(image, widths, start, patch_shape),
          crop_padded(label, widths, start, patch_shape))


def draw_patch(
    spatial_shape: Sequence[int],
    patch_shape: Sequence[int],
    rng: np.random.Generator,
    foreground_fraction: float,
    foreground: np.ndarray | Mapping[int, np.ndarray],
) -> tuple[PadWidths, np.ndarray]:
  """Where :func:`sample_patch` cuts: ``(widths, start)`` for :func:`crop_padded`.

  Draws from `rng` exactly as :func:`sample_patch` documents. `widths` pads a
  volume of `spatial_shape` (centred) up to the patch where it is smaller;
  `start` is the patch's corner in the padded volume. `foreground` is the
  volume's :func:`foreground_voxels` (pooled or per class).
  """
  patch_shape = _check_shape("patch_shape", patch_shape)
  if not 0.0 <= foreground_fraction <= 1.0:
    raise ValueError(f"foreground_fraction must be in [0, 1], got {foreground_fraction}")
  groups = _foreground_groups(foreground)
  widths = center_pad_widths(spatial_shape, patch_shape)
  shape = np.asarray(spatial_shape) + [b + a for b, a in widths]
  patch = np.asarray(patch_shape)
  if groups and rng.random() < foreground_fraction:
    group = groups[rng.integers(len(groups))] if len(groups) > 1 else groups[0]
    voxel = group[rng.integers(len(group))].astype(np.int64) + [b for b, _ in widths]
    start = np.clip(voxel - patch // 2, 0, shape - patch)
  else:
    start = rng.integers(0, shape - patch + 1)
  return widths, start


def random_flip(
    image: np.ndarray,
    label: np.ndarray | None,
    rng: np.random.Generator,
    axes: Sequence[int] = (0, 1, 2),
    probability: float = 0.5,
    out: tuple[np.ndarray, np.ndarray | None] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
  """Flips image and label together along each of `axes` with `probability`.

  Args:
    image: ``[x, y, z, c]``.
    label: ``[x, y, z]`` or None.
    rng: one ``rng.random(len(axes))`` draw decides the flips.
    axes: spatial axes in ``{0, 1, 2}`` that may be flipped.
    probability: per-axis flip probability.
    out: ``(image_out, label_out)`` of the same shapes (any dtypes the
      values fit; ``label_out`` None when `label` is) to write the result
      into, e.g. one sample of a batch; None: new arrays.

  Returns:
    ``(image, label)``, contiguous, same shapes and dtypes; `out` if given.
  """
  _check_pair(image, label)
  axes = tuple(int(a) for a in axes)
  if not set(axes) <= {0, 1, 2} or len(set(axes)) != len(axes):
    raise ValueError(f"axes must be distinct spatial axes in (0, 1, 2), got {axes}")
  flip = tuple(a for a, u in zip(axes, rng.random(len(axes))) if u < probability)
  if out is None:
    out = (np.empty_like(image, order="C"),
           None if label is None else np.empty_like(label, order="C"))
  elif (out[0].shape != image.shape
        or (label is not None and (out[1] is None or out[1].shape != label.shape))):
    raise ValueError(f"out must have the shapes {image.shape} and "
                     f"{None if label is None else label.shape}")
  _copy_flipped(image, flip, out[0])
  if label is not None:
    out[1][...] = np.flip(label, flip)
  return out


def _copy_flipped(image: np.ndarray, axes: tuple[int, ...], out: np.ndarray) -> None:
  """Writes ``image: [x, y, z, c]`` flipped along `axes` into `out`.

  With several channels each voxel is moved as one item (a void view of
  its ``c`` values): numpy's copy of a flipped ``z`` axis otherwise runs an
  inner loop of ``c`` elements per voxel, 1.5-2.5x slower here.
  """
  if (image.shape[3] == 1 or out.dtype != image.dtype
      or not (image.flags.c_contiguous and out.flags.c_contiguous)):
    out[...] = np.flip(image, axes)
    return
  voxel = np.dtype((np.void, image.dtype.itemsize * image.shape[3]))
  out.view(voxel)[..., 0] = np.flip(image.view(voxel)[..., 0], axes)
