"""The training input pipeline: in-memory cases -> infinite stream of batches (grain).

Cases are loaded and normalised once (:func:`load_training_cases` from the raw
NIfTI files, or :func:`load_preprocessed_cases` memory-mapping the
preprocessed cache of :mod:`tversky_jax.data.preprocessing`) and kept in
memory; :func:`make_train_iterator` turns them into an infinite, deterministic,
resumable and per-process sharded stream of batches::

  cases = load_training_cases(dataset, dataset.training_cases, num_classes=2)
  it = make_train_iterator(cases, global_batch_size=4, patch_shape=(96, 96, 96),
                           divisor=16, foreground_fraction=0.33, random_flip=True,
                           seed=0, process_index=jax.process_index(),
                           process_count=jax.process_count())
  batch = next(it)       # {"image": float32 [b, x, y, z, c], "label": int32 [b, x, y, z]}
  state = it.get_state() # JSON-serialisable; it.set_state(state) resumes exactly

The global sample stream (the contract the multi-host trainer relies on):

* Global sample ``i = 0, 1, 2, ...`` uses case ``perm[i % n]`` of the ``n``
  cases, where ``perm`` is the permutation of epoch ``i // n``:
  ``np.random.default_rng([seed, epoch, 1]).permutation(n)``. Every epoch
  visits each case exactly once, in a new order. (grain's own
  ``MapDataset.shuffle`` is not used: its ``index_shuffle`` costs ~5 ms per
  element for a handful of cases, more than cropping a patch.)
* Its crop and flips come from ``np.random.default_rng([seed, i])`` only, so
  sample ``i`` is the same whoever computes it, in whichever process or worker.
* The global batch at step ``t`` is samples ``[t*B, (t+1)*B)``,
  ``B = global_batch_size``. Process ``p`` of ``P`` yields the contiguous slice
  ``[t*B + p*b, t*B + (p+1)*b)``, ``b = B // P``: concatenating the batches of
  processes ``0..P-1`` at step ``t`` gives the batch a single process yields.
  (The per-process dataset is the global stream batched by ``b`` and sliced
  ``[p::P]``.)

Because samples depend on the global index only, the batches are identical for
any ``worker_count`` and ``prefetch_batches``.

Foreground-centred patches (``foreground_fraction``) draw their centre as
:func:`tversky_jax.data.sampling.sample_patch` does: per class (nnU-Net) for
cases built with ``num_classes``, pooled over ``label > 0`` without. For binary
labels both give the same stream, unless a case has more than
``sampling.MAX_VOXELS_PER_CLASS`` foreground voxels (then the per-class list
is a fixed subset of them).
"""

from __future__ import annotations

import dataclasses
import functools
import mmap
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from tversky_jax.data import nifti, preprocessing, sampling


@dataclasses.dataclass(frozen=True, eq=False)
class TrainingCase:
  """One training case, preprocessed and cached in memory (or memory-mapped).

  Pickling (grain worker processes) sends a read-only memory map whose file
  is unchanged (``np.load(mmap_mode="r")`` of a whole ``.npy``) by path, so
  workers map the same file instead of copying the array; other arrays are
  copied.

  Attributes:
    case_id: the case identifier.
    image: ``float32 [x, y, z, c]``, channels last, NIfTI axis order, normalised
      (:func:`tversky_jax.data.nifti.normalize_image` or the plan's
      :func:`tversky_jax.data.preprocessing.normalize`).
    label: ``uint8 [x, y, z]``.
    foreground: :func:`tversky_jax.data.sampling.foreground_voxels` of
      `label`, computed once: ``int [n, 3]`` (``label > 0``, pooled) when
      `num_classes` is None, else ``{k: int32 [n_k, 3]}`` per foreground class
      present.
    num_classes: classes ``K`` (background included) the label values were
      checked against, or None (pooled foreground sampling).
  """

  case_id: str
  image: np.ndarray
  label: np.ndarray
  foreground: np.ndarray | Mapping[int, np.ndarray]
  num_classes: int | None = None

  @classmethod
  def from_arrays(
      cls, case_id: str, image: np.ndarray, label: np.ndarray, num_classes: int | None = None,
      max_voxels_per_class: int | None = sampling.MAX_VOXELS_PER_CLASS,
  ) -> TrainingCase:
    """Builds a case from an already normalised image and its label.

    Arrays already ``float32`` / ``uint8`` and C-contiguous (memory maps
    included) are kept, not copied.

    Args:
      case_id: the case identifier.
      image: ``[x, y, z, c]``, converted to ``float32``; not normalised here.
      label: ``[x, y, z]``, converted to ``uint8``.
      num_classes: None: foreground is ``label > 0``, pooled, and the values
        only need to fit ``uint8``. ``K``: per-class foreground sampling, and
        a value outside ``[0, K)`` is a ValueError.
      max_voxels_per_class: cap of each per-class voxel list
        (:func:`tversky_jax.data.sampling.foreground_voxels`).

    Raises:
      ValueError: bad shapes or label values.
    """
    if num_classes is not None:
      try:
        sampling.check_label_values(label, num_classes)
      except ValueError as e:
        raise ValueError(f"case {case_id!r}: {e}") from None
    else:
      _check_uint8_values(case_id, label)
    image = _contiguous(image, np.float32)
    label = _contiguous(label, np.uint8)
    if image.ndim != 4:
      raise ValueError(f"case {case_id!r}: image must be [x, y, z, c], got shape {image.shape}")
    if label.shape != image.shape[:3]:
      raise ValueError(
          f"case {case_id!r}: label shape {label.shape} must equal image spatial shape "
          f"{image.shape[:3]}"
      )
    foreground = sampling.foreground_voxels(label, num_classes, max_voxels_per_class)
    return cls(case_id, image, label, foreground,
               None if num_classes is None else int(num_classes))

  def __reduce__(self):
    return (_rebuild_case, (self.case_id, _MappedFile.of(self.image), _MappedFile.of(self.label),
                            self.foreground, self.num_classes))


