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

Conventions
-----------
* ``predictions`` are lesion probabilities in [0, 1] or binary masks (bool or
  int), shape ``[batch, *spatial]`` with any number of spatial axes.  The
  project is channels-last, but these functions take the *foreground map
  only*: no class axis.  A voxel is predicted lesion when
  ``predictions >= threshold`` (``threshold=0.5`` by default, as in the paper).
* ``labels`` are binary, same shape; a voxel is lesion when ``labels != 0``.
* ``mask`` (optional, bool or int, same shape) selects the voxels that are
  evaluated (e.g. a brain mask); unselected voxels count nowhere.
* ``pooled=False`` gives one value per case, shape ``[batch]``;
  ``pooled=True`` gives a scalar computed from counts summed over every voxel
  of the batch (not the mean of the per-case values).
* Everything is jit-compatible: no Python branching on array values.
  ``threshold`` and ``beta`` may be traced; ``pooled`` must be a Python bool.
  Values are only range-checked when they are concrete.

Empty cases
-----------
Rule: *a ratio whose denominator is 0 means there was nothing of that kind to
get wrong, and is 1.0*.  Hence

=============================  ====  ===========  =========  ======  ===========
case                           DSC   sensitivity  precision  F_beta  specificity
=============================  ====  ===========  =========  ======  ===========
no lesion, nothing predicted   1     1            1          1       (as usual)
no lesion, voxels predicted    0     1            0          0       (as usual)
lesion, nothing predicted      0     0            1          0       (as usual)
no negative voxel at all       --    --           --         --      1
=============================  ====  ===========  =========  ======  ===========

APR with no positive (lesion) voxel is undefined and is ``NaN`` (scikit-learn
warns and returns 0 there); aggregate per-case APR with ``jnp.nanmean``.
Apart from that, no metric returns NaN or divides by zero (denominators are
made safe with ``jnp.where``), as long as the inputs contain no NaN.

Counts and precision
--------------------
Counts are JAX's default integer type: int32 (int64 with ``jax_enable_x64``).
int32 holds up to 2**31 - 1 ~ 2.1e9 voxels; the paper's whole data set,
15 x 128 x 224 x 256 = 110,100,480 voxels, is ~5% of that, so even pooled
counts over all of it cannot overflow.  Inputs with more than 2**31 - 1
voxels (per case, or in total when pooled) would overflow without x64.
Ratios are computed in the default float type (float32 unless x64), i.e.
to ~1e-7 relative precision.

``average_precision`` is exact (it sorts; it does not bin the scores): it
equals ``sklearn.metrics.average_precision_score(labels.ravel(),
probabilities.ravel())`` including tied scores, which form a single
threshold.  It costs an O(n log n) sort of the voxels of each case (of the
whole batch when pooled).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array
ArrayLike = Any  # jax.typing.ArrayLike; kept loose for numpy / python scalars

__all__ = [
  "confusion_counts",
  "dice",
  "sensitivity",
  "specificity",
  "precision",
  "f_beta",
  "average_precision",
  "all_metrics",
  "dice_from_counts",
  "sensitivity_from_counts",
  "specificity_from_counts",
  "precision_from_counts",
  "f_beta_from_counts",
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
        f"e.g. {pred_name}[..., lesion_channel]"
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


def _safe_ratio(num: Array, den: Array) -> Array:
  """num/den, and 1.0 where den == 0 (nothing of that kind to get wrong)."""
  dt = _float_dtype()
  num = jnp.asarray(num).astype(dt)
  den = jnp.asarray(den).astype(dt)
  ok = den != 0
  return jnp.where(ok, num / jnp.where(ok, den, 1), jnp.ones_like(num))


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
) -> tuple[Array, Array, Array, Array]:
  """Voxel confusion counts (TP, FP, FN, TN) of thresholded predictions.

  Args:
    predictions: lesion probabilities in [0, 1] or a binary mask (bool/int),
    shape ``[batch, *spatial]`` (no class axis).  Binarised as
    ``predictions >= threshold``.
    labels: binary ground truth, same shape; lesion where ``labels != 0``.
    threshold: probability at or above which a voxel is lesion (0.5 in the
    paper).  Must lie in [0, 1] (checked when concrete; may be traced).
    mask: optional bool/int array, same shape; only voxels where it is
    true/non-zero are counted.
    pooled: if True, sum the counts over the whole batch (every voxel).

  Returns:
    ``(tp, fp, fn, tn)``, each of shape ``[batch]`` (scalars if ``pooled``),
    dtype int32 (int64 under ``jax_enable_x64``).  int32 is ample for the
    paper's data (15 x 128 x 224 x 256 = 1.1e8 voxels < 2**31 - 1 ~ 2.1e9);
    inputs beyond 2**31 - 1 voxels would overflow without x64.

  Raises:
    ValueError: mismatched shapes, a class axis, missing batch axis, bad
    dtypes, threshold outside [0, 1], non-bool ``pooled``.

  Reference: the counts underlying the metrics of Salehi et al. 2017,
  arXiv 1706.05721 (Sec. 3).
  """
  predictions, labels, mask = _validate(predictions, labels, mask)
  _check_threshold(threshold)
  pooled = _check_pooled(pooled)
  return _counts_impl(predictions, labels, threshold, mask, pooled=pooled)


