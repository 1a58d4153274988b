"""Whole-volume sliding-window inference, shared by validation and prediction.

Conventions:

* **Channels last, NIfTI axis order.** An image is a host array
  ``[x, y, z, channels]`` (already intensity-normalised); the result is
  ``[x, y, z, classes]`` softmax probabilities, float32, on the host.
* **Model-agnostic.** The model enters as ``logits_fn``, any function mapping a
  device array ``[n, wx, wy, wz, channels]`` to logits
  ``[n, wx, wy, wz, classes]``. The caller jits it (for a Flax NNX model, jit a
  function that merges the graph and state and applies the model). Its
  parameters must be uncommitted or replicated over the ``devices`` given
  here. Parameters placed on a mesh with Explicit axes (``jax.make_mesh``'s
  default) need that mesh set: call this inside ``jax.set_mesh(mesh)``; the windows
  then use the context mesh's axis type. (The training loop instead copies
  the parameters onto a local mesh with Auto axes.)
* **Blending.** Overlapping windows are averaged with an nnU-Net-style
  Gaussian importance map ``w`` (high in the window centre, where the network
  sees the most context): ``p(v) = sum_k w_k(v) p_k(v) / sum_k w_k(v)``.
  Softmax is taken per window before blending, in float32 on the device.
* **Memory.** The full-resolution accumulators (the weighted probability sum
  and the weight sum) are numpy arrays on the host; the device only ever
  holds one batch of ``batch_size`` windows (two while the next batch is being
  computed and the previous one is copied back), so a 256^3 volume needs no
  more device memory than a few windows.
* **Devices.** Each batch is padded to a multiple of ``len(devices)`` and
  sharded along its first axis with a ``NamedSharding`` over a 1-D mesh axis
  ``"data"``, so the windows of a batch are spread over all devices. For one
  volume every call of ``logits_fn`` sees the same batch shape and sharding;
  the batch is the smallest that needs as many calls as ``batch_size``
  would (9 windows with ``batch_size=4``: three calls of 3, not of 4 with
  3 padding windows computed for nothing), so volumes with different window
  counts compile at most ``batch_size`` shapes in all.
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

LogitsFn = Callable[[jax.Array], jax.Array]

# Floor of the importance map. A pure Gaussian with a small sigma_scale
# underflows float32 in the window corners; a voxel covered only by such
# corners would then get weight sum 0 and a 0/0 probability.
_MIN_IMPORTANCE = 1e-6

# The 8 flip combinations of the three spatial axes of a [n, x, y, z, c] batch.
_MIRROR_AXES: tuple[tuple[int, ...], ...] = ((), (1,), (2,), (3,), (1, 2),
                                             (1, 3), (2, 3), (1, 2, 3))


def _check_window(window: Sequence[int]) -> tuple[int, int, int]:
  try:
    items = tuple(window)
  except TypeError:
    raise ValueError(
        f"window must be 3 positive ints, got {window!r}") from None
  if len(items) != 3 or not all(
      isinstance(w, numbers.Integral) and not isinstance(w, bool) and w > 0
      for w in items):
    raise ValueError(f"window must be 3 positive ints, got {window!r}")
  return tuple(int(w) for w in items)  # type: ignore[return-value]


def _check_overlap(overlap: float) -> float:
  if (not isinstance(overlap, numbers.Real) or isinstance(overlap, bool)
      or not 0.0 <= overlap < 1.0):
    raise ValueError(f"overlap must be a number in [0, 1), got {overlap!r}")
  return float(overlap)


def gaussian_importance_map(window: Sequence[int],
                            sigma_scale: float = 0.125) -> np.ndarray:
  """Gaussian blending weights for one window, as in nnU-Net.

  Args:
    window: the window size ``(wx, wy, wz)``.
    sigma_scale: the standard deviation along each axis as a fraction of the
      window size along that axis.

  Returns:
    float32 ``[wx, wy, wz]``: a separable Gaussian centred at ``(w - 1) / 2``
    on every axis (so the map is symmetric under flips of any axis), scaled
    to a maximum of exactly 1, with values below 1e-6 raised to 1e-6 so that
    no voxel of a window ever gets zero weight.
  """
  window = _check_window(window)
  if not sigma_scale > 0:
    raise ValueError(f"sigma_scale must be positive, got {sigma_scale!r}")
  profiles = []
  for size in window:
    coords = np.arange(size, dtype=np.float64) - (size - 1) / 2
    sigma = sigma_scale * size
    profiles.append(np.exp(-0.5 * (coords / sigma) ** 2))
  gauss = (profiles[0][:, None, None] * profiles[1][None, :, None]
           * profiles[2][None, None, :])
  gauss /= gauss.max()
  return np.maximum(gauss, _MIN_IMPORTANCE).astype(np.float32)


def _axis_starts(size: int, window: int, step: int) -> list[int]:
  if size <= window:
    return [0]
  starts = list(range(0, size - window, step))
  starts.append(size - window)  # the last tile is flush with the end
  return starts


def window_starts(volume_shape: Sequence[int], window: Sequence[int],
                  overlap: float) -> list[tuple[int, int, int]]:
  """Start corners of the windows that tile a volume.

  Along each axis the starts are ``0, step, 2 * step, ...`` with
  ``step = max(1, floor(window * (1 - overlap)))``, plus one last start
  ``size - window`` so the last tile ends flush with the volume (it may
  overlap its neighbour by more than ``overlap``). An axis shorter than the
  window has the single start 0: ``sliding_window_inference`` pads such an
  axis to the window size before tiling (and crops the result back), so the
  tiles of such an axis cover ``[0, window)`` of the padded volume.

  Args:
    volume_shape: the spatial shape ``(x, y, z)``.
    window: the window size ``(wx, wy, wz)``.
    overlap: fraction of the window shared by neighbouring tiles, in [0, 1).

  Returns:
    A list of ``(sx, sy, sz)`` in C order (z fastest), every window lying
    within ``max(volume_shape, window)`` on every axis.
  """
  window = _check_window(window)
  overlap = _check_overlap(overlap)
  shape = tuple(int(s) for s in volume_shape)
  if len(shape) != 3 or any(s < 1 for s in shape):
    raise ValueError(
        f"volume_shape must be 3 positive ints, got {volume_shape!r}")
  # The epsilon keeps e.g. 10 * (1 - 0.7) = 2.9999999999999996 from becoming 2.
  steps = [max(1, int(w * (1.0 - overlap) + 1e-9)) for w in window]
  per_axis = [_axis_starts(s, w, st) for s, w, st in zip(shape, window, steps)]
  return [(a, b, c) for a in per_axis[0] for b in per_axis[1]
          for c in per_axis[2]]


@functools.partial(jax.jit, static_argnames=("axes", "sharding"))
def _flip(x: jax.Array, axes: tuple[int, ...],
          sharding: NamedSharding) -> jax.Array:
  # Pinning the output sharding keeps every logits_fn call on one
  # (shape, sharding) signature, i.e. one compilation.
  return jax.lax.with_sharding_constraint(jnp.flip(x, axes), sharding)


@functools.partial(jax.jit, static_argnames=("axes",))
def _add_probs(total: jax.Array | None, logits: jax.Array,
               axes: tuple[int, ...]) -> jax.Array:
  """total + flip(softmax(logits)), the softmax in float32."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  if axes:
    probs = jnp.flip(probs, axes)
  return probs if total is None else total + probs


