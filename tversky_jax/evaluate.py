"""The paper's metrics, and lesion counts, for a folder of predicted masks.

Command line (``python -m tversky_jax.evaluate`` or ``tversky-evaluate``)::

  tversky-evaluate --predictions predictions/ \
      --labels data/Dataset001_Lesions/labelsTs [--output eval/]

Inputs, matched by case name:

* ``--predictions``: ``CASE.nii.gz`` (or ``.nii``) masks, lesion where the
  voxel is non-zero (as ``tversky-predict`` writes them), and optionally
  ``CASE_prob.nii.gz`` lesion probabilities (for APR and the PR curves).
* ``--labels``: reference ``CASE.nii.gz`` (or ``.nii``), lesion where non-zero.

Matching rules: a reference without a prediction is an error (a forgotten
case would silently improve the scores) unless ``--allow-missing`` is given,
which evaluates the cases present in both with a warning; a prediction
without a reference is skipped with a warning (e.g. predictions for unlabelled
scans); a ``CASE_prob`` without ``CASE`` mask is skipped with a warning. A
prediction (or probability) whose shape differs from its reference, or whose
affine differs by more than ``1e-4``, is an error naming the case.

Per case, and pooled over every voxel of every case, it computes (paper,
Sec. 3; the formulas of :mod:`tversky_jax.metrics`):

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
  F1 = 2PR / (P + R). A ratio with denominator 0 is 1 (nothing to miss /
  no false alarm), so an empty reference and an empty prediction score 1.

Outputs: ``metrics.csv`` (one row per case, then a ``pooled`` row: metrics
of the summed counts, and a ``mean`` row: the mean of the per-case values,
APR averaged over the cases that have lesions and probabilities; an empty
cell means undefined), a table on stdout, and ``pr_curve.png`` (voxel-wise
precision-recall curves per case and pooled) when probabilities exist.
``--report report.html [--images imagesTs/]`` also writes a self-contained
HTML page with the table, the curves and per-case overlay montages (see
:mod:`tversky_jax.report`).

Function API (for the replication sweep)::

  result = evaluate_folders("predictions/", "labelsTs/", "eval/")
  result.pooled["dsc"], result.mean["lesion_f1"], result.cases[0].row()
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import os
import sys
from collections.abc import Sequence
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


def voxel_metrics(tp: float, fp: float, fn: float,
                  tn: float) -> dict[str, float]:
  """DSC, sensitivity, specificity, precision and F2 from voxel counts.

  Uses the formulas (and empty-case rules) of :mod:`tversky_jax.metrics`.
  """
  counts = tuple(float(c) for c in (tp, fp, fn, tn))
  return {
      "dsc": float(metrics_lib.dice_from_counts(*counts)),
      "sensitivity": float(metrics_lib.sensitivity_from_counts(*counts)),
      "specificity": float(metrics_lib.specificity_from_counts(*counts)),
      "precision": float(metrics_lib.precision_from_counts(*counts)),
      "f2": float(metrics_lib.f_beta_from_counts(*counts, beta=2.0)),
  }


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
  scores = np.asarray(probabilities, dtype=np.float32).ravel()
  positive = np.asarray(reference).ravel() != 0
  n_pos = int(positive.sum())
  if n_pos == 0:
    return np.zeros(0), np.zeros(0)
  order = np.argsort(-scores, kind="stable")
  scores, positive = scores[order], positive[order]
  # The last position of each run of equal scores: one threshold each.
  ends = np.append(np.flatnonzero(np.diff(scores)), scores.size - 1)
  tps = np.cumsum(positive, dtype=np.int64)[ends]
  fps = ends + 1 - tps
  return tps / (tps + fps), tps / n_pos


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

  def metrics(self) -> dict[str, float]:
    """Voxel and lesion metrics (the CSV's metric columns)."""
    values = voxel_metrics(self.tp, self.fp, self.fn, self.tn)
    values["apr"] = self.apr
    values.update(_lesion_values(self.lesions))
    return values

  def row(self) -> dict[str, Any]:
    """The case's CSV row (``COLUMNS``)."""
    row: dict[str, Any] = {"case": self.case_id, **self.metrics(),
                           "tp": self.tp, "fp": self.fp, "fn": self.fn,
                           "tn": self.tn}
    row.update(_lesion_counts(self.lesions))
    return row


def _lesion_values(lesions: LesionCounts) -> dict[str, float]:
  return {"lesion_precision": lesions.precision,
          "lesion_recall": lesions.recall, "lesion_f1": lesions.f1}


def _lesion_counts(lesions: LesionCounts) -> dict[str, int]:
  return {"ref_lesions": lesions.reference,
          "pred_lesions": lesions.predicted,
          "detected_lesions": lesions.detected,
          "missed_lesions": lesions.missed,
          "fp_lesions": lesions.false_positive}


def evaluate_case(prediction: np.ndarray, reference: np.ndarray,
                  probability: np.ndarray | None = None,
                  case_id: str = "") -> CaseResult:
  """Metrics of one case from arrays.

  Args:
    prediction: ``[x, y, z]`` mask, lesion where non-zero.
    reference: ``[x, y, z]``, lesion where non-zero.
    probability: optional ``[x, y, z]`` lesion probabilities, for APR.
    case_id: name for the result.

  Returns:
    A :class:`CaseResult`.
  """
  pred = np.asarray(prediction) != 0
  ref = np.asarray(reference) != 0
  if pred.shape != ref.shape:
    raise ValueError(f"case {case_id}: prediction shape {pred.shape} differs "
                     f"from reference shape {ref.shape}")
  tp = int(np.count_nonzero(pred & ref))
  fp = int(np.count_nonzero(pred & ~ref))
  fn = int(np.count_nonzero(~pred & ref))
  tn = int(pred.size) - tp - fp - fn
  apr = math.nan
  if probability is not None:
    apr = float(metrics_lib.average_precision(
        np.asarray(probability, np.float32)[None], ref[None])[0])
  return CaseResult(case_id, tp, fp, fn, tn, apr, lesion_detection(pred, ref))


# --------------------------------------------------------------------------
# Folders
# --------------------------------------------------------------------------


@dataclasses.dataclass
class EvaluationResult:
  """What :func:`evaluate_folders` computed.

  Attributes:
    cases: per-case results, sorted by case name.
    pooled: metrics of the counts summed over all cases (APR over all voxels
      of all cases, NaN unless every case has probabilities), plus the
      summed counts.
    mean: the mean of the per-case values of every column (NaN-skipping).
    curves: case name (and ``"pooled"``) -> ``(precision, recall)``.
    warnings: the warnings that were printed.
    csv_path: the written metrics.csv, or None.
    plot_path: the written pr_curve.png, or None (no probabilities).
  """

  cases: list[CaseResult]
  pooled: dict[str, float]
  mean: dict[str, float]
  curves: dict[str, tuple[np.ndarray, np.ndarray]]
  warnings: list[str]
  csv_path: Path | None = None
  plot_path: Path | None = None

  def rows(self) -> list[dict[str, Any]]:
    """The CSV rows: one per case, then ``pooled`` and ``mean``."""
    return ([c.row() for c in self.cases]
            + [{"case": "pooled", **self.pooled},
               {"case": "mean", **self.mean}])


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


def _read_volume(path: Path) -> tuple[np.ndarray, np.ndarray]:
  """``(data [x, y, z], affine)``; [x, y, z, 1] is accepted."""
  try:
    img = nib.load(path)
    data = np.asanyarray(img.dataobj)
  except Exception as error:  # nibabel/gzip raise many kinds on bad files
    raise EvaluationError(
        f"{path}: cannot read ({type(error).__name__}: {error})") from None
  if data.ndim == 4 and data.shape[3] == 1:
    data = data[..., 0]
  if data.ndim != 3:
    raise EvaluationError(f"{path}: expected a 3D volume, got {data.shape}")
  return data, img.affine


def _check_grid(case_id: str, what: str, data: np.ndarray, affine: np.ndarray,
                ref: np.ndarray, ref_affine: np.ndarray) -> None:
  if data.shape != ref.shape:
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
                     allow_missing: bool = False, plot: bool = True,
                     progress: bool = False) -> EvaluationResult:
  """Evaluates a folder of predictions against a folder of references.

  Args:
    pred_dir: ``CASE.nii.gz`` masks and optional ``CASE_prob.nii.gz``.
    label_dir: reference ``CASE.nii.gz``.
    out_dir: where ``metrics.csv`` and ``pr_curve.png`` go (created if
      missing); None writes nothing.
    allow_missing: evaluate only the cases in both folders instead of failing
      when a reference has no prediction.
    plot: write ``pr_curve.png`` (when probabilities exist).
    progress: a tqdm bar over the cases.

  Returns:
    An :class:`EvaluationResult`. Warnings are also printed to stderr.

  Raises:
    EvaluationError: see :func:`match_cases`; an unreadable file; a
      prediction or probability on another grid than its reference.
  """
  matched, warnings = match_cases(pred_dir, label_dir,
                                  allow_missing=allow_missing)
  for warning in warnings:
    _log(f"warning: {warning}")
  cases: list[CaseResult] = []
  pooled_probs: list[np.ndarray] | None = []
  pooled_refs: list[np.ndarray] = []
  curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
  for case_id, mask_path, prob_path, ref_path in tqdm(
      matched, desc="evaluating", unit="case", disable=not progress):
    ref, ref_affine = _read_volume(ref_path)
    mask, affine = _read_volume(mask_path)
    _check_grid(case_id, "prediction", mask, affine, ref, ref_affine)
    prob = None
    if prob_path is not None:
      prob, prob_affine = _read_volume(prob_path)
      _check_grid(case_id, "probability", prob, prob_affine, ref, ref_affine)
      prob = prob.astype(np.float32)
      if ref.any():
        curves[case_id] = precision_recall_curve(prob, ref)
    cases.append(evaluate_case(mask, ref, prob, case_id))
    if pooled_probs is not None and prob is not None:
      pooled_probs.append(prob.ravel())
      pooled_refs.append(ref.ravel() != 0)
    else:
      pooled_probs = None

  pooled = _pooled(cases, pooled_probs, pooled_refs, curves)
  mean = _mean(cases)
  result = EvaluationResult(cases, pooled, mean, curves, warnings)
  if out_dir is not None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result.csv_path = write_csv(result, out_dir / "metrics.csv")
    if plot and curves:
      result.plot_path = plot_pr_curves(curves, cases, pooled,
                                        out_dir / "pr_curve.png")
  return result


