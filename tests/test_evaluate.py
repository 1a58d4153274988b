"""Tests of tversky_jax.evaluate on hand-made and synthetic volumes."""

import csv
import json
import math

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest

from tests import helpers
from tversky_jax import evaluate
from tversky_jax import metrics as metrics_lib
from tversky_jax import validation
from tversky_jax.data import synthetic
from tversky_jax.training_data import ValidationCase

SHAPE = (12, 12, 12)
AFFINE = np.diag([-1.0, 1.0, 2.0, 1.0])


def _save(path, array, affine=AFFINE, dtype=np.uint8):
  img = nib.Nifti1Image(np.asarray(array).astype(dtype), affine)
  img.header.set_sform(affine, code=1)
  img.header.set_qform(affine, code=1)
  nib.save(img, path)


def hand_made_case():
  """Reference, prediction and probability with hand-counted outcomes.

  Reference lesions (26-connected): A 2x2x2 = 8 voxels, B 1 voxel, C 3 voxels,
  D 2 voxels touching only at a corner (one lesion under 26-connectivity, two
  under 6-connectivity): 14 voxels, 4 lesions.
  Prediction: 4 voxels of A plus 5 false-positive voxels attached to A (one
  component with A), nothing of B, 1 voxel of C, 1 voxel of D, and two
  separate false-positive components (2 voxels in a row; 2 voxels touching at
  a corner): TP 6, FP 9, FN 8, 5 components of which 2 are false positive.
  Probability: 0.9 on predicted voxels, 0.3 on missed lesion voxels, 0
  elsewhere, so the mask is ``probability >= 0.5``.
  """
  ref = np.zeros(SHAPE, np.uint8)
  ref[1:3, 1:3, 1:3] = 1  # A
  ref[8, 8, 8] = 1  # B
  ref[5, 1:4, 10] = 1  # C
  ref[10, 1, 1] = ref[11, 2, 2] = 1  # D
  pred = np.zeros(SHAPE, np.uint8)
  pred[1:3, 1:3, 1] = 1  # 4 voxels of A
  pred[1:3, 1:3, 0] = 1  # 4 FP voxels next to A
  pred[0, 1, 1] = 1  # 1 FP voxel next to A
  pred[5, 1, 10] = 1  # C
  pred[11, 2, 2] = 1  # D
  pred[8:10, 2, 6] = 1  # FP component
  pred[5, 8, 3] = pred[6, 9, 4] = 1  # FP component (corner-connected)
  prob = np.where(pred == 1, 0.9, np.where(ref == 1, 0.3, 0.0))
  return ref, pred, prob.astype(np.float32)


TP, FP, FN = 6, 9, 8
TN = 12**3 - TP - FP - FN  # 1705
# Precision 6/15 at threshold 0.9 (recall 6/14), 14/23 at 0.3 (recall 1).
APR = (6 / 14) * (6 / 15) + (8 / 14) * (14 / 23)


def test_hand_made_case_exact_values():
  ref, pred, prob = hand_made_case()
  result = evaluate.evaluate_case(pred, ref, prob, "hand")
  assert (result.tp, result.fp, result.fn, result.tn) == (TP, FP, FN, TN)
  values = result.metrics()
  expected = {
      "dsc": 12 / 29, "sensitivity": 6 / 14, "specificity": 1705 / 1714,
      "precision": 6 / 15, "f2": 30 / 71, "apr": APR,
      "lesion_precision": 3 / 5, "lesion_recall": 3 / 4, "lesion_f1": 2 / 3,
  }
  for name, value in expected.items():
    assert values[name] == pytest.approx(value, rel=1e-6), name
  lesions = result.lesions
  assert (lesions.reference, lesions.predicted, lesions.detected,
          lesions.missed, lesions.false_positive) == (4, 5, 3, 1, 2)


def test_lesions_are_26_connected_components():
  ref = np.zeros((6, 6, 6), np.uint8)
  ref[1, 1, 1] = ref[2, 2, 2] = 1  # corner neighbours: one lesion
  ref[4, 4, 4] = 1  # a second lesion
  pred = np.zeros_like(ref)
  pred[2, 2, 2] = 1  # touches the first lesion at one voxel only
  pred[4, 1, 4] = pred[4, 2, 5] = 1  # edge neighbours: one FP component
  counts = evaluate.lesion_detection(pred, ref)
  assert (counts.reference, counts.detected, counts.missed) == (2, 1, 1)
  assert (counts.predicted, counts.false_positive) == (2, 1)
  # Empty reference and prediction: nothing missed, no false alarm.
  empty = evaluate.lesion_detection(np.zeros_like(ref), np.zeros_like(ref))
  assert (empty.precision, empty.recall, empty.f1) == (1.0, 1.0, 1.0)
  only_fp = evaluate.lesion_detection(pred, np.zeros_like(ref))
  assert (only_fp.precision, only_fp.recall, only_fp.f1) == (0.0, 1.0, 0.0)