@jax.jit
def _weigh(total: jax.Array, importance: jax.Array,
           scale: float) -> jax.Array:
  return total * (importance[None, ..., None] * scale)


def _resolve_devices(devices: Sequence[jax.Device] | None) -> list[jax.Device]:
  if devices is None:
    return list(jax.local_devices())
  devices = list(devices)
  if not devices:
    raise ValueError("devices must not be empty")
  here = jax.process_index()
  if any(d.process_index != here for d in devices):
    raise ValueError(
        "sliding_window_inference runs within one process; every device "
        "must be addressable by it (use jax.local_devices())")
  return devices


def _data_mesh(devices: list[jax.Device]) -> tuple[Mesh, bool]:
  """A 1-D mesh "data" over devices, compatible with the caller's mesh.

  Inside ``jax.set_mesh`` (a caller's Explicit-axis mesh), arrays must
  live on the context mesh, so the window axis copies the axis type of the
  context's "data" axis (``jax.make_mesh`` makes it Explicit) and the mesh is
  made the context mesh while we run; over the same devices it then equals
  the training mesh and parameters replicated on it are used in place.
  Returns the mesh and whether it must be entered with ``jax.set_mesh``.
  """
  context = jax.sharding.get_abstract_mesh()
  axis_type = AxisType.Auto
  if not context.empty and "data" in context.axis_names:
    axis_type = context.axis_types[context.axis_names.index("data")]
  mesh = Mesh(np.asarray(devices), ("data",), axis_types=(axis_type,))
  return mesh, not context.empty


