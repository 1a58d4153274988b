"""The Tversky loss family as pure JAX functions.

Reference: S. S. M. Salehi, D. Erdogmus, A. Gholipour, "Tversky loss function
for image segmentation using 3D fully convolutional deep networks", MLMI 2017,
arXiv:1706.05721.

Conventions used throughout this module:

* **Channels last.** ``predictions`` are ``[batch, *spatial, classes]`` with any
  number of spatial dimensions (2D slices and 3D volumes both work; for NIfTI
  volumes the spatial axes are the file's ``x, y, z``).
* **Labels** are either an integer class map ``[batch, *spatial]`` or a one-hot
  / soft map ``[batch, *spatial, classes]`` with values in ``[0, 1]``.
* **alpha weighs false positives, beta weighs false negatives**, as in the
  paper: ``TI = TP / (TP + alpha * FP + beta * FN)``. (Abraham & Khan's focal
  Tversky paper swaps the two names; this module never does. MONAI's
  ``TverskyLoss`` and optax's ``dice_loss`` use the same convention as here.)
  alpha = beta = 0.5 is the Dice coefficient, alpha = beta = 1 the Jaccard
  index, and alpha + beta = 1 the F-beta family (alpha = 0.2, beta = 0.8 is
  F2).
* **Soft counts** are the paper's Eq. 3 sums over voxels ``i``:
  ``TP = sum p_i g_i``, ``FP = sum p_i (1 - g_i)``, ``FN = sum (1 - p_i) g_i``.
  ``squared_pred=True`` uses V-Net's squared sums instead, with FP and FN
  defined as MONAI does for ``DiceLoss(squared_pred=True)``:
  ``TP = sum p_i g_i``, ``FP = sum p_i^2 - TP``, ``FN = sum g_i^2 - TP``, so
  alpha = beta = 0.5 gives ``2TP / (sum p^2 + sum g^2)``.
* **Smoothing.** ``TI = (TP + smooth_nr) / (TP + alpha FP + beta FN +
  smooth_dr)``. Each of ``smooth_nr`` and ``smooth_dr`` that is not given
  (None) takes the value of ``smooth`` (default 1e-5), so ``smooth`` alone
  means both, as before, and a given ``smooth_nr`` / ``smooth_dr`` always wins.
  With equal smoothing a class with neither ground truth nor prediction has
  index 1 and loss 0; with ``smooth_nr=0`` it has index 0 and loss 1. While
  ``smooth_dr > 0`` the denominator never falls below it, so the gradient is
  finite for all-background volumes, all-foreground volumes and extreme
  logits.
* **Background.** ``include_background=None`` (the default) drops softmax class
  0 (the paper's loss is on the lesion class) and keeps every sigmoid channel
  (independent regions). ``False`` drops channel 0 whatever the activation,
  as MONAI does; ``True`` keeps every channel. A single channel is always kept
  (MONAI too: it warns and ignores ``include_background=False``).
* **Labels outside the classes.** A class-map value that is not a class
  (``< 0`` or ``>= classes``; for a single sigmoid channel, not 0 or 1) and is
  not ``ignore_index`` raises ValueError when the labels are concrete. Under
  ``jax.jit`` (traced labels) the values cannot be checked, and such voxels are
  dropped from every sum, like ``ignore_index`` voxels. The metrics in
  :mod:`tversky_jax.metrics` follow the same rule.
* **Precision.** Inputs of any float dtype (bfloat16 included) are accumulated
  in float32 (float64 when given float64 inputs with ``jax_enable_x64``).
* **Transformations.** Nothing here branches in Python on array values, so all
  functions work under ``jax.jit``, ``jax.grad`` and ``jax.vmap`` (for example
  over a grid of alpha and beta), and inside ``jax.pmap`` / ``jax.shard_map``
  with ``axis_name``. Argument checks that need values (negative alpha, labels
  out of range) run only when those values are concrete, once per call.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
ArrayLike = jax.typing.ArrayLike

ACTIVATIONS = ("softmax", "sigmoid")
REDUCTIONS = ("mean", "sum", "none")

__all__ = [
    "confusion_stats",
    "tversky_index",
    "tversky_loss",
    "dice_loss",
    "jaccard_loss",
    "focal_tversky_loss",
    "tversky_ce_loss",
]


# --------------------------------------------------------------------------
# Argument checking
# --------------------------------------------------------------------------


def _concrete(x: Any) -> np.ndarray | None:
  """Returns ``x`` as a NumPy array, or None when it is traced (under jit...)
  or spread over hosts (then its values cannot be checked here)."""
  try:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return None
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError,
          jax.errors.ConcretizationTypeError):
    return None


def _check_nonnegative(name: str, value: Any, fn: str) -> None:
  concrete = _concrete(value)
  if concrete is not None and concrete.size and np.any(concrete < 0):
    raise ValueError(f"{fn}: `{name}` must be >= 0, got {concrete.tolist()}.")


def _check_choice(name: str, value: str, choices: Sequence[str], fn: str):
  if not isinstance(value, str) or value not in choices:
    raise ValueError(
        f"{fn}: unknown `{name}`={value!r}; expected one of {list(choices)}.")


def _check_bool(name: str, value: Any, fn: str, allow_none: bool = False):
  if value is None and allow_none:
    return
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(
        f"{fn}: `{name}` must be a Python bool"
        + (" or None" if allow_none else "") + f", got {value!r}.")


def _check_options(fn: str, *, alpha, beta, gamma, smooth, smooth_nr,
                   smooth_dr, reduction, reductions, from_logits, activation,
                   include_background, soft_label, squared_pred,
                   pool_batch) -> tuple[Any, Any]:
  """Checks the non-array options of a loss once; returns ``(nr, dr)``."""
  _check_choice("activation", activation, ACTIVATIONS, fn)
  _check_choice("reduction", reduction, reductions, fn)
  for name, value in (("from_logits", from_logits), ("soft_label", soft_label),
                      ("squared_pred", squared_pred),
                      ("pool_batch", pool_batch)):
    _check_bool(name, value, fn)
  _check_bool("include_background", include_background, fn, allow_none=True)
  nr = smooth if smooth_nr is None else smooth_nr
  dr = smooth if smooth_dr is None else smooth_dr
  for name, value in (("alpha", alpha), ("beta", beta), ("smooth", smooth),
                      ("smooth_nr", nr), ("smooth_dr", dr)):
    _check_nonnegative(name, value, fn)
  if gamma is not None:
    concrete = _concrete(gamma)
    if concrete is not None and np.any(concrete <= 0):
      raise ValueError(f"{fn}: `gamma` must be > 0, got {concrete.tolist()}.")
  return nr, dr


# --------------------------------------------------------------------------
# Per-class probabilities, targets and voxel weights
# --------------------------------------------------------------------------


def _accumulation_dtype(dtype) -> jnp.dtype:
  return jnp.promote_types(dtype, jnp.float32)


def _class_slices(x: Array) -> list[Array]:
  # The class axis is tiny (2 for the paper) and last in memory. Reductions
  # and softmax over such an axis vectorise badly on CPU, so every class is
  # handled as its own [batch, *spatial] array; XLA fuses the per-class
  # elementwise work into one pass over the voxels (4x faster than
  # jax.nn.softmax + one_hot on 2 classes, see bench/bench_losses.py).
  return [x[..., c] for c in range(x.shape[-1])]


def _probabilities(predictions: Array, from_logits: bool,
                   activation: str) -> list[Array]:
  """Per-class probabilities, each ``[batch, *spatial]``."""
  x = predictions.astype(_accumulation_dtype(predictions.dtype))
  slices = _class_slices(x)
  if not from_logits:
    return slices
  if activation == "sigmoid":
    return [jax.nn.sigmoid(s) for s in slices]
  if len(slices) == 2:
    # Softmax of two logits is the sigmoid of their difference: one exp.
    p1 = jax.nn.sigmoid(slices[1] - slices[0])
    return [1.0 - p1, p1]
  return list(_softmax_classes(x))


def _softmax_of_slices(x: Array) -> tuple[Array, ...]:
  slices = _class_slices(x)
  m = slices[0]
  for s in slices[1:]:
    m = jnp.maximum(m, s)
  exps = [jnp.exp(s - m) for s in slices]
  total = exps[0]
  for e in exps[1:]:
    total = total + e
  inv = 1.0 / total
  return tuple(e * inv for e in exps)


@jax.custom_jvp
def _softmax_classes(x: Array) -> tuple[Array, ...]:
  """Softmax over the last axis of ``x``, one ``[batch, *spatial]`` per class.

  The JVP is given in closed form, ``dp_c = p_c (dx_c - sum_j p_j dx_j)``:
  differentiating through the max-subtracted exponentials instead makes
  XLA:CPU run the backward pass 1.5x slower for 4 classes. A custom JVP
  (rather than VJP) keeps forward-mode differentiation working.
  """
  return _softmax_of_slices(x)


@_softmax_classes.defjvp
def _softmax_classes_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  probs = _softmax_of_slices(x)
  dxs = _class_slices(dx)
  mean = probs[0] * dxs[0]
  for p, d in zip(probs[1:], dxs[1:]):
    mean = mean + p * d
  return probs, tuple(p * (d - mean) for p, d in zip(probs, dxs))


def _log_probabilities(predictions: Array, from_logits: bool,
                       activation: str) -> tuple[list[Array], list[Array]]:
  """Per-class ``(log p, log (1 - p))``, each ``[batch, *spatial]``.

  Computed from the logits where possible, so extreme logits stay finite.
  """
  x = predictions.astype(_accumulation_dtype(predictions.dtype))
  slices = _class_slices(x)
  if not from_logits:
    tiny = jnp.finfo(x.dtype).tiny
    return ([jnp.log(jnp.clip(s, tiny, 1.0)) for s in slices],
            [jnp.log(jnp.clip(1.0 - s, tiny, 1.0)) for s in slices])
  if activation == "sigmoid":
    return ([jax.nn.log_sigmoid(s) for s in slices],
            [jax.nn.log_sigmoid(-s) for s in slices])
  m = slices[0]
  for s in slices[1:]:
    m = jnp.maximum(m, s)
  total = jnp.exp(slices[0] - m)
  for s in slices[1:]:
    total = total + jnp.exp(s - m)
  log_z = m + jnp.log(total)
  log_p = [s - log_z for s in slices]
  # log(1 - p) is only needed for the sigmoid (binary) cross-entropy.
  return log_p, []


def _targets(labels: Array, predictions: Array, activation: str,
             ignore_index: int | None, fn: str) -> tuple[list[Array], Array | None]:
  """Per-class targets ``g_c`` (each ``[batch, *spatial]``) and a validity mask.

  ``labels`` is an integer class map ``[batch, *spatial]`` or one-hot / soft
  labels of the shape of ``predictions`` ``[batch, *spatial, classes]``.
  Raises ValueError for shapes that do not fit ``predictions`` and, when the
  labels are concrete, for values out of range. For traced class maps the
  mask drops the voxels whose label is not a class (see the module
  docstring).
  """
  if labels.ndim == predictions.ndim - 1:
    return _class_map_targets(labels, predictions, activation, ignore_index,
                              fn)
  if labels.ndim == predictions.ndim:
    return _soft_targets(labels, predictions, ignore_index, fn), None
  raise ValueError(
      f"{fn}: `labels` has shape {labels.shape}; expected "
      f"{predictions.shape[:-1]} (integer class map) or {predictions.shape} "
      f"(one-hot or soft) for `predictions` of shape {predictions.shape}.")


def _class_map_targets(labels: Array, predictions: Array, activation: str,
                       ignore_index: int | None, fn: str
                       ) -> tuple[list[Array], Array | None]:
  """:func:`_targets` of an integer class map ``labels`` ``[batch, *spatial]``.

  Softmax: one target ``labels == c`` per class; a single sigmoid channel:
  the one target ``labels == 1`` of a binary map.
  """
  _check_class_map(labels, predictions, activation, ignore_index, fn)
  num_classes = predictions.shape[-1]
  # A single sigmoid channel takes a binary map {0, 1}.
  num_values = 2 if activation == "sigmoid" else num_classes
  valid = _class_map_validity(labels, num_values, ignore_index, fn)
  dtype = _accumulation_dtype(predictions.dtype)
  if activation == "sigmoid":
    return [(labels == 1).astype(dtype)], valid
  return [(labels == c).astype(dtype) for c in range(num_classes)], valid


def _check_class_map(labels: Array, predictions: Array, activation: str,
                     ignore_index: int | None, fn: str) -> None:
  """Raises ValueError unless the class map ``labels`` (shape, dtype) and
  ``ignore_index`` fit ``predictions`` and ``activation``."""
  num_classes = predictions.shape[-1]
  spatial_shape = predictions.shape[:-1]
  if labels.shape != spatial_shape:
    raise ValueError(
        f"{fn}: `labels` class map has shape {labels.shape}, expected "
        f"{spatial_shape} to match `predictions` {predictions.shape} "
        "([batch, *spatial, classes]).")
  if not jnp.issubdtype(labels.dtype, jnp.integer) and labels.dtype != bool:
    raise ValueError(
        f"{fn}: `labels` of shape {labels.shape} is a class map and must "
        f"have an integer dtype, got {labels.dtype}. Pass one-hot or soft "
        f"labels with shape {predictions.shape} instead.")
  if activation == "sigmoid" and num_classes != 1:
    raise ValueError(
        f"{fn}: with activation='sigmoid' the classes are independent "
        f"regions, so `labels` must have the shape of `predictions` "
        f"{predictions.shape}; got a class map {labels.shape}. (A class map "
        "is accepted only for a single sigmoid channel.)")
  if ignore_index is not None and 0 <= ignore_index < max(num_classes, 2):
    raise ValueError(
        f"{fn}: `ignore_index`={ignore_index} is a class index; use a value "
        f"outside [0, {max(num_classes, 2)}) such as -1 or 255.")


def _class_map_validity(labels: Array, num_values: int,
                        ignore_index: int | None, fn: str) -> Array | None:
  """The voxels of a class map to count (None: all of them).

  Concrete labels are checked: a value outside ``[0, num_values)`` other
  than ``ignore_index`` raises ValueError, and only the ``ignore_index``
  voxels are dropped. Traced values cannot be checked, so every voxel whose
  label is not a class (``ignore_index`` included, as it lies outside
  ``[0, num_values)``) is dropped.
  """
  concrete = _concrete(labels)
  if concrete is None:
    if labels.dtype == bool and num_values >= 2:
      return None
    return (labels >= 0) & (labels < num_values)
  if concrete.size:
    values = concrete.astype(np.int64)
    bad = (values < 0) | (values >= num_values)
    if ignore_index is not None:
      bad &= values != ignore_index
    if np.any(bad):
      raise ValueError(
          f"{fn}: `labels` contains values "
          f"{np.unique(values[bad])[:10].tolist()} outside "
          f"[0, {num_values - 1}] ({num_values} classes)"
          + ("; pass ignore_index to skip voxels" if ignore_index is None
             else f", and not ignore_index={ignore_index}") + ".")
  return None if ignore_index is None else labels != ignore_index


def _soft_targets(labels: Array, predictions: Array, ignore_index: int | None,
                  fn: str) -> list[Array]:
  """:func:`_targets` of one-hot or soft ``labels`` of the shape of
  ``predictions``; their values must lie in [0, 1] (checked when concrete)."""
  if labels.shape != predictions.shape:
    raise ValueError(
        f"{fn}: `labels` has shape {labels.shape}, expected "
        f"{predictions.shape} (the shape of `predictions`) for one-hot or "
        f"soft labels, or {predictions.shape[:-1]} for an integer class map.")
  if ignore_index is not None:
    raise ValueError(
        f"{fn}: `ignore_index` needs an integer class map `labels` "
        f"{predictions.shape[:-1]}; for one-hot or soft labels use `mask`.")
  concrete = _concrete(labels)
  if concrete is not None and concrete.size and (
      np.min(concrete) < 0 or np.max(concrete) > 1):
    raise ValueError(
        f"{fn}: one-hot or soft `labels` must lie in [0, 1], got values in "
        f"[{np.min(concrete)}, {np.max(concrete)}].")
  return _class_slices(labels.astype(_accumulation_dtype(predictions.dtype)))


def _voxel_weight(mask: ArrayLike | None, valid: Array | None,
                  spatial_shape: tuple[int, ...], dtype, fn: str) -> Array | None:
  weight = None
  if mask is not None:
    mask = jnp.asarray(mask)
    if mask.shape != spatial_shape:
      raise ValueError(
          f"{fn}: `mask` has shape {mask.shape}, expected {spatial_shape} "
          "([batch, *spatial], the shape of `predictions` without classes).")
    weight = mask.astype(dtype)
  if valid is not None:
    weight = valid.astype(dtype) if weight is None else weight * valid
  return weight


class _Inputs(NamedTuple):
  """Checked inputs: ``predictions`` as given (an array), the per-class
  targets ``[batch, *spatial]`` and the voxel weight (None: all voxels)."""
  predictions: Array
  targets: list[Array]
  weight: Array | None


def _prepare(predictions, labels, *, from_logits, activation, mask,
             ignore_index, fn) -> _Inputs:
  """Checks the arrays (shapes, dtypes, label values) once per call."""
  predictions = jnp.asarray(predictions)
  labels = jnp.asarray(labels)
  if predictions.ndim < 2:
    raise ValueError(
        f"{fn}: `predictions` must be [batch, *spatial, classes], got shape "
        f"{predictions.shape}.")
  if not jnp.issubdtype(predictions.dtype, jnp.floating):
    raise ValueError(
        f"{fn}: `predictions` must be floating point (logits or "
        f"probabilities), got {predictions.dtype}.")
  if activation == "softmax" and from_logits and predictions.shape[-1] < 2:
    raise ValueError(
        f"{fn}: softmax over {predictions.shape[-1]} class is constant; use "
        "activation='sigmoid' for a single foreground channel.")
  targets, valid = _targets(labels, predictions, activation, ignore_index, fn)
  weight = _voxel_weight(mask, valid, predictions.shape[:-1],
                         _accumulation_dtype(predictions.dtype), fn)
  return _Inputs(predictions, targets, weight)


def _kept_classes(num_classes: int, activation: str,
                  include_background: bool | None, fn: str) -> tuple[int, ...]:
  """The channels that enter the loss; see "Background" in the module doc."""
  if include_background is None:
    drop = activation == "softmax"  # softmax class 0 is the background
  else:
    drop = not include_background
  if drop and num_classes == 1:
    if include_background is False:
      warnings.warn(
          f"{fn}: single channel prediction, include_background=False "
          "ignored (there is no other channel to keep).", stacklevel=4)
    return (0,)
  return tuple(range(1 if drop else 0, num_classes))


def _stats(inputs: _Inputs, *, from_logits: bool, activation: str,
           classes: Sequence[int], soft_label: bool, squared_pred: bool,
           pool_batch: bool, axis_name: Any) -> tuple[Array, Array, Array]:
  """``(tp, fp, fn)``, each ``[batch, len(classes)]`` (``[1, ...]`` pooled)."""
  predictions, targets, weight = inputs
  probs = _probabilities(predictions, from_logits, activation)
  spatial_axes = tuple(range(1, predictions.ndim - 1))

  def total(x):
    return jnp.sum(x if weight is None else x * weight, axis=spatial_axes)

  tp, fp, fn_ = [], [], []
  for c in classes:
    p, g = probs[c], targets[c]
    if squared_pred:
      # MONAI's squared form: FP = sum p^2 - TP, FN = sum g^2 - TP.
      pg = p * g
      tp.append(total(pg))
      fp.append(total(p * p - pg))
      fn_.append(total(g * g - pg))
    elif soft_label:
      tp.append(total(jnp.minimum(p, g)))
      fp.append(total(jnp.maximum(p - g, 0.0)))
      fn_.append(total(jnp.maximum(g - p, 0.0)))
    else:
      pg = p * g
      tp.append(total(pg))
      fp.append(total(p - pg))
      fn_.append(total(g - pg))
  stats = tuple(jnp.stack(s, axis=-1) for s in (tp, fp, fn_))
  if pool_batch:
    stats = tuple(jnp.sum(s, axis=0, keepdims=True) for s in stats)
    if axis_name is not None:
      stats = jax.lax.psum(stats, axis_name)
  return stats


def _index(tp, fp, fn, alpha, beta, nr, dr) -> Array:
  return (tp + nr) / (tp + alpha * fp + beta * fn + dr)


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def confusion_stats(
    predictions: ArrayLike,
    labels: ArrayLike,
    *,
    from_logits: bool = True,
    activation: str = "softmax",
    include_background: bool | None = None,
    mask: ArrayLike | None = None,
    ignore_index: int | None = None,
    soft_label: bool = False,
    squared_pred: bool = False,
    pool_batch: bool = False,
    axis_name: Any = None,
) -> tuple[Array, Array, Array]:
  """Soft true positives, false positives and false negatives per class.

  Implements the sums of Eq. 3 of Salehi et al. (2017), for every class ``c``
  and over all voxels ``i`` of a case::

    TP_c = sum_i p_ic g_ic
    FP_c = sum_i p_ic (1 - g_ic)
    FN_c = sum_i (1 - p_ic) g_ic

  In the Tversky index alpha weighs FP and beta weighs FN.

  Args:
    predictions: ``[batch, *spatial, classes]`` logits (``from_logits=True``)
      or probabilities, channels last. Any float dtype; sums are float32.
    labels: integer class map ``[batch, *spatial]`` with values in
      ``[0, classes)``, or one-hot / soft labels ``[batch, *spatial, classes]``
      with values in ``[0, 1]``. With ``activation="sigmoid"`` labels must be
      ``[batch, *spatial, classes]``, except that a single sigmoid channel
      also accepts a binary map ``[batch, *spatial]``. Class-map values that
      are not classes raise ValueError when concrete and are dropped like
      ``ignore_index`` under ``jax.jit``.
    from_logits: apply ``activation`` to ``predictions`` first.
    activation: ``"softmax"`` (mutually exclusive classes, class 0 is the
      background) or ``"sigmoid"`` (independent, possibly overlapping regions).
    include_background: None (default): drop softmax class 0 (for a 2-class
      network exactly the paper's loss, on the lesion class) and keep every
      sigmoid channel. False: drop channel 0 for either activation (MONAI's
      ``include_background=False``). True: keep every channel. A single
      channel is always kept (with a warning for False).
    mask: optional bool ``[batch, *spatial]``; voxels where it is False are
      dropped from every sum.
    ignore_index: optional label value (outside ``[0, classes)``, e.g. -1 or
      255) marking voxels to drop; needs an integer class map.
    soft_label: use the L1 form ``TP = sum min(p, g)``,
      ``FP = sum max(p - g, 0)``, ``FN = sum max(g - p, 0)``. It equals the
      product form on hard labels and, unlike it, gives FP = FN = 0 (a perfect
      score) when a soft target equals the prediction.
    squared_pred: V-Net / MONAI squared form ``TP = sum p g``,
      ``FP = sum p^2 - TP``, ``FN = sum g^2 - TP`` (MONAI's
      ``DiceLoss(squared_pred=True)`` definition). FP and FN may then be
      negative per class, but ``2TP + FP + FN = sum p^2 + sum g^2 >= 0``.
      It also scores a soft target equal to the prediction as perfect, so
      ``soft_label`` has no effect with it (as in MONAI).
    pool_batch: sum the statistics over the batch (batch Tversky / Dice):
      every case contributes voxels to one shared ratio.
    axis_name: with ``pool_batch=True``, also ``psum`` the statistics over this
      named axis of ``jax.pmap`` / ``jax.shard_map``, so the pooled ratio is
      the one of the global batch on every device. Per-case statistics
      (``pool_batch=False``) are local and not summed.

  Returns:
    ``(tp, fp, fn)``, each ``[batch, classes']`` (``[1, classes']`` when
    pooled) where ``classes'`` are the channels kept by
    ``include_background``.

  Raises:
    ValueError: for mismatched shapes, labels out of range (when concrete),
      an unknown activation or an ``ignore_index`` that is a class index.
  """
  fn = "confusion_stats"
  _check_choice("activation", activation, ACTIVATIONS, fn)
  for name, value in (("from_logits", from_logits), ("soft_label", soft_label),
                      ("squared_pred", squared_pred),
                      ("pool_batch", pool_batch)):
    _check_bool(name, value, fn)
  _check_bool("include_background", include_background, fn, allow_none=True)
  inputs = _prepare(predictions, labels, from_logits=from_logits,
                    activation=activation, mask=mask,
                    ignore_index=ignore_index, fn=fn)
  classes = _kept_classes(inputs.predictions.shape[-1], activation,
                          include_background, fn)
  return _stats(inputs, from_logits=from_logits, activation=activation,
                classes=classes, soft_label=soft_label,
                squared_pred=squared_pred, pool_batch=pool_batch,
                axis_name=axis_name)


def tversky_index(
    tp: ArrayLike,
    fp: ArrayLike,
    fn: ArrayLike,
    *,
    alpha: ArrayLike = 0.3,
    beta: ArrayLike = 0.7,
    smooth: ArrayLike = 1e-5,
    smooth_nr: ArrayLike | None = None,
    smooth_dr: ArrayLike | None = None,
) -> Array:
  """Tversky index ``(TP + smooth_nr) / (TP + alpha FP + beta FN + smooth_dr)``.

  Eq. 3 of Salehi et al. (2017): **alpha weighs false positives, beta false
  negatives**. With equal smoothing an empty class (no ground truth, no
  prediction) scores 1.

  Args:
    tp, fp, fn: soft counts of any (broadcastable) shape, e.g. the
      ``[batch, classes]`` output of :func:`confusion_stats`.
    alpha: weight of false positives (>= 0). May be a traced array.
    beta: weight of false negatives (>= 0). May be a traced array.
    smooth: default for ``smooth_nr`` and ``smooth_dr`` (>= 0).
    smooth_nr: added to the numerator (>= 0); None: ``smooth``.
    smooth_dr: added to the denominator (>= 0); None: ``smooth``. With 0 an
      empty class divides by 0 (NaN or inf).

  Returns:
    The index, of the broadcast shape of the inputs; in ``[0, 1]`` for the
    Eq. 3 counts when ``smooth_nr <= smooth_dr``.
  """
  fn_name = "tversky_index"
  nr = smooth if smooth_nr is None else smooth_nr
  dr = smooth if smooth_dr is None else smooth_dr
  for name, value in (("alpha", alpha), ("beta", beta), ("smooth", smooth),
                      ("smooth_nr", nr), ("smooth_dr", dr)):
    _check_nonnegative(name, value, fn_name)
  tp, fp, fn = (jnp.asarray(x) for x in (tp, fp, fn))
  return _index(tp, fp, fn, alpha, beta, nr, dr)


def _class_weight_vector(class_weights: ArrayLike | None, num_classes: int,
                         dtype, fn: str) -> Array | None:
  if class_weights is None:
    return None
  weights = jnp.asarray(class_weights, dtype)
  if weights.shape != (num_classes,):
    raise ValueError(
        f"{fn}: `class_weights` has shape {weights.shape}, expected "
        f"({num_classes},): one weight per class after the background is "
        "dropped.")
  _check_nonnegative("class_weights", class_weights, fn)
  return weights


def _reduce(loss: Array, weights: Array | None, reduction: str,
            axis_name: Any, pooled: bool) -> Array:
  """Reduces a ``[batch, classes']`` loss; see :func:`tversky_loss`."""
  weighted = loss if weights is None else loss * weights
  if reduction == "none":
    return weighted[0] if pooled else weighted
  total = jnp.sum(weighted)
  if reduction == "sum":
    if axis_name is not None and not pooled:
      total = jax.lax.psum(total, axis_name)
    return total
  count = jnp.asarray(loss.shape[0], loss.dtype)
  if axis_name is not None and not pooled:
    # The mean over the global batch, taken inside the loss: under shard_map
    # the gradient of replicated parameters is then exact without a pmean.
    total, count = jax.lax.psum((total, count), axis_name)
  weight_sum = (jnp.asarray(loss.shape[-1], loss.dtype) if weights is None
                else jnp.sum(weights))
  return total / (count * weight_sum)


_FOCAL_LINEAR_BELOW = 1e-6


def _safe_power(x: Array, exponent: ArrayLike) -> Array:
  """``x ** exponent`` for x >= 0 with a finite gradient at x = 0."""
  eps = jnp.asarray(_FOCAL_LINEAR_BELOW, x.dtype)
  large = x > eps
  x_safe = jnp.where(large, x, eps)  # keeps the unused branch's gradient finite
  return jnp.where(large, x_safe ** exponent, x * eps ** (exponent - 1.0))


def _region_loss(inputs: _Inputs, *, alpha, beta, gamma, nr, dr, from_logits,
                 activation, classes, soft_label, squared_pred, pool_batch,
                 axis_name) -> Array:
  """Unreduced ``[batch, classes']`` (``[1, classes']`` pooled) loss."""
  tp, fp, fn_ = _stats(inputs, from_logits=from_logits, activation=activation,
                       classes=classes, soft_label=soft_label,
                       squared_pred=squared_pred, pool_batch=pool_batch,
                       axis_name=axis_name)
  loss = 1.0 - _index(tp, fp, fn_, alpha, beta, nr, dr)
  if gamma is not None:
    # The power needs loss >= 0 (the squared form can give TI > 1).
    return _safe_power(jnp.maximum(loss, 0.0), 1.0 / gamma)
  if not squared_pred:
    # Rounding can leave 1 - TI a hair below 0 for a perfect prediction. The
    # squared form is left alone: its TI > 1 is real (see tversky_loss).
    loss = jnp.maximum(loss, 0.0)
  return loss


def _region_family(predictions, labels, *, fn, alpha, beta, gamma, smooth,
                   smooth_nr, smooth_dr, squared_pred, class_weights,
                   reduction, from_logits, activation, include_background,
                   mask, ignore_index, soft_label, pool_batch,
                   axis_name) -> Array:
  nr, dr = _check_options(
      fn, alpha=alpha, beta=beta, gamma=gamma, smooth=smooth,
      smooth_nr=smooth_nr, smooth_dr=smooth_dr, reduction=reduction,
      reductions=REDUCTIONS, from_logits=from_logits, activation=activation,
      include_background=include_background, soft_label=soft_label,
      squared_pred=squared_pred, pool_batch=pool_batch)
  inputs = _prepare(predictions, labels, from_logits=from_logits,
                    activation=activation, mask=mask,
                    ignore_index=ignore_index, fn=fn)
  classes = _kept_classes(inputs.predictions.shape[-1], activation,
                          include_background, fn)
  loss = _region_loss(inputs, alpha=alpha, beta=beta, gamma=gamma, nr=nr,
                      dr=dr, from_logits=from_logits, activation=activation,
                      classes=classes, soft_label=soft_label,
                      squared_pred=squared_pred, pool_batch=pool_batch,
                      axis_name=axis_name)
  weights = _class_weight_vector(class_weights, len(classes), loss.dtype, fn)
  return _reduce(loss, weights, reduction, axis_name, pool_batch)


def tversky_loss(
    predictions: ArrayLike,
    labels: ArrayLike,
    *,
    alpha: ArrayLike = 0.3,
    beta: ArrayLike = 0.7,
    smooth: ArrayLike = 1e-5,
    smooth_nr: ArrayLike | None = None,
    smooth_dr: ArrayLike | None = None,
    squared_pred: bool = False,
    class_weights: ArrayLike | None = None,
    reduction: str = "mean",
    from_logits: bool = True,
    activation: str = "softmax",
    include_background: bool | None = None,
    mask: ArrayLike | None = None,
    ignore_index: int | None = None,
    soft_label: bool = False,
    pool_batch: bool = False,
    axis_name: Any = None,
) -> Array:
  """Tversky loss ``1 - TI`` of Salehi et al. (2017), arXiv:1706.05721.

  ``TI = (TP + smooth_nr) / (TP + alpha FP + beta FN + smooth_dr)`` per case
  and class, from the soft counts of :func:`confusion_stats`. **alpha weighs
  false positives, beta weighs false negatives**; raising beta trades
  precision for recall. The paper's best setting on MS lesions is
  alpha = 0.3, beta = 0.7 (the default); alpha = beta = 0.5 is the Dice loss.

  Args:
    predictions: ``[batch, *spatial, classes]`` logits or probabilities,
      channels last.
    labels: class map ``[batch, *spatial]`` or one-hot / soft labels
      ``[batch, *spatial, classes]``; see :func:`confusion_stats`.
    alpha: false-positive weight (>= 0); may be traced (vmap, schedules).
    beta: false-negative weight (>= 0); may be traced.
    smooth: default of ``smooth_nr`` and ``smooth_dr`` (>= 0): alone, it is
      added to numerator and denominator and an empty class has loss 0.
    smooth_nr: numerator smoothing (>= 0); None: ``smooth``. Overrides
      ``smooth`` for the numerator only. ``smooth_nr=0`` gives an empty class
      loss 1.
    smooth_dr: denominator smoothing (>= 0); None: ``smooth``. Overrides
      ``smooth`` for the denominator only; keep it > 0 for a finite gradient.
    squared_pred: use the squared sums of V-Net / MONAI (see
      :func:`confusion_stats`): ``TI = (TP + nr) / ((1 - alpha - beta) TP +
      alpha sum p^2 + beta sum g^2 + dr)``. For alpha = beta >= 0.5 (Dice,
      Jaccard) TI stays <= 1; otherwise (e.g. alpha = 0.9, beta = 0.1) the
      squared form can exceed 1 and this loss can be negative. It is not
      clipped (clipping would zero the gradient); the focal loss clips at 0.
    class_weights: optional ``[classes']`` non-negative weights, one per class
      kept by ``include_background``.
    reduction: ``"mean"``: the weighted mean over cases and classes,
      ``sum_bc w_c L_bc / (batch * sum_c w_c)`` (so weights [1, 1] and [2, 2]
      give the same value; MONAI and optax instead average ``w_c L_bc`` over
      the ``batch * classes'`` entries). ``"sum"``: ``sum_bc w_c L_bc``.
      ``"none"``: ``w_c L_bc`` per case and class, ``[batch, classes']``, or
      ``[classes']`` with ``pool_batch``.
    from_logits, activation, include_background, mask, ignore_index,
      soft_label, pool_batch, axis_name: see :func:`confusion_stats`. With
      ``axis_name`` and per-case statistics, "mean" and "sum" run over the
      global batch of all devices.

  Returns:
    A scalar; ``[batch, classes']`` or ``[classes']`` for
    ``reduction="none"``.

  Raises:
    ValueError: for a bad argument (negative alpha, beta or smoothing when
      concrete, unknown reduction or activation, class weights of the wrong
      shape) or bad inputs (see :func:`confusion_stats`).
  """
  return _region_family(
      predictions, labels, fn="tversky_loss", alpha=alpha, beta=beta,
      gamma=None, smooth=smooth, smooth_nr=smooth_nr, smooth_dr=smooth_dr,
      squared_pred=squared_pred, class_weights=class_weights,
      reduction=reduction, from_logits=from_logits, activation=activation,
      include_background=include_background, mask=mask,
      ignore_index=ignore_index, soft_label=soft_label, pool_batch=pool_batch,
      axis_name=axis_name)


def dice_loss(
    predictions: ArrayLike,
    labels: ArrayLike,
    *,
    smooth: ArrayLike = 1e-5,
    smooth_nr: ArrayLike | None = None,
    smooth_dr: ArrayLike | None = None,
    squared_pred: bool = False,
    class_weights: ArrayLike | None = None,
    reduction: str = "mean",
    from_logits: bool = True,
    activation: str = "softmax",
    include_background: bool | None = None,
    mask: ArrayLike | None = None,
    ignore_index: int | None = None,
    soft_label: bool = False,
    pool_batch: bool = False,
    axis_name: Any = None,
) -> Array:
  """Soft Dice loss ``1 - (2TP + 2 s_nr) / (2TP + FP + FN + 2 s_dr)``.

  The Tversky loss with alpha (false positives) = beta (false negatives) =
  0.5, the paper's baseline (Table 1 row one). In the 2TP form the smoothing
  terms are doubled: MONAI's ``DiceLoss(smooth_nr=a, smooth_dr=b)`` is
  ``smooth_nr=a/2, smooth_dr=b/2`` here. With ``squared_pred`` the
  denominator is ``sum p^2 + sum g^2`` (V-Net). Arguments as in
  :func:`tversky_loss`.

  Returns:
    A scalar; ``[batch, classes']`` or ``[classes']`` for
    ``reduction="none"``.
  """
  return _region_family(
      predictions, labels, fn="dice_loss", alpha=0.5, beta=0.5, gamma=None,
      smooth=smooth, smooth_nr=smooth_nr, smooth_dr=smooth_dr,
      squared_pred=squared_pred, class_weights=class_weights,
      reduction=reduction, from_logits=from_logits, activation=activation,
      include_background=include_background, mask=mask,
      ignore_index=ignore_index, soft_label=soft_label, pool_batch=pool_batch,
      axis_name=axis_name)


def jaccard_loss(
    predictions: ArrayLike,
    labels: ArrayLike,
    *,
    smooth: ArrayLike = 1e-5,
    smooth_nr: ArrayLike | None = None,
    smooth_dr: ArrayLike | None = None,
    squared_pred: bool = False,
    class_weights: ArrayLike | None = None,
    reduction: str = "mean",
    from_logits: bool = True,
    activation: str = "softmax",
    include_background: bool | None = None,
    mask: ArrayLike | None = None,
    ignore_index: int | None = None,
    soft_label: bool = False,
    pool_batch: bool = False,
    axis_name: Any = None,
) -> Array:
  """Soft Jaccard (IoU, Tanimoto) loss ``1 - TP / (TP + FP + FN)``.

  The Tversky loss with alpha (false positives) = beta (false negatives) = 1.
  Arguments as in :func:`tversky_loss`.

  Returns:
    A scalar; ``[batch, classes']`` or ``[classes']`` for
    ``reduction="none"``.
  """
  return _region_family(
      predictions, labels, fn="jaccard_loss", alpha=1.0, beta=1.0, gamma=None,
      smooth=smooth, smooth_nr=smooth_nr, smooth_dr=smooth_dr,
      squared_pred=squared_pred, class_weights=class_weights,
      reduction=reduction, from_logits=from_logits, activation=activation,
      include_background=include_background, mask=mask,
      ignore_index=ignore_index, soft_label=soft_label, pool_batch=pool_batch,
      axis_name=axis_name)


def focal_tversky_loss(
    predictions: ArrayLike,
    labels: ArrayLike,
    *,
    alpha: ArrayLike = 0.3,
    beta: ArrayLike = 0.7,
    gamma: ArrayLike = 4.0 / 3.0,
    smooth: ArrayLike = 1e-5,
    smooth_nr: ArrayLike | None = None,
    smooth_dr: ArrayLike | None = None,
    squared_pred: bool = False,
    class_weights: ArrayLike | None = None,
    reduction: str = "mean",
    from_logits: bool = True,
    activation: str = "softmax",
    include_background: bool | None = None,
    mask: ArrayLike | None = None,
    ignore_index: int | None = None,
    soft_label: bool = False,
    pool_batch: bool = False,
    axis_name: Any = None,
) -> Array:
  """Focal Tversky loss ``(1 - TI)^(1/gamma)`` per case and class.

  Abraham & Khan (2019), arXiv:1810.07842, with gamma in [1, 3] and 4/3
  recommended; gamma > 1 focuses training on hard (low-TI) cases. Careful:
  that paper calls the false-negative weight alpha. Here, as everywhere in
  this module, **alpha weighs false positives and beta false negatives**
  (Salehi et al.'s convention).

  ``x^(1/gamma)`` has an infinite slope at x = 0 (a perfect or empty class)
  when gamma > 1; below ``x = 1e-6`` the power is replaced by its secant
  through 0, so the loss is continuous, 0 at TI = 1, and its gradient finite.
  ``1 - TI`` is clipped at 0 first (with ``squared_pred`` TI can exceed 1).

  Arguments as in :func:`tversky_loss`, plus ``gamma`` (> 0, may be traced).

  Returns:
    A scalar; ``[batch, classes']`` or ``[classes']`` for
    ``reduction="none"``.
  """
  return _region_family(
      predictions, labels, fn="focal_tversky_loss", alpha=alpha, beta=beta,
      gamma=gamma, smooth=smooth, smooth_nr=smooth_nr, smooth_dr=smooth_dr,
      squared_pred=squared_pred, class_weights=class_weights,
      reduction=reduction, from_logits=from_logits, activation=activation,
      include_background=include_background, mask=mask,
      ignore_index=ignore_index, soft_label=soft_label, pool_batch=pool_batch,
      axis_name=axis_name)


def tversky_ce_loss(
    predictions: ArrayLike,
    labels: ArrayLike,
    *,
    alpha: ArrayLike = 0.3,
    beta: ArrayLike = 0.7,
    smooth: ArrayLike = 1e-5,
    smooth_nr: ArrayLike | None = None,
    smooth_dr: ArrayLike | None = None,
    squared_pred: bool = False,
    class_weights: ArrayLike | None = None,
    ce_weight: ArrayLike = 1.0,
    reduction: str = "mean",
    from_logits: bool = True,
    activation: str = "softmax",
    include_background: bool | None = None,
    mask: ArrayLike | None = None,
    ignore_index: int | None = None,
    soft_label: bool = False,
    pool_batch: bool = False,
    axis_name: Any = None,
) -> Array:
  """Tversky loss plus ``ce_weight`` times the voxel-wise cross-entropy.

  The nnU-Net-style combination (nnU-Net pairs Dice with cross-entropy): the
  region term handles the class imbalance, the cross-entropy gives every voxel
  a well-conditioned gradient early in training. **alpha weighs false
  positives, beta false negatives** in the Tversky term.

  The cross-entropy uses all classes (background included, whatever
  ``include_background``) for a softmax, and the mean binary cross-entropy
  over channels for a sigmoid; it honours ``mask`` and ``ignore_index`` (and
  drops traced labels that are not classes) and is averaged over the valid
  voxels.

  Args:
    predictions, labels, alpha, beta, smooth, smooth_nr, smooth_dr,
      squared_pred, class_weights: as in :func:`tversky_loss`.
    ce_weight: weight of the cross-entropy term (>= 0; may be traced).
    reduction: ``"mean"``: the Tversky mean plus the cross-entropy averaged
      over all valid voxels of the batch (of all devices with ``axis_name``);
      ``"none"``: ``[batch]``, per case the class-weighted mean Tversky loss
      plus that case's mean cross-entropy (not with ``pool_batch``).
    from_logits, activation, include_background, mask, ignore_index,
      soft_label, pool_batch, axis_name: as in :func:`confusion_stats`.

  Returns:
    A scalar, or ``[batch]`` for ``reduction="none"``.
  """
  fn = "tversky_ce_loss"
  nr, dr = _check_options(
      fn, alpha=alpha, beta=beta, gamma=None, smooth=smooth,
      smooth_nr=smooth_nr, smooth_dr=smooth_dr, reduction=reduction,
      reductions=("mean", "none"), from_logits=from_logits,
      activation=activation, include_background=include_background,
      soft_label=soft_label, squared_pred=squared_pred, pool_batch=pool_batch)
  _check_nonnegative("ce_weight", ce_weight, fn)
  if reduction == "none" and pool_batch:
    raise ValueError(f"{fn}: reduction='none' gives per-case values and "
                     "cannot be combined with pool_batch=True.")
  inputs = _prepare(predictions, labels, from_logits=from_logits,
                    activation=activation, mask=mask,
                    ignore_index=ignore_index, fn=fn)
  classes = _kept_classes(inputs.predictions.shape[-1], activation,
                          include_background, fn)
  region = _region_loss(inputs, alpha=alpha, beta=beta, gamma=None, nr=nr,
                        dr=dr, from_logits=from_logits, activation=activation,
                        classes=classes, soft_label=soft_label,
                        squared_pred=squared_pred, pool_batch=pool_batch,
                        axis_name=axis_name)
  weights = _class_weight_vector(class_weights, len(classes), region.dtype, fn)
  ce_sum, count = _cross_entropy_sums(inputs, from_logits=from_logits,
                                      activation=activation)
  if reduction == "none":
    per_case = _reduce(region, weights, "none", None, False)
    weight_sum = (jnp.asarray(len(classes), region.dtype) if weights is None
                  else jnp.sum(weights))
    per_case = jnp.sum(per_case, axis=-1) / weight_sum
    return per_case + ce_weight * ce_sum / jnp.maximum(count, 1.0)
  region = _reduce(region, weights, "mean", axis_name, pool_batch)
  ce_sum, count = jnp.sum(ce_sum), jnp.sum(count)
  if axis_name is not None:
    ce_sum, count = jax.lax.psum((ce_sum, count), axis_name)
  return region + ce_weight * ce_sum / jnp.maximum(count, 1.0)


def _cross_entropy_sums(inputs: _Inputs, *, from_logits: bool,
                        activation: str) -> tuple[Array, Array]:
  """Per case ``(sum of voxel cross-entropies, number of valid voxels)``."""
  predictions, targets, weight = inputs
  log_p, log_not_p = _log_probabilities(predictions, from_logits, activation)
  if activation == "sigmoid":
    terms = [g * lp + (1.0 - g) * lq
             for g, lp, lq in zip(targets, log_p, log_not_p)]
  else:
    terms = [g * lp for g, lp in zip(targets, log_p)]
  voxel_ce = -terms[0]
  for t in terms[1:]:
    voxel_ce = voxel_ce - t
  if activation == "sigmoid":
    voxel_ce = voxel_ce / len(terms)
  spatial_axes = tuple(range(1, predictions.ndim - 1))
  if weight is None:
    weight = jnp.ones(voxel_ce.shape, voxel_ce.dtype)
  return (jnp.sum(voxel_ce * weight, axis=spatial_axes),
          jnp.sum(weight, axis=spatial_axes))
