"""The operating point: the threshold chosen on the validation cases, on
hand-made probabilities (no training)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import helpers
from tversky_jax import evaluate
from tversky_jax import operating_point
from tversky_jax import validation
from tversky_jax.training_data import ValidationCase

SHAPE = (16, 16, 16)
SEARCHED = ("dsc", "f2", "sensitivity", "precision", "specificity")


def _cases():
  """(label, lesion probability) of three cases: a lesion found only below
  0.5, one found in part at 0.5, and an empty reference with false
  positives. No probability is near a grid threshold."""
  label_a, prob_a = np.zeros(SHAPE, np.uint8), np.full(SHAPE, 0.02)
  label_a[2:8, 2:8, 2:8] = 1
  prob_a[2:8, 2:8, 2:8] = 0.42
  prob_a[10:14, 10:14, 10:12] = 0.22  # false positives below 0.25
  label_b, prob_b = np.zeros(SHAPE, np.uint8), np.full(SHAPE, 0.03)
  label_b[4:12, 4:12, 4:10] = 1
  prob_b[4:12, 4:12, 4:7] = 0.87
  prob_b[4:12, 4:12, 7:10] = 0.32
  prob_b[12:14, 4:12, 4:10] = 0.38  # a false-positive rim
  label_c, prob_c = np.zeros(SHAPE, np.uint8), np.full(SHAPE, 0.01)
  prob_c[5:9, 5:9, 5:9] = 0.62
  return [(label, np.stack([1 - prob, prob], -1).astype(np.float32))
          for label, prob in ((label_a, prob_a), (label_b, prob_b),
                              (label_c, prob_c))]


def _validation_value(cases, threshold, metric):
  """``metric`` as validation aggregates it: the project's per-case
  evaluator and the mean row of its ClassPool."""
  pool = evaluate.ClassPool()
  for i, (label, probs) in enumerate(cases):
    segmentation = validation.segment(probs, threshold)
    (result,) = evaluate.evaluate_case_classes(
        segmentation, label, probs, f"case_{i}", (1,),
        ["background", "lesion"]).values()
    pool.add(result, probs[..., 1], label == 1)
  return pool.finish(1, "lesion").mean[metric]


def _search(cases, metric, default=0.5):
  search = operating_point.Search(metric, default)
  for label, probs in cases:
    search.add(ValidationCase("c", np.zeros((*SHAPE, 1)), label), None,
               probs)
  return search.finish()


@pytest.mark.parametrize("metric", SEARCHED)
def test_the_chosen_threshold_maximises_the_validation_metric(metric):
  cases = _cases()
  point = _search(cases, metric)
  values = {t: _validation_value(cases, t, metric)
            for t in operating_point.GRID}
  assert point.at_threshold == pytest.approx(max(values.values()), abs=1e-12)
  assert point.at_threshold == pytest.approx(values[point.threshold],
                                             abs=1e-12)
  assert point.at_default == pytest.approx(values[0.5], abs=1e-12)
  assert point.cases == 3 and point.metric == metric
  # Ties go to the threshold nearest 0.5.
  best = [t for t, v in values.items()
          if v == pytest.approx(point.at_threshold, abs=1e-12)]
  assert abs(point.threshold - 0.5) == min(abs(t - 0.5) for t in best)


def test_a_low_threshold_wins_where_the_lesions_are_below_half():
  point = _search(_cases(), "dsc")
  # Case a is found from 0.40 down, b fully from 0.30 down, a's false
  # positives join below 0.25 (the empty case c has no DSC).
  assert point.threshold == 0.3
  assert point.at_threshold > point.at_default
  assert point.describe() == (
      f"threshold 0.3 on 3 validation cases (dsc {point.at_default:.4f} -> "
      f"{point.at_threshold:.4f} at 0.5 -> 0.3)")


def test_the_configured_threshold_is_a_candidate_and_kept_without_lesions():
  assert 0.37 in operating_point.candidates(0.37)
  assert operating_point.candidates(0.5) == operating_point.GRID
  empty = [(np.zeros(SHAPE, np.uint8), probs) for _, probs in _cases()]
  point = _search(empty, "f2", default=0.37)
  assert point.threshold == 0.37
  assert math.isnan(point.at_default) and math.isnan(point.at_threshold)


def test_apr_and_more_than_two_classes_are_not_searched():
  assert operating_point.searched("f2", 2)
  assert not operating_point.searched("apr", 2)
  assert not operating_point.searched("f2", 3)
  assert operating_point.summary_line(None, 4, "apr", 2, 0.5) == (
      "Operating point: threshold 0.5 kept (train.best_metric apr does not "
      "depend on it)")
  assert "3 classes are segmented by their most probable class" in (
      operating_point.summary_line(None, 4, "f2", 3, 0.5))
  assert operating_point.summary_line(None, 4, "f2", 2, 0.5) is None


def test_the_stored_form_is_json_and_reads_back():
  point = operating_point.OperatingPoint(0.35, "precision", 0.5, math.nan,
                                         0.8, 2)
  stored = point.to_dict()
  assert stored["at_default"] is None  # NaN is not JSON
  again = operating_point.OperatingPoint.from_dict(stored)
  assert again.threshold == 0.35 and again.at_threshold == 0.8
  assert math.isnan(again.at_default)
  assert operating_point.OperatingPoint.from_dict(None) is None
  assert operating_point.summary_line(stored, 6, "precision", 2, 0.5) == (
      "Operating point of step 6: threshold 0.35 on 2 validation cases "
      "(precision nan -> 0.8000 at 0.5 -> 0.35)")


def test_validation_hands_its_probabilities_to_the_search():
  """Through validation.validate: the value at 0.5 is the logged one, and
  validating at the chosen threshold gives the value at it."""
  cases = [ValidationCase(f"case_{i}", probs[..., 1:].copy(), label)
           for i, (label, probs) in enumerate(_cases())]

  def logits_fn(images):  # the image is the lesion probability
    p = jnp.clip(images[..., :1], 1e-6, 1 - 1e-6)
    return jnp.concatenate([jnp.zeros_like(p), jnp.log(p / (1 - p))], -1)

  class Writer:
    takes_images = False

    def write(self, step, values):
      pass

  config = helpers.tiny_config("/unused")
  config.inference.overlap = 0.0
  names = ("background", "lesion")
  search = operating_point.Search("f2", 0.5)
  values = validation.validate(cases, logits_fn, config, SHAPE, names,
                               jax.devices()[:1], Writer(), 1,
                               on_case=search.add)
  point = search.finish()
  assert point.at_default == pytest.approx(values["f2"], abs=1e-12)
  assert point.threshold != 0.5
  config.inference.threshold = point.threshold
  again = validation.evaluate_cases(cases, logits_fn, config, SHAPE, names,
                                    jax.devices()[:1])
  assert point.at_threshold == pytest.approx(again["f2"], abs=1e-12)