def test_precision_recall_curve_gives_the_metrics_ap():
  rng = np.random.default_rng(0)
  ref = rng.random((10, 10, 10)) < 0.1
  prob = np.clip(0.3 * ref + rng.random(ref.shape) * 0.8, 0, 1)
  prob = np.round(prob, 2).astype(np.float32)  # with ties
  precision, recall = evaluate.precision_recall_curve(prob, ref)
  assert np.all(np.diff(recall) >= 0) and recall[-1] == 1.0
  ap = np.sum(np.diff(np.r_[0.0, recall]) * precision)
  expected = float(metrics_lib.average_precision(prob[None], ref[None])[0])
  assert ap == pytest.approx(expected, rel=1e-5)
  assert evaluate.precision_recall_curve(prob, np.zeros_like(ref))[0].size == 0


def _random_cases(seed=0, count=4):
  """``count`` (probability, reference) pairs of different shapes, scores
  rounded to 2 decimals (ties within and across cases); the second has no
  lesion."""
  rng = np.random.default_rng(seed)
  cases = []
  for i in range(count):
    shape = (6 + i, 7, 5 + 2 * i)
    ref = rng.random(shape) < (0.0 if i == 1 else 0.15)
    prob = np.clip(0.3 * ref + 0.8 * rng.random(shape), 0, 1)
    cases.append((np.round(prob, 2).astype(np.float32), ref))
  return cases


def test_pooled_ap_from_merged_count_tables_equals_sklearn():
  sklearn_metrics = pytest.importorskip("sklearn.metrics")
  cases = _random_cases()
  scores = np.concatenate([p.ravel() for p, _ in cases])
  labels = np.concatenate([r.ravel() for _, r in cases])
  expected = sklearn_metrics.average_precision_score(labels, scores)
  merged = evaluate.merge_score_counts(
      [evaluate.score_counts(p, r) for p, r in cases])
  assert merged.voxels.sum() == scores.size
  assert merged.positives.sum() == labels.sum()
  assert evaluate.average_precision_from_counts(merged) == pytest.approx(
      expected, rel=1e-12)
  # The same curve as from all the voxels at once, in any merge order.
  for got, want in zip(evaluate.curve_from_counts(merged),
                       evaluate.precision_recall_curve(scores, labels)):
    np.testing.assert_array_equal(got, want)
  reordered = evaluate.merge_score_counts(
      [evaluate.score_counts(p, r) for p, r in cases[::-1]])
  np.testing.assert_array_equal(reordered.positives, merged.positives)
  # What the pool reports (the cases added one by one).
  pool = evaluate.ClassPool()
  for i, (prob, ref) in enumerate(cases):
    pool.add(evaluate.evaluate_case(prob >= 0.5, ref, prob, f"c{i}"), prob,
             ref)
  evaluation = pool.finish(1, "lesion")
  assert evaluation.pooled["apr"] == pytest.approx(expected, rel=1e-12)
  assert sorted(evaluation.curves) == ["c0", "c2", "c3", "pooled"]
  assert math.isnan(evaluate.average_precision_from_counts(
      evaluate.score_counts(*cases[1])))


def test_pooled_ap_beyond_int32_voxels_from_counts():
  """4.5e9 voxels (> 2**31) in two tables: int32 counts would overflow."""
  first = evaluate.ScoreCounts(np.array([0.1, 0.9], np.float32),
                               np.array([1_200_000_000, 1_500_000_000]),
                               np.array([40_000_000, 1_200_000_000]))
  second = evaluate.ScoreCounts(np.array([0.1, 0.5], np.float32),
                                np.array([800_000_000, 1_000_000_000]),
                                np.array([60_000_000, 300_000_000]))
  merged = evaluate.merge_score_counts([first, second])
  np.testing.assert_array_equal(merged.voxels, [2_000_000_000, 1_000_000_000,
                                                1_500_000_000])
  assert merged.voxels.sum() > 2**31
  # Thresholds 0.9, 0.5, 0.1: (positives, voxels) at or above each.
  above = [(1_200_000_000, 1_500_000_000), (1_500_000_000, 2_500_000_000),
           (1_600_000_000, 4_500_000_000)]
  positives = 1_600_000_000
  expected, last_tp = 0.0, 0
  for tp, predicted in above:
    expected += (tp - last_tp) / positives * (tp / predicted)
    last_tp = tp
  assert expected == pytest.approx(0.6 + 0.1125 + 1 / 45, rel=1e-15)
  assert evaluate.average_precision_from_counts(merged) == pytest.approx(
      expected, rel=1e-12)
  precision, recall = evaluate.curve_from_counts(merged)
  np.testing.assert_allclose(precision, [0.8, 0.6, 16 / 45], rtol=1e-15)
  np.testing.assert_allclose(recall, [0.75, 0.9375, 1.0], rtol=1e-15)


