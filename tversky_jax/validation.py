"""Validation during training: whole-volume inference and the paper's metrics."""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import ml_collections
import numpy as np

from tversky_jax import inference
from tversky_jax import metrics as metrics_lib
from tversky_jax.configuration import METRICS
from tversky_jax.data import pipeline


def lesion_probability(image: np.ndarray, logits_fn: Callable,
                       config: ml_collections.ConfigDict, window: Sequence[int],
                       devices: Sequence[jax.Device] | None = None,
                       progress: bool = False) -> np.ndarray:
  """Sliding-window lesion probability ``[x, y, z]`` of one normalised image.

  ``image`` is ``[x, y, z, channels]`` (channels last, NIfTI axis order),
  already normalised with :func:`tversky_jax.data.nifti.normalize_image`.
  """
  probabilities = inference.sliding_window_inference(
      logits_fn, image, window=tuple(window), overlap=config.inference.overlap,
      batch_size=config.inference.batch_size, mirror=config.inference.mirror,
      progress=progress, devices=devices)
  return 1.0 - probabilities[..., 0]


def evaluate_cases(cases: Sequence[pipeline.TrainingCase], logits_fn: Callable,
                   config: ml_collections.ConfigDict, window: Sequence[int],
                   devices: Sequence[jax.Device] | None = None
                   ) -> dict[str, float]:
  """The paper's metrics on whole validation volumes.

  Returns the mean over cases of DSC, sensitivity, specificity, precision, F2
  and APR (APR averaged over the cases that contain lesions), and the same
  metrics pooled over all voxels of all cases under ``pooled_*`` keys.
  """
  threshold = config.inference.threshold
  per_case, probs, labels = [], [], []
  for case in cases:
    prob = lesion_probability(case.image, logits_fn, config, window, devices)
    label = (case.label != 0).astype(np.int32)  # lesion vs. the rest
    values = metrics_lib.all_metrics(prob[None], label[None],
                                     threshold=threshold)
    per_case.append({k: float(v[0]) for k, v in values.items()})
    probs.append(prob.ravel())
    labels.append(label.ravel())
  result = {name: float(np.nanmean([c[name] for c in per_case]))
            if per_case else float("nan") for name in METRICS}
  if per_case:
    pooled = metrics_lib.all_metrics(np.concatenate(probs)[None],
                                     np.concatenate(labels)[None],
                                     threshold=threshold, pooled=True)
    result.update({f"pooled_{k}": float(v) for k, v in pooled.items()})
  return result