def _pooled(cases: list[CaseResult], probs: list[np.ndarray] | None,
            refs: list[np.ndarray],
            curves: dict[str, tuple[np.ndarray, np.ndarray]]
            ) -> dict[str, float]:
  tp, fp, fn, tn = (sum(getattr(c, k) for c in cases)
                    for k in ("tp", "fp", "fn", "tn"))
  lesions = cases[0].lesions
  for case in cases[1:]:
    lesions = lesions + case.lesions
  pooled: dict[str, Any] = voxel_metrics(tp, fp, fn, tn)
  pooled["apr"] = math.nan
  if probs:
    scores = np.concatenate(probs)
    labels = np.concatenate(refs)
    if labels.any():
      pooled["apr"] = float(metrics_lib.average_precision(
          scores[None], labels[None], pooled=True))
      curves["pooled"] = precision_recall_curve(scores, labels)
  pooled.update(_lesion_values(lesions))
  pooled.update(tp=tp, fp=fp, fn=fn, tn=tn, **_lesion_counts(lesions))
  return pooled


def _mean(cases: list[CaseResult]) -> dict[str, float]:
  rows = [c.row() for c in cases]
  mean = {}
  for column in COLUMNS[1:]:
    values = np.array([r[column] for r in rows], dtype=np.float64)
    values = values[np.isfinite(values)]
    mean[column] = float(values.mean()) if values.size else math.nan
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
  """Writes ``COLUMNS`` for every case, ``pooled`` and ``mean``; NaN as ''."""
  path = Path(path)
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(COLUMNS)
    for row in result.rows():
      writer.writerow([_csv_value(row[c]) for c in COLUMNS])
  return path


