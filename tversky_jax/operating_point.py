"""The operating point: the lesion threshold chosen on the validation cases.

The Tversky loss shifts the calibration of the softmax: a run trained with
beta > alpha (false negatives weigh more) reaches a good APR, but its masks
at the paper's threshold 0.5 are too large, and its DSC and F2 there are
poor. At every validation the trainer therefore also scores the lesion masks
``p(lesion) >= t`` for each ``t`` of :data:`GRID` (and the configured
``inference.threshold``) and keeps the ``t`` with the highest
``train.best_metric``. It is stored with that validation's checkpoint (the
``operating_point`` item of its ``meta``), so every validated checkpoint,
best or latest, carries the threshold of its own parameters, and
``tversky-predict --threshold chosen`` uses it (opt-in: on held-out
cases it helped one task and hurt another, docs/real_data.md).

The metric of each threshold is computed exactly as validation computes it
(:func:`tversky_jax.validation.segment` for the mask,
:func:`tversky_jax.evaluate.voxel_metrics` with ``empty="nan"`` per case and
:func:`tversky_jax.evaluate.finite_mean` over the cases: a case whose
reference is empty is left out of DSC, F2 and sensitivity), so at the
configured threshold it equals the logged ``val/NAME``, which still ranks
the checkpoints. The value at the chosen threshold is optimistic: the
threshold was chosen on these cases. Cost: a few passes over each
validation volume per threshold (about 0.3 s for a 160^3 case on a CPU
core), no second inference.

Not searched (the configured threshold stays): ``train.best_metric = apr``
(it does not depend on the threshold) and models with more than two classes
(segmented by their most probable class; there is no single threshold).
Ties go to the threshold nearest the configured one, so the operating point
moves only when that improves the metric.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np

from tversky_jax import evaluate
from tversky_jax import validation

# The candidate thresholds: 0.05, 0.10, ..., 0.95 (0.5 included).
GRID = tuple(round(0.05 * i, 2) for i in range(1, 20))
# The item of a checkpoint's meta that holds :meth:`OperatingPoint.to_dict`.
META_KEY = "operating_point"
# Metrics whose value does not depend on the threshold.
THRESHOLD_FREE = ("apr",)


@dataclasses.dataclass(frozen=True)
class OperatingPoint:
  """A threshold chosen on the validation cases, and what it gains.

  Attributes:
    threshold: a voxel is lesion where ``p(lesion) >= threshold``.
    metric: the metric it maximises (``train.best_metric``).
    default_threshold: the configured ``inference.threshold`` (0.5).
    at_default: the metric (mean over the validation cases) at
      ``default_threshold``; NaN when undefined.
    at_threshold: the metric at ``threshold``; NaN when undefined.
    cases: the number of validation cases.
  """

  threshold: float
  metric: str
  default_threshold: float
  at_default: float
  at_threshold: float
  cases: int

  def to_dict(self) -> dict[str, Any]:
    """JSON-safe: NaN values become None."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in dataclasses.asdict(self).items()}

  @classmethod
  def from_dict(cls, values: dict[str, Any] | None) -> OperatingPoint | None:
    """The inverse of :meth:`to_dict`; None for None (no operating point)."""
    if not values:
      return None
    return cls(threshold=float(values["threshold"]), metric=values["metric"],
               default_threshold=float(values["default_threshold"]),
               at_default=_float(values["at_default"]),
               at_threshold=_float(values["at_threshold"]),
               cases=int(values["cases"]))

  def scalars(self) -> dict[str, float]:
    """What the metric log gets, as ``val/KEY``."""
    return {"threshold": self.threshold,
            f"{self.metric}_at_threshold": self.at_threshold}

  def describe(self) -> str:
    """E.g. ``threshold 0.35 on 2 validation cases (f2 0.6100 -> 0.6600 at
    0.5 -> 0.35)``."""
    return (f"threshold {self.threshold:g} on {self.cases} validation "
            f"case{'s' if self.cases != 1 else ''} ({self.metric} "
            f"{self.at_default:.4f} -> {self.at_threshold:.4f} at "
            f"{self.default_threshold:g} -> {self.threshold:g})")


def _float(value: float | None) -> float:
  return math.nan if value is None else float(value)


def candidates(default_threshold: float) -> tuple[float, ...]:
  """:data:`GRID` and ``default_threshold``, increasing."""
  return tuple(sorted(set(GRID) | {float(default_threshold)}))


def searched(metric: str, num_classes: int) -> bool:
  """Whether a threshold is chosen for ``train.best_metric = metric`` and a
  model of ``num_classes`` classes (background included)."""
  return num_classes == 2 and metric not in THRESHOLD_FREE


