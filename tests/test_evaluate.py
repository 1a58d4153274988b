"""Tests of tversky_jax.evaluate on hand-made and synthetic volumes."""

import csv
import math

import nibabel as nib
import numpy as np
import pytest

from tversky_jax import evaluate
from tversky_jax import metrics as metrics_lib
from tversky_jax.data import synthetic

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
  # Mean: of the per-case values; APR over the cases that have lesions.
  assert float(mean["dsc"]) == pytest.approx((12 / 29 + 1) / 2, rel=1e-6)
  assert float(mean["lesion_f1"]) == pytest.approx((2 / 3 + 1) / 2)
  assert float(mean["apr"]) == pytest.approx(APR, rel=1e-6)
  assert float(mean["ref_lesions"]) == 2.0
  assert result.pooled["dsc"] == pytest.approx(12 / 29, rel=1e-6)
  assert sorted(result.curves) == ["hand", "pooled"]
  assert result.plot_path == out / "pr_curve.png"
  assert (out / "pr_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