def format_table(result: EvaluationResult) -> str:
  """A fixed-width table: metrics in %, lesions as detected/reference."""
  header = (f"{'case':<20} {'DSC':>6} {'Sens':>6} {'Spec':>6} {'Prec':>6} "
            f"{'F2':>6} {'APR':>6} {'lesions':>9} {'missed':>6} {'FP-les':>6} "
            f"{'L-F1':>6}")
  lines = [header, "-" * len(header)]

  def pct(v):
    return f"{100 * v:6.2f}" if math.isfinite(v) else f"{'-':>6}"

  def line(name, values, counts):
    return (f"{name[:20]:<20} " + " ".join(pct(values[k]) for k in
                                           VOXEL_METRICS)
            + f" {counts[0]:>9} {counts[1]:>6} {counts[2]:>6} "
            + pct(values["lesion_f1"]))

  for case in result.cases:
    les = case.lesions
    lines.append(line(case.case_id, case.metrics(),
                      (f"{les.detected}/{les.reference}", les.missed,
                       les.false_positive)))
  lines.append("-" * len(header))
  p, m = result.pooled, result.mean
  lines.append(line("pooled", p, (
      f"{p['detected_lesions']}/{p['ref_lesions']}", p["missed_lesions"],
      p["fp_lesions"])))
  lines.append(line("mean", m, (
      f"{m['detected_lesions']:.1f}/{m['ref_lesions']:.1f}",
      f"{m['missed_lesions']:.1f}", f"{m['fp_lesions']:.1f}")))
  return "\n".join(lines)


