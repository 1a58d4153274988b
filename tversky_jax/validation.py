"""Whole-volume inference and its scores, shared by validation and predict.

:func:`class_probabilities` runs the sliding window over one image as the
network sees it; :func:`segment` turns probabilities into a label map;
:func:`evaluate_cases` scores validation cases on each scan's own grid with
the project's one per-case evaluator
(:func:`tversky_jax.evaluate.evaluate_case_classes`, one-vs-rest per
foreground class) and its aggregation (:class:`tversky_jax.evaluate.
ClassPool`), as ``tversky-evaluate`` does. :func:`validate` is the trainer's
validation step: the scores, written as ``val/*`` metrics, and (with
TensorBoard) the overlay montages of the first :data:`OVERLAY_CASES` cases,
drawn from the same predictions by :func:`case_overlay`.
"""

from __future__ import annotations

from typing import Callable, Sequence, TYPE_CHECKING

import jax
import ml_collections
import numpy as np
import tqdm

from tversky_jax import evaluate
from tversky_jax import inference
from tversky_jax import report
from tversky_jax.configuration import METRICS
from tversky_jax.data import preprocessing

if TYPE_CHECKING:
  from tversky_jax.metric_writer import MetricWriter
  from tversky_jax.training_data import ValidationCase

# Validation cases (the first ones) drawn as TensorBoard images.
OVERLAY_CASES = 2


def class_probabilities(image: np.ndarray, logits_fn: Callable,
                        window: Sequence[int], *, overlap: float,
                        batch_size: int, mirror: bool = False,
                        devices: Sequence[jax.Device] | None = None,
                        progress: bool = False) -> np.ndarray:
  """Sliding-window softmax probabilities ``float32 [x, y, z, K]``.

  ``image`` is ``[x, y, z, channels]`` (channels last, NIfTI axis order),
  normalised (and resampled) as the training data were.
  """
  return inference.sliding_window_inference(
      logits_fn, image, window=tuple(window), overlap=overlap,
      batch_size=batch_size, mirror=mirror, progress=progress,
      devices=devices)


def segment(probabilities: np.ndarray, threshold: float = 0.5) -> np.ndarray:
  """uint8 label map ``[x, y, z]`` of class probabilities ``[x, y, z, K]``.

  Two classes: 1 where ``p(class 1) >= threshold`` (the paper's rule, 0.5).
  More: the most probable class.
  """
  if probabilities.shape[-1] == 2:
    return (probabilities[..., 1] >= threshold).astype(np.uint8)
  return np.argmax(probabilities, axis=-1).astype(np.uint8)


def evaluate_cases(cases: Sequence, logits_fn: Callable,
                   config: ml_collections.ConfigDict, window: Sequence[int],
                   class_names: Sequence[str],
                   devices: Sequence[jax.Device] | None = None,
                   on_case: Callable[[ValidationCase, np.ndarray,
                                      np.ndarray], None]
                   | None = None) -> dict[str, float]:
  """The paper's metrics of whole validation volumes, on each scan's grid.

  Args:
    cases: :class:`tversky_jax.training_data.ValidationCase` s; a case with
      ``meta`` has its probabilities resampled back to its scan's grid
      before they are segmented and scored.
    logits_fn: ``images [n, x, y, z, c] -> logits [n, x, y, z, K]``.
    config: ``inference.*`` keys (overlap, batch size, mirror, threshold).
    window: the sliding window.
    class_names: one per class, background first.
    devices: the devices the windows are spread over.
    on_case: called with each case, its segmentation (``uint8 [X, Y, Z]``)
      and its class probabilities (``float32 [X, Y, Z, K]``), both on the
      case's label grid, once it is scored.

  Returns:
    For two classes the keys of :data:`METRICS` (NaN-skipping mean over the
    cases, where a case whose reference is empty is left out of DSC, F2,
    sensitivity and APR, as MONAI's ``ignore_empty`` and nnU-Net: see
    :mod:`tversky_jax.evaluate`), ``pooled_*`` (over all voxels of all
    cases) and :data:`tversky_jax.evaluate.EMPTY_COLUMNS` (the
    empty-reference cases and their false positives). For more, the same
    per foreground class as ``dsc/NAME`` and ``pooled_dsc/NAME``, and under
    the plain names the NaN-skipping mean over the foreground classes (what
    ``train.best_metric`` ranks; NaN when no class is defined, which
    checkpoint selection ranks worst) or, for the empty-case counts, their
    sum.
  """
  inf = config.inference
  classes = tuple(range(1, len(class_names)))
  pools = {k: evaluate.ClassPool() for k in classes}
  for case in cases:
    probs = class_probabilities(
        case.image, logits_fn, window, overlap=inf.overlap,
        batch_size=inf.batch_size, mirror=inf.mirror, devices=devices)
    if case.meta is not None:
      probs = preprocessing.resample_to_original(probs, case.meta)
    segmentation = segment(probs, inf.threshold)
    results = evaluate.evaluate_case_classes(
        segmentation, case.label, probs, case.case_id, classes,
        list(class_names))
    if on_case is not None:
      on_case(case, segmentation, probs)
    for k, result in zip(classes, results.values()):
      pools[k].add(result, probs[..., k], case.label == k)
  values = {k: _summary(pools[k].finish(k, class_names[k]))
            for k in classes}
  if len(class_names) == 2:
    return values[1]
  result = {f"{name}/{class_names[k]}": value
            for k, summary in values.items() for name, value in summary.items()}
  for name in values[1]:
    per_class = [s[name] for s in values.values()]
    result[name] = (float(sum(per_class)) if name in evaluate.EMPTY_COLUMNS
                    else evaluate.finite_mean(per_class))
  return result


