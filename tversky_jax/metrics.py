"""Evaluation metrics of Salehi et al. 2017 (arXiv 1706.05721) as pure JAX functions.

The paper reports, on the test set, the Dice similarity coefficient (DSC),
sensitivity, specificity, the F2 score and APR (area under the
precision-recall curve of the voxel probabilities)::

  DSC         = 2TP / (2TP + FP + FN)
  sensitivity = TP / (TP + FN)                (recall)
  specificity = TN / (TN + FP)
  precision   = TP / (TP + FP)
  F_beta      = (1+b^2)TP / ((1+b^2)TP + b^2 FN + FP)   (F2 = 5TP/(5TP+4FN+FP))
  APR         = sum_k (R_k - R_{k-1}) P_k     (step-wise, as scikit-learn)

and, not in the paper, the rest of the confusion-matrix family::

  NPV               = TN / (TN + FN)          (negative predictive value)
  FPR               = FP / (FP + TN)          (fall-out, 1 - specificity)
  FNR               = FN / (FN + TP)          (miss rate, 1 - sensitivity)
  balanced accuracy = (sensitivity + specificity) / 2
  MCC               = (TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN))

(In the Tversky index TP / (TP + alpha FP + beta FN) of the losses, alpha
weighs false positives and beta false negatives: F_beta is alpha =
1/(1+b^2), beta_T = b^2/(1+b^2).)

Conventions
-----------
* ``predictions`` are lesion probabilities in [0, 1] or binary masks (bool or
  int), shape ``[batch, *spatial]`` with any number of spatial axes.  The
  project is channels-last, but these functions take the *foreground map
  only*: no class axis.  A voxel is predicted lesion when
  ``predictions >= threshold`` (``threshold=0.5`` by default, as in the paper).
* ``labels`` are a binary class map, same shape: 0 (background) or 1
  (lesion), as bool, int or float.
* **Several classes.** With ``num_classes=K``, ``predictions`` and ``labels``
  are both integer class maps ``[batch, *spatial]`` with values in
  ``[0, K)`` (e.g. ``jnp.argmax(probabilities, -1)``; ``threshold`` is then
  unused), and every metric is computed one-vs-rest per class: outputs are
  ``[batch, classes']`` (``[classes']`` pooled), where ``classes'`` are the
  classes ``1..K-1``, or ``0..K-1`` with ``include_background=True``.  The
  binary mode is ``num_classes=2`` without the background, squeezed.
* **Labels outside the classes.** A label that is not a class (``< 0``,
  ``>= K``, not an integer, NaN; ``K = 2`` in the binary mode) and is not
  ``ignore_index`` raises ValueError when the labels are concrete (the message
  names the values and the number of classes).  Under ``jax.jit`` (traced
  labels) they cannot be checked and those voxels are dropped from every
  count, like ``ignore_index`` and masked voxels.  The losses in
  :mod:`tversky_jax.losses` follow the same rule.  Predicted class maps
  outside ``[0, K)`` raise too when concrete; traced, such a voxel predicts
  none of the classes.
* ``mask`` (optional, bool or int, same shape) selects the voxels that are
  evaluated (e.g. a brain mask); unselected voxels count nowhere.
  ``ignore_index`` (an int that is not a class, e.g. -1 or 255) marks
  label voxels that count nowhere.
* ``pooled=False`` gives one value per case, shape ``[batch]``;
  ``pooled=True`` gives a scalar computed from counts summed over every voxel
  of the batch (not the mean of the per-case values).
* Everything is jit-compatible: no Python branching on array values.
  ``threshold`` and ``beta`` may be traced; ``pooled``, ``empty``,
  ``num_classes``, ``include_background`` and ``ignore_index`` must be
  Python values.  Values are only range-checked when they are concrete.

Empty cases
-----------
``empty="one"`` (the default, the rule used so far): *a ratio whose
denominator is 0 means there was nothing of that kind to get wrong, and is
perfect*: 1.0 for the scores, 0.0 for the error rates FPR and FNR (so
FPR = 1 - specificity and FNR = 1 - sensitivity always).  Hence

=============================  ====  ===========  =========  ======  ===========
case                           DSC   sensitivity  precision  F_beta  specificity
=============================  ====  ===========  =========  ======  ===========
no lesion, nothing predicted   1     1            1          1       (as usual)
no lesion, voxels predicted    0     1            0          0       (as usual)
lesion, nothing predicted      0     0            1          0       (as usual)
no negative voxel at all       --    --           --         --      1
=============================  ====  ===========  =========  ======  ===========

NPV is 1 when nothing is predicted negative; balanced accuracy averages the
sensitivity and specificity above; MCC, whose denominator is 0 whenever the
prediction or the reference is constant, is 1 there if the case has no error
(FP = FN = 0) and 0 otherwise (scikit-learn's value; scikit-learn also gives 0
for the error-free case).

``empty="nan"`` follows MONAI: DSC and F_beta are NaN whenever the reference
has no lesion (TP + FN = 0), even if voxels were predicted, as
``DiceMetric(ignore_empty=True)``; every other ratio is NaN where its
denominator is 0, as ``ConfusionMatrixMetric`` (balanced accuracy: where the
reference has no lesion or no background voxel; MCC: where its denominator
is 0).  Aggregate with ``jnp.nanmean`` to skip those cases, as MONAI's
reductions do.

APR with no positive (lesion) voxel is undefined and is ``NaN`` (scikit-learn
warns and returns 0 there); aggregate per-case APR with ``jnp.nanmean``.
Apart from that and ``empty="nan"``, no metric returns NaN or divides by zero
(denominators are made safe with ``jnp.where``), as long as the inputs contain
no NaN.

Counts and precision
--------------------
Counts are JAX's default integer type: int32 (int64 with ``jax_enable_x64``).
int32 holds up to 2**31 - 1 ~ 2.1e9 voxels; the paper's whole data set,
15 x 128 x 224 x 256 = 110,100,480 voxels, is ~5% of that, so even pooled
counts over all of it cannot overflow.  Inputs with more than 2**31 - 1
voxels (per case, or in total when pooled) would overflow without x64.
Ratios are computed in the default float type (float32 unless x64), i.e.
to ~1e-7 relative precision; MCC divides the counts by their total first, so
its products of counts cannot overflow.

``average_precision`` is exact (it sorts; it does not bin the scores): it
equals ``sklearn.metrics.average_precision_score(labels.ravel(),
probabilities.ravel())`` including tied scores, which form a single
threshold.  It costs an O(n log n) sort of the voxels of each case (of the
whole batch when pooled), and its counts are int32 like the others: pooled
over more than 2**31 - 1 voxels it overflows silently, so pooled AP over a
test set is computed on the host from int64 count tables
(:func:`tversky_jax.evaluate.average_precision_from_counts`).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array
ArrayLike = Any  # jax.typing.ArrayLike; kept loose for numpy / python scalars

EMPTY_RULES = ("one", "nan")

__all__ = [
  "confusion_counts",
  "dice",
  "sensitivity",
  "specificity",
  "precision",
  "f_beta",
  "npv",
  "fpr",
  "fnr",
  "balanced_accuracy",
  "mcc",
  "average_precision",
  "all_metrics",
  "dice_from_counts",
  "sensitivity_from_counts",
  "specificity_from_counts",
  "precision_from_counts",
  "f_beta_from_counts",
  "npv_from_counts",
  "fpr_from_counts",
  "fnr_from_counts",
  "balanced_accuracy_from_counts",
  "mcc_from_counts",
]

_REF = "Salehi et al. 2017, arXiv 1706.05721"


# ---------------------------------------------------------------------------
# validation helpers (static: shapes, dtypes, concrete scalars only)
# ---------------------------------------------------------------------------


def _float_dtype() -> np.dtype:
  """Default float dtype: float32, or float64 when jax_enable_x64 is on."""
  return jax.dtypes.canonicalize_dtype(jnp.float64)


def _check_pooled(pooled: Any) -> bool:
  if not isinstance(pooled, (bool, np.bool_)):
    raise ValueError(
      f"pooled must be a Python bool (it selects the output shape statically); "
      f"got {type(pooled).__name__}"
    )
  return bool(pooled)


def _check_empty(empty: Any) -> str:
  if not isinstance(empty, str) or empty not in EMPTY_RULES:
    raise ValueError(f"empty must be one of {list(EMPTY_RULES)}; got {empty!r}")
  return empty


def _is_int(x: Any) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _concrete_float(x: Any, name: str) -> float | None:
  """Return float(x) when x is a concrete scalar, None when it is traced."""
  if isinstance(x, str) or np.ndim(x) != 0:
    raise ValueError(f"{name} must be a real scalar; got {x!r}")
  if isinstance(x, jax.core.Tracer):
    return None
  try:
    return float(x)
  except jax.errors.ConcretizationTypeError:  # pragma: no cover - defensive
    return None
  except (TypeError, ValueError) as err:
    raise ValueError(f"{name} must be a real scalar; got {x!r}") from err


def _concrete_array(x: Array) -> np.ndarray | None:
  """``x`` as a NumPy array, or None when traced or spread over hosts."""
  if isinstance(x, jax.core.Tracer):
    return None
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return None
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError,
          jax.errors.ConcretizationTypeError):  # pragma: no cover - defensive
    return None


def _check_threshold(threshold: Any) -> None:
  t = _concrete_float(threshold, "threshold")
  if t is not None and not 0.0 <= t <= 1.0:
    raise ValueError(f"threshold must lie in [0, 1]; got {t}")


def _check_beta(beta: Any) -> None:
  b = _concrete_float(beta, "beta")
  if b is not None and not (math.isfinite(b) and b >= 0.0):
    raise ValueError(f"beta must be a finite number >= 0; got {b}")


def _check_dtype(x: Array, name: str, kinds: str) -> None:
  if np.dtype(x.dtype).kind not in kinds:
    allowed = {"b": "bool", "i": "int", "u": "uint", "f": "float"}
    raise ValueError(
      f"{name} must have dtype in ({', '.join(allowed[k] for k in kinds)}); "
      f"got {x.dtype}"
    )


def _validate(
  predictions: ArrayLike,
  labels: ArrayLike,
  mask: ArrayLike | None,
  pred_name: str = "predictions",
) -> tuple[Array, Array, Array | None]:
  """Convert to arrays and check shapes/dtypes; raises ValueError."""
  predictions = jnp.asarray(predictions)
  labels = jnp.asarray(labels)
  _check_dtype(predictions, pred_name, "biuf")
  _check_dtype(labels, "labels", "biuf")
  if predictions.ndim == 0 or labels.ndim == 0:
    raise ValueError(
      f"{pred_name} and labels need a leading batch axis, shape [batch, *spatial]; "
      f"got {pred_name}.shape={predictions.shape}, labels.shape={labels.shape}"
    )
  if predictions.shape != labels.shape:
    if predictions.ndim == labels.ndim + 1 and predictions.shape[:-1] == labels.shape:
      raise ValueError(
        f"{pred_name} looks like it has a trailing class axis: "
        f"{pred_name}.shape={predictions.shape} vs labels.shape={labels.shape}. "
        f"Pass the lesion (foreground) map only, shape [batch, *spatial], "
        f"e.g. {pred_name}[..., lesion_channel], or a class map "
        f"(argmax) with num_classes"
      )
    if labels.ndim == predictions.ndim + 1 and labels.shape[:-1] == predictions.shape:
      raise ValueError(
        f"labels looks like it has a trailing class (one-hot) axis: "
        f"labels.shape={labels.shape} vs {pred_name}.shape={predictions.shape}. "
        f"Pass the binary lesion map only, shape [batch, *spatial]"
      )
    raise ValueError(
      f"{pred_name} and labels must have the same shape [batch, *spatial]; "
      f"got {pred_name}.shape={predictions.shape}, labels.shape={labels.shape}"
    )
  if mask is not None:
    mask = jnp.asarray(mask)
    _check_dtype(mask, "mask", "biu")
    if mask.shape != labels.shape:
      raise ValueError(
        f"mask must have the same shape as {pred_name} and labels "
        f"{labels.shape}; got mask.shape={mask.shape}"
      )
    mask = mask.astype(bool)
  return predictions, labels, mask


def _not_a_class(values: np.ndarray, num_classes: int) -> np.ndarray:
  """Where concrete ``values`` are not one of the classes ``0..K-1``."""
  if values.dtype == bool:
    return np.zeros(values.shape, bool) if num_classes >= 2 else values
  bad = (values < 0) | (values >= num_classes)
  if values.dtype.kind == "f":
    bad |= ~np.isfinite(values) | (values != np.floor(values))
  return bad


def _is_a_class(values: Array, num_classes: int) -> Array:
  """Traced version of ``~_not_a_class`` (NaN compares False: not a class)."""
  ok = (values >= 0) & (values < num_classes)
  if jnp.issubdtype(values.dtype, jnp.floating):
    ok &= values == jnp.floor(values)
  return ok


def _format_values(values: np.ndarray) -> list:
  shown = np.unique(values)[:10]
  if shown.dtype.kind == "f" and np.all(np.isfinite(shown)) and np.all(
    shown == np.floor(shown)
  ):
    shown = shown.astype(np.int64)
  return shown.tolist()


def _label_validity(
  labels: Array, num_classes: int, ignore_index: int | None
) -> Array | None:
  """Voxels whose label is a class: None (all), or a bool mask.

  Raises ValueError, naming the values and the number of classes, when the
  labels are concrete and contain a value that is neither a class nor
  ``ignore_index``.  Traced labels cannot be checked: the mask then drops
  every voxel whose label is not a class (``ignore_index`` included).
  """
  concrete = _concrete_array(labels)
  if concrete is None:
    if labels.dtype == bool and num_classes >= 2:
      return None
    return _is_a_class(labels, num_classes)
  if concrete.size:
    bad = _not_a_class(concrete, num_classes)
    if ignore_index is not None:
      bad &= concrete != ignore_index
    if np.any(bad):
      hint = (
        "; pass ignore_index to skip voxels"
        if ignore_index is None
        else f", and not ignore_index={ignore_index}"
      )
      raise ValueError(
        f"labels contains values {_format_values(concrete[bad])} outside the "
        f"{num_classes} classes [0, {num_classes - 1}]{hint}"
      )
  return None if ignore_index is None else labels != ignore_index


def _check_class_options(
  num_classes: Any, include_background: Any, ignore_index: Any
) -> int:
  """Checks the class options; returns the number of label values K."""
  if num_classes is not None and not (_is_int(num_classes) and num_classes >= 2):
    raise ValueError(f"num_classes must be None or an int >= 2; got {num_classes!r}")
  if not isinstance(include_background, (bool, np.bool_)):
    raise ValueError(
      f"include_background must be a Python bool; got {include_background!r}"
    )
  if include_background and num_classes is None:
    raise ValueError(
      "include_background=True needs num_classes (per-class metrics of class "
      "maps); the binary metrics are those of the lesion class"
    )
  k = 2 if num_classes is None else int(num_classes)
  if ignore_index is not None:
    if not _is_int(ignore_index):
      raise ValueError(f"ignore_index must be None or an int; got {ignore_index!r}")
    if 0 <= ignore_index < k:
      raise ValueError(
        f"ignore_index={ignore_index} is a class index; use a value outside "
        f"[0, {k}) such as -1 or 255"
      )
  return k


class _Prepared(NamedTuple):
  """Checked inputs of the count-based metrics."""

  predictions: Array  # [batch, *spatial]
  labels: Array  # [batch, *spatial]
  valid: Array | None  # bool [batch, *spatial]; None: every voxel counts
  classes: tuple[int, ...] | None  # class indices; None: binary mode


def _prepare(
  predictions: ArrayLike,
  labels: ArrayLike,
  *,
  threshold: Any,
  mask: ArrayLike | None,
  num_classes: Any,
  include_background: Any,
  ignore_index: Any,
) -> _Prepared:
  """Checks everything once: shapes, dtypes, options and label values."""
  predictions, labels, mask = _validate(predictions, labels, mask)
  _check_threshold(threshold)
  k = _check_class_options(num_classes, include_background, ignore_index)
  classes = None
  if num_classes is not None:
    if np.dtype(predictions.dtype).kind == "f":
      raise ValueError(
        f"with num_classes, predictions must be an integer class map (e.g. "
        f"jnp.argmax(probabilities, -1)); got dtype {predictions.dtype}"
      )
    concrete = _concrete_array(predictions)
    if concrete is not None and concrete.size:
      bad = _not_a_class(concrete, k)
      if np.any(bad):
        raise ValueError(
          f"predictions contains values {_format_values(concrete[bad])} outside "
          f"the {k} classes [0, {k - 1}]"
        )
    classes = tuple(range(0 if include_background else 1, k))
  valid = _label_validity(labels, k, ignore_index)
  if mask is not None:
    valid = mask if valid is None else mask & valid
  return _Prepared(predictions, labels, valid, classes)


def _fill_ratio(num: Array, den: Array, fill: float) -> Array:
  """num/den, and ``fill`` where den == 0."""
  dt = _float_dtype()
  num = jnp.asarray(num).astype(dt)
  den = jnp.asarray(den).astype(dt)
  ok = den != 0
  return jnp.where(ok, num / jnp.where(ok, den, 1), jnp.asarray(fill, dt))


def _safe_ratio(num: Array, den: Array) -> Array:
  """num/den, and 1.0 where den == 0 (nothing of that kind to get wrong)."""
  return _fill_ratio(num, den, 1.0)


# ---------------------------------------------------------------------------
# confusion counts
# ---------------------------------------------------------------------------


def confusion_counts(
  predictions: ArrayLike,
  labels: ArrayLike,
  *,
  threshold: float | ArrayLike = 0.5,
  mask: ArrayLike | None = None,
  pooled: bool = False,
  num_classes: int | None = None,
  include_background: bool = False,
  ignore_index: int | None = None,
) -> tuple[Array, Array, Array, Array]:
  """Voxel confusion counts (TP, FP, FN, TN) of thresholded predictions.

  Args:
    predictions: lesion probabilities in [0, 1] or a binary mask (bool/int),
    shape ``[batch, *spatial]`` (no class axis).  Binarised as
    ``predictions >= threshold``.  With ``num_classes``: an integer class
    map of the same shape (e.g. the argmax over the class axis).
    labels: binary ground truth (0 or 1), same shape; with ``num_classes``
    an integer class map with values in ``[0, num_classes)``.  Other values
    (except ``ignore_index``) raise ValueError when concrete and are not
    counted when traced (under jit).
    threshold: probability at or above which a voxel is lesion (0.5 in the
    paper).  Must lie in [0, 1] (checked when concrete; may be traced).
    Unused with ``num_classes``.
    mask: optional bool/int array, same shape; only voxels where it is
    true/non-zero are counted.
    pooled: if True, sum the counts over the whole batch (every voxel).
    num_classes: None (binary lesion map) or the number of classes K >= 2
    of class maps: the counts are then one-vs-rest, per class.
    include_background: with ``num_classes``, also count class 0.
    ignore_index: optional label value (not a class, e.g. -1 or 255) of
    voxels that are not counted.

  Returns:
    ``(tp, fp, fn, tn)``, each of shape ``[batch]`` (scalars if ``pooled``);
    with ``num_classes``, ``[batch, classes']`` (``[classes']`` if
    ``pooled``), ``classes'`` being ``1..K-1`` (``0..K-1`` with
    ``include_background``).  Dtype int32 (int64 under ``jax_enable_x64``).
    int32 is ample for the paper's data (15 x 128 x 224 x 256 = 1.1e8
    voxels < 2**31 - 1 ~ 2.1e9); inputs beyond 2**31 - 1 voxels would
    overflow without x64.

  Raises:
    ValueError: mismatched shapes, a class axis, missing batch axis, bad
    dtypes, threshold outside [0, 1], non-bool ``pooled``, labels (or
    predicted classes) that are not classes, bad class options.

  Reference: the counts underlying the metrics of Salehi et al. 2017,
  arXiv 1706.05721 (Sec. 3).
  """
  pooled = _check_pooled(pooled)
  prep = _prepare(
    predictions,
    labels,
    threshold=threshold,
    mask=mask,
    num_classes=num_classes,
    include_background=include_background,
    ignore_index=ignore_index,
  )
  return _counts(prep, threshold, pooled)


def _counts(prep: _Prepared, threshold: Any, pooled: bool):
  return _counts_impl(
    prep.predictions,
    prep.labels,
    threshold,
    prep.valid,
    pooled=pooled,
    classes=prep.classes,
  )


@functools.partial(jax.jit, static_argnames=("pooled", "classes"))
def _counts_impl(
  predictions: Array,
  labels: Array,
  threshold: Array,
  valid: Array | None,
  pooled: bool,
  classes: tuple[int, ...] | None,
) -> tuple[Array, Array, Array, Array]:
  if classes is None:
    pred = (predictions >= threshold)[..., None]
    gt = (labels != 0)[..., None]
  else:
    pred = jnp.stack([predictions == c for c in classes], axis=-1)
    gt = jnp.stack([labels == c for c in classes], axis=-1)
  v = jnp.ones_like(gt) if valid is None else valid[..., None]
  axes = tuple(range(0 if pooled else 1, gt.ndim - 1))
  tp = jnp.sum(pred & gt & v, axis=axes)
  fp = jnp.sum(pred & ~gt & v, axis=axes)
  fn = jnp.sum(~pred & gt & v, axis=axes)
  tn = jnp.sum(~pred & ~gt & v, axis=axes)
  if classes is None:
    return tp[..., 0], fp[..., 0], fn[..., 0], tn[..., 0]
  return tp, fp, fn, tn


# ---------------------------------------------------------------------------
# formulas on counts
# ---------------------------------------------------------------------------


def dice_from_counts(
  tp: ArrayLike,
  fp: ArrayLike,
  fn: ArrayLike,
  tn: ArrayLike | None = None,
  *,
  empty: str = "one",
) -> Array:
  """Dice similarity coefficient from counts: ``2TP / (2TP + FP + FN)``.

  Counts of any (broadcastable) shape, int or float; ``tn`` is unused (it is
  accepted so that ``dice_from_counts(*confusion_counts(...))`` works).
  Returns the default float dtype, same shape as the counts.  Empty rule:
  ``empty="one"``: denominator 0 (no lesion, none predicted) gives 1.0;
  ``empty="nan"``: no lesion in the reference (TP + FN = 0) gives NaN, as
  MONAI's ``DiceMetric(ignore_empty=True)``.
  Reference: Salehi et al. 2017, arXiv 1706.05721 (Sec. 3, DSC).
  """
  del tn
  empty = _check_empty(empty)
  tp, fp, fn = (jnp.asarray(x) for x in (tp, fp, fn))
  return _dice_impl(tp, fp, fn, empty=empty)


def sensitivity_from_counts(
  tp: ArrayLike,
  fp: ArrayLike,
  fn: ArrayLike,
  tn: ArrayLike | None = None,
  *,
  empty: str = "one",
) -> Array:
  """Sensitivity (recall) from counts: ``TP / (TP + FN)``.

  ``fp`` and ``tn`` are unused.  Empty rule: no lesion voxel (TP + FN = 0)
  gives 1.0 (nothing to miss), or NaN with ``empty="nan"``.
  Reference: Salehi et al. 2017, arXiv 1706.05721 (Sec. 3).
  """
  del fp, tn
  empty = _check_empty(empty)
  tp, fn = jnp.asarray(tp), jnp.asarray(fn)
  return _ratio_impl(tp, tp + fn, fill=_fill(empty, 1.0))


def specificity_from_counts(
  tp: ArrayLike, fp: ArrayLike, fn: ArrayLike, tn: ArrayLike, *, empty: str = "one"
) -> Array:
  """Specificity from counts: ``TN / (TN + FP)``.

  ``tp`` and ``fn`` are unused.  Empty rule: no negative voxel
  (TN + FP = 0) gives 1.0, or NaN with ``empty="nan"``.
  Reference: Salehi et al. 2017, arXiv 1706.05721 (Sec. 3).
  """
  del tp, fn
  empty = _check_empty(empty)
  fp, tn = jnp.asarray(fp), jnp.asarray(tn)
  return _ratio_impl(tn, tn + fp, fill=_fill(empty, 1.0))


def precision_from_counts(
  tp: ArrayLike,
  fp: ArrayLike,
  fn: ArrayLike,
  tn: ArrayLike | None = None,
  *,
  empty: str = "one",
) -> Array:
  """Precision (positive predictive value) from counts: ``TP / (TP + FP)``.

  ``fn`` and ``tn`` are unused.  Empty rule: nothing predicted
  (TP + FP = 0) gives 1.0 (no false alarm), or NaN with ``empty="nan"``.
  Reference: Salehi et al. 2017, arXiv 1706.05721 (Tversky index with
  alpha=1, beta=0).
  """
  del fn, tn
  empty = _check_empty(empty)
  tp, fp = jnp.asarray(tp), jnp.asarray(fp)
  return _ratio_impl(tp, tp + fp, fill=_fill(empty, 1.0))


def f_beta_from_counts(
  tp: ArrayLike,
  fp: ArrayLike,
  fn: ArrayLike,
  tn: ArrayLike | None = None,
  *,
  beta: float | ArrayLike = 2.0,
  empty: str = "one",
) -> Array:
  """F_beta score from counts: ``(1+b^2)TP / ((1+b^2)TP + b^2 FN + FP)``.

  ``beta=2`` gives the paper's F2 = 5TP / (5TP + 4FN + FP); ``beta=1`` is
  Dice, ``beta=0`` is precision.  Equal to the Tversky index
  ``TP / (TP + a FP + b FN)`` with a = 1/(1+beta^2) (weight of false
  positives), b = beta^2/(1+beta^2) (weight of false negatives).
  ``tn`` is unused.  ``beta`` must be finite and >= 0 (checked when
  concrete).  Empty rule as DSC: ``empty="one"``: denominator 0 (no lesion,
  none predicted) gives 1; ``empty="nan"``: no lesion in the reference
  gives NaN.
  Reference: Salehi et al. 2017, arXiv 1706.05721 (Sec. 2.2 and 3).
  """
  del tn
  _check_beta(beta)
  empty = _check_empty(empty)
  return _f_beta_impl(tp, fp, fn, beta, empty=empty)


def npv_from_counts(
  tp: ArrayLike, fp: ArrayLike, fn: ArrayLike, tn: ArrayLike, *, empty: str = "one"
) -> Array:
  """Negative predictive value from counts: ``TN / (TN + FN)``.

  ``tp`` and ``fp`` are unused.  Empty rule: nothing predicted negative
  (TN + FN = 0) gives 1.0 (no missed lesion among the negatives), or NaN
  with ``empty="nan"`` (MONAI).  Not reported by Salehi et al. 2017
  (arXiv 1706.05721); the precision of the background.
  """
  del tp, fp
  empty = _check_empty(empty)
  fn, tn = jnp.asarray(fn), jnp.asarray(tn)
  return _ratio_impl(tn, tn + fn, fill=_fill(empty, 1.0))


def fpr_from_counts(
  tp: ArrayLike, fp: ArrayLike, fn: ArrayLike, tn: ArrayLike, *, empty: str = "one"
) -> Array:
  """False positive rate (fall-out) from counts: ``FP / (FP + TN)``.

  ``tp`` and ``fn`` are unused; equals ``1 - specificity``.  Empty rule: no
  negative voxel (FP + TN = 0) gives 0.0 (nothing to get wrong), or NaN
  with ``empty="nan"`` (MONAI).  Not reported by Salehi et al. 2017
  (arXiv 1706.05721).
  """
  del tp, fn
  empty = _check_empty(empty)
  fp, tn = jnp.asarray(fp), jnp.asarray(tn)
  return _ratio_impl(fp, fp + tn, fill=_fill(empty, 0.0))


def fnr_from_counts(
  tp: ArrayLike,
  fp: ArrayLike,
  fn: ArrayLike,
  tn: ArrayLike | None = None,
  *,
  empty: str = "one",
) -> Array:
  """False negative rate (miss rate) from counts: ``FN / (FN + TP)``.

  ``fp`` and ``tn`` are unused; equals ``1 - sensitivity``.  Empty rule: no
  lesion voxel (FN + TP = 0) gives 0.0 (nothing to miss), or NaN with
  ``empty="nan"`` (MONAI).  Not reported by Salehi et al. 2017
  (arXiv 1706.05721).
  """
  del fp, tn
  empty = _check_empty(empty)
  tp, fn = jnp.asarray(tp), jnp.asarray(fn)
  return _ratio_impl(fn, fn + tp, fill=_fill(empty, 0.0))


def balanced_accuracy_from_counts(
  tp: ArrayLike, fp: ArrayLike, fn: ArrayLike, tn: ArrayLike, *, empty: str = "one"
) -> Array:
  """Balanced accuracy from counts: ``(TP/(TP+FN) + TN/(TN+FP)) / 2``.

  The mean of sensitivity and specificity, each with its empty rule: with
  ``empty="one"`` a case without lesion (or without background) uses 1 for
  the undefined half; with ``empty="nan"`` it is NaN (MONAI).  scikit-learn's
  ``balanced_accuracy_score`` instead averages only the defined half.
  Sensitivity and specificity are reported by Salehi et al. 2017
  (arXiv 1706.05721, Sec. 3); their mean is not.
  """
  empty = _check_empty(empty)
  tp, fp, fn, tn = (jnp.asarray(x) for x in (tp, fp, fn, tn))
  return _balanced_accuracy_impl(tp, fp, fn, tn, empty=empty)


def mcc_from_counts(
  tp: ArrayLike, fp: ArrayLike, fn: ArrayLike, tn: ArrayLike, *, empty: str = "one"
) -> Array:
  """Matthews correlation coefficient from counts, in [-1, 1].

  ``(TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN))``, computed on the
  counts divided by their total (no overflow).  Empty rule: the denominator
  is 0 when the prediction or the reference is constant; ``empty="one"``
  gives 1 there if the case has no error (FP = FN = 0) and 0 otherwise (as
  scikit-learn, which gives 0 in both cases); ``empty="nan"`` gives NaN
  (MONAI).  Not reported by Salehi et al. 2017 (arXiv 1706.05721).
  """
  empty = _check_empty(empty)
  tp, fp, fn, tn = (jnp.asarray(x) for x in (tp, fp, fn, tn))
  return _mcc_impl(tp, fp, fn, tn, empty=empty)


def _fill(empty: str, perfect: float) -> float:
  """The value of a 0/0 ratio: ``perfect`` (empty="one") or NaN."""
  return perfect if empty == "one" else math.nan


@functools.partial(jax.jit, static_argnames=("fill",))
def _ratio_impl(num: Array, den: Array, fill: float) -> Array:
  return _fill_ratio(num, den, fill)


def _overlap_score(num: Array, den: Array, reference: Array, empty: str) -> Array:
  """DSC-like score: 1 at 0/0 ("one"), NaN without reference lesion ("nan")."""
  if empty == "one":
    return _safe_ratio(num, den)
  value = _fill_ratio(num, den, math.nan)
  return jnp.where(reference > 0, value, jnp.nan)


@functools.partial(jax.jit, static_argnames=("empty",))
def _dice_impl(tp: Array, fp: Array, fn: Array, empty: str) -> Array:
  return _overlap_score(2 * tp, 2 * tp + fp + fn, tp + fn, empty)


@functools.partial(jax.jit, static_argnames=("empty",))
def _f_beta_impl(tp: Array, fp: Array, fn: Array, beta: Array, empty: str) -> Array:
  dt = _float_dtype()
  tp, fp, fn = (jnp.asarray(x).astype(dt) for x in (tp, fp, fn))
  b2 = jnp.asarray(beta, dt) ** 2
  return _overlap_score((1 + b2) * tp, (1 + b2) * tp + b2 * fn + fp, tp + fn, empty)


@functools.partial(jax.jit, static_argnames=("empty",))
def _balanced_accuracy_impl(tp, fp, fn, tn, empty: str) -> Array:
  fill = _fill(empty, 1.0)
  return 0.5 * (_fill_ratio(tp, tp + fn, fill) + _fill_ratio(tn, tn + fp, fill))


@functools.partial(jax.jit, static_argnames=("empty",))
def _mcc_impl(tp, fp, fn, tn, empty: str) -> Array:
  dt = _float_dtype()
  tp, fp, fn, tn = jnp.broadcast_arrays(
    *(jnp.asarray(x).astype(dt) for x in (tp, fp, fn, tn))
  )
  n = tp + fp + fn + tn
  n = jnp.where(n > 0, n, 1)
  a, b, c, d = tp / n, fp / n, fn / n, tn / n
  ok = (a + b > 0) & (a + c > 0) & (d + b > 0) & (d + c > 0)
  den = jnp.sqrt((a + b) * (a + c)) * jnp.sqrt((d + b) * (d + c))
  value = (a * d - b * c) / jnp.where(ok, den, 1)
  if empty == "one":
    degenerate = jnp.where((fp == 0) & (fn == 0), 1.0, 0.0).astype(dt)
  else:
    degenerate = jnp.full_like(value, jnp.nan)
  return jnp.clip(jnp.where(ok, value, degenerate), -1.0, 1.0)


# ---------------------------------------------------------------------------
# metrics on predictions
# ---------------------------------------------------------------------------

_METRIC_DOC = """{title}

  ``{formula}``, per case (``[batch]``) or pooled over every voxel of the
  batch (scalar); with ``num_classes``, per class one-vs-rest
  (``[batch, classes']`` or ``[classes']``).  Empty rule: {empty}

  Args:
    predictions: lesion probabilities in [0, 1] or binary masks (bool/int),
    shape ``[batch, *spatial]`` (no class axis); lesion where
    ``predictions >= threshold``.  With ``num_classes``: an integer class
    map of the same shape (e.g. the argmax over the class axis).
    labels: binary ground truth (0 or 1), same shape; with ``num_classes``
    an integer class map.  Values that are not classes (except
    ``ignore_index``) raise ValueError when concrete and are not counted
    under jit.
    threshold: binarisation threshold in [0, 1] (0.5 in the paper); unused
    with ``num_classes``.
    mask: optional bool/int array of the same shape selecting the voxels
    to evaluate.
    pooled: if True, one value from counts summed over the whole batch.
    empty: ``"one"`` (default: a ratio with nothing to get wrong is
    perfect) or ``"nan"`` (MONAI: NaN, to be skipped with ``jnp.nanmean``);
    see the module docstring.
    num_classes: None (binary lesion map) or the number of classes K >= 2
    of class maps.
    include_background: with ``num_classes``, also report class 0.
    ignore_index: optional label value (not a class, e.g. -1 or 255) of
    voxels that are not evaluated.

  Returns:
    ``[batch]`` array (scalar if ``pooled``) in the default float dtype;
    ``[batch, classes']`` (``[classes']``) with ``num_classes``.

  Raises:
    ValueError: on mismatched shapes or bad arguments (see
    :func:`confusion_counts`).

  Reference: {reference}
  """

_PAPER = "Salehi et al. 2017, arXiv 1706.05721 (Sec. 3)."
_NOT_PAPER = (
  "not reported by Salehi et al. 2017 (arXiv 1706.05721); the\n"
  "  confusion-matrix metric of the same name (MONAI ConfusionMatrixMetric,\n"
  "  scikit-learn)."
)


def _metric_counts(
  predictions, labels, threshold, mask, pooled, num_classes, include_background,
  ignore_index,
):
  return confusion_counts(
    predictions,
    labels,
    threshold=threshold,
    mask=mask,
    pooled=pooled,
    num_classes=num_classes,
    include_background=include_background,
    ignore_index=ignore_index,
  )


def dice(
  predictions: ArrayLike,
  labels: ArrayLike,
  *,
  threshold: float | ArrayLike = 0.5,
  mask: ArrayLike | None = None,
  pooled: bool = False,
  empty: str = "one",
  num_classes: int | None = None,
  include_background: bool = False,
  ignore_index: int | None = None,
) -> Array:
  empty = _check_empty(empty)
  counts = _metric_counts(
    predictions, labels, threshold, mask, pooled, num_classes,
    include_background, ignore_index,
  )
  return dice_from_counts(*counts, empty=empty)


dice.__doc__ = _METRIC_DOC.format(
  title="Dice similarity coefficient (DSC, F1) of thresholded predictions.",
  formula="2TP / (2TP + FP + FN)",
  empty=(
    "no lesion and none predicted gives 1; otherwise 0 when TP = 0.\n"
    "  With ``empty=\"nan\"``: NaN whenever the reference has no lesion."
  ),
  reference=_PAPER,
)


def sensitivity(
  predictions: ArrayLike,
  labels: ArrayLike,
  *,
  threshold: float | ArrayLike = 0.5,
  mask: ArrayLike | None = None,
  pooled: bool = False,
  empty: str = "one",
  num_classes: int | None = None,
  include_background: bool = False,
  ignore_index: int | None = None,
) -> Array:
  empty = _check_empty(empty)
  counts = _metric_counts(
    predictions, labels, threshold, mask, pooled, num_classes,
    include_background, ignore_index,
  )
  return sensitivity_from_counts(*counts, empty=empty)


sensitivity.__doc__ = _METRIC_DOC.format(
  title="Sensitivity (recall, true positive rate) of thresholded predictions.",
  formula="TP / (TP + FN)",
  empty="no lesion voxel gives 1 (nothing to miss), or NaN.",
  reference=_PAPER,
)


def specificity(
  predictions: ArrayLike,
  labels: ArrayLike,
  *,
  threshold: float | ArrayLike = 0.5,
  mask: ArrayLike | None = None,
  pooled: bool = False,
  empty: str = "one",
  num_classes: int | None = None,
  include_background: bool = False,
  ignore_index: int | None = None,
) -> Array:
  empty = _check_empty(empty)
  counts = _metric_counts(
    predictions, labels, threshold, mask, pooled, num_classes,
    include_background, ignore_index,
  )
  return specificity_from_counts(*counts, empty=empty)


specificity.__doc__ = _METRIC_DOC.format(
  title="Specificity (true negative rate) of thresholded predictions.",
  formula="TN / (TN + FP)",
  empty="no negative (non-lesion) voxel gives 1, or NaN.",
  reference=_PAPER,
)


def precision(
  predictions: ArrayLike,
  labels: ArrayLike,
  *,
  threshold: float | ArrayLike = 0.5,
  mask: ArrayLike | None = None,
  pooled: bool = False,
  empty: str = "one",
  num_classes: int | None = None,
  include_background: bool = False,
  ignore_index: int | None = None,
) -> Array:
  empty = _check_empty(empty)
  counts = _metric_counts(
    predictions, labels, threshold, mask, pooled, num_classes,
    include_background, ignore_index,
  )
  return precision_from_counts(*counts, empty=empty)


precision.__doc__ = _METRIC_DOC.format(
  title="Precision (positive predictive value) of thresholded predictions.",
  formula="TP / (TP + FP)",
  empty="nothing predicted gives 1 (no false alarm), or NaN.",
  reference=_PAPER,
)


def f_beta(
  predictions: ArrayLike,
  labels: ArrayLike,
  *,
  beta: float | ArrayLike = 2.0,
  threshold: float | ArrayLike = 0.5,
  mask: ArrayLike | None = None,
  pooled: bool = False,
  empty: str = "one",
  num_classes: int | None = None,
  include_background: bool = False,
  ignore_index: int | None = None,
) -> Array:
  _check_beta(beta)
  empty = _check_empty(empty)
  counts = _metric_counts(
    predictions, labels, threshold, mask, pooled, num_classes,
    include_background, ignore_index,
  )
  return f_beta_from_counts(*counts, beta=beta, empty=empty)


f_beta.__doc__ = _METRIC_DOC.format(
  title=(
    "F_beta score of thresholded predictions (beta=2: the paper's F2).\n\n"
    "  Equals the Tversky index with alpha = 1/(1+beta^2) (weight of FP) and\n"
    "  beta_T = beta^2/(1+beta^2) (weight of FN); beta must be finite, >= 0."
  ),
  formula="(1+beta^2)TP / ((1+beta^2)TP + beta^2 FN + FP); F2 = 5TP/(5TP+4FN+FP)",
  empty=(
    "no lesion and none predicted gives 1; otherwise 0 when TP = 0.\n"
    "  With ``empty=\"nan\"``: NaN whenever the reference has no lesion."
  ),
  reference="Salehi et al. 2017, arXiv 1706.05721 (Sec. 2.2 and 3).",
)


def npv(
  predictions: ArrayLike,
  labels: ArrayLike,
  *,
  threshold: float | ArrayLike = 0.5,
  mask: ArrayLike | None = None,
  pooled: bool = False,
  empty: str = "one",
  num_classes: int | None = None,
  include_background: bool = False,
  ignore_index: int | None = None,
) -> Array:
  empty = _check_empty(empty)
  counts = _metric_counts(
    predictions, labels, threshold, mask, pooled, num_classes,
    include_background, ignore_index,
  )
  return npv_from_counts(*counts, empty=empty)


npv.__doc__ = _METRIC_DOC.format(
  title="Negative predictive value of thresholded predictions.",
  formula="TN / (TN + FN)",
  empty="nothing predicted negative gives 1, or NaN.",
  reference=_NOT_PAPER,
)


def fpr(
  predictions: ArrayLike,
  labels: ArrayLike,
  *,
  threshold: float | ArrayLike = 0.5,
  mask: ArrayLike | None = None,
  pooled: bool = False,
  empty: str = "one",
  num_classes: int | None = None,
  include_background: bool = False,
  ignore_index: int | None = None,
) -> Array:
  empty = _check_empty(empty)
  counts = _metric_counts(
    predictions, labels, threshold, mask, pooled, num_classes,
    include_background, ignore_index,
  )
  return fpr_from_counts(*counts, empty=empty)


fpr.__doc__ = _METRIC_DOC.format(
  title="False positive rate (fall-out, 1 - specificity) of thresholded predictions.",
  formula="FP / (FP + TN)",
  empty="no negative voxel gives 0 (nothing to get wrong), or NaN.",
  reference=_NOT_PAPER,
)


def fnr(
  predictions: ArrayLike,
  labels: ArrayLike,
  *,
  threshold: float | ArrayLike = 0.5,
  mask: ArrayLike | None = None,
  pooled: bool = False,
  empty: str = "one",
  num_classes: int | None = None,
  include_background: bool = False,
  ignore_index: int | None = None,
) -> Array:
  empty = _check_empty(empty)
  counts = _metric_counts(
    predictions, labels, threshold, mask, pooled, num_classes,
    include_background, ignore_index,
  )
  return fnr_from_counts(*counts, empty=empty)


fnr.__doc__ = _METRIC_DOC.format(
  title="False negative rate (miss rate, 1 - sensitivity) of thresholded predictions.",
  formula="FN / (FN + TP)",
  empty="no lesion voxel gives 0 (nothing to miss), or NaN.",
  reference=_NOT_PAPER,
)


def balanced_accuracy(
  predictions: ArrayLike,
  labels: ArrayLike,
  *,
  threshold: float | ArrayLike = 0.5,
  mask: ArrayLike | None = None,
  pooled: bool = False,
  empty: str = "one",
  num_classes: int | None = None,
  include_background: bool = False,
  ignore_index: int | None = None,
) -> Array:
  empty = _check_empty(empty)
  counts = _metric_counts(
    predictions, labels, threshold, mask, pooled, num_classes,
    include_background, ignore_index,
  )
  return balanced_accuracy_from_counts(*counts, empty=empty)


balanced_accuracy.__doc__ = _METRIC_DOC.format(
  title="Balanced accuracy (mean of sensitivity and specificity).",
  formula="(TP / (TP + FN) + TN / (TN + FP)) / 2",
  empty=(
    "each half follows its own rule (1 when undefined); with\n"
    "  ``empty=\"nan\"`` NaN when either half is undefined."
  ),
  reference=_NOT_PAPER,
)


def mcc(
  predictions: ArrayLike,
  labels: ArrayLike,
  *,
  threshold: float | ArrayLike = 0.5,
  mask: ArrayLike | None = None,
  pooled: bool = False,
  empty: str = "one",
  num_classes: int | None = None,
  include_background: bool = False,
  ignore_index: int | None = None,
) -> Array:
  empty = _check_empty(empty)
  counts = _metric_counts(
    predictions, labels, threshold, mask, pooled, num_classes,
    include_background, ignore_index,
  )
  return mcc_from_counts(*counts, empty=empty)


mcc.__doc__ = _METRIC_DOC.format(
  title="Matthews correlation coefficient of thresholded predictions, in [-1, 1].",
  formula="(TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN))",
  empty=(
    "a constant prediction or reference (denominator 0) gives 1 if\n"
    "  FP = FN = 0, else 0 (scikit-learn: 0); or NaN."
  ),
  reference=_NOT_PAPER,
)


# ---------------------------------------------------------------------------
# average precision (APR)
# ---------------------------------------------------------------------------


def _average_precision_flat(
  scores: Array, positive: Array, valid: Array | None
) -> Array:
  """Exact AP of one flat vector of scores (see :func:`average_precision`)."""
  n = scores.shape[0]
  dt = _float_dtype()
  if n == 0:  # static shape: no voxel at all, hence no positive
    return jnp.asarray(jnp.nan, dt)
  # Sort ascending by (masked?, -score): selected voxels first, by decreasing
  # score; masked-out voxels last, where they carry zero weight.
  if valid is None:
    keys: tuple[Array, ...] = (-scores,)
    out = lax.sort(keys + (positive,), num_keys=1)
    skeys, spos = out[:1], out[1]
    sneg = ~spos
  else:
    keys = (~valid, -scores)
    out = lax.sort(keys + (positive & valid,), num_keys=2)
    skeys, spos = out[:2], out[2]
    sneg = ~out[0] & ~spos
  # A position ends its tie group if the next key differs (or it is last).
  differs = jnp.zeros((n - 1,), bool)
  for k in skeys:
    differs = differs | (k[1:] != k[:-1])
  is_end = jnp.concatenate([differs, jnp.ones((1,), bool)])
  # Cumulative TP / FP counts in decreasing-score order (default int: int32
  # unless x64), then read at the end of each voxel's tie group: the counts
  # are non-decreasing, so that is a reverse cumulative minimum over the
  # group-end positions.
  counts = jnp.cumsum(jnp.stack([spos, sneg]), axis=1)
  big = jnp.iinfo(counts.dtype).max
  at_end = lax.cummin(jnp.where(is_end, counts, big), axis=1, reverse=True)
  tp_end, fp_end = at_end[0], at_end[1]
  n_pos = counts[0, -1]
  # precision at the threshold = this voxel's tie group (all its ties counted)
  prec = _safe_ratio(tp_end, tp_end + fp_end)
  total = jnp.sum(jnp.where(spos, prec, 0).astype(dt))
  return jnp.where(
    n_pos > 0, total / jnp.where(n_pos > 0, n_pos, 1).astype(dt), jnp.nan
  ).astype(dt)


def average_precision(
  probabilities: ArrayLike,
  labels: ArrayLike,
  *,
  mask: ArrayLike | None = None,
  pooled: bool = False,
  ignore_index: int | None = None,
) -> Array:
  """Exact average precision (APR, area under the precision-recall curve).

  The paper's preferred metric for skewed data.  With the distinct scores
  as thresholds in decreasing order,
  ``AP = sum_k (R_k - R_{k-1}) P_k``
  i.e. the sum over positive voxels of the precision at their score's
  threshold, divided by the number of positives.  Voxels with equal scores
  form one threshold (their precision counts all ties), exactly as
  ``sklearn.metrics.average_precision_score(labels.ravel(),
  probabilities.ravel())``.  Computed with a sort (no histogram), int
  cumulative counts and a reverse ``lax.cummin`` for tie-group ends; static
  shapes, jit- and vmap-compatible.  Only the ranking matters, so logits
  also work; NaN scores are not supported.

  Size limit: the cumulative counts are JAX's default int, int32 unless
  ``jax_enable_x64``, so more than 2**31 - 1 voxels (in a case, or in the
  whole batch when ``pooled``) overflow *silently* (wrong value, no error),
  and the sort holds every voxel on the device.  Fine per case (a 512^3
  volume is 1.3e8 voxels); for a pooled AP over a large test set use
  :func:`tversky_jax.evaluate.average_precision_from_counts` (NumPy, int64
  counts per distinct score, merged case by case), which
  ``tversky-evaluate`` and validation use.

  Args:
    probabilities: lesion probabilities (or any scores; bool/int accepted,
    e.g. a binary mask), shape ``[batch, *spatial]``, no class axis.
    labels: binary ground truth (0 or 1), same shape.  Other values (except
    ``ignore_index``) raise ValueError when concrete and are not ranked
    under jit, as in :func:`confusion_counts`.
    mask: optional bool/int array of the same shape; only selected voxels
    are ranked and counted (masked voxels are sorted after all selected
    ones via a second sort key and carry zero weight).
    pooled: if True, one AP over all voxels of the batch; else one per case.
    ignore_index: optional label value (not 0 or 1) of voxels to leave out.

  Returns:
    ``[batch]`` (scalar if ``pooled``) in the default float dtype.  NaN
    where there is no positive (selected) voxel: AP is undefined there
    (scikit-learn warns and returns 0); use ``jnp.nanmean`` to aggregate.

  Raises:
    ValueError: mismatched shapes, probabilities with a class axis, bad
    dtypes, non-bool ``pooled``, labels that are not 0 or 1.

  Reference: Salehi et al. 2017, arXiv 1706.05721 (Sec. 3, APR).
  """
  probabilities, labels, mask = _validate(
    probabilities, labels, mask, pred_name="probabilities"
  )
  pooled = _check_pooled(pooled)
  k = _check_class_options(None, False, ignore_index)
  valid = _label_validity(labels, k, ignore_index)
  if mask is not None:
    valid = mask if valid is None else mask & valid
  return _average_precision(probabilities, labels, valid, pooled)


def _average_precision(
  probabilities: Array, labels: Array, valid: Array | None, pooled: bool
) -> Array:
  if not jnp.issubdtype(probabilities.dtype, jnp.floating):
    # bool/int scores: exact in the default float for any realistic score
    probabilities = probabilities.astype(_float_dtype())
  return _average_precision_impl(probabilities, labels, valid, pooled=pooled)


@functools.partial(jax.jit, static_argnames=("pooled",))
def _average_precision_impl(
  probabilities: Array, labels: Array, mask: Array | None, pooled: bool
) -> Array:
  scores = probabilities
  positive = labels != 0
  if pooled:
    return _average_precision_flat(
      scores.reshape(-1),
      positive.reshape(-1),
      None if mask is None else mask.reshape(-1),
    )
  batch = scores.shape[0]
  n = math.prod(scores.shape[1:])
  scores = scores.reshape(batch, n)
  positive = positive.reshape(batch, n)
  if mask is None:
    return jax.vmap(lambda s, p: _average_precision_flat(s, p, None))(
      scores, positive
    )
  return jax.vmap(_average_precision_flat)(scores, positive, mask.reshape(batch, n))


# ---------------------------------------------------------------------------
# everything at once
# ---------------------------------------------------------------------------


def all_metrics(
  predictions: ArrayLike,
  labels: ArrayLike,
  *,
  threshold: float | ArrayLike = 0.5,
  mask: ArrayLike | None = None,
  pooled: bool = False,
  empty: str = "one",
  num_classes: int | None = None,
  include_background: bool = False,
  ignore_index: int | None = None,
) -> dict[str, Array]:
  """All metrics of the paper's Table 1 (plus precision) in one pass.

  Args:
    predictions: lesion probabilities in [0, 1] (or binary masks), shape
    ``[batch, *spatial]``, no class axis; with ``num_classes`` an integer
    class map.
    labels: binary ground truth (0 or 1), same shape; with ``num_classes``
    an integer class map.
    threshold: binarisation threshold for the count-based metrics (0.5).
    mask: optional bool/int voxel selection, same shape.
    pooled: if True, scalars over the whole batch; else ``[batch]`` each.
    empty: ``"one"`` or ``"nan"``: the empty-case rule of the ratios (see
    the module docstring); APR is NaN without lesion either way.
    num_classes, include_background: per-class metrics of class maps, each
    ``[batch, classes']`` (``[classes']`` pooled); see
    :func:`confusion_counts`.
    ignore_index: optional label value (not a class) of voxels to leave out.

  Returns:
    dict with keys ``dsc``, ``sensitivity``, ``specificity``,
    ``precision``, ``f2`` (from one set of confusion counts) and, without
    ``num_classes``, ``apr`` (:func:`average_precision` of the raw
    predictions; meaningful only when they are probabilities, always
    computed; NaN for cases without lesion).  Class maps have no scores, so
    no ``apr``.  Empty-case rules as in the module docstring.

  Raises:
    ValueError: as :func:`confusion_counts`.

  Reference: Salehi et al. 2017, arXiv 1706.05721 (Sec. 3, Table 1).
  """
  pooled = _check_pooled(pooled)
  empty = _check_empty(empty)
  prep = _prepare(
    predictions,
    labels,
    threshold=threshold,
    mask=mask,
    num_classes=num_classes,
    include_background=include_background,
    ignore_index=ignore_index,
  )
  counts = _counts(prep, threshold, pooled)
  result = {
    "dsc": dice_from_counts(*counts, empty=empty),
    "sensitivity": sensitivity_from_counts(*counts, empty=empty),
    "specificity": specificity_from_counts(*counts, empty=empty),
    "precision": precision_from_counts(*counts, empty=empty),
    "f2": f_beta_from_counts(*counts, beta=2.0, empty=empty),
  }
  if prep.classes is None:
    result["apr"] = _average_precision(
      prep.predictions, prep.labels, prep.valid, pooled
    )
  return result
