"""Training-sample transforms: padding, patch sampling and flips.

Pure numpy, top-level functions (picklable for grain worker processes). All
randomness comes from the ``np.random.Generator`` passed in, so a sample is a
deterministic function of the inputs and the generator's state.

Images are channels-last ``[x, y, z, channels]``, labels ``[x, y, z]``, both in
NIfTI axis order (see :mod:`tversky_jax.data.nifti`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PadWidths = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


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


def _pad(image: np.ndarray, label: np.ndarray | None, widths: PadWidths):
  if not any(b or a for b, a in widths):
    return image, label
  image = np.pad(image, (*widths, (0, 0)))
  label = np.pad(label, widths) if label is not None else None
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


def pad_to_multiple(
    image: np.ndarray, label: np.ndarray | None, multiple: int
) -> tuple[np.ndarray, np.ndarray | None]:
  """Zero-pads (centred) each spatial axis up to a multiple of `multiple`.

  For whole-volume training or inference with a U-Net of ``depth`` 2x2x2
  poolings use ``multiple = 2 ** depth``, so every pooling halves an even size
  and the skip connections line up.

  Args:
    image: ``[x, y, z, c]``; padded with 0.
    label: ``[x, y, z]`` or None; padded with 0.
    multiple: positive integer.

  Returns:
    ``(image, label)`` with every spatial size a multiple of `multiple`.
  """
  if multiple < 1:
    raise ValueError(f"multiple must be >= 1, got {multiple}")
  _check_pair(image, label)
  target = [-(-s // multiple) * multiple for s in image.shape[:3]]
  return _pad(image, label, center_pad_widths(image.shape[:3], target))


def foreground_voxels(label: np.ndarray) -> np.ndarray:
  """``int64 [n, 3]`` indices of the voxels with ``label > 0``.

  Precompute once per case and pass to :func:`sample_patch` to avoid scanning
  the whole label for every patch.
  """
  return np.argwhere(label > 0)


def sample_patch(
    image: np.ndarray,
    label: np.ndarray,
    patch_shape: Sequence[int],
    rng: np.random.Generator,
    foreground_fraction: float = 0.33,
    foreground: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Crops a random patch, centred on a lesion with probability `foreground_fraction`.

  With probability `foreground_fraction` (and if the case has foreground) the
  patch is centred on a uniformly drawn foreground voxel, shifted as needed to
  stay inside the volume; otherwise its corner is uniform over all valid
  positions. Volumes smaller than the patch are first zero-padded (centred,
  :func:`pad_to_shape`).

  Args:
    image: ``[x, y, z, c]``.
    label: ``[x, y, z]``; foreground is ``label > 0``.
    patch_shape: ``(px, py, pz)``.
    rng: source of randomness; the result is a function of its state.
    foreground_fraction: probability in ``[0, 1]`` of a foreground-centred patch.
    foreground: optional ``[n, 3]`` from :func:`foreground_voxels` of the
      *unpadded* label, to skip rescanning it.

  Returns:
    ``(image_patch, label_patch)``: ``[px, py, pz, c]`` and ``[px, py, pz]``,
    contiguous copies with the input dtypes.
  """
  _check_pair(image, label)
  patch_shape = _check_shape("patch_shape", patch_shape)
  if not 0.0 <= foreground_fraction <= 1.0:
    raise ValueError(f"foreground_fraction must be in [0, 1], got {foreground_fraction}")
  if foreground is None:
    foreground = foreground_voxels(label)
  elif foreground.ndim != 2 or foreground.shape[1] != 3:
    raise ValueError(f"foreground must be [n, 3] voxel indices, got shape {foreground.shape}")
  widths = center_pad_widths(label.shape, patch_shape)
  image, label = _pad(image, label, widths)
  shape = np.asarray(label.shape)
  patch = np.asarray(patch_shape)

  if len(foreground) and rng.random() < foreground_fraction:
    voxel = foreground[rng.integers(len(foreground))] + [b for b, _ in widths]
    start = np.clip(voxel - patch // 2, 0, shape - patch)
  else:
    start = rng.integers(0, shape - patch + 1)
  box = tuple(slice(s, s + p) for s, p in zip(start, patch))
  return np.ascontiguousarray(image[box]), np.ascontiguousarray(label[box])


def random_flip(
    image: np.ndarray,
    label: np.ndarray | None,
    rng: np.random.Generator,
    axes: Sequence[int] = (0, 1, 2),
    probability: float = 0.5,
) -> tuple[np.ndarray, np.ndarray | None]:
  """Flips image and label together along each of `axes` with `probability`.

  Args:
    image: ``[x, y, z, c]``.
    label: ``[x, y, z]`` or None.
    rng: one ``rng.random(len(axes))`` draw decides the flips.
    axes: spatial axes in ``{0, 1, 2}`` that may be flipped.
    probability: per-axis flip probability.

  Returns:
    ``(image, label)``, contiguous, same shapes and dtypes.
  """
  _check_pair(image, label)
  axes = tuple(int(a) for a in axes)
  if not set(axes) <= {0, 1, 2} or len(set(axes)) != len(axes):
    raise ValueError(f"axes must be distinct spatial axes in (0, 1, 2), got {axes}")
  flip = tuple(a for a, u in zip(axes, rng.random(len(axes))) if u < probability)
  if flip:
    image = np.flip(image, flip)
    label = np.flip(label, flip) if label is not None else None
  image = np.ascontiguousarray(image)
  return image, np.ascontiguousarray(label) if label is not None else None