@functools.partial(jax.jit, static_argnames=("pooled",))
def _counts_impl(
  predictions: Array, labels: Array, threshold: Array, mask: Array | None, pooled: bool
) -> tuple[Array, Array, Array, Array]:
  pred = predictions >= threshold
  gt = labels != 0
  if mask is None:
    valid = jnp.ones_like(gt)
  else:
    valid = mask
  axes = None if pooled else tuple(range(1, gt.ndim))
  tp = jnp.sum(pred & gt & valid, axis=axes)
  fp = jnp.sum(pred & ~gt & valid, axis=axes)
  fn = jnp.sum(~pred & gt & valid, axis=axes)
  tn = jnp.sum(~pred & ~gt & valid, axis=axes)
  return tp, fp, fn, tn


# ---------------------------------------------------------------------------
# formulas on counts
# ---------------------------------------------------------------------------


def dice_from_counts(
  tp: ArrayLike, fp: ArrayLike, fn: ArrayLike, tn: ArrayLike | None = None
) -> Array:
  """Dice similarity coefficient from counts: ``2TP / (2TP + FP + FN)``.

  Counts of any (broadcastable) shape, int or float; ``tn`` is unused (it is
  accepted so that ``dice_from_counts(*confusion_counts(...))`` works).
  Returns the default float dtype, same shape as the counts.  Empty rule:
  denominator 0 (no lesion, none predicted) gives 1.0.
  Reference: Salehi et al. 2017, arXiv 1706.05721 (Sec. 3, DSC).
  """
  del tn
  tp, fp, fn = (jnp.asarray(x) for x in (tp, fp, fn))
  return _dice_impl(tp, fp, fn)


def sensitivity_from_counts(
  tp: ArrayLike, fp: ArrayLike, fn: ArrayLike, tn: ArrayLike | None = None
) -> Array:
  """Sensitivity (recall) from counts: ``TP / (TP + FN)``.

  ``fp`` and ``tn`` are unused.  Empty rule: no lesion voxel (TP + FN = 0)
  gives 1.0 (nothing to miss).
  Reference: Salehi et al. 2017, arXiv 1706.05721 (Sec. 3).
  """
  del fp, tn
  tp, fn = jnp.asarray(tp), jnp.asarray(fn)
  return _ratio_impl(tp, tp + fn)


def specificity_from_counts(
  tp: ArrayLike, fp: ArrayLike, fn: ArrayLike, tn: ArrayLike
) -> Array:
  """Specificity from counts: ``TN / (TN + FP)``.

  ``tp`` and ``fn`` are unused.  Empty rule: no negative voxel
  (TN + FP = 0) gives 1.0.
  Reference: Salehi et al. 2017, arXiv 1706.05721 (Sec. 3).
  """
  del tp, fn
  fp, tn = jnp.asarray(fp), jnp.asarray(tn)
  return _ratio_impl(tn, tn + fp)


def precision_from_counts(
  tp: ArrayLike, fp: ArrayLike, fn: ArrayLike, tn: ArrayLike | None = None
) -> Array:
  """Precision (positive predictive value) from counts: ``TP / (TP + FP)``.

  ``fn`` and ``tn`` are unused.  Empty rule: nothing predicted
  (TP + FP = 0) gives 1.0 (no false alarm).
  Reference: Salehi et al. 2017, arXiv 1706.05721 (Tversky index with
  alpha=1, beta=0).
  """
  del fn, tn
  tp, fp = jnp.asarray(tp), jnp.asarray(fp)
  return _ratio_impl(tp, tp + fp)