def sliding_window_inference(
    logits_fn: LogitsFn,
    image: np.ndarray,
    *,
    window: Sequence[int],
    overlap: float = 0.5,
    batch_size: int = 4,
    mirror: bool = False,
    progress: bool = False,
    devices: Sequence[jax.Device] | None = None,
) -> np.ndarray:
  """Softmax probabilities of a whole volume, blended over overlapping windows.

  Args:
    logits_fn: maps a device array ``[n, wx, wy, wz, channels]`` (float32)
      to logits ``[n, wx, wy, wz, classes]``; jitted by the caller. For one
      volume it is always called with the same ``n`` and sharding: at most
      ``batch_size`` rounded up to a multiple of ``len(devices)``, and as
      small as the same number of calls allows (``_balanced_batch``).
    image: host array ``[x, y, z, channels]``, channels last, NIfTI axis
      order, already normalised. Sent to the device as float32.
    window: window size ``(wx, wy, wz)``. An axis of the image shorter than
      the window is zero-padded to the window size, symmetrically (the
      content stays in the middle of the window, where the network has
      context on both sides), and the result cropped back.
    overlap: fraction of the window shared by neighbouring tiles, in [0, 1);
      see ``window_starts``.
    batch_size: windows per ``logits_fn`` call (before rounding up to a
      multiple of the device count). Bounds device memory.
    mirror: test-time augmentation: average the probabilities of the 8 flip
      combinations of the three spatial axes (flip the window, run the
      model, flip the probabilities back). 8 times the compute.
    progress: show a tqdm progress bar over the windows.
    devices: the devices the windows of a batch are spread over, all
      addressable by this process. Defaults to ``jax.local_devices()``
      (identical to ``jax.devices()`` in a single process; in a multi-host
      job each process predicts its own volumes on its own devices).

  Returns:
    float32 ``[x, y, z, classes]`` on the host: per voxel
    ``sum_k w_k p_k / sum_k w_k`` over the windows ``k`` containing it, with
    ``p_k`` the window's softmax probabilities (mirror-averaged when
    ``mirror``) and ``w_k`` its ``gaussian_importance_map``. Sums to 1 over
    classes.

  Raises:
    ValueError: on an image that is not 4-D, a window that is not 3 positive
      ints, an overlap outside [0, 1), a batch_size below 1, no devices, or
      logits of an unexpected shape.
  """
  image = np.asarray(image)
  if image.ndim != 4:
    raise ValueError(
        f"image must be 4-D [x, y, z, channels], got shape {image.shape}")
  if 0 in image.shape:
    raise ValueError(f"image must not be empty, got shape {image.shape}")
  window = _check_window(window)
  overlap = _check_overlap(overlap)
  if (not isinstance(batch_size, numbers.Integral)
      or isinstance(batch_size, bool) or batch_size < 1):
    raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
  devices = _resolve_devices(devices)

  image, crop = _pad_to_window(image.astype(np.float32, copy=False), window)
  starts = window_starts(image.shape[:3], window, overlap)
  n_batch = _balanced_batch(len(starts), batch_size, len(devices))
  mesh, enter_mesh = _data_mesh(devices)
  importance = gaussian_importance_map(window)
  with (jax.set_mesh(mesh) if enter_mesh else contextlib.nullcontext(),
        tqdm(total=len(starts), disable=not progress, unit="window",
             desc="sliding window") as bar):
    prob_sum = _weighted_probability_sum(
        logits_fn, image, starts, window, n_batch, mesh, importance,
        _MIRROR_AXES if mirror else ((),), bar.update)
  weight_sum = _weight_sum(image.shape[:3], starts, window, importance)
  prob_sum /= weight_sum[..., None]
  return prob_sum if crop is None else np.ascontiguousarray(prob_sum[crop])


def _balanced_batch(num_windows: int, batch_size: int, num_devices: int
                    ) -> int:
  """Windows per call: the fewest calls ``batch_size`` allows (rounded up
  to a multiple of the device count), with as little padding as they allow,
  e.g. 9 windows, batch 4, 1 device: 3 (three calls of 3, none padded)."""
  per_call = math.ceil(batch_size / num_devices) * num_devices
  calls = math.ceil(num_windows / per_call)
  return math.ceil(math.ceil(num_windows / calls) / num_devices) * num_devices


def _window_box(start: Sequence[int], window: Sequence[int]
                ) -> tuple[slice, slice, slice]:
  """The spatial slices of the window at ``start`` ``(sx, sy, sz)``."""
  sx, sy, sz = start
  wx, wy, wz = window
  return slice(sx, sx + wx), slice(sy, sy + wy), slice(sz, sz + wz)