def plot_pr_curves(curves: dict[str, tuple[np.ndarray, np.ndarray]],
                   cases: Sequence[CaseResult], pooled: dict[str, float],
                   path: str | os.PathLike[str],
                   max_points: int = 4000) -> Path:
  """Writes the precision-recall curves (per case thin, pooled thick) as PNG.

  Uses matplotlib's Agg canvas directly (no pyplot, no global backend
  change). Curves are step plots, thinned to ``max_points`` points each.
  """
  # pylint: disable=g-import-not-at-top
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  # pylint: enable=g-import-not-at-top

  apr = {c.case_id: c.apr for c in cases}
  apr["pooled"] = pooled.get("apr", math.nan)
  fig = Figure(figsize=(6.5, 5.5), dpi=120)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  per_case = [k for k in curves if k != "pooled"]
  for i, name in enumerate(per_case):
    precision, recall = _thin(*curves[name], max_points)
    ax.plot(np.r_[0.0, recall], np.r_[precision[:1], precision],
            drawstyle="steps-pre", linewidth=1.0, alpha=0.7,
            label=(f"{name} (AP {apr[name]:.3f})" if i < 12 else None))
  if "pooled" in curves:
    precision, recall = _thin(*curves["pooled"], max_points)
    ax.plot(np.r_[0.0, recall], np.r_[precision[:1], precision],
            drawstyle="steps-pre", color="black", linewidth=2.5,
            label=f"pooled (AP {apr['pooled']:.3f})")
  ax.set_xlabel("recall (sensitivity)")
  ax.set_ylabel("precision")
  ax.set_xlim(0.0, 1.0)
  ax.set_ylim(0.0, 1.02)
  ax.set_title("Voxel-wise precision-recall")
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
          "reference labels, matched by case name. Writes metrics.csv and "
          "pr_curve.png."),
      epilog=(
          "A reference without prediction is an error (see --allow-missing); "
          "a prediction without reference is skipped with a warning. Exit "
          "status: 0 done; 1 an input problem (one-line message); 2 invalid "
          "arguments."))
  parser.add_argument("--predictions", required=True, metavar="DIR",
                      help="CASE.nii.gz masks and optional CASE_prob.nii.gz")
  parser.add_argument("--labels", required=True, metavar="DIR",
                      help="reference CASE.nii.gz labels (lesion where != 0)")
  parser.add_argument("--output", metavar="DIR",
                      help="where metrics.csv and pr_curve.png go "
                      "(default: --predictions)")
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
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the command line; returns the exit status."""
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.images and not args.report:
    parser.error("--images is only used with --report")
  out_dir = args.output or args.predictions
  report_path = None
  try:
    if args.report:  # checks its inputs before the evaluation runs
      from tversky_jax import report  # pylint: disable=g-import-not-at-top
      files = report.collect_inputs(args.predictions, args.labels,
                                    args.images,
                                    allow_missing=args.allow_missing)
    result = evaluate_folders(args.predictions, args.labels, out_dir,
                              allow_missing=args.allow_missing,
                              plot=not args.no_plot,
                              progress=not args.no_progress)
    if args.report:
      report_path = report.write_report(result, files, args.report,
                                        progress=not args.no_progress)
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


def _log(message: str) -> None:
  tqdm.write(message, file=sys.stderr)


if __name__ == "__main__":
  # Run the importable module, not __main__: tversky_jax.report imports it and
  # raises its EvaluationError, which main() must catch.
  from tversky_jax import evaluate  # pylint: disable=g-import-not-at-top
  sys.exit(evaluate.main())