def f_beta_from_counts(
  tp: ArrayLike,
  fp: ArrayLike,
  fn: ArrayLike,
  tn: ArrayLike | None = None,
  *,
  beta: float | ArrayLike = 2.0,
) -> Array:
  """F_beta score from counts: ``(1+b^2)TP / ((1+b^2)TP + b^2 FN + FP)``.

  ``beta=2`` gives the paper's F2 = 5TP / (5TP + 4FN + FP); ``beta=1`` is
  Dice, ``beta=0`` is precision.  Equal to the Tversky index
  ``TP / (TP + a FP + b FN)`` with a = 1/(1+beta^2), b = beta^2/(1+beta^2).
  ``tn`` is unused.  ``beta`` must be finite and >= 0 (checked when
  concrete).  Empty rule: denominator 0 (no lesion, none predicted) gives 1.
  Reference: Salehi et al. 2017, arXiv 1706.05721 (Sec. 2.2 and 3).
  """
  del tn
  _check_beta(beta)
  return _f_beta_impl(tp, fp, fn, beta)


@jax.jit
def _ratio_impl(num: Array, den: Array) -> Array:
  return _safe_ratio(num, den)


@jax.jit
def _dice_impl(tp: Array, fp: Array, fn: Array) -> Array:
  return _safe_ratio(2 * tp, 2 * tp + fp + fn)


@jax.jit
def _f_beta_impl(tp: Array, fp: Array, fn: Array, beta: Array) -> Array:
  dt = _float_dtype()
  tp, fp, fn = (jnp.asarray(x).astype(dt) for x in (tp, fp, fn))
  b2 = jnp.asarray(beta, dt) ** 2
  return _safe_ratio((1 + b2) * tp, (1 + b2) * tp + b2 * fn + fp)


# ---------------------------------------------------------------------------
# metrics on predictions
# ---------------------------------------------------------------------------

_METRIC_DOC = """{title}

  ``{formula}``, per case (``[batch]``) or pooled over every voxel of the
  batch (scalar).  Empty rule: {empty}

  Args:
    predictions: lesion probabilities in [0, 1] or binary masks (bool/int),
    shape ``[batch, *spatial]`` (no class axis); lesion where
    ``predictions >= threshold``.
    labels: binary ground truth, same shape; lesion where ``labels != 0``.
    threshold: binarisation threshold in [0, 1] (0.5 in the paper).
    mask: optional bool/int array of the same shape selecting the voxels
    to evaluate.
    pooled: if True, one scalar from counts summed over the whole batch.

  Returns:
    ``[batch]`` array (scalar if ``pooled``) in the default float dtype.

  Raises:
    ValueError: on mismatched shapes or bad arguments (see
    :func:`confusion_counts`).

  Reference: Salehi et al. 2017, arXiv 1706.05721 (Sec. 3).
  """


def dice(
  predictions: ArrayLike,
  labels: ArrayLike,
  *,
  threshold: float | ArrayLike = 0.5,
  mask: ArrayLike | None = None,
  pooled: bool = False,
) -> Array:
  counts = confusion_counts(
    predictions, labels, threshold=threshold, mask=mask, pooled=pooled
  )
  return dice_from_counts(*counts)


dice.__doc__ = _METRIC_DOC.format(
  title="Dice similarity coefficient (DSC, F1) of thresholded predictions.",
  formula="2TP / (2TP + FP + FN)",
  empty="no lesion and none predicted gives 1; otherwise 0 when TP = 0.",
)


def sensitivity(
  predictions: ArrayLike,
  labels: ArrayLike,
  *,
  threshold: float | ArrayLike = 0.5,
  mask: ArrayLike | None = None,
  pooled: bool = False,
) -> Array:
  counts = confusion_counts(
    predictions, labels, threshold=threshold, mask=mask, pooled=pooled
  )
  return sensitivity_from_counts(*counts)


sensitivity.__doc__ = _METRIC_DOC.format(
  title="Sensitivity (recall, true positive rate) of thresholded predictions.",
  formula="TP / (TP + FN)",
  empty="no lesion voxel gives 1 (nothing to miss).",
)


def specificity(
  predictions: ArrayLike,
  labels: ArrayLike,
  *,
  threshold: float | ArrayLike = 0.5,
  mask: ArrayLike | None = None,
  pooled: bool = False,
) -> Array:
  counts = confusion_counts(
    predictions, labels, threshold=threshold, mask=mask, pooled=pooled
  )
  return specificity_from_counts(*counts)


specificity.__doc__ = _METRIC_DOC.format(
  title="Specificity (true negative rate) of thresholded predictions.",
  formula="TN / (TN + FP)",
  empty="no negative (non-lesion) voxel gives 1.",
)


