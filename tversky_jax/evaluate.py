"""The paper's metrics, and lesion counts, for a folder of predicted label maps.

Command line (``python -m tversky_jax.evaluate`` or ``tversky-evaluate``)::

  tversky-evaluate --predictions predictions/ \
      --labels data/Dataset001_Lesions/labelsTs [--output eval/] \
      [--classes auto|1,2,3] [--class-names NAMES | --dataset-json FILE]

Inputs, matched by case name:

* ``--predictions``: ``CASE.nii.gz`` (or ``.nii``) label maps (as
  ``tversky-predict`` writes them: a binary lesion mask, or the argmax over
  the classes), and optionally ``CASE_prob.nii.gz`` probabilities (for APR
  and the PR curves): ``[x, y, z]`` lesion probabilities, or ``[x, y, z, K]``
  class probabilities (softmax over all K classes, background first, so
  channel k is class k).
* ``--labels``: reference ``CASE.nii.gz`` (or ``.nii``) label maps.

Classes: ``--classes auto`` (the default) evaluates the non-zero values found
in the references and predictions (which are read once more for this; they
must be integers >= 0). When that is label 1 only (or nothing), the data is
binary and everything is exactly as before classes existed: lesion where the
label is non-zero, no ``class`` column. Otherwise, and always with
``--classes 1,2,3``, each class k is evaluated one-vs-rest (prediction == k
against reference == k), APR from channel k of the probabilities. Class names
come from ``--class-names`` (names of labels 0, 1, 2, ..., background first)
or from the ``labels`` of an nnU-Net ``--dataset-json``; default the label
value.

Matching rules: a reference without a prediction is an error (a forgotten
case would silently improve the scores) unless ``--allow-missing`` is given,
which evaluates the cases present in both with a warning; a prediction
without a reference is skipped with a warning (e.g. predictions for unlabelled
scans); a ``CASE_prob`` without ``CASE`` mask is skipped with a warning. A
prediction (or probability) whose shape differs from its reference, or whose
affine differs by more than ``1e-4``, is an error naming the case.

Per case and class, and pooled over every voxel of every case, it computes
(paper, Sec. 3; the formulas of :mod:`tversky_jax.metrics`):

* voxel-wise DSC, sensitivity, specificity, precision, F2 from the masks, and
  APR (exact average precision) from the probabilities when they exist;
* lesion-wise detection: lesions are the connected components
  (``scipy.ndimage.label``, **26-connectivity**: voxels sharing a face, edge
  or corner belong to one lesion) of the reference and of the predicted mask.
  A reference lesion is *detected* when at least one of its voxels is
  predicted, else *missed*; a predicted component is a *false-positive
  component* when none of its voxels is a reference lesion voxel. Lesion
  recall = detected / reference lesions, lesion precision = (predicted
  components - false-positive components) / predicted components, lesion
  F1 = 2PR / (P + R). In the case rows a ratio with denominator 0 is 1
  (nothing to miss / no false alarm), so an empty reference and an empty
  prediction score 1 (``empty="one"`` of :mod:`tversky_jax.metrics`).

Empty references in the aggregates (``pooled`` and ``mean`` rows, and the
validation metrics that rank checkpoints): MONAI's convention
(``DiceMetric(ignore_empty=True)``, ``ConfusionMatrixMetric``; nnU-Net also
sets Dice to NaN when reference and prediction are empty and averages with
``nanmean``), i.e. ``empty="nan"`` of :mod:`tversky_jax.metrics`, then means
that skip NaN. Per metric:

* DSC, F2, sensitivity, APR, lesion recall and lesion F1 are undefined (NaN)
  for a case (or class) whose reference is empty, prediction or not, and are
  left out of the mean: a case with nothing to find cannot raise them.
* precision and lesion precision are undefined only when nothing is
  predicted (then left out, also in a lesion case); an empty-reference case
  with false positives has precision 0 and counts.
* specificity is defined whenever there are background voxels: every case
  counts, so false positives on empty cases lower it.
* the count columns of the ``mean`` row average all cases.

The false positives of the empty-reference cases are also reported apart,
as extra keys of the ``mean`` dict (:data:`EMPTY_COLUMNS`: ``empty_cases``,
``empty_fp_cases`` with any false-positive voxel, ``empty_fp_voxels``), a
line of the table and a note of the HTML report. A class whose reference is
empty in every case has NaN pooled and mean DSC, F2, sensitivity and APR
(never 1).

Outputs: ``metrics.csv`` (one row per case, then a ``pooled`` row: metrics
of the summed counts, and a ``mean`` row: the NaN-skipping mean of the
per-case values under the rule above; an empty cell means undefined), a
table on stdout, and ``pr_curve.png`` (voxel-wise precision-recall curves
per case and pooled) when probabilities exist. The pooled APR and curve are
exact (scikit-learn's ``average_precision_score`` of all voxels of all
cases, ties grouped) and computed from per-case tables of voxel counts per
distinct score (:class:`ScoreCounts`, int64), merged case by case, so the
voxels of the whole set are never held at once and no count overflows. With
classes, ``metrics.csv`` has a ``class`` column after ``case``: per class its
case rows, ``pooled`` and ``mean``; then ``pooled`` and ``mean`` rows of class
``mean``: the mean over the classes of their pooled and mean metrics (count
cells empty). The table is grouped by class, and ``pr_curve.png`` has one
pooled curve per class. ``--report report.html [--images imagesTs/]
[--report-class NAME]`` also writes a self-contained HTML page with the
tables, the curves and per-case overlay montages (see
:mod:`tversky_jax.report`).

Function API (for the replication sweep and validation during training)::

  result = evaluate_folders("predictions/", "labelsTs/", "eval/")
  result.pooled["dsc"], result.mean["lesion_f1"], result.cases[0].row()
  result.classes["lesion"].pooled["dsc"]  # by class name, any number
  per_class = evaluate_case_classes(argmax, label, softmax, "case_1",
                                    classes=(1, 2, 3), class_names=names)
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from tversky_jax import metrics as metrics_lib
from tversky_jax.data import nifti

PROBABILITY_SUFFIX = "_prob"
CONNECTIVITY = 26
# 26-connectivity: the full 3x3x3 neighbourhood.
_STRUCTURE = np.ones((3, 3, 3), dtype=bool)

VOXEL_METRICS = ("dsc", "sensitivity", "specificity", "precision", "f2",
                 "apr")
LESION_METRICS = ("lesion_precision", "lesion_recall", "lesion_f1")
COUNT_COLUMNS = ("tp", "fp", "fn", "tn", "ref_lesions", "pred_lesions",
                 "detected_lesions", "missed_lesions", "fp_lesions")
COLUMNS = ("case", *VOXEL_METRICS, *LESION_METRICS, *COUNT_COLUMNS)
# Extra keys of the mean dict (not CSV columns): the cases whose reference is
# empty (left out of the mean of DSC, F2, ...), those of them with false
# positive voxels, and their false-positive voxels.
EMPTY_COLUMNS = ("empty_cases", "empty_fp_cases", "empty_fp_voxels")
# The CSV columns when classes are evaluated (not binary).
CLASS_COLUMNS = ("case", "class", *COLUMNS[1:])
# The class column of the rows averaging over the classes (a reserved name).
CLASS_MEAN = "mean"
AUTO = "auto"
# Names by label value: a sequence (index = label, background first) or a
# mapping label -> name.
ClassNames = Sequence[str] | Mapping[int, str]


class EvaluationError(ValueError):
  """A problem with the inputs (missing case, grid mismatch, bad file)."""


# --------------------------------------------------------------------------
# Metrics of arrays
# --------------------------------------------------------------------------


def _ratio(num: float, den: float) -> float:
  """num / den, 1.0 when den is 0 (the metrics module's empty rule)."""
  return float(num) / float(den) if den else 1.0


@dataclasses.dataclass(frozen=True)
class LesionCounts:
  """Lesion-wise detection counts of one case (or summed over cases).

  Attributes:
    reference: connected components of the reference.
    predicted: connected components of the predicted mask.
    detected: reference lesions with at least one predicted voxel.
    false_positive: predicted components with no reference voxel.
  """

  reference: int
  predicted: int
  detected: int
  false_positive: int

  @property
  def missed(self) -> int:
    return self.reference - self.detected

  @property
  def recall(self) -> float:
    return _ratio(self.detected, self.reference)

  @property
  def precision(self) -> float:
    return _ratio(self.predicted - self.false_positive, self.predicted)

  @property
  def f1(self) -> float:
    p, r = self.precision, self.recall
    return 2 * p * r / (p + r) if p + r else 0.0

  def __add__(self, other: LesionCounts) -> LesionCounts:
    return LesionCounts(*(a + b for a, b in zip(dataclasses.astuple(self),
                                                dataclasses.astuple(other))))


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
  """26-connected components (the lesions) of a mask.

  Args:
    mask: ``[x, y, z]``, foreground where non-zero.

  Returns:
    ``(labels, count)``: ``int32 [x, y, z]`` component numbers ``1..count``,
    0 on the background.
  """
  labels, count = ndimage.label(np.asarray(mask) != 0, structure=_STRUCTURE)
  return labels, int(count)


def lesion_detection(prediction: np.ndarray,
                     reference: np.ndarray) -> LesionCounts:
  """Lesion-wise detection with 26-connected components.

  Args:
    prediction: ``[x, y, z]`` mask, lesion where non-zero.
    reference: ``[x, y, z]`` reference, lesion where non-zero.

  Returns:
    :class:`LesionCounts`.
  """
  pred = np.asarray(prediction) != 0
  ref = np.asarray(reference) != 0
  if pred.shape != ref.shape:
    raise ValueError(f"shapes differ: {pred.shape} vs {ref.shape}")
  ref_labels, n_ref = connected_components(ref)
  pred_labels, n_pred = connected_components(pred)
  detected = np.unique(ref_labels[pred & ref]).size
  true_components = np.unique(pred_labels[pred & ref]).size
  return LesionCounts(reference=int(n_ref), predicted=int(n_pred),
                      detected=int(detected),
                      false_positive=int(n_pred - true_components))


def voxel_metrics(tp: float, fp: float, fn: float, tn: float,
                  empty: str = "one") -> dict[str, float]:
  """DSC, sensitivity, specificity, precision and F2 from voxel counts.

  Uses the formulas and the ``empty`` rule (``"one"`` for case rows,
  ``"nan"`` for the aggregates; see the module doc) of
  :mod:`tversky_jax.metrics`.
  """
  counts = tuple(float(c) for c in (tp, fp, fn, tn))
  return {
      "dsc": float(metrics_lib.dice_from_counts(*counts, empty=empty)),
      "sensitivity": float(metrics_lib.sensitivity_from_counts(
          *counts, empty=empty)),
      "specificity": float(metrics_lib.specificity_from_counts(
          *counts, empty=empty)),
      "precision": float(metrics_lib.precision_from_counts(
          *counts, empty=empty)),
      "f2": float(metrics_lib.f_beta_from_counts(*counts, beta=2.0,
                                                  empty=empty)),
  }


@dataclasses.dataclass(frozen=True, eq=False)
class ScoreCounts:
  """Exact voxel counts per distinct score: all that AP and the PR curve use.

  A histogram without bins: its size is the number of distinct float32
  scores, at most the number of voxels and never more than the float32
  values in [0, 1] (about 1.07e9), however many cases are merged.

  Attributes:
    scores: float32 ``[n]`` distinct scores, increasing.
    voxels: int64 ``[n]`` voxels with each score.
    positives: int64 ``[n]`` reference (lesion) voxels among them.
  """

  scores: np.ndarray
  voxels: np.ndarray
  positives: np.ndarray


def score_counts(probabilities: np.ndarray,
                 reference: np.ndarray) -> ScoreCounts:
  """The :class:`ScoreCounts` of one case (two sorts, no argsort).

  Args:
    probabilities: lesion probabilities (float32 or cast to it), any shape.
    reference: same shape, lesion where non-zero.
  """
  scores = np.asarray(probabilities, dtype=np.float32).ravel()
  positive = np.asarray(reference).ravel() != 0
  values, voxels = np.unique(scores, return_counts=True)
  hit_values, hits = np.unique(scores[positive], return_counts=True)
  positives = np.zeros(values.shape, np.int64)
  positives[np.searchsorted(values, hit_values)] = hits
  return ScoreCounts(values, voxels.astype(np.int64), positives)


def merge_score_counts(tables: Sequence[ScoreCounts]) -> ScoreCounts:
  """The :class:`ScoreCounts` of the union of the tables' voxels.

  Equal scores of different tables are summed (int64, exact). The tables are
  sorted runs, which the stable (Timsort) argsort merges in about linear
  time.
  """
  scores = np.concatenate([np.zeros(0, np.float32)]
                          + [t.scores for t in tables])
  if not scores.size:
    return ScoreCounts(scores, np.zeros(0, np.int64), np.zeros(0, np.int64))
  order = np.argsort(scores, kind="stable")
  scores = scores[order]
  starts = np.flatnonzero(np.r_[True, scores[1:] != scores[:-1]])

  def summed(name: str) -> np.ndarray:
    counts = np.concatenate([getattr(t, name) for t in tables])
    return np.add.reduceat(counts.astype(np.int64)[order], starts)

  return ScoreCounts(scores[starts], summed("voxels"), summed("positives"))


def curve_from_counts(counts: ScoreCounts) -> tuple[np.ndarray, np.ndarray]:
  """The precision-recall curve of :func:`precision_recall_curve` from counts.

  Returns:
    ``(precision, recall)``, float64, one point per distinct score in
    decreasing order; empty arrays when there is no positive voxel.
  """
  tps = np.cumsum(counts.positives[::-1], dtype=np.int64)
  if not tps.size or tps[-1] == 0:
    return np.zeros(0), np.zeros(0)
  predicted = np.cumsum(counts.voxels[::-1], dtype=np.int64)
  return tps / predicted, tps / tps[-1]


def average_precision_from_counts(counts: ScoreCounts) -> float:
  """Exact AP (``sum_k (R_k - R_{k-1}) P_k``, ties one threshold), float64.

  The value of ``sklearn.metrics.average_precision_score`` on the voxels the
  counts describe, with int64 counts: no overflow below 2**63 voxels. NaN
  without positive voxel.
  """
  precision, _ = curve_from_counts(counts)
  if not precision.size:
    return math.nan
  # R_k - R_{k-1} = (positives at threshold k) / all positives.
  positives = counts.positives[::-1]
  return float(np.dot(positives, precision) / positives.sum())


def precision_recall_curve(probabilities: np.ndarray, reference: np.ndarray
                           ) -> tuple[np.ndarray, np.ndarray]:
  """Voxel-wise precision-recall curve, one point per distinct probability.

  Args:
    probabilities: lesion probabilities, any shape.
    reference: same shape, lesion where non-zero.

  Returns:
    ``(precision, recall)``, float64, thresholds in decreasing order
    (recall non-decreasing), so that ``sum(diff([0, *recall]) * precision)``
    is the average precision of :func:`tversky_jax.metrics.average_precision`.
    Empty arrays when the reference has no lesion.
  """
  return curve_from_counts(score_counts(probabilities, reference))


@dataclasses.dataclass
class CaseResult:
  """Metrics of one case.

  Attributes:
    case_id: the case name.
    tp, fp, fn, tn: voxel counts of the mask against the reference.
    apr: average precision of the probabilities; NaN without probabilities
      or without reference lesion.
    lesions: lesion-wise detection counts.
  """

  case_id: str
  tp: int
  fp: int
  fn: int
  tn: int
  apr: float
  lesions: LesionCounts

  def metrics(self, empty: str = "one") -> dict[str, float]:
    """Voxel and lesion metrics (the CSV's metric columns).

    Args:
      empty: ``"one"``, the case row's rule, or ``"nan"``, the rule of the
        mean over cases (see the module doc).
    """
    values = voxel_metrics(self.tp, self.fp, self.fn, self.tn, empty)
    values["apr"] = self.apr
    values.update(_lesion_values(self.lesions, empty))
    return values

  def row(self) -> dict[str, Any]:
    """The case's CSV row (``COLUMNS``)."""
    row: dict[str, Any] = {"case": self.case_id, **self.metrics(),
                           "tp": self.tp, "fp": self.fp, "fn": self.fn,
                           "tn": self.tn}
    row.update(_lesion_counts(self.lesions))
    return row


def _lesion_values(lesions: LesionCounts,
                   empty: str = "one") -> dict[str, float]:
  """Lesion precision, recall and F1; with ``empty="nan"`` NaN where
  undefined: recall and F1 without reference lesion (as DSC), precision
  without predicted component."""
  values = {"lesion_precision": lesions.precision,
            "lesion_recall": lesions.recall, "lesion_f1": lesions.f1}
  if empty == "nan" and not lesions.predicted:
    values["lesion_precision"] = math.nan
  if empty == "nan" and not lesions.reference:
    values["lesion_recall"] = values["lesion_f1"] = math.nan
  return values


def _lesion_counts(lesions: LesionCounts) -> dict[str, int]:
  return {"ref_lesions": lesions.reference,
          "pred_lesions": lesions.predicted,
          "detected_lesions": lesions.detected,
          "missed_lesions": lesions.missed,
          "fp_lesions": lesions.false_positive}


def _check_shapes(case_id: str, prediction: tuple[int, ...],
                  reference: tuple[int, ...]) -> None:
  if prediction != reference:
    raise EvaluationError(f"case {case_id}: prediction shape {prediction} "
                          f"differs from reference shape {reference}")


def _case_result(pred: np.ndarray, ref: np.ndarray,
                 probability: np.ndarray | None, case_id: str) -> CaseResult:
  """Metrics of one class of one case: the evaluator every caller uses.

  Args:
    pred: bool ``[x, y, z]``, where the class is predicted.
    ref: bool ``[x, y, z]``, where the class is in the reference.
    probability: optional ``[x, y, z]`` probabilities of the class, for APR.
    case_id: name for the result.

  Returns:
    A :class:`CaseResult`.
  """
  tp = int(np.count_nonzero(pred & ref))
  fp = int(np.count_nonzero(pred)) - tp
  fn = int(np.count_nonzero(ref)) - tp
  tn = int(pred.size) - tp - fp - fn
  apr = math.nan  # also without reference voxels: then AP is undefined
  if probability is not None and tp + fn:
    apr = float(metrics_lib.average_precision(
        np.asarray(probability, np.float32)[None], ref[None])[0])
  return CaseResult(case_id, tp, fp, fn, tn, apr, lesion_detection(pred, ref))


def evaluate_case(prediction: np.ndarray, reference: np.ndarray,
                  probability: np.ndarray | None = None,
                  case_id: str = "") -> CaseResult:
  """Binary metrics of one case from arrays (lesion where non-zero).

  Args:
    prediction: ``[x, y, z]`` mask, lesion where non-zero.
    reference: ``[x, y, z]``, lesion where non-zero.
    probability: optional ``[x, y, z]`` lesion probabilities, for APR.
    case_id: name for the result.

  Returns:
    A :class:`CaseResult`.

  Raises:
    EvaluationError: (a ValueError) the shapes differ.
  """
  pred = np.asarray(prediction) != 0
  ref = np.asarray(reference) != 0
  _check_shapes(case_id, pred.shape, ref.shape)
  return _case_result(pred, ref, probability, case_id)


def evaluate_case_classes(prediction: np.ndarray, reference: np.ndarray,
                          probabilities: np.ndarray | None = None,
                          case_id: str = "", classes: Sequence[int] = (1,),
                          class_names: ClassNames | None = None
                          ) -> dict[str, CaseResult]:
  """Per-class (one-vs-rest) metrics of one case from arrays in memory.

  The per-case evaluator of :func:`evaluate_folders` and of validation during
  training. Class k compares ``prediction == k`` with ``reference == k``: its
  voxel counts, its lesions (26-connected components of each mask) and APR
  from its probabilities. Cost per class: a few passes over the volume, two
  ``scipy.ndimage.label`` calls and, with probabilities, one sort.

  Args:
    prediction: ``[x, y, z]`` integer label map (e.g. the argmax of the
      softmax; a binary mask is label map {0, 1}).
    reference: ``[x, y, z]`` integer label map.
    probabilities: optional, for APR: ``[x, y, z, K]`` probabilities of all K
      classes (background first: channel k is class k), or ``[x, y, z]``
      probabilities of the class when ``classes`` has one.
    case_id: name for the results.
    classes: label values to evaluate, each >= 1.
    class_names: names by label value (see :func:`class_names_for`);
      default the label values as strings.

  Returns:
    class name -> :class:`CaseResult`, in increasing label order.

  Raises:
    EvaluationError: (a ValueError) shapes differ, bad classes or names, a
      probability map without a channel for a class.
  """
  pred, ref = np.asarray(prediction), np.asarray(reference)
  _check_shapes(case_id, pred.shape, ref.shape)
  labels = check_class_labels(classes)
  names = class_names_for(labels, class_names)
  channels = class_probabilities(probabilities, labels, ref.shape, case_id)
  return {name: _case_result(pred == k, ref == k, channel, case_id)
          for name, k, channel in zip(names, labels, channels)}


def class_probabilities(probabilities: np.ndarray | None,
                        labels: Sequence[int], shape: Sequence[int],
                        case_id: str = "") -> list[np.ndarray | None]:
  """The ``[x, y, z]`` probability map of each class (views, no copy).

  Args:
    probabilities: None, ``[x, y, z, K]`` over all classes (channel k is
      class k), or ``[x, y, z]`` for a single class.
    labels: the classes, from :func:`check_class_labels`.
    shape: ``[x, y, z]`` of the label maps.
    case_id: named in errors.

  Returns:
    One map (or None without probabilities) per label.
  """
  if probabilities is None:
    return [None] * len(labels)
  probs = np.asarray(probabilities)
  if probs.ndim not in (3, 4) or probs.shape[:3] != tuple(shape):
    raise EvaluationError(f"case {case_id}: probability shape {probs.shape} "
                          f"does not match the label map's {tuple(shape)}")
  if probs.ndim == 3:
    if len(labels) != 1:
      raise EvaluationError(
          f"case {case_id}: an [x, y, z] probability map holds one class but "
          f"{len(labels)} are evaluated; give [x, y, z, K] class "
          "probabilities")
    return [probs]
  if probs.shape[3] <= labels[-1]:
    raise EvaluationError(
        f"case {case_id}: the probability map has {probs.shape[3]} channels, "
        f"class {labels[-1]} needs channel {labels[-1]} (channel k is class k,"
        " background first)")
  return [probs[..., k] for k in labels]


# --------------------------------------------------------------------------
# Classes
# --------------------------------------------------------------------------

def check_class_labels(classes: Iterable[int]) -> tuple[int, ...]:
  """Validated class labels, increasing.

  Raises:
    EvaluationError: none, one below 1 (0 is the background), a non-integer,
      or one given twice.
  """
  labels = tuple(classes)
  if not labels:
    raise EvaluationError("no class to evaluate")
  for k in labels:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
      raise EvaluationError(f"class {k!r}: classes are label values >= 1 "
                            "(0 is the background)")
  if len(set(labels)) != len(labels):
    raise EvaluationError(f"classes {', '.join(map(str, labels))}: a class is "
                          "given twice")
  return tuple(sorted(int(k) for k in labels))


def parse_classes(text: str) -> str | tuple[int, ...]:
  """``--classes``: ``"auto"`` or comma-separated labels such as ``1,2,3``."""
  if text.strip() == AUTO:
    return AUTO
  try:
    labels = [int(part) for part in text.split(",")]
  except ValueError:
    raise EvaluationError(
        f"--classes {text!r}: expected 'auto' or label values separated by "
        "commas, such as 1,2,3") from None
  try:
    return check_class_labels(labels)
  except EvaluationError as error:
    raise EvaluationError(f"--classes {text}: {error}") from None


def parse_class_names(text: str) -> tuple[str, ...]:
  """``--class-names``: names of labels 0, 1, 2, ... separated by commas."""
  names = tuple(name.strip() for name in text.split(","))
  if not all(names):
    raise EvaluationError(
        f"--class-names {text!r}: an empty name; give the names of labels 0, "
        "1, 2, ... (background first) separated by commas")
  return names


def names_by_label(labels: Mapping[str, Any]) -> dict[int, str]:
  """Label value -> name from an nnU-Net ``labels`` dict (name -> value).

  E.g. ``{"background": 0, "lesion": 1}`` (``dataset.json``, or
  :attr:`tversky_jax.data.nifti.Dataset.labels`) gives ``{0: "background",
  1: "lesion"}``. Region labels (a list of values) are not supported.
  """
  regions = [name for name, value in labels.items()
             if not isinstance(value, (int, np.integer))]
  if regions:
    raise EvaluationError(f"region labels are not supported: {_names(regions)}")
  names = {int(value): str(name) for name, value in labels.items()}
  if len(names) != len(labels):
    raise EvaluationError(f"two names share a label value in {dict(labels)}")
  return names


def read_dataset_json_names(path: str | os.PathLike[str]) -> dict[int, str]:
  """Label value -> name from the ``labels`` of an nnU-Net dataset.json."""
  try:
    meta = json.loads(Path(path).read_text(encoding="utf-8"))
  except OSError as error:
    raise EvaluationError(f"--dataset-json {path}: {error.strerror}") from None
  except ValueError as error:
    raise EvaluationError(
        f"--dataset-json {path}: not JSON ({error})") from None
  labels, problems = nifti._parse_labels(  # pylint: disable=protected-access
      meta.get("labels") if isinstance(meta, dict) else None)
  try:
    if problems:
      raise EvaluationError(problems[0])
    return names_by_label(labels)
  except EvaluationError as error:
    raise EvaluationError(f"--dataset-json {path}: {error}") from None


def class_names_for(labels: Sequence[int],
                    class_names: ClassNames | None = None) -> tuple[str, ...]:
  """The name of each label: from ``class_names``, default ``str(label)``.

  Args:
    labels: the classes.
    class_names: a sequence indexed by label value (background first) or a
      mapping label -> name; must name every label.

  Raises:
    EvaluationError: a label without name, names that are not unique, or the
      reserved name ``"mean"``.
  """
  if class_names is None:
    names = tuple(str(k) for k in labels)
  else:
    lookup = (class_names if isinstance(class_names, Mapping)
              else dict(enumerate(class_names)))
    missing = [str(k) for k in labels if k not in lookup]
    if missing:
      raise EvaluationError(
          f"no name for class {', '.join(missing)}: names are given for labels"
          f" {', '.join(map(str, sorted(lookup)))} (by label value, background "
          "first)")
    names = tuple(str(lookup[k]) for k in labels)
  if len(set(names)) != len(names) or CLASS_MEAN in names:
    raise EvaluationError(f"class names {', '.join(names)}: names must be "
                          f"unique and not {CLASS_MEAN!r}")
  return names


def label_values(data: np.ndarray, what: str = "label map") -> set[int]:
  """The non-zero values of a label map.

  Raises:
    EvaluationError: a value that is not an integer >= 0 (e.g. a
      probability map given as a label map).
  """
  values = np.unique(np.asarray(data))
  if values.dtype.kind == "f":
    bad = values[~np.isfinite(values) | (values < 0)
                 | (values != np.round(values))]
  else:
    bad = values[values < 0]
  if bad.size:
    raise EvaluationError(f"{what}: label values must be integers >= 0, found "
                          f"{bad[0]}")
  return {int(v) for v in values if v != 0}


@dataclasses.dataclass(frozen=True)
class ClassSpec:
  """The classes of an evaluation.

  Attributes:
    labels: label values, increasing.
    names: the name of each.
    binary: the binary layout: ``auto`` found label 1 only (or nothing), so
      outputs are as before classes existed (no ``class`` column).
  """

  labels: tuple[int, ...]
  names: tuple[str, ...]
  binary: bool = False


def resolve_classes(matched: Sequence[tuple[str, Path, Path | None, Path]],
                    classes: str | Sequence[int] = AUTO,
                    class_names: ClassNames | None = None, *,
                    progress: bool = False) -> ClassSpec:
  """The classes to evaluate.

  Args:
    matched: from :func:`match_cases`.
    classes: label values, or ``"auto"``: the non-zero values of the
      references and predictions (each file is read for this).
    class_names: see :func:`class_names_for`.
    progress: a tqdm bar over the cases while looking for labels.

  Returns:
    A :class:`ClassSpec`.
  """
  if isinstance(classes, str):
    if classes != AUTO:
      raise EvaluationError(f"classes {classes!r}: expected {AUTO!r} or "
                            "label values")
    found: set[int] = set()
    for _, mask, _, ref in tqdm(matched, desc="finding classes", unit="case",
                                disable=not progress):
      for path in (ref, mask):
        found |= label_values(_read_volume(path)[0], str(path))
    labels = tuple(sorted(found)) or (1,)
    return ClassSpec(labels, class_names_for(labels, class_names),
                     binary=labels == (1,))
  labels = check_class_labels(classes)
  return ClassSpec(labels, class_names_for(labels, class_names))


# --------------------------------------------------------------------------
# Folders
# --------------------------------------------------------------------------


@dataclasses.dataclass
class ClassEvaluation:
  """The results of one class over all cases.

  Attributes:
    label: the label value.
    name: the class name.
    cases: per-case results, sorted by case name.
    pooled: metrics of the counts summed over all cases (APR over all voxels
      of all cases, NaN unless every case has probabilities), plus the
      summed counts; undefined ratios are NaN (module doc, empty
      references).
    mean: the NaN-skipping mean over the cases of every column, the metrics
      with undefined ratios NaN (module doc: a case whose reference is
      empty is left out of DSC, F2, ...), plus the :data:`EMPTY_COLUMNS`.
    curves: case name (and ``"pooled"``) -> ``(precision, recall)``.
  """

  label: int
  name: str
  cases: list[CaseResult]
  pooled: dict[str, float]
  mean: dict[str, float]
  curves: dict[str, tuple[np.ndarray, np.ndarray]]

  @property
  def reference_voxels(self) -> int:
    """Voxels of the class in all references."""
    return int(self.pooled["tp"] + self.pooled["fn"])

  def rows(self) -> list[dict[str, Any]]:
    """The CSV rows: one per case, then ``pooled`` and ``mean``."""
    return ([c.row() for c in self.cases]
            + [{"case": "pooled", **self.pooled},
               {"case": "mean", **self.mean}])


@dataclasses.dataclass
class EvaluationResult:
  """What :func:`evaluate_folders` computed.

  ``cases``, ``pooled``, ``mean`` and ``curves`` are those of the only class
  (see :class:`ClassEvaluation`); with several classes use ``classes``.

  Attributes:
    classes: class name -> its results, in increasing label order.
    binary: the binary layout (no ``class`` column; see :class:`ClassSpec`).
    warnings: the warnings that were printed.
    csv_path: the written metrics.csv, or None.
    plot_path: the written pr_curve.png, or None (no probabilities).
  """

  classes: dict[str, ClassEvaluation]
  binary: bool
  warnings: list[str]
  csv_path: Path | None = None
  plot_path: Path | None = None

  def only(self) -> ClassEvaluation:
    """The results of the only class; ValueError with several."""
    if len(self.classes) != 1:
      raise ValueError(f"{len(self.classes)} classes "
                       f"({', '.join(self.classes)}): use result.classes[NAME]")
    return next(iter(self.classes.values()))

  @property
  def cases(self) -> list[CaseResult]:
    """The only class's per-case results."""
    return self.only().cases

  @property
  def pooled(self) -> dict[str, float]:
    """The only class's pooled metrics and counts."""
    return self.only().pooled

  @property
  def mean(self) -> dict[str, float]:
    """The only class's mean over the cases."""
    return self.only().mean

  @property
  def curves(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The only class's precision-recall curves."""
    return self.only().curves

  @property
  def class_mean(self) -> dict[str, dict[str, float]]:
    """``{"pooled": ..., "mean": ...}``: the mean over the classes of their
    pooled and mean metrics (NaN-skipping); the count columns are NaN."""
    return {which: {column: finite_mean([getattr(c, which)[column] for c in
                                         self.classes.values()])
                    if column in VOXEL_METRICS + LESION_METRICS else math.nan
                    for column in COLUMNS[1:]}
            for which in ("pooled", "mean")}

  @property
  def has_pr_curves(self) -> bool:
    """Whether pr_curve.png has something to show."""
    if self.binary:
      return bool(self.only().curves)
    return any("pooled" in c.curves for c in self.classes.values())

  def rows(self) -> list[dict[str, Any]]:
    """The CSV rows (see the module doc)."""
    if self.binary:
      return self.only().rows()
    rows = [{**row, "class": name} for name, evaluation in self.classes.items()
            for row in evaluation.rows()]
    return rows + [{"case": which, "class": CLASS_MEAN, **values}
                   for which, values in self.class_mean.items()]


def _strip_ending(name: str) -> str | None:
  for ending in nifti.SUPPORTED_FILE_ENDINGS:
    if name.endswith(ending):
      return name[:-len(ending)]
  return None


def _list_volumes(folder: Path, what: str) -> dict[str, Path]:
  if not folder.is_dir():
    raise EvaluationError(f"--{what} {folder}: no such directory")
  found: dict[str, Path] = {}
  for path in sorted(folder.iterdir()):
    stem = _strip_ending(path.name)
    if stem is None or path.name.startswith(".") or not path.is_file():
      continue
    if stem in found:
      raise EvaluationError(
          f"{folder}: both {found[stem].name} and {path.name}; keep one")
    found[stem] = path
  return found


def _read_volume(path: Path, channels: bool = False
                 ) -> tuple[np.ndarray, np.ndarray]:
  """``(data [x, y, z], affine)``; [x, y, z, 1] is accepted.

  With ``channels``, ``[x, y, z, K]`` is accepted too (class probabilities).
  """
  try:
    img = nib.load(path)
    data = np.asanyarray(img.dataobj)
  except Exception as error:  # nibabel/gzip raise many kinds on bad files
    raise EvaluationError(
        f"{path}: cannot read ({type(error).__name__}: {error})") from None
  if data.ndim == 4 and data.shape[3] == 1:
    data = data[..., 0]
  if data.ndim != 3 and not (channels and data.ndim == 4):
    expected = "a 3D volume" + (" or [x, y, z, K]" if channels else "")
    raise EvaluationError(f"{path}: expected {expected}, got {data.shape}")
  return data, img.affine


def _check_grid(case_id: str, what: str, data: np.ndarray, affine: np.ndarray,
                ref: np.ndarray, ref_affine: np.ndarray) -> None:
  if data.shape[:3] != ref.shape:
    raise EvaluationError(
        f"case {case_id}: {what} shape {data.shape} differs from the "
        f"reference's {ref.shape}")
  if not np.allclose(affine, ref_affine, atol=nifti.AFFINE_ATOL):
    diff = float(np.max(np.abs(affine - ref_affine)))
    raise EvaluationError(
        f"case {case_id}: {what} affine differs from the reference's (max abs "
        f"diff {diff:.3g} > {nifti.AFFINE_ATOL}): not on the same grid")


def match_cases(pred_dir: str | os.PathLike[str],
                label_dir: str | os.PathLike[str], *,
                allow_missing: bool = False
                ) -> tuple[list[tuple[str, Path, Path | None, Path]],
                           list[str]]:
  """Pairs predictions with references by case name (see the module doc).

  Returns:
    ``([(case_id, mask, probability or None, reference)], warnings)``.

  Raises:
    EvaluationError: a folder is missing, a reference has no prediction
      (unless ``allow_missing``), or no case is in both folders.
  """
  pred_dir, label_dir = Path(pred_dir), Path(label_dir)
  preds = _list_volumes(pred_dir, "predictions")
  refs = _list_volumes(label_dir, "labels")
  # CASE_prob is the probability map of CASE, unless a reference is itself
  # named CASE_prob.
  probs, masks = {}, {}
  for stem, path in preds.items():
    if stem.endswith(PROBABILITY_SUFFIX) and stem not in refs:
      probs[stem[:-len(PROBABILITY_SUFFIX)]] = path
    else:
      masks[stem] = path
  warnings = []
  no_ref = sorted(set(masks) - set(refs))
  if no_ref:
    warnings.append(f"skipping {len(no_ref)} prediction(s) without a reference "
                    f"in {label_dir}: {_names(no_ref)}")
  lone_probs = sorted(set(probs) - set(masks))
  if lone_probs:
    lone_names = _names(c + PROBABILITY_SUFFIX for c in lone_probs)
    warnings.append(f"skipping {len(lone_probs)} probability map(s) without a "
                    f"mask: {lone_names}")
  no_pred = sorted(set(refs) - set(masks))
  if no_pred and not allow_missing:
    raise EvaluationError(
        f"{len(no_pred)} reference(s) in {label_dir} have no prediction in "
        f"{pred_dir}: {_names(no_pred)} (pass --allow-missing to evaluate "
        "only the cases present in both)")
  if no_pred:
    warnings.append(f"{len(no_pred)} reference(s) have no prediction and are "
                    f"not evaluated: {_names(no_pred)}")
  common = sorted(set(masks) & set(refs))
  if not common:
    raise EvaluationError(
        f"no case is in both {pred_dir} (CASE.nii.gz masks) and {label_dir}")
  return [(c, masks[c], probs.get(c), refs[c]) for c in common], warnings


def _names(names) -> str:
  names = list(names)
  return ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")


def evaluate_folders(pred_dir: str | os.PathLike[str],
                     label_dir: str | os.PathLike[str],
                     out_dir: str | os.PathLike[str] | None = None, *,
                     classes: str | Sequence[int] | ClassSpec = AUTO,
                     class_names: ClassNames | None = None,
                     allow_missing: bool = False, plot: bool = True,
                     progress: bool = False) -> EvaluationResult:
  """Evaluates a folder of predictions against a folder of references.

  Args:
    pred_dir: ``CASE.nii.gz`` label maps and optional ``CASE_prob.nii.gz``.
    label_dir: reference ``CASE.nii.gz``.
    out_dir: where ``metrics.csv`` and ``pr_curve.png`` go (created if
      missing); None writes nothing.
    classes: ``"auto"``, label values, or a :class:`ClassSpec` from
      :func:`resolve_classes` (see the module doc).
    class_names: see :func:`class_names_for` (unused with a ClassSpec).
    allow_missing: evaluate only the cases in both folders instead of failing
      when a reference has no prediction.
    plot: write ``pr_curve.png`` (when probabilities exist).
    progress: a tqdm bar over the cases.

  Returns:
    An :class:`EvaluationResult`. Warnings are also printed to stderr.

  Raises:
    EvaluationError: see :func:`match_cases` and :func:`resolve_classes`; an
      unreadable file; a prediction or probability on another grid than its
      reference, or without a channel for a class.
  """
  matched, warnings = match_cases(pred_dir, label_dir,
                                  allow_missing=allow_missing)
  for warning in warnings:
    _log(f"warning: {warning}")
  spec = (classes if isinstance(classes, ClassSpec) else
          resolve_classes(matched, classes, class_names, progress=progress))
  pools = [ClassPool() for _ in spec.labels]
  for case_id, mask_path, prob_path, ref_path in tqdm(
      matched, desc="evaluating", unit="case", disable=not progress):
    mask, ref, prob = _read_case(case_id, mask_path, prob_path, ref_path)
    channels = class_probabilities(prob, spec.labels, ref.shape, case_id)
    results = evaluate_case_classes(mask, ref, prob, case_id, spec.labels,
                                    dict(zip(spec.labels, spec.names)))
    for pool, k, result, channel in zip(pools, spec.labels, results.values(),
                                        channels):
      pool.add(result, channel, ref == k)
  result = EvaluationResult(
      {name: pool.finish(k, name)
       for pool, k, name in zip(pools, spec.labels, spec.names)},
      spec.binary, warnings)
  if out_dir is not None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result.csv_path = write_csv(result, out_dir / "metrics.csv")
    if plot and result.has_pr_curves:
      result.plot_path = write_pr_plot(result, out_dir / "pr_curve.png")
  return result


def _read_case(case_id: str, mask_path: Path, prob_path: Path | None,
               ref_path: Path
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
  """``(prediction, reference, float32 probabilities or None)`` of a case,
  checked to be on the reference's grid."""
  ref, ref_affine = _read_volume(ref_path)
  mask, affine = _read_volume(mask_path)
  _check_grid(case_id, "prediction", mask, affine, ref, ref_affine)
  prob = None
  if prob_path is not None:
    prob, prob_affine = _read_volume(prob_path, channels=True)
    _check_grid(case_id, "probability", prob, prob_affine, ref, ref_affine)
    prob = prob.astype(np.float32)
  return mask, ref, prob


@dataclasses.dataclass
class ClassPool:
  """Collects one class's results case by case into a ClassEvaluation.

  :func:`evaluate_folders` uses one per class; so can validation during
  training, for the same pooled and mean metrics::

    pool.add(results[name], softmax[..., k], label == k)  # every case
    evaluation = pool.finish(k, name)  # .pooled, .mean, .curves

  Memory: the results, the curves, and one :class:`ScoreCounts` table into
  which each case's table is merged as it comes (bounded by the distinct
  float32 scores, not by the voxels of the set).

  Attributes:
    cases: the per-case results.
    counts: the voxel counts per distinct score of the cases so far; None
      once a case has no probabilities (then there is no pooled APR).
    curves: case name -> precision-recall curve.
  """

  cases: list[CaseResult] = dataclasses.field(default_factory=list)
  counts: ScoreCounts | None = dataclasses.field(
      default_factory=lambda: merge_score_counts([]))
  curves: dict[str, tuple[np.ndarray, np.ndarray]] = dataclasses.field(
      default_factory=dict)

  def add(self, result: CaseResult, prob: np.ndarray | None,
          ref: np.ndarray) -> None:
    """Adds a case: its result, class probabilities and reference mask."""
    self.cases.append(result)
    if prob is None:
      self.counts = None
      return
    counts = score_counts(prob, ref)
    if result.tp + result.fn:
      self.curves[result.case_id] = curve_from_counts(counts)
    if self.counts is not None:
      self.counts = merge_score_counts([self.counts, counts])

  def finish(self, label: int, name: str) -> ClassEvaluation:
    """The class's :class:`ClassEvaluation` (pooled APR over every voxel)."""
    pooled = _pooled(self.cases, self.counts, self.curves)
    return ClassEvaluation(label, name, self.cases, pooled, _mean(self.cases),
                           self.curves)


def _pooled(cases: list[CaseResult], counts: ScoreCounts | None,
            curves: dict[str, tuple[np.ndarray, np.ndarray]]
            ) -> dict[str, float]:
  """Metrics of the summed counts (``empty="nan"``), APR and the pooled
  curve (added to ``curves``) from the merged score counts."""
  tp, fp, fn, tn = (sum(getattr(c, k) for c in cases)
                    for k in ("tp", "fp", "fn", "tn"))
  lesions = cases[0].lesions
  for case in cases[1:]:
    lesions = lesions + case.lesions
  pooled: dict[str, Any] = voxel_metrics(tp, fp, fn, tn, empty="nan")
  pooled["apr"] = math.nan
  if counts is not None and tp + fn:
    pooled["apr"] = average_precision_from_counts(counts)
    curves["pooled"] = curve_from_counts(counts)
  pooled.update(_lesion_values(lesions, empty="nan"))
  pooled.update(tp=tp, fp=fp, fn=fn, tn=tn, **_lesion_counts(lesions))
  return pooled


def finite_mean(values: Iterable[float]) -> float:
  """The mean of the finite values; NaN when there is none (no warning)."""
  values = np.array(list(values), dtype=np.float64)
  values = values[np.isfinite(values)]
  return float(values.mean()) if values.size else math.nan


def _mean(cases: list[CaseResult]) -> dict[str, float]:
  """The mean row: metrics under ``empty="nan"`` and counts, NaN-skipping
  means over the cases, plus the :data:`EMPTY_COLUMNS` of the cases whose
  reference is empty."""
  rows = [{**c.row(), **c.metrics(empty="nan")} for c in cases]
  mean = {column: finite_mean(r[column] for r in rows)
          for column in COLUMNS[1:]}
  empty = [c for c in cases if not c.tp + c.fn]
  mean.update(empty_cases=len(empty),
              empty_fp_cases=sum(1 for c in empty if c.fp),
              empty_fp_voxels=sum(c.fp for c in empty))
  return mean


# --------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------


def _csv_value(value: Any) -> str:
  if isinstance(value, (int, np.integer)):
    return str(int(value))
  if isinstance(value, str):
    return value
  value = float(value)
  return "" if not math.isfinite(value) else repr(value)


def write_csv(result: EvaluationResult, path: str | os.PathLike[str]) -> Path:
  """Writes ``result.rows()`` under ``COLUMNS`` (``CLASS_COLUMNS`` when not
  binary); NaN as ''."""
  columns = COLUMNS if result.binary else CLASS_COLUMNS
  path = Path(path)
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(columns)
    for row in result.rows():
      writer.writerow([_csv_value(row[c]) for c in columns])
  return path


_TABLE_HEADER = (f"{'case':<20} {'DSC':>6} {'Sens':>6} {'Spec':>6} {'Prec':>6} "
                 f"{'F2':>6} {'APR':>6} {'lesions':>9} {'missed':>6} "
                 f"{'FP-les':>6} {'L-F1':>6}")
_TABLE_RULE = "-" * len(_TABLE_HEADER)


def format_table(result: EvaluationResult) -> str:
  """A fixed-width table: metrics in %, lesions as detected/reference.

  With classes, a block per class (``== class NAME (label K) ==``), then the
  mean over the classes. A block whose cases include empty references ends
  with :func:`empty_reference_note`.
  """
  lines = [_TABLE_HEADER, _TABLE_RULE]
  if result.binary:
    return "\n".join(lines + _table_block(result.only()))
  for evaluation in result.classes.values():
    lines.append(f"== class {evaluation.name} (label {evaluation.label}) ==")
    lines += _table_block(evaluation)
  lines.append(f"== mean over the {len(result.classes)} classes ==")
  lines += [_table_line(which, values, ("-", "-", "-"))
            for which, values in result.class_mean.items()]
  return "\n".join(lines)


def _table_block(evaluation: ClassEvaluation) -> list[str]:
  """The case lines of one class, a rule, then its pooled and mean lines."""
  lines = []
  for case in evaluation.cases:
    les = case.lesions
    lines.append(_table_line(case.case_id, case.metrics(),
                             (f"{les.detected}/{les.reference}", les.missed,
                              les.false_positive)))
  lines.append(_TABLE_RULE)
  p, m = evaluation.pooled, evaluation.mean
  lines.append(_table_line("pooled", p, (
      f"{p['detected_lesions']}/{p['ref_lesions']}", p["missed_lesions"],
      p["fp_lesions"])))
  lines.append(_table_line("mean", m, (
      f"{m['detected_lesions']:.1f}/{m['ref_lesions']:.1f}",
      f"{m['missed_lesions']:.1f}", f"{m['fp_lesions']:.1f}")))
  note = empty_reference_note(m)
  return lines + ([note] if note else [])


def empty_reference_note(mean: Mapping[str, float]) -> str:
  """What the mean says of the empty-reference cases ('' when none)."""
  if not mean.get("empty_cases"):
    return ""
  return (f"empty reference: {int(mean['empty_cases'])} case(s), "
          f"{int(mean['empty_fp_cases'])} with false positives "
          f"({int(mean['empty_fp_voxels'])} voxels); not in the mean of DSC, "
          "sensitivity, F2, APR, lesion recall and F1")


def _table_line(name: str, values: Mapping[str, float],
                counts: tuple[Any, Any, Any]) -> str:
  def pct(v):
    return f"{100 * v:6.2f}" if math.isfinite(v) else f"{'-':>6}"

  return (f"{name[:20]:<20} " + " ".join(pct(values[k]) for k in VOXEL_METRICS)
          + f" {counts[0]:>9} {counts[1]:>6} {counts[2]:>6} "
          + pct(values["lesion_f1"]))


def write_pr_plot(result: EvaluationResult,
                  path: str | os.PathLike[str]) -> Path:
  """Writes ``pr_curve.png``: :func:`plot_pr_curves` when binary, else
  :func:`plot_class_pr_curves`."""
  if result.binary:
    only = result.only()
    return plot_pr_curves(only.curves, only.cases, only.pooled, path)
  return plot_class_pr_curves(result.classes, path)


def plot_pr_curves(curves: dict[str, tuple[np.ndarray, np.ndarray]],
                   cases: Sequence[CaseResult], pooled: dict[str, float],
                   path: str | os.PathLike[str],
                   max_points: int = 4000) -> Path:
  """Writes the precision-recall curves (per case thin, pooled thick) as PNG.

  Uses matplotlib's Agg canvas directly (no pyplot, no global backend
  change). Curves are step plots, thinned to ``max_points`` points each.
  """
  apr = {c.case_id: c.apr for c in cases}
  apr["pooled"] = pooled.get("apr", math.nan)
  fig, ax = _pr_axes()
  per_case = [k for k in curves if k != "pooled"]
  for i, name in enumerate(per_case):
    _step(ax, curves[name], max_points, linewidth=1.0, alpha=0.7,
          label=(f"{name} (AP {apr[name]:.3f})" if i < 12 else None))
  if "pooled" in curves:
    _step(ax, curves["pooled"], max_points, color="black", linewidth=2.5,
          label=f"pooled (AP {apr['pooled']:.3f})")
  return _save_pr(fig, ax, "Voxel-wise precision-recall", path)


def plot_class_pr_curves(classes: Mapping[str, ClassEvaluation],
                         path: str | os.PathLike[str],
                         max_points: int = 4000) -> Path:
  """Writes one pooled precision-recall curve per class as PNG.

  A class without a pooled curve (no reference voxel, or a case without
  probabilities) is left out.
  """
  fig, ax = _pr_axes()
  for name, evaluation in classes.items():
    if "pooled" in evaluation.curves:
      _step(ax, evaluation.curves["pooled"], max_points, linewidth=2.0,
            label=f"{name} (AP {evaluation.pooled['apr']:.3f})")
  return _save_pr(fig, ax, "Voxel-wise precision-recall per class (pooled)",
                  path)


def _pr_axes():
  """A figure on matplotlib's Agg canvas (no pyplot) and its axes."""
  # pylint: disable=g-import-not-at-top
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  # pylint: enable=g-import-not-at-top
  fig = Figure(figsize=(6.5, 5.5), dpi=120)
  FigureCanvasAgg(fig)
  return fig, fig.add_subplot()


def _step(ax, curve: tuple[np.ndarray, np.ndarray], max_points: int,
          **style) -> None:
  """Draws a ``(precision, recall)`` curve as a step plot."""
  precision, recall = _thin(*curve, max_points)
  ax.plot(np.r_[0.0, recall], np.r_[precision[:1], precision],
          drawstyle="steps-pre", **style)


def _save_pr(fig, ax, title: str, path: str | os.PathLike[str]) -> Path:
  ax.set_xlabel("recall (sensitivity)")
  ax.set_ylabel("precision")
  ax.set_xlim(0.0, 1.0)
  ax.set_ylim(0.0, 1.02)
  ax.set_title(title)
  ax.grid(True, alpha=0.3)
  ax.legend(loc="lower left", fontsize="small")
  fig.tight_layout()
  path = Path(path)
  fig.savefig(path)
  return path


def _thin(precision: np.ndarray, recall: np.ndarray,
          max_points: int) -> tuple[np.ndarray, np.ndarray]:
  if precision.size <= max_points:
    return precision, recall
  keep = np.unique(np.linspace(0, precision.size - 1, max_points).astype(int))
  return precision[keep], recall[keep]


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="tversky-evaluate",
      description=(
          "DSC, sensitivity, specificity, precision, F2, APR and lesion-wise "
          "detection (26-connected components) of predicted masks against "
          "reference labels, matched by case name, per class for label maps "
          "with several classes. Writes metrics.csv and pr_curve.png."),
      epilog=(
          "A reference without prediction is an error (see --allow-missing); "
          "a prediction without reference is skipped with a warning. Exit "
          "status: 0 done; 1 an input problem (one-line message); 2 invalid "
          "arguments."))
  parser.add_argument("--predictions", required=True, metavar="DIR",
                      help="CASE.nii.gz masks or label maps and optional "
                      "CASE_prob.nii.gz ([x, y, z] lesion or [x, y, z, K] "
                      "class probabilities)")
  parser.add_argument("--labels", required=True, metavar="DIR",
                      help="reference CASE.nii.gz labels (lesion where != 0, "
                      "or label maps 0..K-1)")
  parser.add_argument("--output", metavar="DIR",
                      help="where metrics.csv and pr_curve.png go "
                      "(default: --predictions)")
  parser.add_argument("--classes", default=AUTO, metavar="auto|1,2,3",
                      help="the labels to evaluate one-vs-rest (default auto: "
                      "the non-zero values in the data; label 1 alone is the "
                      "binary evaluation, without class column)")
  names = parser.add_mutually_exclusive_group()
  names.add_argument("--class-names", metavar="NAMES",
                     help="names of labels 0, 1, 2, ... (background first), "
                     "separated by commas (default: the label values)")
  names.add_argument("--dataset-json", metavar="FILE",
                     help="class names from the \"labels\" of an nnU-Net "
                     "dataset.json")
  parser.add_argument("--allow-missing", action="store_true",
                      help="evaluate only the cases present in both folders")
  parser.add_argument("--no-plot", action="store_true",
                      help="do not write pr_curve.png")
  parser.add_argument("--no-progress", action="store_true",
                      help="no progress bar")
  parser.add_argument("--report", metavar="FILE.html",
                      help="also write a self-contained HTML report: metrics "
                      "table, PR curve and per-case overlay montages, worst "
                      "DSC first")
  parser.add_argument("--images", metavar="DIR",
                      help="with --report: scans for the overlay background, "
                      "CASE_0000.nii.gz files (nnU-Net imagesTr/imagesTs); "
                      "default: grey")
  parser.add_argument("--report-class", metavar="NAME",
                      help="with --report and several classes: the class of "
                      "the overlays and of the case order (default: the "
                      "class with the fewest reference voxels)")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the command line; returns the exit status."""
  parser = build_parser()
  args = parser.parse_args(argv)
  for option in ("images", "report_class"):
    if getattr(args, option) and not args.report:
      parser.error(f"--{option.replace('_', '-')} is only used with --report")
  try:
    classes = parse_classes(args.classes)
    names = parse_class_names(args.class_names) if args.class_names else None
  except EvaluationError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  try:
    result, report_path = _run(args, classes, names)
  except (EvaluationError, OSError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 1
  print(format_table(result))
  print(f"\nWrote {result.csv_path}"
        + (f" and {result.plot_path}" if result.plot_path else
           " (no probability maps, so no pr_curve.png)"))
  if report_path is not None:
    print(f"Wrote {report_path}")
  return 0


def _run(args: argparse.Namespace, classes: str | tuple[int, ...],
         names: ClassNames | None) -> tuple[EvaluationResult, Path | None]:
  """Checks the inputs, evaluates and writes the outputs of :func:`main`."""
  if args.dataset_json:
    names = read_dataset_json_names(args.dataset_json)
  if args.report:  # checks its inputs before the evaluation runs
    from tversky_jax import report  # pylint: disable=g-import-not-at-top
    files = report.collect_inputs(args.predictions, args.labels, args.images,
                                  allow_missing=args.allow_missing)
  matched, _ = match_cases(args.predictions, args.labels,
                           allow_missing=args.allow_missing)
  spec = resolve_classes(matched, classes, names,
                         progress=not args.no_progress)
  if args.report_class is not None:
    report.check_class_name(spec.names, args.report_class)
  result = evaluate_folders(args.predictions, args.labels,
                            args.output or args.predictions, classes=spec,
                            allow_missing=args.allow_missing,
                            plot=not args.no_plot,
                            progress=not args.no_progress)
  if not args.report:
    return result, None
  return result, report.write_report(result, files, args.report,
                                     report_class=args.report_class,
                                     progress=not args.no_progress)


def _log(message: str) -> None:
  tqdm.write(message, file=sys.stderr)


if __name__ == "__main__":
  # Run the importable module, not __main__: tversky_jax.report imports it and
  # raises its EvaluationError, which main() must catch.
  from tversky_jax import evaluate  # pylint: disable=g-import-not-at-top
  sys.exit(evaluate.main())