def _pad_to_window(image: np.ndarray, window: tuple[int, int, int]
                   ) -> tuple[np.ndarray, tuple[slice, ...] | None]:
  """``(padded image, crop)``: every spatial axis of ``image`` ``[x, y, z,
  c]`` shorter than the window zero-padded to it, symmetrically (the content
  in the middle of the window, where the network has context on both
  sides); ``crop`` takes the original ``[x, y, z]`` back out (None: no
  padding)."""
  shape = image.shape[:3]
  pad_before = [max(0, w - s) // 2 for s, w in zip(shape, window)]
  pad_after = [max(0, w - s) - b for s, w, b in zip(shape, window, pad_before)]
  if not any(pad_before) and not any(pad_after):
    return image, None
  image = np.pad(image, list(zip(pad_before, pad_after)) + [(0, 0)])
  return image, tuple(slice(b, b + s) for b, s in zip(pad_before, shape))


def _weight_sum(shape: tuple[int, ...], starts: list[tuple[int, int, int]],
                window: tuple[int, int, int],
                importance: np.ndarray) -> np.ndarray:
  """float32 ``[x, y, z]``: the sum of the windows' importance maps (the
  blending denominator ``sum_k w_k``); it depends on the tiling only."""
  weight_sum = np.zeros(shape, np.float32)
  for start in starts:
    weight_sum[_window_box(start, window)] += importance
  return weight_sum


def _weighted_probability_sum(
    logits_fn: LogitsFn, image: np.ndarray, starts: list[tuple[int, int, int]],
    window: tuple[int, int, int], n_batch: int, mesh: Mesh,
    importance: np.ndarray, flips: tuple[tuple[int, ...], ...],
    advance: Callable[[int], object],
) -> np.ndarray:
  """float32 ``[x, y, z, classes]`` on the host: ``sum_k w_k p_k`` over the
  windows at ``starts`` of ``image`` ``[x, y, z, channels]``.

  The windows go to the devices in batches of ``n_batch`` sharded over
  ``mesh``'s "data" axis, ``p_k`` averaged over the ``flips``. Batch k+1 is
  dispatched before batch k is copied back, so the device computes while the
  host accumulates (JAX dispatch is asynchronous); ``advance(n)`` is called
  as each batch of ``n`` windows is added.
  """
  batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
  importance_dev = jax.device_put(importance,
                                  NamedSharding(mesh, PartitionSpec()))
  scale = 1.0 / len(flips)
  prob_sum: np.ndarray | None = None
  pending = None
  for first in range(0, len(starts), n_batch):
    batch_starts = starts[first:first + n_batch]
    host = np.zeros((n_batch, *window, image.shape[3]), np.float32)
    for i, start in enumerate(batch_starts):
      host[i] = image[_window_box(start, window)]
    x = jax.device_put(host, batch_sharding)
    weighted = _weigh(_flipped_probabilities(logits_fn, x, flips,
                                             batch_sharding),
                      importance_dev, scale)
    if pending is not None:
      prob_sum = _add_windows(prob_sum, *pending, image.shape[:3], window)
      advance(len(pending[1]))
    pending = (weighted, batch_starts)
  prob_sum = _add_windows(prob_sum, *pending, image.shape[:3], window)
  advance(len(pending[1]))
  return prob_sum


def _flipped_probabilities(logits_fn: LogitsFn, x: jax.Array,
                           flips: tuple[tuple[int, ...], ...],
                           sharding: NamedSharding) -> jax.Array:
  """Sum over ``flips`` of the softmax probabilities of the flipped batch
  ``x`` ``[n, wx, wy, wz, channels]``, each flipped back: float32 ``[n, wx,
  wy, wz, classes]`` on the devices."""
  total = None
  for axes in flips:
    logits = logits_fn(_flip(x, axes, sharding) if axes else x)
    if logits.ndim != 5 or tuple(logits.shape[:4]) != tuple(x.shape[:4]):
      raise ValueError(
          "logits_fn must map [n, wx, wy, wz, channels] to "
          f"[n, wx, wy, wz, classes]; got {logits.shape} for input "
          f"{x.shape}")
    total = _add_probs(total, logits, axes)
  return total


def _add_windows(prob_sum: np.ndarray | None, weighted: jax.Array,
                 batch_starts: list[tuple[int, int, int]],
                 shape: tuple[int, ...],
                 window: tuple[int, int, int]) -> np.ndarray:
  """Adds the weighted probabilities ``[n, wx, wy, wz, classes]`` of the
  windows at ``batch_starts`` into ``prob_sum`` ``[x, y, z, classes]``
  (allocated on the first call, once the class count is known)."""
  weighted = np.asarray(weighted)
  if prob_sum is None:
    prob_sum = np.zeros((*shape, weighted.shape[-1]), np.float32)
  for i, start in enumerate(batch_starts):
    prob_sum[_window_box(start, window)] += weighted[i]
  return prob_sum