def precision(
  predictions: ArrayLike,
  labels: ArrayLike,
  *,
  threshold: float | ArrayLike = 0.5,
  mask: ArrayLike | None = None,
  pooled: bool = False,
) -> Array:
  counts = confusion_counts(
    predictions, labels, threshold=threshold, mask=mask, pooled=pooled
  )
  return precision_from_counts(*counts)


precision.__doc__ = _METRIC_DOC.format(
  title="Precision (positive predictive value) of thresholded predictions.",
  formula="TP / (TP + FP)",
  empty="nothing predicted gives 1 (no false alarm).",
)


def f_beta(
  predictions: ArrayLike,
  labels: ArrayLike,
  *,
  beta: float | ArrayLike = 2.0,
  threshold: float | ArrayLike = 0.5,
  mask: ArrayLike | None = None,
  pooled: bool = False,
) -> Array:
  counts = confusion_counts(
    predictions, labels, threshold=threshold, mask=mask, pooled=pooled
  )
  return f_beta_from_counts(*counts, beta=beta)


f_beta.__doc__ = _METRIC_DOC.format(
  title=(
    "F_beta score of thresholded predictions (beta=2: the paper's F2).\n\n"
    "    Equals the Tversky index with alpha = 1/(1+beta^2) (weight of FP) and\n"
    "    beta_T = beta^2/(1+beta^2) (weight of FN); beta must be finite, >= 0."
  ),
  formula="(1+beta^2)TP / ((1+beta^2)TP + beta^2 FN + FP); F2 = 5TP/(5TP+4FN+FP)",
  empty="no lesion and none predicted gives 1; otherwise 0 when TP = 0.",
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

  Args:
    probabilities: lesion probabilities (or any scores; bool/int accepted,
    e.g. a binary mask), shape ``[batch, *spatial]``, no class axis.
    labels: binary ground truth, same shape; lesion where ``labels != 0``.
    mask: optional bool/int array of the same shape; only selected voxels
    are ranked and counted (masked voxels are sorted after all selected
    ones via a second sort key and carry zero weight).
    pooled: if True, one AP over all voxels of the batch; else one per case.

  Returns:
    ``[batch]`` (scalar if ``pooled``) in the default float dtype.  NaN
    where there is no positive (selected) voxel: AP is undefined there
    (scikit-learn warns and returns 0); use ``jnp.nanmean`` to aggregate.

  Raises:
    ValueError: mismatched shapes, probabilities with a class axis, bad
    dtypes, non-bool ``pooled``.

  Reference: Salehi et al. 2017, arXiv 1706.05721 (Sec. 3, APR).
  """
  probabilities, labels, mask = _validate(
    probabilities, labels, mask, pred_name="probabilities"
  )
  pooled = _check_pooled(pooled)
  if not jnp.issubdtype(probabilities.dtype, jnp.floating):
    # bool/int scores: exact in the default float for any realistic score
    probabilities = probabilities.astype(_float_dtype())
  return _average_precision_impl(probabilities, labels, mask, pooled=pooled)


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
) -> dict[str, Array]:
  """All metrics of the paper's Table 1 (plus precision) in one pass.

  Args:
    predictions: lesion probabilities in [0, 1] (or binary masks), shape
    ``[batch, *spatial]``, no class axis.
    labels: binary ground truth, same shape.
    threshold: binarisation threshold for the count-based metrics (0.5).
    mask: optional bool/int voxel selection, same shape.
    pooled: if True, scalars over the whole batch; else ``[batch]`` each.

  Returns:
    dict with keys ``dsc``, ``sensitivity``, ``specificity``,
    ``precision``, ``f2`` (from one set of confusion counts) and ``apr``
    (:func:`average_precision` of the raw predictions; meaningful only when
    they are probabilities, always computed; NaN for cases without
    lesion).  Empty-case rules as in the module docstring.

  Raises:
    ValueError: as :func:`confusion_counts`.

  Reference: Salehi et al. 2017, arXiv 1706.05721 (Sec. 3, Table 1).
  """
  counts = confusion_counts(
    predictions, labels, threshold=threshold, mask=mask, pooled=pooled
  )
  return {
    "dsc": dice_from_counts(*counts),
    "sensitivity": sensitivity_from_counts(*counts),
    "specificity": specificity_from_counts(*counts),
    "precision": precision_from_counts(*counts),
    "f2": f_beta_from_counts(*counts, beta=2.0),
    "apr": average_precision(predictions, labels, mask=mask, pooled=pooled),
  }