def _contiguous(array: np.ndarray, dtype: type) -> np.ndarray:
  """`array` itself if it has `dtype` and is C-contiguous (keeps memory maps), else a copy."""
  if isinstance(array, np.ndarray) and array.dtype == dtype and array.flags.c_contiguous:
    return array
  return np.ascontiguousarray(array, dtype=dtype)


def _check_uint8_values(case_id: str, label: np.ndarray) -> None:
  label = np.asarray(label)
  if label.dtype == np.uint8 or label.dtype == np.bool_ or not label.size:
    return
  if label.min() < 0 or label.max() > 255:
    bad = np.unique(label[(label < 0) | (label > 255)])
    raise ValueError(f"case {case_id!r}: label value(s) {bad[:10].tolist()} do not fit uint8 "
                     "(pass num_classes to check them against the classes)")


@dataclasses.dataclass(frozen=True)
class _MappedFile:
  """A picklable reference to a read-only ``np.memmap`` of a whole file."""

  path: str
  dtype: str
  shape: tuple[int, ...]
  offset: int
  signature: tuple[int, int, int]  # inode, size, mtime_ns when pickled

  @classmethod
  def of(cls, array: np.ndarray) -> _MappedFile | np.ndarray:
    """The reference for a whole-file read-only memmap; `array` itself otherwise."""
    if not (isinstance(array, np.memmap) and isinstance(array.base, mmap.mmap)
            and array.filename and array.mode == "r" and array.flags.c_contiguous):
      return array
    try:
      stat = os.stat(array.filename)
    except OSError:
      return array
    return cls(array.filename, array.dtype.str, array.shape, int(array.offset),
               (stat.st_ino, stat.st_size, stat.st_mtime_ns))

  def open(self) -> np.memmap:
    stat = os.stat(self.path)
    if (stat.st_ino, stat.st_size, stat.st_mtime_ns) != self.signature:
      raise ValueError(f"{self.path} changed since its case was loaded (the preprocessed cache "
                       "was rebuilt during training?): reload the cases")
    return np.memmap(self.path, np.dtype(self.dtype), "r", self.offset, self.shape)


def _rebuild_case(case_id, image, label, foreground, num_classes) -> TrainingCase:
  image, label = (a.open() if isinstance(a, _MappedFile) else a for a in (image, label))
  return TrainingCase(case_id, image, label, foreground, num_classes)


def _progress(case_ids: list[str], desc: str, progress: bool) -> Iterable[str]:
  if not progress:
    return case_ids
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel

  return tqdm(case_ids, desc=desc, unit="case")