def threshold_counts(probabilities: np.ndarray, label: np.ndarray,
                     thresholds: Sequence[float]) -> np.ndarray:
  """Voxel counts of the lesion mask of each threshold against the label.

  Args:
    probabilities: ``[x, y, z, 2]`` class probabilities (background first).
    label: ``[x, y, z]`` label map; lesion where it is 1.
    thresholds: ``T`` thresholds.

  Returns:
    int64 ``[T, 4]``: tp, fp, fn, tn of
    ``validation.segment(probabilities, t)`` for each ``t``.
  """
  reference = np.asarray(label) == 1
  positives = int(np.count_nonzero(reference))
  counts = np.zeros((len(thresholds), 4), np.int64)
  for i, threshold in enumerate(thresholds):
    predicted = validation.segment(probabilities, threshold) != 0
    tp = int(np.count_nonzero(predicted & reference))
    fp = int(np.count_nonzero(predicted)) - tp
    fn = positives - tp
    counts[i] = tp, fp, fn, reference.size - tp - fp - fn
  return counts


def mean_metric(counts: np.ndarray, metric: str) -> np.ndarray:
  """``metric`` per threshold, the NaN-skipping mean over the cases.

  Args:
    counts: ``[cases, T, 4]`` of :func:`threshold_counts`.
    metric: a key of :func:`tversky_jax.evaluate.voxel_metrics`.

  Returns:
    float64 ``[T]``; NaN where no case defines the metric.
  """
  counts = np.asarray(counts)
  return np.array([
      evaluate.finite_mean(
          evaluate.voxel_metrics(*case[t], empty="nan")[metric]
          for case in counts)
      for t in range(counts.shape[1])], np.float64)


def choose(counts: np.ndarray, thresholds: Sequence[float], metric: str,
           default_threshold: float) -> OperatingPoint:
  """The threshold of ``thresholds`` with the highest mean ``metric``.

  Args:
    counts: ``[cases, T, 4]`` of :func:`threshold_counts`.
    thresholds: the ``T`` thresholds; must include ``default_threshold``.
    metric: the metric to maximise.
    default_threshold: kept when no threshold defines the metric; ties go
      to the threshold nearest it.

  Returns:
    The :class:`OperatingPoint`.
  """
  values = mean_metric(counts, metric)
  thresholds = np.asarray(thresholds, np.float64)
  best = default = int(np.flatnonzero(thresholds == default_threshold)[0])
  if np.isfinite(values).any():
    top = np.flatnonzero(values == np.nanmax(values))
    best = int(top[np.argmin(np.abs(thresholds[top] - default_threshold))])
  return OperatingPoint(
      threshold=float(thresholds[best]), metric=metric,
      default_threshold=float(default_threshold),
      at_default=float(values[default]),
      at_threshold=float(values[best]), cases=int(np.shape(counts)[0]))


class Search:
  """Collects the counts of each validation case, then :meth:`finish`.

  Its :meth:`add` is the ``on_case`` hook of
  :func:`tversky_jax.validation.validate`, so the probabilities that
  validation computes are reused (no second inference).
  """

  def __init__(self, metric: str, default_threshold: float):
    self.metric = metric
    self.default_threshold = float(default_threshold)
    self.thresholds = candidates(default_threshold)
    self._counts: list[np.ndarray] = []

  def add(self, case: Any, segmentation: np.ndarray,
          probabilities: np.ndarray) -> None:
    """Adds one case (``case.label`` ``[x, y, z]``; ``probabilities``
    ``[x, y, z, 2]`` on the label's grid; ``segmentation`` is unused)."""
    del segmentation
    self._counts.append(
        threshold_counts(probabilities, case.label, self.thresholds))

  def finish(self) -> OperatingPoint:
    """The :func:`choose` of the cases added so far."""
    return choose(np.stack(self._counts), self.thresholds, self.metric,
                  self.default_threshold)


def summary_line(stored: dict[str, Any] | None, step: int, metric: str,
                 num_classes: int, default_threshold: float) -> str | None:
  """The line the trainer prints at the end for the best checkpoint.

  Args:
    stored: the checkpoint's ``meta[META_KEY]`` (None without one).
    step: the checkpoint's step.
    metric: ``train.best_metric``.
    num_classes: classes of the model, background included.
    default_threshold: ``inference.threshold``.

  Returns:
    The line, or None for a checkpoint saved before operating points.
  """
  point = OperatingPoint.from_dict(stored)
  if point is not None:
    return f"Operating point of step {step}: {point.describe()}"
  if num_classes > 2:
    return (f"Operating point: none; the {num_classes} classes are segmented "
            "by their most probable class (a threshold needs two)")
  if metric in THRESHOLD_FREE:
    return (f"Operating point: threshold {default_threshold:g} kept "
            f"(train.best_metric {metric} does not depend on it)")
  return None