def validate(cases: Sequence[ValidationCase], logits_fn: Callable,
             config: ml_collections.ConfigDict, window: Sequence[int],
             class_names: Sequence[str], devices: Sequence[jax.Device],
             writer: MetricWriter, step: int,
             on_case: Callable[[ValidationCase, np.ndarray, np.ndarray],
                               None] | None = None) -> dict[str, float]:
  """:func:`evaluate_cases`, its values written as ``val/NAME`` at ``step``
  and printed as one line (process 0).

  When the writer takes images (TensorBoard), also the
  :func:`case_overlay` of the first :data:`OVERLAY_CASES` cases, from the
  predictions just scored (no second inference). ``on_case`` is the hook of
  :func:`evaluate_cases` (e.g. the threshold search of
  :mod:`tversky_jax.operating_point`).
  """
  images = {}

  def each_case(case, segmentation, probabilities):
    if writer.takes_images and len(images) < OVERLAY_CASES:
      tag, rgb = case_overlay(case, segmentation, class_names)
      images[tag] = rgb
    if on_case is not None:
      on_case(case, segmentation, probabilities)

  values = evaluate_cases(
      cases, logits_fn, config, window, class_names, devices,
      each_case if writer.takes_images or on_case is not None else None)
  writer.write(step, {f"val/{k}": v for k, v in values.items()})
  if images:
    writer.write_images(step, images)
  if jax.process_index() == 0:
    tqdm.tqdm.write(f"step {step}: " + format_metrics(values))
  return values


def case_overlay(case: ValidationCase, segmentation: np.ndarray,
                 class_names: Sequence[str]) -> tuple[str, np.ndarray]:
  """The overlay montage of a validation case, as ``tversky-evaluate
  --report`` draws it (:func:`tversky_jax.report.overlay_montage`).

  Args:
    case: the case; its first image channel is put back on the label's grid
      (as the probabilities are) and shown under the overlay.
    segmentation: ``[X, Y, Z]`` label map on the label's grid.
    class_names: one per class; with several foreground classes the montage
      shows the one with the fewest reference voxels in the case.

  Returns:
    ``(tag, rgb)``: ``val_overlay/CASE`` (``/CLASS`` with several foreground
    classes) and ``uint8 [h, w, 3]``. Display axes: RAS+ with the scan's
    spacing when the case has ``meta``, else the array's own axes.
  """
  tag, k = f"val_overlay/{case.case_id}", 1
  if len(class_names) > 2:
    counts = np.bincount(case.label.ravel(),
                         minlength=len(class_names))[1:len(class_names)]
    present = np.flatnonzero(counts)
    if present.size:
      k = 1 + int(present[np.argmin(counts[present])])
    tag += f"/{class_names[k]}"
  scan, affine = _scan_on_label_grid(case)
  reference, spacing = report.to_display_axes(case.label == k, affine)
  prediction, _ = report.to_display_axes(segmentation == k, affine)
  if scan is not None:
    scan = report.to_display_axes(scan, affine)[0]
  return tag, report.overlay_montage(scan, reference, prediction,
                                     spacing=spacing)


def _scan_on_label_grid(case: ValidationCase
                        ) -> tuple[np.ndarray | None, np.ndarray]:
  """(first image channel on the label's grid or None, its affine)."""
  channel = np.asarray(case.image[..., 0], np.float32)
  if case.meta is None:
    scan, affine = channel, np.eye(4)
  else:
    meta = case.meta
    scan = np.zeros(meta.original_shape, np.float32)
    scan[tuple(slice(lo, hi) for lo, hi in meta.bbox)] = (
        preprocessing.resample(channel, meta.shape_after_crop, (1, 1, 1)))
    affine = np.asarray(meta.affine, np.float64)
  return (scan if scan.shape == case.label.shape else None), affine


def _summary(evaluation: evaluate.ClassEvaluation) -> dict[str, float]:
  """Mean over cases and pooled values of :data:`METRICS`, and the
  empty-reference counts of the mean."""
  values = {name: float(evaluation.mean[name]) for name in METRICS}
  values.update({f"pooled_{name}": float(evaluation.pooled[name])
                 for name in METRICS})
  values.update({name: float(evaluation.mean[name])
                 for name in evaluate.EMPTY_COLUMNS})
  return values


def format_metrics(values: dict[str, float]) -> str:
  """One line of validation metrics (and the DSC of each class)."""
  text = "  ".join(f"{k} {values[k]:.4f}" for k in METRICS if k in values)
  per_class = [f"{k[4:]} {v:.4f}" for k, v in values.items()
               if k.startswith("dsc/")]
  return text + (f"  (dsc: {', '.join(per_class)})" if per_class else "")