def load_training_cases(
    dataset: nifti.Dataset,
    case_ids: Iterable[str],
    split: nifti.Split = "train",
    progress: bool = True,
    num_classes: int | None = None,
) -> list[TrainingCase]:
  """Loads, normalises and caches cases for training.

  Each case is read with :func:`tversky_jax.data.nifti.load_case` and its image
  normalised with :func:`tversky_jax.data.nifti.normalize_image` (the one
  preprocessing function shared with inference).

  Args:
    dataset: from :func:`tversky_jax.data.nifti.read_dataset`.
    case_ids: the cases to load, in the order to keep.
    split: ``"train"`` or ``"test"`` (the split must have labels).
    progress: show a tqdm progress bar.
    num_classes: classes ``K`` incl. background for per-class foreground
      sampling (:meth:`TrainingCase.from_arrays`); None pools ``label > 0``.

  Returns:
    One :class:`TrainingCase` per id, in the order of `case_ids`.

  Raises:
    ValueError: `case_ids` is empty, a case has no label, or a label value
      is not in ``[0, num_classes)``.
    nifti.DatasetError: a case is unknown or a file is broken.
  """
  case_ids = list(case_ids)
  if not case_ids:
    raise ValueError("case_ids is empty: need at least one case to train on")
  cases = []
  for case_id in _progress(case_ids, f"loading {split} cases", progress):
    case = nifti.load_case(dataset, case_id, split)
    if case.label is None:
      raise ValueError(f"case {case_id!r} of the {split} split has no label file")
    cases.append(TrainingCase.from_arrays(case_id, nifti.normalize_image(case.image), case.label,
                                          num_classes))
  return cases


def load_preprocessed_cases(
    folder: str | os.PathLike[str],
    case_ids: Iterable[str],
    num_classes: int | None = None,
    progress: bool = True,
) -> list[TrainingCase]:
  """Memory-maps cases of the preprocessed cache for training.

  Each case is read with :func:`tversky_jax.data.preprocessing.load_preprocessed`
  (already cropped, normalised and resampled to the plan's grid); image and
  label stay read-only memory maps, only the foreground voxel lists are
  computed (one pass over each label). Grain worker processes reopen the
  maps by path instead of copying them (:class:`TrainingCase`).

  Args:
    folder: the cases folder (``preprocessing.CacheSummary.folder``,
      ``<preprocessed dir>/cases``).
    case_ids: the cases to load, in the order to keep.
    num_classes: classes ``K`` incl. background (``plan.num_classes``) for
      per-class foreground sampling; None pools ``label > 0``.
    progress: show a tqdm progress bar.

  Returns:
    One :class:`TrainingCase` per id, in the order of `case_ids`.

  Raises:
    ValueError: `case_ids` is empty, a case is not (completely) cached, or a
      label value is not in ``[0, num_classes)``.
  """
  case_ids = list(case_ids)
  if not case_ids:
    raise ValueError("case_ids is empty: need at least one case to train on")
  cases = []
  for case_id in _progress(case_ids, "loading preprocessed cases", progress):
    image, label, _ = preprocessing.load_preprocessed(folder, case_id)
    cases.append(TrainingCase.from_arrays(case_id, image, label, num_classes))
  return cases


# --------------------------------------------------------------------------
# Sample transform (top level: cloudpickled into grain worker processes)


@dataclasses.dataclass(frozen=True, eq=False)
class _MakeBatch(grain.transforms.MapWithIndex):
  """Block index ``k`` -> the batch of global samples ``[k*b, (k+1)*b)``.

  Each sample is cut straight into its place in the batch's arrays: no
  per-sample array is stacked afterwards (stacking was half the time of a
  batch of 2 x 128^3 patches with 3 channels).
  """

  cases: tuple[TrainingCase, ...]
  batch_size: int  # b: samples per process and step
  patch_shape: tuple[int, int, int] | None  # None: whole volume padded to `volume_shape`.
  volume_shape: tuple[int, int, int]
  foreground_fraction: float
  random_flip: bool
  seed: int

  def map_with_index(self, index: int, element: Any) -> dict[str, np.ndarray]:
    del element  # The batch depends on its block index only.
    size = self.patch_shape or self.volume_shape
    channels = self.cases[0].image.shape[-1]
    # Zeros: a sample that reaches into the padding leaves it as it is
    # (np.zeros costs no more than np.empty here: the kernel zeroes pages).
    image = np.zeros((self.batch_size, *size, channels), np.float32)
    label = np.zeros((self.batch_size, *size), np.int32)
    for i in range(self.batch_size):
      self._sample_into(index * self.batch_size + i, image[i], label[i])
    return {"image": image, "label": label}

  def _sample_into(self, index: int, image: np.ndarray, label: np.ndarray) -> None:
    """Writes global sample ``index`` into ``image [x, y, z, c]``, ``label [x, y, z]``."""
    epoch, position = divmod(index, len(self.cases))
    case = self.cases[_epoch_order(self.seed, len(self.cases), epoch)[position]]
    rng = np.random.default_rng([self.seed, index])
    if self.patch_shape is None:
      widths = sampling.center_pad_widths(case.label.shape, self.volume_shape)
      start = (0, 0, 0)
    else:
      widths, start = sampling.draw_patch(case.label.shape, self.patch_shape, rng,
                                          self.foreground_fraction, case.foreground)
    size = label.shape
    if not self.random_flip:
      sampling.crop_padded(case.image, widths, start, size, out=image)
      sampling.crop_padded(case.label, widths, start, size, out=label)
      return
    sampling.random_flip(sampling.crop_padded(case.image, widths, start, size),
                         sampling.crop_padded(case.label, widths, start, size), rng,
                         out=(image, label))