@pytest.fixture
def folders(tmp_path):
  """Case 'hand' (above) and case 'empty' (no lesion, nothing predicted)."""
  pred_dir, label_dir = tmp_path / "pred", tmp_path / "labels"
  pred_dir.mkdir()
  label_dir.mkdir()
  ref, pred, prob = hand_made_case()
  _save(label_dir / "hand.nii.gz", ref)
  _save(pred_dir / "hand.nii.gz", pred)
  _save(pred_dir / "hand_prob.nii.gz", prob, dtype=np.float32)
  zeros = np.zeros(SHAPE, np.uint8)
  _save(label_dir / "empty.nii.gz", zeros)
  _save(pred_dir / "empty.nii", zeros)  # .nii and .nii.gz both accepted
  _save(pred_dir / "empty_prob.nii.gz", zeros, dtype=np.float32)
  return pred_dir, label_dir, tmp_path / "eval"


def test_folders_csv_with_pooled_and_mean_rows(folders):
  pred_dir, label_dir, out = folders
  result = evaluate.evaluate_folders(pred_dir, label_dir, out)
  rows = {r["case"]: r for r in csv.DictReader(open(out / "metrics.csv"))}
  assert list(rows) == ["empty", "hand", "pooled", "mean"]
  assert tuple(next(csv.reader(open(out / "metrics.csv")))) == evaluate.COLUMNS
  hand, empty, pooled, mean = (rows[k] for k in ("hand", "empty", "pooled",
                                                  "mean"))
  assert float(hand["dsc"]) == pytest.approx(12 / 29, rel=1e-6)
  assert float(hand["apr"]) == pytest.approx(APR, rel=1e-6)
  assert (int(hand["missed_lesions"]), int(hand["fp_lesions"])) == (1, 2)
  for name in ("dsc", "sensitivity", "specificity", "precision", "f2",
               "lesion_f1"):
    assert float(empty[name]) == 1.0
  assert empty["apr"] == ""  # undefined without lesion
  # Pooled: metrics of the summed counts.
  assert (int(pooled["tp"]), int(pooled["fp"]), int(pooled["fn"]),
          int(pooled["tn"])) == (TP, FP, FN, TN + 12**3)
  assert float(pooled["dsc"]) == pytest.approx(12 / 29, rel=1e-6)
  assert float(pooled["specificity"]) == pytest.approx(
      (TN + 12**3) / (TN + 12**3 + FP), rel=1e-6)
  assert float(pooled["apr"]) == pytest.approx(APR, rel=1e-6)
  assert int(pooled["ref_lesions"]) == 4
  assert float(pooled["lesion_f1"]) == pytest.approx(2 / 3)
  # Mean: of the per-case values; the empty case (reference and prediction
  # empty) is left out of DSC, sensitivity, precision, F2, APR and the lesion
  # ratios, not of specificity nor of the counts.
  for name in ("dsc", "sensitivity", "precision", "f2", "lesion_precision",
               "lesion_recall", "lesion_f1"):
    assert float(mean[name]) == pytest.approx(float(hand[name]), rel=1e-6)
  assert float(mean["specificity"]) == pytest.approx((1705 / 1714 + 1) / 2)
  assert float(mean["apr"]) == pytest.approx(APR, rel=1e-6)
  assert float(mean["ref_lesions"]) == 2.0
  assert {k: result.mean[k] for k in evaluate.EMPTY_COLUMNS} == {
      "empty_cases": 1, "empty_fp_cases": 0, "empty_fp_voxels": 0}
  assert result.pooled["dsc"] == pytest.approx(12 / 29, rel=1e-6)
  assert sorted(result.curves) == ["hand", "pooled"]
  assert result.plot_path == out / "pr_curve.png"
  assert (out / "pr_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _pool(*cases):
  """The ClassEvaluation of ``(prediction, reference)`` pairs, no
  probabilities."""
  pool = evaluate.ClassPool()
  for i, (pred, ref) in enumerate(cases):
    pool.add(evaluate.evaluate_case(pred, ref, case_id=f"c{i}"), None, ref)
  return pool.finish(1, "lesion")


def test_empty_references_are_left_out_of_the_mean():
  ref, pred, _ = hand_made_case()
  zeros = np.zeros_like(ref)
  hand = evaluate.evaluate_case(pred, ref).metrics()
  # An empty case with an empty prediction does not raise the mean DSC.
  mean = _pool((pred, ref), (zeros, zeros)).mean
  assert mean["dsc"] == pytest.approx(hand["dsc"], rel=1e-6)
  assert mean["f2"] == pytest.approx(hand["f2"], rel=1e-6)
  assert (mean["empty_cases"], mean["empty_fp_cases"]) == (1, 0)
  # With false positives it is still out of DSC, and reported apart; its
  # precision (0: all predicted voxels are false) counts.
  fp = np.zeros_like(ref)
  fp[0, 0, 5:8] = 1
  mean = _pool((pred, ref), (fp, zeros), (zeros, zeros)).mean
  assert mean["dsc"] == pytest.approx(hand["dsc"], rel=1e-6)
  assert mean["precision"] == pytest.approx(hand["precision"] / 2, rel=1e-6)
  assert {k: mean[k] for k in evaluate.EMPTY_COLUMNS} == {
      "empty_cases": 2, "empty_fp_cases": 1, "empty_fp_voxels": 3}
  # A class empty in every case: undefined (NaN), never 1.
  nothing = _pool((zeros, zeros), (zeros, zeros))
  for values in (nothing.mean, nothing.pooled):
    for name in ("dsc", "sensitivity", "f2", "apr", "lesion_recall",
                 "lesion_f1"):
      assert math.isnan(values[name]), name
  assert nothing.mean["specificity"] == 1.0
  assert nothing.cases[0].metrics()["dsc"] == 1.0  # the case row's rule


def test_validation_mean_skips_empty_cases_and_classes():
  """validation.evaluate_cases, what ranks checkpoints: class 1 is in one of
  the two cases, class 2 in none."""
  def logits_fn(images):  # the first channel is the predicted class map
    return 20.0 * jax.nn.one_hot(images[..., 0].astype(jnp.int32), 3)

  label = np.zeros((16, 16, 16), np.uint8)
  label[4:10, 4:10, 4:10] = 1
  found = np.roll(label, 2, axis=0)  # DSC 2 * 144 / 432 = 2/3
  cases = [ValidationCase(case_id, image[..., None].astype(np.float32), ref)
           for case_id, image, ref in (("lesion", found, label),
                                       ("empty", 0 * label, 0 * label))]
  config = helpers.tiny_config("/unused")
  config.inference.overlap = 0.0
  values = validation.evaluate_cases(cases, logits_fn, config, (16, 16, 16),
                                     ("background", "lesion", "other"),
                                     jax.devices()[:1])
  assert values["dsc/lesion"] == pytest.approx(2 / 3, rel=1e-6)
  assert math.isnan(values["dsc/other"])
  assert math.isnan(values["pooled_dsc/other"])
  assert values["dsc"] == pytest.approx(2 / 3, rel=1e-6)
  assert values["f2"] == pytest.approx(values["f2/lesion"])
  assert (values["empty_cases/lesion"], values["empty_cases/other"],
          values["empty_cases"], values["empty_fp_cases"]) == (1, 2, 3, 0)


def test_cli_prints_the_table(folders, capsys):
  pred_dir, label_dir, out = folders
  assert evaluate.main(["--predictions", str(pred_dir), "--labels",
                        str(label_dir), "--output", str(out)]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].split() == ["case", "DSC", "Sens", "Spec", "Prec", "F2",
                              "APR", "lesions", "missed", "FP-les", "L-F1"]
  hand = next(line for line in lines if line.startswith("hand"))
  assert hand.split()[1] == f"{100 * 12 / 29:.2f}"
  assert "3/4" in hand.split()
  assert any(line.startswith("pooled") for line in lines)
  assert lines[-3].startswith("empty reference: 1 case(s), 0 with false "
                              "positives (0 voxels); not in the mean of DSC")
  assert (out / "metrics.csv").exists()


def test_labels_against_themselves(tmp_path):
  root = synthetic.make_synthetic_dataset(tmp_path / "Dataset904_Self",
                                          num_cases=1, shape=(24, 24, 24),
                                          seed=2, num_test_cases=3)
  labels = root / "labelsTs"
  result = evaluate.evaluate_folders(labels, labels, tmp_path / "eval")
  assert len(result.cases) == 3
  for values in [c.metrics() for c in result.cases] + [result.pooled,
                                                       result.mean]:
    for name in ("dsc", "sensitivity", "specificity", "precision", "f2",
                 "lesion_precision", "lesion_recall", "lesion_f1"):
      assert values[name] == 1.0, name
  for case in result.cases:
    assert case.lesions.reference >= 1
    assert case.lesions.missed == 0 and case.lesions.false_positive == 0
    assert case.lesions.detected == case.lesions.reference
  assert result.pooled["missed_lesions"] == 0
  assert result.plot_path is None and not (tmp_path / "eval" /
                                           "pr_curve.png").exists()


def test_mismatched_grid_is_an_error_naming_the_case(folders, capsys):
  pred_dir, label_dir, out = folders
  _save(pred_dir / "hand.nii.gz", np.zeros((12, 12, 11)))
  with pytest.raises(evaluate.EvaluationError,
                     match=r"case hand: prediction shape \(12, 12, 11\) "
                     r"differs from the reference's \(12, 12, 12\)"):
    evaluate.evaluate_folders(pred_dir, label_dir)
  shifted = AFFINE.copy()
  shifted[0, 3] = 1.0
  _save(pred_dir / "hand.nii.gz", hand_made_case()[1], affine=shifted)
  with pytest.raises(evaluate.EvaluationError,
                     match="case hand: prediction affine differs"):
    evaluate.evaluate_folders(pred_dir, label_dir)
  _save(pred_dir / "hand.nii.gz", hand_made_case()[1])
  _save(pred_dir / "empty_prob.nii.gz", np.zeros((12, 12, 13)),
        dtype=np.float32)
  assert evaluate.main(["--predictions", str(pred_dir), "--labels",
                        str(label_dir), "--output", str(out),
                        "--no-progress"]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert err == ["error: case empty: probability shape (12, 12, 13) differs "
                 "from the reference's (12, 12, 12)"]
  assert not out.exists()


def test_matching_rules(folders, capsys):
  pred_dir, label_dir, _ = folders
  # A prediction without reference: skipped with a warning.
  _save(pred_dir / "extra.nii.gz", np.zeros(SHAPE))
  result = evaluate.evaluate_folders(pred_dir, label_dir)
  assert [c.case_id for c in result.cases] == ["empty", "hand"]
  assert "skipping 1 prediction(s) without a reference" in (
      capsys.readouterr().err)
  # A reference without prediction: an error, unless allow_missing.
  (pred_dir / "empty.nii").unlink()
  with pytest.raises(evaluate.EvaluationError,
                     match="1 reference.* have no prediction.*: empty.*"
                     "--allow-missing"):
    evaluate.evaluate_folders(pred_dir, label_dir)
  result = evaluate.evaluate_folders(pred_dir, label_dir, allow_missing=True)
  assert [c.case_id for c in result.cases] == ["hand"]
  err = capsys.readouterr().err
  assert "have no prediction and are not evaluated: empty" in err
  assert "skipping 1 probability map(s) without a mask: empty_prob" in err
  # Nothing in common, or no folder: errors.
  no_labels = label_dir.parent / "no_labels"
  no_labels.mkdir()
  with pytest.raises(evaluate.EvaluationError, match="no case is in both"):
    evaluate.evaluate_folders(pred_dir, no_labels)
  with pytest.raises(evaluate.EvaluationError, match="no such directory"):
    evaluate.evaluate_folders(pred_dir / "nowhere", label_dir)


def test_unreadable_file_is_an_error_naming_it(folders):
  pred_dir, label_dir, _ = folders
  (pred_dir / "hand.nii.gz").write_bytes(b"garbage")
  with pytest.raises(evaluate.EvaluationError,
                     match=r"hand\.nii\.gz: cannot read"):
    evaluate.evaluate_folders(pred_dir, label_dir)


def test_apr_is_nan_without_probabilities():
  ref, pred, _ = hand_made_case()
  result = evaluate.evaluate_case(pred, ref)
  assert math.isnan(result.apr)
  assert evaluate._csv_value(result.apr) == ""


# --------------------------------------------------------------------------
# Several classes
# --------------------------------------------------------------------------

SHAPE3 = (10, 10, 10)
NAMES3 = {0: "background", 1: "white_matter", 2: "grey_matter", 3: "lesion"}


def three_class_case():
  """Label maps 0..3 with hand-counted per-class outcomes (1000 voxels).

  Class 1: reference x 0:2 (200 voxels, one component), predicted x 0:3:
  TP 200, FP 100, FN 0; 1 lesion, detected; 1 component, not false.
  Class 2: reference blocks x 4:6 y 0:5 z 0:5 (50) and x 4:6 y 7:10 z 7:10
  (18): 68 voxels, 2 lesions. Predicted: the first block but its voxel
  (4, 0, 0), which is predicted 3, and an isolated voxel (9, 9, 0): TP 49,
  FP 1, FN 19; lesions 1 of 2 detected, 2 components, 1 false.
  Class 3: reference (8, 1, 1) and the corner-connected pair (8, 5, 5),
  (9, 6, 6): 3 voxels, 2 lesions. Predicted (8, 1, 1) and (4, 0, 0): TP 1,
  FP 1, FN 2; 1 of 2 lesions detected, 2 components, 1 false.
  Probabilities ``[x, y, z, 4]``: 0.7 on the predicted class, 0.1 on the
  others, so each class has two thresholds.
  """
  ref = np.zeros(SHAPE3, np.uint8)
  ref[0:2] = 1
  ref[4:6, 0:5, 0:5] = 2
  ref[4:6, 7:10, 7:10] = 2
  ref[8, 1, 1] = ref[8, 5, 5] = ref[9, 6, 6] = 3
  pred = np.zeros(SHAPE3, np.uint8)
  pred[0:3] = 1
  pred[4:6, 0:5, 0:5] = 2
  pred[4, 0, 0] = 3
  pred[9, 9, 0] = 2
  pred[8, 1, 1] = 3
  prob = np.full((*SHAPE3, 4), 0.1, np.float32)
  np.put_along_axis(prob, pred[..., None].astype(np.int64), 0.7, axis=-1)
  return ref, pred, prob


# class: (tp, fp, fn, tn), (reference, predicted, detected, false positive).
COUNTS3 = {1: ((200, 100, 0, 700), (1, 1, 1, 0)),
           2: ((49, 1, 19, 931), (2, 2, 1, 1)),
           3: ((1, 1, 2, 996), (2, 2, 1, 1))}


def _ap_two_thresholds(tp, fp, positives, voxels=1000):
  """AP with scores 0.7 (tp + fp voxels) and 0.1 (all the others)."""
  recall = tp / positives
  return recall * tp / (tp + fp) + (1 - recall) * positives / voxels


APR3 = {k: _ap_two_thresholds(c[0], c[1], c[0] + c[2])
        for k, (c, _) in COUNTS3.items()}


def test_three_class_case_exact_counts():
  ref, pred, prob = three_class_case()
  results = evaluate.evaluate_case_classes(pred, ref, prob, "three",
                                           classes=(3, 1, 2),
                                           class_names=NAMES3)
  assert list(results) == ["white_matter", "grey_matter", "lesion"]
  for k, name in ((1, "white_matter"), (2, "grey_matter"), (3, "lesion")):
    result = results[name]
    voxels, lesions = COUNTS3[k]
    assert (result.tp, result.fp, result.fn, result.tn) == voxels, name
    les = result.lesions
    assert (les.reference, les.predicted, les.detected,
            les.false_positive) == lesions, name
    assert result.apr == pytest.approx(APR3[k], rel=1e-6), name
    tp, fp, fn, _ = voxels
    assert result.metrics()["dsc"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
  # Default names are the label values; one class takes [x, y, z] too.
  single = evaluate.evaluate_case_classes(pred, ref, prob[..., 3], "three",
                                          classes=[3])
  assert list(single) == ["3"] and single["3"].apr == pytest.approx(APR3[3])
  # A binary mask is the label map {0, 1}: the same as evaluate_case.
  bref, bpred, bprob = hand_made_case()
  assert evaluate.evaluate_case_classes(bpred, bref, bprob)["1"] == (
      evaluate.evaluate_case(bpred, bref, bprob))


@pytest.mark.parametrize("kwargs, message", [
    ({"classes": (0, 1)}, "0 is the background"),
    ({"classes": (1, 1)}, "given twice"),
    ({"classes": ()}, "no class"),
    ({"class_names": ["bg", "wm"]}, "no name for class 2, 3"),
    ({"class_names": ["bg", "a", "a", "b"]}, "unique"),
    ({"probabilities": np.zeros((*SHAPE3, 3))}, "has 3 channels, class 3"),
    ({"probabilities": np.zeros(SHAPE3)}, r"\[x, y, z\] probability map "
     "holds one class"),
])
def test_evaluate_case_classes_errors(kwargs, message):
  ref, pred, _ = three_class_case()
  kwargs = {"classes": (1, 2, 3), **kwargs}
  with pytest.raises(evaluate.EvaluationError, match=message):
    evaluate.evaluate_case_classes(pred, ref, case_id="three", **kwargs)


@pytest.fixture
def class_folders(tmp_path):
  """Case 'three' (above) and case 'zeros' (all background), with 4-D
  probabilities, and an nnU-Net dataset.json naming the classes."""
  pred_dir, label_dir = tmp_path / "pred", tmp_path / "labels"
  pred_dir.mkdir()
  label_dir.mkdir()
  ref, pred, prob = three_class_case()
  zeros = np.zeros(SHAPE3, np.uint8)
  background = np.zeros((*SHAPE3, 4), np.float32)
  background[..., 0] = 1.0
  for case, (r, p, q) in {"three": (ref, pred, prob),
                          "zeros": (zeros, zeros, background)}.items():
    _save(label_dir / f"{case}.nii.gz", r)
    _save(pred_dir / f"{case}.nii.gz", p)
    _save(pred_dir / f"{case}_prob.nii.gz", q, dtype=np.float32)
  dataset_json = tmp_path / "dataset.json"
  dataset_json.write_text(json.dumps(
      {"labels": {name: k for k, name in NAMES3.items()}}))
  return pred_dir, label_dir, tmp_path / "eval", dataset_json


def test_class_folders_csv_rows_and_per_class_apr(class_folders):
  pred_dir, label_dir, out, dataset_json = class_folders
  result = evaluate.evaluate_folders(
      pred_dir, label_dir, out,
      class_names=evaluate.read_dataset_json_names(dataset_json))
  assert not result.binary
  assert list(result.classes) == ["white_matter", "grey_matter", "lesion"]
  with pytest.raises(ValueError, match="3 classes"):
    _ = result.cases
  reader = csv.reader(open(out / "metrics.csv"))
  assert tuple(next(reader)) == evaluate.CLASS_COLUMNS
  rows = list(csv.DictReader(open(out / "metrics.csv")))
  assert [(r["case"], r["class"]) for r in rows] == [
      (case, name) for name in result.classes
      for case in ("three", "zeros", "pooled", "mean")] + [
          ("pooled", "mean"), ("mean", "mean")]
  by_key = {(r["case"], r["class"]): r for r in rows}
  for k, name in ((1, "white_matter"), (2, "grey_matter"), (3, "lesion")):
    (tp, fp, fn, tn), (n_ref, n_pred, detected, false) = COUNTS3[k]
    row = by_key["three", name]
    assert [int(row[c]) for c in ("tp", "fp", "fn", "tn", "ref_lesions",
                                  "pred_lesions", "detected_lesions",
                                  "fp_lesions")] == [tp, fp, fn, tn, n_ref,
                                                     n_pred, detected, false]
    assert float(row["apr"]) == pytest.approx(APR3[k], rel=1e-6)
    assert by_key["zeros", name]["apr"] == ""  # no voxel of the class
    pooled = by_key["pooled", name]
    assert int(pooled["tn"]) == tn + 1000
    # The extra background voxels rank last: the pooled AP is the same.
    assert float(pooled["apr"]) == pytest.approx(APR3[k], rel=1e-6)
    # Case 'zeros' has no voxel of the class: not in the mean DSC.
    assert float(by_key["mean", name]["dsc"]) == pytest.approx(
        2 * tp / (2 * tp + fp + fn))
  dscs = [2 * c[0] / (2 * c[0] + c[1] + c[2]) for c, _ in COUNTS3.values()]
  assert float(by_key["pooled", "mean"]["dsc"]) == pytest.approx(
      np.mean(dscs))
  assert float(by_key["pooled", "mean"]["apr"]) == pytest.approx(
      np.mean(list(APR3.values())), rel=1e-6)
  assert by_key["pooled", "mean"]["tp"] == ""  # counts are not averaged
  assert sorted(result.classes["lesion"].curves) == ["pooled", "three"]
  assert (out / "pr_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_class_selection_and_names(class_folders):
  pred_dir, label_dir, out, _ = class_folders
  result = evaluate.evaluate_folders(pred_dir, label_dir, classes=[3],
                                     class_names=["bg", "wm", "gm", "les"])
  assert list(result.classes) == ["les"] and not result.binary
  assert result.cases[0].tp == 1  # one class: the single-class properties
  auto = evaluate.evaluate_folders(pred_dir, label_dir)
  assert list(auto.classes) == ["1", "2", "3"]
  # A label found in the data without a name is an error.
  with pytest.raises(evaluate.EvaluationError, match="no name for class 3"):
    evaluate.evaluate_folders(pred_dir, label_dir,
                              class_names={0: "bg", 1: "wm", 2: "gm"})
  assert not out.exists()


def test_dataset_json_names(tmp_path):
  path = tmp_path / "dataset.json"
  path.write_text(json.dumps({"labels": {"background": 0, "lesion": 1}}))
  assert evaluate.read_dataset_json_names(path) == {0: "background",
                                                    1: "lesion"}
  path.write_text(json.dumps({"labels": {"background": 0, "whole": [1, 2]}}))
  with pytest.raises(evaluate.EvaluationError,
                     match="region labels are not supported: whole"):
    evaluate.read_dataset_json_names(path)
  path.write_text("{")
  with pytest.raises(evaluate.EvaluationError, match="not JSON"):
    evaluate.read_dataset_json_names(path)
  with pytest.raises(evaluate.EvaluationError, match="nowhere.json: No such"):
    evaluate.read_dataset_json_names(tmp_path / "nowhere.json")


def test_binary_output_is_unchanged_by_class_options(folders, tmp_path):
  pred_dir, label_dir, out = folders
  dataset_json = tmp_path / "dataset.json"
  dataset_json.write_text(json.dumps({"labels": {"background": 0,
                                                 "lesion": 1}}))
  base = ["--predictions", str(pred_dir), "--labels", str(label_dir),
          "--no-progress", "--output"]
  assert evaluate.main([*base, str(out)]) == 0
  assert evaluate.main([*base, str(tmp_path / "named"), "--dataset-json",
                        str(dataset_json)]) == 0
  plain = (out / "metrics.csv").read_bytes()
  assert plain.startswith(",".join(evaluate.COLUMNS).encode() + b"\r\n")
  assert (tmp_path / "named" / "metrics.csv").read_bytes() == plain
  assert ((tmp_path / "named" / "pr_curve.png").read_bytes()
          == (out / "pr_curve.png").read_bytes())
  # An explicit --classes asks for the class column; the values are the same.
  assert evaluate.main([*base, str(tmp_path / "explicit"), "--classes", "1",
                        "--dataset-json", str(dataset_json)]) == 0
  rows = list(csv.DictReader(open(tmp_path / "explicit" / "metrics.csv")))
  old = list(csv.DictReader(open(out / "metrics.csv")))
  assert [r.pop("class") for r in rows[:4]] == ["lesion"] * 4
  assert rows[:4] == old


def test_cli_prints_a_table_per_class(class_folders, capsys):
  pred_dir, label_dir, out, dataset_json = class_folders
  assert evaluate.main(["--predictions", str(pred_dir), "--labels",
                        str(label_dir), "--output", str(out), "--no-progress",
                        "--dataset-json", str(dataset_json)]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].split()[:2] == ["case", "DSC"]
  titles = [i for i, line in enumerate(lines) if line.startswith("==")]
  assert [lines[i] for i in titles] == [
      "== class white_matter (label 1) ==", "== class grey_matter (label 2) ==",
      "== class lesion (label 3) ==", "== mean over the 3 classes =="]
  lesion = lines[titles[2] + 1:titles[3]]
  assert [line.split()[0] for line in lesion] == ["three", "zeros",
                                                  "-" * 93, "pooled", "mean",
                                                  "empty"]
  assert lesion[0].split()[1] == f"{100 * 2 / 5:.2f}"
  assert "1/2" in lesion[0].split()
  assert [line.split()[0] for line in lines[titles[3] + 1:][:2]] == [
      "pooled", "mean"]


@pytest.mark.parametrize("value, message", [
    ("0", "--classes 0: class 0: classes are label values >= 1"),
    ("1,x", "--classes '1,x': expected 'auto' or label values"),
    ("", "--classes '': expected 'auto'"),
    ("2,2", "--classes 2,2: classes 2, 2: a class is given twice"),
    ("-1", "--classes -1: class -1: classes are label values >= 1"),
])
def test_bad_classes_are_one_line_errors(class_folders, capsys, value,
                                         message):
  pred_dir, label_dir, out, _ = class_folders
  code = evaluate.main(["--predictions", str(pred_dir), "--labels",
                        str(label_dir), "--output", str(out), "--no-progress",
                        "--classes", value])
  err = capsys.readouterr().err
  assert code == 2 and err.count("\n") == 1, err
  assert err.startswith(f"error: {message}"), err
  assert not out.exists()


@pytest.mark.parametrize("extra, message", [
    (["--class-names", "wm,gm,lesion"], "no name for class 3: names are given "
     "for labels 0, 1, 2"),
    (["--class-names", "a,,b"], "--class-names 'a,,b': an empty name"),
    (["--dataset-json", "nowhere.json"],
     "--dataset-json nowhere.json: No such"),
    (["--classes", "4"], "case three: the probability map has 4 channels, "
     "class 4 needs channel 4"),
    ("3d_prob", "case three: an [x, y, z] probability map holds one class"),
    ("float_labels", "three.nii.gz: label values must be integers >= 0, "
     "found 0.5"),
])
def test_class_input_errors_are_one_line(class_folders, capsys, extra,
                                         message):
  pred_dir, label_dir, out, _ = class_folders
  if extra == "3d_prob":
    _save(pred_dir / "three_prob.nii.gz", np.zeros(SHAPE3), dtype=np.float32)
    extra = []
  elif extra == "float_labels":
    _save(pred_dir / "three.nii.gz", np.full(SHAPE3, 0.5), dtype=np.float32)
    extra = []
  code = evaluate.main(["--predictions", str(pred_dir), "--labels",
                        str(label_dir), "--output", str(out), "--no-progress",
                        *extra])
  err = capsys.readouterr().err
  assert code in (1, 2) and err.count("\n") == 1, err
  assert err.startswith("error: ") and message in err, err
  assert "Traceback" not in err
