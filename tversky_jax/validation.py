"""Whole-volume inference and its scores, shared by validation and predict.

:func:`class_probabilities` runs the sliding window over one image as the
network sees it; :func:`segment` turns probabilities into a label map;
:func:`evaluate_cases` scores validation cases on each scan's own grid with
the project's one per-case evaluator
(:func:`tversky_jax.evaluate.evaluate_case_classes`, one-vs-rest per
foreground class) and its aggregation (:class:`tversky_jax.evaluate.
ClassPool`), as ``tversky-evaluate`` does.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import ml_collections
import numpy as np

from tversky_jax import evaluate
from tversky_jax import inference
from tversky_jax.configuration import METRICS
from tversky_jax.data import preprocessing


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


def lesion_probability(image: np.ndarray, logits_fn: Callable,
                       config: ml_collections.ConfigDict, window: Sequence[int],
                       devices: Sequence[jax.Device] | None = None,
                       progress: bool = False) -> np.ndarray:
  """``1 - p(background)`` ``[x, y, z]`` of one image, with the sliding
  window settings of ``config.inference``."""
  inf = config.inference
  return 1.0 - class_probabilities(
      image, logits_fn, window, overlap=inf.overlap,
      batch_size=inf.batch_size, mirror=inf.mirror, devices=devices,
      progress=progress)[..., 0]


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
                   devices: Sequence[jax.Device] | None = None
                   ) -> dict[str, float]:
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

  Returns:
    For two classes the keys of :data:`METRICS` (mean over cases; APR over
    the cases with lesions) and ``pooled_*`` (over all voxels of all cases).
    For more, the same per foreground class as ``dsc/NAME`` and
    ``pooled_dsc/NAME``, and their mean over the foreground classes under
    the plain names (what ``train.best_metric`` ranks).
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
    results = evaluate.evaluate_case_classes(
        segment(probs, inf.threshold), case.label, probs, case.case_id,
        classes, list(class_names))
    for k, result in zip(classes, results.values()):
      pools[k].add(result, probs[..., k], case.label == k)
  values = {k: _summary(pools[k].finish(k, class_names[k]))
            for k in classes}
  if len(class_names) == 2:
    return values[1]
  result = {f"{name}/{class_names[k]}": value
            for k, summary in values.items() for name, value in summary.items()}
  for name in values[1]:
    result[name] = float(np.nanmean([s[name] for s in values.values()]))
  return result


def _summary(evaluation: evaluate.ClassEvaluation) -> dict[str, float]:
  """Mean over cases and pooled values of :data:`METRICS`."""
  values = {name: float(evaluation.mean[name]) for name in METRICS}
  values.update({f"pooled_{name}": float(evaluation.pooled[name])
                 for name in METRICS})
  return values


def format_metrics(values: dict[str, float]) -> str:
  """One line of validation metrics (and the DSC of each class)."""
  text = "  ".join(f"{k} {values[k]:.4f}" for k in METRICS if k in values)
  per_class = [f"{k[4:]} {v:.4f}" for k, v in values.items()
               if k.startswith("dsc/")]
  return text + (f"  (dsc: {', '.join(per_class)})" if per_class else "")