@functools.lru_cache(maxsize=16)
def _epoch_order(seed: int, num_cases: int, epoch: int) -> np.ndarray:
  """``int [num_cases]``: the case order of `epoch` (read-only, cached).

  The trailing 1 keeps this seed sequence apart from the per-sample ones,
  ``[seed, i]`` (numpy pads short entropy with zeros, so ``[seed, i] ==
  [seed, i, 0]`` but never ``[seed, epoch, 1]``).
  """
  order = np.random.default_rng([seed, epoch, 1]).permutation(num_cases)
  order.flags.writeable = False
  return order


def whole_volume_shape(
    cases: Sequence[TrainingCase], divisor: int | Sequence[int]
) -> tuple[int, int, int]:
  """Max spatial shape over `cases`, axis ``i`` rounded up to a multiple of ``divisor[i]``.

  The shape of whole-volume batches (``patch_shape=None``); `divisor` is an
  integer or one per axis ``(dx, dy, dz)``.
  """
  largest = np.max([c.label.shape for c in cases], axis=0)
  return sampling.round_up_shape(largest, divisor)


def _ensure_absl_flags_parsed() -> None:
  """grain reads its config from absl flags; outside an absl app they are unparsed."""
  from absl import flags  # pylint: disable=import-outside-toplevel

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _check_int(name: str, value: Any, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
  return int(value)


def _check_divisor(divisor: Any) -> tuple[int, int, int]:
  """`divisor` (an integer or 3) as 3 per-axis integers >= 1."""
  values = (divisor,) * 3 if np.ndim(divisor) == 0 else tuple(divisor)
  if len(values) != 3:
    raise ValueError(f"divisor must be an integer >= 1 or 3 of them (x, y, z), got {divisor!r}")
  return tuple(_check_int("divisor", v, 1) for v in values)  # type: ignore[return-value]


_NUM_SAMPLES = 2**40


def make_train_iterator(
    cases: Sequence[TrainingCase],
    *,
    global_batch_size: int,
    patch_shape: Sequence[int] | None,
    divisor: int | Sequence[int],
    foreground_fraction: float,
    random_flip: bool,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    worker_count: int = 0,
    prefetch_batches: int = 2,
) -> grain.DatasetIterator:
  """Returns the infinite, deterministic, resumable training-batch iterator.

  See the module docstring for the global sample stream and how it is split
  over processes.

  Args:
    cases: the cached training cases (:func:`load_training_cases`,
      :func:`load_preprocessed_cases`); all must have the same number of
      channels and the same ``num_classes``.
    global_batch_size: samples per step over all processes (``B``).
    patch_shape: ``(px, py, pz)``: random patches (:func:`sampling.sample_patch`;
      cases smaller than the patch are zero-padded, centred); each size must be
      a multiple of `divisor` (per axis). ``None`` or ``()``: whole volumes,
      every case zero-padded (centred) to the common shape, the largest case
      shape rounded up per axis to a multiple of `divisor`
      (:func:`whole_volume_shape`).
    divisor: spatial sizes must be multiples of it: an integer, e.g.
      ``2 ** depth`` for a U-Net with `depth` 2x2x2 poolings, or one per axis
      ``(dx, dy, dz)``, the product of the pooling strides of each axis.
    foreground_fraction: probability in ``[0, 1]`` that a patch is centred on a
      foreground voxel (patch mode only): of a class drawn uniformly among
      those present for cases with ``num_classes``, of any foreground voxel
      otherwise.
    random_flip: flip each spatial axis with probability 1/2
      (:func:`sampling.random_flip`), image and label together.
    seed: non-negative integer; the whole stream is a function of it.
    process_index: this process, ``jax.process_index()``.
    process_count: ``jax.process_count()``; must divide `global_batch_size`.
    worker_count: grain worker processes (``mp_prefetch``) that crop and flip in
      the background; 0 does it in this process. Does not change the batches.
    prefetch_batches: batches buffered ahead (per worker when
      ``worker_count > 0``; with ``worker_count == 0`` a background thread
      prepares them, 0 makes everything synchronous). Does not change the
      batches.

  Returns:
    A grain ``DatasetIterator`` that never ends, yielding
    ``{"image": float32 [b, x, y, z, c], "label": int32 [b, x, y, z]}`` with
    ``b = global_batch_size // process_count``. ``get_state()`` returns a
    JSON-serialisable state; ``set_state(state)`` on a fresh iterator built
    with the same arguments continues exactly where the state was taken (the
    state's layout is grain's and depends on `worker_count`: resume with the
    same `worker_count`). With ``worker_count > 0`` call ``close()`` when done
    to stop the workers; each worker holds its own copy of `cases`, except
    memory-mapped arrays (:func:`load_preprocessed_cases`), which it maps.

  Raises:
    ValueError: no cases, inconsistent cases, or a bad argument.
  """
  cases = tuple(cases)
  if not cases:
    raise ValueError("cases is empty: need at least one training case")
  num_channels = {c.image.shape[-1] for c in cases}
  if len(num_channels) != 1:
    raise ValueError(f"all cases must have the same number of channels, got {sorted(num_channels)}")
  num_classes = {c.num_classes for c in cases}
  if len(num_classes) != 1:
    raise ValueError(f"all cases must have the same num_classes (None: pooled foreground), got "
                     f"{sorted(num_classes, key=str)}")
  global_batch_size = _check_int("global_batch_size", global_batch_size, 1)
  divisors = _check_divisor(divisor)
  process_count = _check_int("process_count", process_count, 1)
  process_index = _check_int("process_index", process_index, 0)
  worker_count = _check_int("worker_count", worker_count, 0)
  prefetch_batches = _check_int("prefetch_batches", prefetch_batches, 0)
  seed = _check_int("seed", seed, 0)
  if process_index >= process_count:
    raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
  if global_batch_size % process_count:
    raise ValueError(
        f"global_batch_size ({global_batch_size}) must be divisible by process_count "
        f"({process_count}): every process takes an equal share of each batch"
    )
  if not 0.0 <= foreground_fraction <= 1.0:
    raise ValueError(f"foreground_fraction must be in [0, 1], got {foreground_fraction}")

  if patch_shape is None or len(patch_shape) == 0:
    patch: tuple[int, int, int] | None = None
    volume_shape = whole_volume_shape(cases, divisors)
  else:
    patch = tuple(patch_shape)  # type: ignore[assignment]
    if (len(patch) != 3
        or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in patch)
        or min(patch) < 1):
      raise ValueError(f"patch_shape must be 3 positive integers (or None/() for whole "
                       f"volumes), got {tuple(patch_shape)}")
    patch = tuple(int(s) for s in patch)  # type: ignore[assignment]
    if any(s % d for s, d in zip(patch, divisors)):  # type: ignore[arg-type]
      raise ValueError(f"patch_shape {patch} must be a multiple of divisor {divisor} on every "
                       "axis")
    volume_shape = patch  # type: ignore[assignment]

  local_batch_size = global_batch_size // process_count
  transform = _MakeBatch(cases, local_batch_size, patch, volume_shape,
                         float(foreground_fraction), bool(random_flip), seed)
  # Block k = global samples [k*b, (k+1)*b); effectively infinite (2**40
  # samples). A truly infinite dataset has length sys.maxsize, which grain
  # cannot slice.
  ds = grain.MapDataset.range(_NUM_SAMPLES // local_batch_size).map_with_index(transform)
  ds = ds[process_index::process_count]  # step t = block t*P + p
  if worker_count > 0:
    _ensure_absl_flags_parsed()
    iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=worker_count, per_worker_buffer_size=max(prefetch_batches, 1)))
  else:
    iter_ds = ds.to_iter_dataset(grain.ReadOptions(
        num_threads=1 if prefetch_batches else 0, prefetch_buffer_size=prefetch_batches))
  return iter_ds.__iter__()

