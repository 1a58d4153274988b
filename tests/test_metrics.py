"""Tests for tversky_jax.metrics (Salehi et al. 2017 evaluation metrics)."""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import (
  average_precision_score,
  balanced_accuracy_score,
  f1_score,
  fbeta_score,
  matthews_corrcoef,
  precision_score,
  recall_score,
)

from tversky_jax import metrics as M

RATIO_FNS = {
  "dsc": M.dice,
  "sensitivity": M.sensitivity,
  "specificity": M.specificity,
  "precision": M.precision,
  "f2": M.f_beta,
}
COUNT_FNS = {
  "dsc": M.dice_from_counts,
  "sensitivity": M.sensitivity_from_counts,
  "specificity": M.specificity_from_counts,
  "precision": M.precision_from_counts,
  "f2": M.f_beta_from_counts,
}


# ---------------------------------------------------------------------------
# float64 NumPy references
# ---------------------------------------------------------------------------


def np_counts(pred, lab, threshold=0.5, mask=None, pooled=False):
  p = np.asarray(pred) >= threshold
  g = np.asarray(lab) != 0
  v = np.ones_like(g) if mask is None else np.asarray(mask, bool)
  axes = None if pooled else tuple(range(1, g.ndim))
  f = lambda x: np.sum(x & v, axis=axes).astype(np.float64)  # noqa: E731
  return f(p & g), f(p & ~g), f(~p & g), f(~p & ~g)


def np_ratio(num, den):
  num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where(den == 0, 1.0, num / np.where(den == 0, 1, den))


def np_metrics(tp, fp, fn, tn, beta=2.0):
  b2 = beta**2
  return {
    "dsc": np_ratio(2 * tp, 2 * tp + fp + fn),
    "sensitivity": np_ratio(tp, tp + fn),
    "specificity": np_ratio(tn, tn + fp),
    "precision": np_ratio(tp, tp + fp),
    "f2": np_ratio((1 + b2) * tp, (1 + b2) * tp + b2 * fn + fp),
  }


def sk_ap(scores, labels, mask=None):
  s = np.asarray(scores, np.float64).ravel()
  y = (np.asarray(labels) != 0).ravel()
  if mask is not None:
    m = np.asarray(mask, bool).ravel()
    s, y = s[m], y[m]
  return average_precision_score(y, s)


def sk_ap_cases(scores, labels, mask=None):
  return np.array(
    [
      sk_ap(scores[i], labels[i], None if mask is None else mask[i])
      for i in range(scores.shape[0])
    ]
  )


@pytest.fixture
def rng():
  return np.random.default_rng(1706_05721)


def random_case(rng, shape=(3, 6, 7, 5), p_lesion=0.2):  # == SHAPE
  probs = rng.random(shape).astype(np.float32)
  labels = rng.random(shape) < p_lesion
  return probs, labels


# ---------------------------------------------------------------------------
# formulas vs reference
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("pooled", [False, True])
@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_metrics_match_numpy_reference(rng, pooled, use_mask, threshold):
  probs, labels = random_case(rng)
  mask = rng.random(probs.shape) < 0.7 if use_mask else None
  ref_counts = np_counts(probs, labels, threshold, mask, pooled)
  counts = M.confusion_counts(
    probs, labels, threshold=threshold, mask=mask, pooled=pooled
  )
  expected_shape = () if pooled else (probs.shape[0],)
  for c, rc in zip(counts, ref_counts):
    assert c.shape == expected_shape
    assert jnp.issubdtype(c.dtype, jnp.integer)
    np.testing.assert_array_equal(np.asarray(c), rc)
  ref = np_metrics(*ref_counts)
  for name, fn in RATIO_FNS.items():
    got = fn(probs, labels, threshold=threshold, mask=mask, pooled=pooled)
    assert got.shape == expected_shape
    np.testing.assert_allclose(np.asarray(got), ref[name], rtol=1e-6, atol=1e-7)
    from_counts = COUNT_FNS[name](*counts)
    np.testing.assert_allclose(np.asarray(from_counts), ref[name], rtol=1e-6)
  allm = M.all_metrics(probs, labels, threshold=threshold, mask=mask, pooled=pooled)
  assert set(allm) == {"dsc", "sensitivity", "specificity", "precision", "f2", "apr"}
  for name in ref:
    np.testing.assert_allclose(np.asarray(allm[name]), ref[name], rtol=1e-6)
  ref_ap = (
    sk_ap(probs, labels, mask) if pooled else sk_ap_cases(probs, labels, mask)
  )
  np.testing.assert_allclose(np.asarray(allm["apr"]), ref_ap, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(4, 9), (2, 5, 6), (2, 3, 4, 5, 2)])
def test_any_number_of_spatial_dims(rng, shape):
  probs, labels = random_case(rng, shape, 0.4)
  ref = np_metrics(*np_counts(probs, labels))
  got = M.all_metrics(probs, labels)
  for name in ref:
    assert got[name].shape == (shape[0],)
    np.testing.assert_allclose(np.asarray(got[name]), ref[name], rtol=1e-6)
  np.testing.assert_allclose(
    np.asarray(got["apr"]), sk_ap_cases(probs, labels), rtol=1e-6, atol=1e-6
  )


def test_binary_mask_predictions_bool_and_int(rng):
  probs, labels = random_case(rng)
  hard = probs >= 0.5
  ref = np_metrics(*np_counts(hard, labels))
  for pred in (hard, hard.astype(np.int32), hard.astype(np.uint8)):
    for name, fn in RATIO_FNS.items():
      np.testing.assert_allclose(
        np.asarray(fn(pred, labels.astype(np.float32))), ref[name], rtol=1e-6
      )


def test_pooled_is_not_mean_of_cases():
  # case 0: perfect on a big lesion, case 1: misses a tiny lesion
  pred = np.zeros((2, 10), bool)
  lab = np.zeros((2, 10), bool)
  pred[0, :8] = lab[0, :8] = True
  lab[1, 0] = True
  np.testing.assert_allclose(M.sensitivity(pred, lab), [1.0, 0.0])
  np.testing.assert_allclose(M.sensitivity(pred, lab, pooled=True), 8 / 9, rtol=1e-6)


# ---------------------------------------------------------------------------
# hand-made case with known counts
# ---------------------------------------------------------------------------


def hand_case():
  """One case of 20 voxels: TP=3, FP=2, FN=5, TN=10 (probabilities)."""
  pred = np.array([0.9, 0.5, 0.7] + [0.6, 0.99] + [0.1, 0.49, 0.0, 0.3, 0.2] + [0.0] * 10)
  lab = np.array([1, 1, 1] + [0, 0] + [1, 1, 1, 1, 1] + [0] * 10)
  return pred[None].astype(np.float32), lab[None].astype(np.int32)


def test_hand_made_exact_values():
  pred, lab = hand_case()
  tp, fp, fn, tn = M.confusion_counts(pred, lab)
  assert (int(tp[0]), int(fp[0]), int(fn[0]), int(tn[0])) == (3, 2, 5, 10)
  expect = {
    "dsc": 6 / 13,
    "sensitivity": 3 / 8,
    "specificity": 10 / 12,
    "precision": 3 / 5,
    "f2": 15 / 37,
  }
  got = M.all_metrics(pred, lab)
  for name, val in expect.items():
    np.testing.assert_allclose(float(got[name][0]), val, rtol=1e-6)
    np.testing.assert_allclose(float(RATIO_FNS[name](pred, lab)[0]), val, rtol=1e-6)
  # the >= 0.5 rule: 0.5 is lesion, 0.49 is not
  assert int(M.confusion_counts(pred, lab, threshold=0.5)[0][0]) == 3
  assert int(M.confusion_counts(pred, lab, threshold=0.51)[0][0]) == 2
  # AP by hand: scores desc 0.99(-) 0.9(+) 0.7(+) 0.6(-) 0.5(+) 0.49(+) 0.3(+)
  # 0.2(+) 0.1(+) then 0.0 tie group {1 pos, 10 neg}
  ap = (1 / 2 + 2 / 3 + 3 / 5 + 4 / 6 + 5 / 7 + 6 / 8 + 7 / 9 + 8 / 20) / 8
  np.testing.assert_allclose(float(got["apr"][0]), ap, rtol=1e-6)
  np.testing.assert_allclose(ap, sk_ap(pred, lab), rtol=1e-12)


def test_f2_formula_and_tversky_relation(rng):
  probs, labels = random_case(rng, (6, 40), 0.3)
  tp, fp, fn, tn = (np.asarray(c, np.float64) for c in M.confusion_counts(probs, labels))
  f2 = np.asarray(M.f_beta(probs, labels, beta=2.0))
  np.testing.assert_allclose(f2, 5 * tp / (5 * tp + 4 * fn + fp), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(M.f_beta(probs, labels)), f2)  # default 2
  for f in (0.5, 1.0, 2.0, 3.0):
    a, b = 1 / (1 + f**2), f**2 / (1 + f**2)
    tversky = tp / (tp + a * fp + b * fn)
    got = np.asarray(M.f_beta_from_counts(tp, fp, fn, tn, beta=f))
    np.testing.assert_allclose(got, tversky, rtol=1e-6)
  # beta=1 is Dice, beta=0 is precision
  np.testing.assert_allclose(
    np.asarray(M.f_beta(probs, labels, beta=1.0)), np.asarray(M.dice(probs, labels)), rtol=1e-6
  )
  np.testing.assert_allclose(
    np.asarray(M.f_beta(probs, labels, beta=0.0)),
    np.asarray(M.precision(probs, labels)),
    rtol=1e-6,
  )


# ---------------------------------------------------------------------------
# average precision vs scikit-learn
# ---------------------------------------------------------------------------


SHAPE = (3, 6, 7, 5)  # shared by most tests so that compiled functions are reused


@pytest.mark.parametrize("kind", ["random", "ties", "binary", "few_pos", "bool", "int"])
@pytest.mark.parametrize("use_mask", [False, True])
def test_average_precision_matches_sklearn(rng, kind, use_mask):
  labels = rng.random(SHAPE) < (0.01 if kind == "few_pos" else 0.25)
  labels[:, 0, 0, 0] = True  # every case (and its mask) has a positive
  scores = rng.random(SHAPE).astype(np.float32)
  if kind in ("random", "ties", "few_pos"):
    # informative scores, so AP is not trivially the prevalence
    boost = labels & (rng.random(SHAPE) < 0.5)
    scores = np.where(boost, np.minimum(scores + 0.3, 1.0), scores)
  if kind == "ties":  # many ties: 11 distinct scores
    scores = np.round(scores, 1)
  elif kind == "binary":  # two distinct scores
    scores = scores < 0.4
  scores = scores.astype(np.float32)
  if kind == "bool":
    scores = scores < 0.4
  elif kind == "int":
    scores = rng.integers(0, 5, SHAPE)
  mask = None
  if use_mask:
    mask = rng.random(SHAPE) < 0.6
    mask[:, 0, 0, 0] = True
  per_case = M.average_precision(scores, labels, mask=mask)
  assert per_case.shape == (SHAPE[0],)
  np.testing.assert_allclose(
    np.asarray(per_case), sk_ap_cases(scores, labels, mask), rtol=1e-6, atol=1e-6
  )
  pooled = M.average_precision(scores, labels, mask=mask, pooled=True)
  assert pooled.shape == ()
  np.testing.assert_allclose(float(pooled), sk_ap(scores, labels, mask), rtol=1e-6, atol=1e-6)


def test_average_precision_mask_ignores_high_scoring_voxels(rng):
  scores, labels = random_case(rng, (2, 200), 0.2)
  mask = rng.random(scores.shape) < 0.5
  # masked-out voxels get extreme scores / labels: they must not matter
  tampered = np.where(mask, scores, 1.0).astype(np.float32)
  tampered_lab = np.where(mask, labels, False)
  ref = sk_ap_cases(scores, labels, mask)
  for s, lab in ((tampered, labels), (scores, tampered_lab), (tampered, tampered_lab)):
    np.testing.assert_allclose(
      np.asarray(M.average_precision(s, lab, mask=mask)), ref, rtol=1e-6, atol=1e-6
    )
  # also with scores that are exactly 0 or negative infinite (logits)
  logits = np.log(scores / (1 - scores + 1e-7) + 1e-30).astype(np.float32)
  logits[~mask] = -np.inf
  np.testing.assert_allclose(
    np.asarray(M.average_precision(logits, labels, mask=mask)), ref, rtol=1e-5, atol=1e-6
  )


def test_average_precision_perfect_and_worst():
  lab = np.array([[1, 1, 0, 0, 0]])
  np.testing.assert_allclose(M.average_precision(np.array([[0.9, 0.8, 0.1, 0.2, 0.3]]), lab), [1.0])
  # all scores tied: AP = prevalence
  np.testing.assert_allclose(M.average_precision(np.full((1, 5), 0.5), lab), [0.4], rtol=1e-6)


# ---------------------------------------------------------------------------
# jit
# ---------------------------------------------------------------------------


def test_jit(rng):
  probs, labels = random_case(rng)
  mask = rng.random(probs.shape) < 0.7
  eager = M.all_metrics(probs, labels, mask=mask)
  jitted = jax.jit(M.all_metrics, static_argnames="pooled")(
    probs, labels, mask=mask, threshold=0.5, pooled=False
  )
  for k in eager:
    np.testing.assert_allclose(np.asarray(jitted[k]), np.asarray(eager[k]), rtol=1e-6)
  np.testing.assert_allclose(
    np.asarray(jitted["apr"]), sk_ap_cases(probs, labels, mask), rtol=1e-6, atol=1e-6
  )
  # pooled under jit, traced threshold and beta
  f = jax.jit(lambda p, y, t, b: M.f_beta(p, y, threshold=t, beta=b, pooled=True))
  np.testing.assert_allclose(
    float(f(probs, labels, 0.3, 1.0)),
    float(M.dice(probs, labels, threshold=0.3, pooled=True)),
    rtol=1e-6,
  )
  ap = jax.jit(M.average_precision, static_argnames="pooled")(probs, labels, pooled=True)
  np.testing.assert_allclose(float(ap), sk_ap(probs, labels), rtol=1e-6, atol=1e-6)


def test_sharded_batch_over_devices(rng):
  devices = jax.devices()
  assert len(devices) == 4  # tests/conftest.py
  probs, labels = random_case(rng, (4, 6, 5, 3))
  mesh = jax.sharding.Mesh(np.array(devices), ("batch",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
  p = jax.device_put(probs, sharding)
  y = jax.device_put(labels, sharding)
  got = jax.jit(M.all_metrics)(p, y)
  ref = np_metrics(*np_counts(probs, labels))
  for name in ref:
    np.testing.assert_allclose(np.asarray(got[name]), ref[name], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(got["apr"]), sk_ap_cases(probs, labels), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------
# empty cases
# ---------------------------------------------------------------------------


def _empty_batch():
  """Cases: 0 empty GT + empty pred, 1 empty GT + FP, 2 lesion + empty pred."""
  pred = np.zeros((3, 4, 4), np.float32)
  lab = np.zeros((3, 4, 4), bool)
  pred[1, 0, :2] = 0.9
  lab[2, 1, 1:3] = True
  pred[2] = 0.2  # some probability mass, but below threshold
  return pred, lab


def test_empty_case_rules():
  pred, lab = _empty_batch()
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    got = {k: np.asarray(v) for k, v in M.all_metrics(pred, lab).items()}
  np.testing.assert_array_equal(got["dsc"], [1.0, 0.0, 0.0])
  np.testing.assert_array_equal(got["sensitivity"], [1.0, 1.0, 0.0])
  np.testing.assert_array_equal(got["precision"], [1.0, 0.0, 1.0])
  np.testing.assert_array_equal(got["f2"], [1.0, 0.0, 0.0])
  np.testing.assert_array_equal(got["specificity"], [1.0, 14 / 16, 1.0])
  for name in ("dsc", "sensitivity", "precision", "f2", "specificity"):
    assert np.all(np.isfinite(got[name]))
  # APR: undefined without positives -> NaN; defined for case 2
  assert np.isnan(got["apr"][0]) and np.isnan(got["apr"][1])
  np.testing.assert_allclose(got["apr"][2], 2 / 16, rtol=1e-6)  # all tied
  np.testing.assert_allclose(float(jnp.nanmean(M.all_metrics(pred, lab)["apr"])), 2 / 16, rtol=1e-6)
  # beta variants follow the same rule
  np.testing.assert_array_equal(np.asarray(M.f_beta(pred, lab, beta=0.5)), [1.0, 0.0, 0.0])


def test_specificity_without_negatives_is_one():
  pred = np.array([[1.0, 0.0, 1.0]], np.float32)
  lab = np.ones((1, 3), bool)
  np.testing.assert_array_equal(np.asarray(M.specificity(pred, lab)), [1.0])
  np.testing.assert_array_equal(np.asarray(M.specificity_from_counts(0, 0, 0, 0)), 1.0)


def test_empty_rules_pooled_and_from_counts():
  pred, lab = _empty_batch()
  z = np.zeros((2, 5), np.float32)
  zl = np.zeros((2, 5), bool)
  for name, fn in RATIO_FNS.items():
    assert float(fn(z, zl, pooled=True)) == 1.0, name
  assert np.isnan(float(M.average_precision(z, zl, pooled=True)))
  # all-masked: nothing evaluated at all -> every ratio is 1, APR NaN
  nothing = np.zeros(pred.shape, bool)
  got = M.all_metrics(pred, lab, mask=nothing)
  for name in ("dsc", "sensitivity", "specificity", "precision", "f2"):
    np.testing.assert_array_equal(np.asarray(got[name]), [1.0, 1.0, 1.0])
  assert np.all(np.isnan(np.asarray(got["apr"])))
  # counts version, with float counts too
  zero = jnp.zeros(())
  for fn in COUNT_FNS.values():
    assert float(fn(zero, zero, zero, zero)) == 1.0
  assert float(M.dice_from_counts(0, 3, 0, 5)) == 0.0
  assert float(M.sensitivity_from_counts(0, 3, 0, 5)) == 1.0
  assert float(M.precision_from_counts(0, 0, 4, 5)) == 1.0
  assert float(M.f_beta_from_counts(0, 0, 4, 5)) == 0.0
  # empty batch axis
  e = np.zeros((0, 3), np.float32)
  assert M.dice(e, e).shape == (0,)
  assert M.average_precision(e, e).shape == (0,)
  assert float(M.dice(e, e, pooled=True)) == 1.0
  assert np.isnan(float(M.average_precision(e, e, pooled=True)))


def test_empty_case_rules_under_jit():
  pred, lab = _empty_batch()
  got = jax.jit(M.all_metrics)(pred, lab)
  np.testing.assert_array_equal(np.asarray(got["dsc"]), [1.0, 0.0, 0.0])
  np.testing.assert_array_equal(np.asarray(got["precision"]), [1.0, 0.0, 1.0])


# ---------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------


ALL_FNS = list(RATIO_FNS.values()) + [M.confusion_counts, M.all_metrics]


@pytest.mark.parametrize("fn", ALL_FNS + [M.average_precision])
def test_shape_mismatch_raises(fn):
  with pytest.raises(ValueError, match=r"same shape.*\(2, 3, 4\).*\(2, 3, 5\)"):
    fn(np.zeros((2, 3, 4)), np.zeros((2, 3, 5)))
  with pytest.raises(ValueError, match="mask"):
    fn(np.zeros((2, 3)), np.zeros((2, 3)), mask=np.ones((2, 4), bool))
  with pytest.raises(ValueError, match="batch axis"):
    fn(np.float32(0.3), np.float32(1.0))


def test_class_axis_raises():
  probs = np.full((2, 4, 4, 2), 0.5, np.float32)
  lab = np.zeros((2, 4, 4), bool)
  with pytest.raises(ValueError, match=r"probabilities.*class axis.*\(2, 4, 4, 2\)"):
    M.average_precision(probs, lab)
  with pytest.raises(ValueError, match=r"predictions.*class axis"):
    M.dice(probs, lab)
  with pytest.raises(ValueError, match=r"labels.*one-hot"):
    M.dice(lab, probs)


@pytest.mark.parametrize("fn", ALL_FNS)
@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_threshold_out_of_range_raises(fn, bad):
  x = np.zeros((1, 3))
  with pytest.raises(ValueError, match=r"threshold must lie in \[0, 1\]"):
    fn(x, x, threshold=bad)
  with pytest.raises(ValueError, match="threshold must be a real scalar"):
    fn(x, x, threshold=np.array([0.5, 0.5]))
  with pytest.raises(ValueError, match="threshold must be a real scalar"):
    fn(x, x, threshold="0.5")


def test_threshold_bounds_accepted():
  x = np.array([[0.0, 1.0]])
  assert int(M.confusion_counts(x, x, threshold=0.0)[0][0]) == 1  # everything lesion
  assert int(M.confusion_counts(x, x, threshold=1.0)[0][0]) == 1  # only p == 1


def test_bad_beta_and_pooled_and_dtypes_raise():
  x = np.zeros((1, 3))
  with pytest.raises(ValueError, match="beta must be a finite number >= 0"):
    M.f_beta(x, x, beta=-1.0)
  with pytest.raises(ValueError, match="beta must be a finite number >= 0"):
    M.f_beta_from_counts(1, 1, 1, beta=float("inf"))
  with pytest.raises(ValueError, match="pooled must be a Python bool"):
    M.dice(x, x, pooled="yes")
  with pytest.raises(ValueError, match="pooled must be a Python bool"):
    M.average_precision(x, x, pooled=jnp.array(True))
  with pytest.raises(ValueError, match="mask must have dtype"):
    M.dice(x, x, mask=np.ones((1, 3), np.float32))
  with pytest.raises(ValueError, match="predictions must have dtype"):
    M.dice(x.astype(np.complex64), x)
  with pytest.raises(ValueError, match="labels must have dtype"):
    M.dice(x, x.astype(np.complex64))


def test_public_api_documented():
  for name in M.__all__:
    fn = getattr(M, name)
    assert fn.__doc__ and "1706.05721" in fn.__doc__, name
    assert "return" in fn.__annotations__, name


# ---------------------------------------------------------------------------
# the confusion-matrix family vs scikit-learn
# ---------------------------------------------------------------------------

FAMILY_FNS = {
  "npv": (M.npv, M.npv_from_counts),
  "fpr": (M.fpr, M.fpr_from_counts),
  "fnr": (M.fnr, M.fnr_from_counts),
  "balanced_accuracy": (M.balanced_accuracy, M.balanced_accuracy_from_counts),
  "mcc": (M.mcc, M.mcc_from_counts),
}


def sk_family(y, p):
  """Every count metric of one flat binary case, from scikit-learn."""
  kw = dict(zero_division=np.nan)
  return {
    "dsc": f1_score(y, p, **kw),
    "f2": fbeta_score(y, p, beta=2.0, **kw),
    "sensitivity": recall_score(y, p, **kw),
    "specificity": recall_score(y, p, pos_label=0, **kw),
    "precision": precision_score(y, p, **kw),
    "npv": precision_score(y, p, pos_label=0, **kw),
    "fpr": 1.0 - recall_score(y, p, pos_label=0, **kw),
    "fnr": 1.0 - recall_score(y, p, **kw),
    "balanced_accuracy": balanced_accuracy_score(y, p),
    "mcc": matthews_corrcoef(y, p),
  }


def sk_cases(pred, lab, mask=None, pooled=False):
  pred, lab = np.asarray(pred) != 0, np.asarray(lab) != 0
  keep = np.ones(pred.shape, bool) if mask is None else np.asarray(mask, bool)
  if pooled:
    return sk_family(lab[keep], pred[keep])
  rows = [sk_family(lab[i][keep[i]], pred[i][keep[i]]) for i in range(len(pred))]
  return {k: np.array([r[k] for r in rows]) for k in rows[0]}


ALL_RATIO_FNS = dict(RATIO_FNS, **{k: v[0] for k, v in FAMILY_FNS.items()})


@pytest.mark.parametrize("pooled", [False, True])
@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("empty", ["one", "nan"])
def test_confusion_family_matches_sklearn(rng, pooled, use_mask, empty):
  # Cases with lesion, background, predicted lesion and predicted background,
  # so no ratio is empty and every convention agrees with scikit-learn.
  probs, labels = random_case(rng, (5, 9, 8, 7), 0.3)
  probs = np.where(labels & (rng.random(labels.shape) < 0.5), 0.9, probs)
  mask = rng.random(probs.shape) < 0.8 if use_mask else None
  ref = sk_cases(probs >= 0.5, labels, mask, pooled)
  counts = M.confusion_counts(probs, labels, mask=mask, pooled=pooled)
  for name, fn in ALL_RATIO_FNS.items():
    got = np.asarray(fn(probs, labels, mask=mask, pooled=pooled, empty=empty))
    assert got.shape == (() if pooled else (5,)), name
    assert np.all(np.isfinite(got)), name
    np.testing.assert_allclose(got, ref[name], rtol=2e-6, atol=1e-7, err_msg=name)
  for name, (_, from_counts) in FAMILY_FNS.items():
    np.testing.assert_allclose(
      np.asarray(from_counts(*counts, empty=empty)), ref[name], rtol=2e-6,
      atol=1e-7, err_msg=name,
    )


def test_mcc_extremes_and_no_overflow():
  assert float(M.mcc_from_counts(5, 0, 0, 7)) == 1.0
  assert float(M.mcc_from_counts(0, 5, 7, 0)) == -1.0
  # pooled counts of ~1e9 voxels: products of counts reach 1e36
  tp, fp, fn, tn = 1.2e9, 3.0e8, 4.0e8, 1.9e9
  ref = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
  np.testing.assert_allclose(float(M.mcc_from_counts(tp, fp, fn, tn)), ref, rtol=1e-6)
  big = np.array([2**30, 2**29, 2**28, 2**30], np.int32)
  t, f, n, g = (float(x) for x in big)
  ref = (t * g - f * n) / math.sqrt((t + f) * (t + n) * (g + f) * (g + n))
  np.testing.assert_allclose(float(M.mcc_from_counts(*big)), ref, rtol=1e-6)


# ---------------------------------------------------------------------------
# empty= rules
# ---------------------------------------------------------------------------


def test_empty_one_rules_of_the_family():
  pred, lab = _empty_batch()
  # 0: empty GT + empty pred, 1: empty GT + 2 FP, 2: lesion (2) + empty pred
  np.testing.assert_array_equal(np.asarray(M.npv(pred, lab)), [1.0, 1.0, 14 / 16])
  np.testing.assert_array_equal(np.asarray(M.fpr(pred, lab)), [0.0, 2 / 16, 0.0])
  np.testing.assert_array_equal(np.asarray(M.fnr(pred, lab)), [0.0, 0.0, 1.0])
  np.testing.assert_allclose(
    np.asarray(M.balanced_accuracy(pred, lab)), [1.0, (1 + 14 / 16) / 2, 0.5]
  )
  np.testing.assert_array_equal(np.asarray(M.mcc(pred, lab)), [1.0, 0.0, 0.0])
  # error rates are the complements of the scores, empty cases included
  np.testing.assert_allclose(M.fpr(pred, lab), 1 - M.specificity(pred, lab))
  np.testing.assert_allclose(M.fnr(pred, lab), 1 - M.sensitivity(pred, lab))
  # no negative voxel at all; nothing predicted negative
  full = np.ones((1, 4), bool)
  assert float(M.fpr(full, full)[0]) == 0.0
  assert float(M.npv(full, full)[0]) == 1.0
  assert float(M.mcc(full, full)[0]) == 1.0
  assert float(M.mcc(full, ~full)[0]) == 0.0


def test_empty_nan_follows_monai():
  pred, lab = _empty_batch()
  got = M.all_metrics(pred, lab, empty="nan")
  nan = np.nan
  # DiceMetric(ignore_empty=True): NaN whenever the reference is empty
  np.testing.assert_array_equal(np.asarray(got["dsc"]), [nan, nan, 0.0])
  np.testing.assert_array_equal(np.asarray(got["f2"]), [nan, nan, 0.0])
  # ConfusionMatrixMetric: NaN where the denominator is 0
  np.testing.assert_array_equal(np.asarray(got["sensitivity"]), [nan, nan, 0.0])
  np.testing.assert_array_equal(np.asarray(got["precision"]), [nan, 0.0, nan])
  np.testing.assert_array_equal(np.asarray(got["specificity"]), [1.0, 14 / 16, 1.0])
  kw = dict(empty="nan")
  np.testing.assert_array_equal(np.asarray(M.npv(pred, lab, **kw)), [1.0, 1.0, 14 / 16])
  np.testing.assert_array_equal(np.asarray(M.fnr(pred, lab, **kw)), [nan, nan, 1.0])
  np.testing.assert_array_equal(np.asarray(M.fpr(pred, lab, **kw)), [0.0, 2 / 16, 0.0])
  np.testing.assert_array_equal(
    np.asarray(M.balanced_accuracy(pred, lab, **kw)), [nan, nan, 0.5]
  )
  np.testing.assert_array_equal(np.asarray(M.mcc(pred, lab, **kw)), [nan, nan, nan])
  # skipped in the mean: nanmean over the defined cases
  assert float(jnp.nanmean(got["precision"])) == 0.0
  # the APR rule does not change
  assert np.isnan(np.asarray(got["apr"][0]))
  # from counts, and a reference-free case with FP (MONAI's Dice: NaN)
  assert np.isnan(float(M.dice_from_counts(0, 3, 0, 5, empty="nan")))
  assert float(M.dice_from_counts(0, 3, 0, 5)) == 0.0
  assert np.isnan(float(M.f_beta_from_counts(0, 3, 0, 5, beta=0.5, empty="nan")))
  # pooled: NaN only if the whole batch is empty
  assert float(M.dice(pred, lab, pooled=True, empty="nan")) == 0.0


@pytest.mark.parametrize("fn", list(ALL_RATIO_FNS.values()) + [M.all_metrics])
def test_bad_empty_raises(fn):
  x = np.zeros((1, 3))
  with pytest.raises(ValueError, match=r"empty must be one of \['one', 'nan'\]"):
    fn(x, x, empty="zero")


# ---------------------------------------------------------------------------
# per-class metrics of class maps
# ---------------------------------------------------------------------------


def random_class_maps(rng, shape=(3, 6, 7, 5), k=4):
  labels = rng.integers(0, k, shape)
  pred = np.where(rng.random(shape) < 0.6, labels, rng.integers(0, k, shape))
  return pred.astype(np.int32), labels.astype(np.uint8)


@pytest.mark.parametrize("include_background", [False, True])
@pytest.mark.parametrize("pooled", [False, True])
def test_per_class_metrics_match_sklearn_one_vs_rest(rng, include_background, pooled):
  pred, labels = random_class_maps(rng)
  mask = rng.random(pred.shape) < 0.9
  classes = list(range(0 if include_background else 1, 4))
  kw = dict(num_classes=4, include_background=include_background, mask=mask,
            pooled=pooled)
  expected_shape = (len(classes),) if pooled else (3, len(classes))
  got = {name: np.asarray(fn(pred, labels, **kw)) for name, fn in ALL_RATIO_FNS.items()}
  for c_idx, c in enumerate(classes):
    ref = sk_cases(pred == c, labels == c, mask, pooled)
    for name in ALL_RATIO_FNS:
      assert got[name].shape == expected_shape, name
      np.testing.assert_allclose(
        got[name][..., c_idx], ref[name], rtol=2e-6, atol=1e-7, err_msg=f"{name} {c}"
      )
  allm = M.all_metrics(pred, labels, **kw)
  assert set(allm) == {"dsc", "sensitivity", "specificity", "precision", "f2"}
  np.testing.assert_allclose(np.asarray(allm["dsc"]), got["dsc"], rtol=1e-7)
  # sklearn's per-class (average=None) scores, pooled over all voxels
  if pooled:
    keep = mask.ravel()
    y, p = labels.ravel()[keep], pred.ravel()[keep]
    np.testing.assert_allclose(
      got["dsc"], f1_score(y, p, labels=classes, average=None), rtol=2e-6
    )
    np.testing.assert_allclose(
      got["sensitivity"], recall_score(y, p, labels=classes, average=None), rtol=2e-6
    )


def test_binary_mode_is_two_class_mode_without_background(rng):
  probs, labels = random_case(rng)
  binary = M.all_metrics(probs, labels)
  two = M.all_metrics((probs >= 0.5).astype(np.int32), labels.astype(np.int32),
                      num_classes=2)
  for name in two:
    np.testing.assert_array_equal(np.asarray(two[name])[:, 0], np.asarray(binary[name]))
  counts = M.confusion_counts(probs >= 0.5, labels, num_classes=2,
                              include_background=True, pooled=True)
  assert counts[0].shape == (2,)
  # class 0's TP are class 1's TN
  assert int(counts[0][0]) == int(counts[3][1])


def test_class_map_errors():
  pred = np.zeros((1, 4), np.int32)
  lab = np.array([[0, 1, 2, 3]])
  with pytest.raises(ValueError, match=r"predictions must be an integer class map"):
    M.dice(pred.astype(np.float32), lab, num_classes=4)
  with pytest.raises(ValueError, match=r"predictions contains values \[4\] outside"):
    M.dice(pred + 4, lab, num_classes=4)
  with pytest.raises(ValueError, match=r"include_background=True needs num_classes"):
    M.dice(pred, lab, include_background=True)
  with pytest.raises(ValueError, match=r"num_classes must be None or an int >= 2"):
    M.dice(pred, lab, num_classes=1)
  with pytest.raises(ValueError, match=r"ignore_index=3 is a class index"):
    M.dice(pred, lab, num_classes=4, ignore_index=3)


# ---------------------------------------------------------------------------
# labels outside the classes (issue 9): error when concrete, dropped when traced
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
  "bad,shown",
  [(2, "[2]"), (-1, "[-1]"), (255, "[255]"), (0.5, "[0.5]"), (np.nan, "[nan]")],
)
@pytest.mark.parametrize("fn", [M.dice, M.confusion_counts, M.all_metrics,
                                M.average_precision, M.mcc])
def test_labels_outside_classes_raise(fn, bad, shown):
  probs = np.full((2, 5), 0.7, np.float32)
  dtype = np.float32 if isinstance(bad, float) else np.int32
  lab = np.zeros((2, 5), dtype)
  lab[1, 3] = bad
  with pytest.raises(ValueError) as info:
    fn(probs, lab)
  message = str(info.value)
  assert "\n" not in message
  assert f"labels contains values {shown} outside the 2 classes [0, 1]" in message


def test_labels_outside_classes_with_ignore_index_and_num_classes():
  lab = np.array([[0, 1, 2, 255, 7]], np.int32)
  pred = np.zeros((1, 5), np.int32)
  with pytest.raises(ValueError, match=r"values \[7\] outside the 3 .*ignore_index=255"):
    M.dice(pred, lab, num_classes=3, ignore_index=255)
  with pytest.raises(ValueError, match=r"values \[3\] outside the 3 classes \[0, 2\]"):
    M.dice(pred, np.array([[0, 1, 2, 3, 0]]), num_classes=3)
  ok = lab.copy()
  ok[0, 4] = 255
  np.testing.assert_array_equal(
    [np.asarray(c) for c in M.confusion_counts(pred, ok, num_classes=3,
                                               ignore_index=255)],
    [np.asarray(c) for c in M.confusion_counts(pred[:, :3], lab[:, :3],
                                               num_classes=3)],
  )


def test_labels_outside_classes_are_dropped_under_jit(rng):
  probs, labels = random_case(rng)
  bad = rng.random(labels.shape) < 0.2
  corrupted = np.where(bad, rng.choice([-1, 2, 255], labels.shape), labels).astype(
    np.int32
  )
  expected = M.all_metrics(probs, labels, mask=~bad)
  got = jax.jit(M.all_metrics)(probs, corrupted)
  for name in expected:
    np.testing.assert_allclose(np.asarray(got[name]), np.asarray(expected[name]),
                               rtol=1e-6, err_msg=name)
  # float labels: non-integers and NaN are not classes either
  floats = np.where(bad, np.where(rng.random(labels.shape) < 0.5, 0.5, np.nan),
                    labels).astype(np.float32)
  got = jax.jit(M.dice)(probs, floats)
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected["dsc"]), rtol=1e-6)
  # class maps: traced out-of-range predictions predict no class
  pred, lab = random_class_maps(rng)
  lab_bad = np.where(bad, 9, lab).astype(np.int32)
  got = jax.jit(lambda p, y: M.confusion_counts(p, y, num_classes=4))(pred, lab_bad)
  want = M.confusion_counts(pred, lab, num_classes=4, mask=~bad)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
  pred_bad = np.where(bad, 7, pred).astype(np.int32)
  tp, fp, fn, tn = jax.jit(lambda p, y: M.confusion_counts(p, y, num_classes=4))(
    pred_bad, lab
  )
  want = M.confusion_counts(pred, lab, num_classes=4, mask=~bad)
  np.testing.assert_array_equal(np.asarray(fp), np.asarray(want[1]))
  assert np.all(np.asarray(tp + fp + fn + tn) == np.prod(lab.shape[1:]) * 1)


def test_loss_and_metrics_agree_on_labels_outside_classes(rng):
  # Hard one-hot probabilities make the soft Dice loss the hard DSC: under
  # jit both drop the voxels whose label is not a class.
  from tversky_jax import losses  # pylint: disable=import-outside-toplevel

  probs, labels = random_case(rng, (3, 8, 8, 8), 0.3)
  hard = probs >= 0.5
  two_channel = np.stack([~hard, hard], -1).astype(np.float32)
  bad = rng.random(labels.shape) < 0.15
  corrupted = np.where(bad, 3, labels).astype(np.int32)
  dice_loss = jax.jit(
    lambda p, y: losses.dice_loss(p, y, from_logits=False, smooth=0.0, reduction="none")
  )(two_channel, corrupted)
  dsc = jax.jit(M.dice)(hard, corrupted)
  np.testing.assert_allclose(1 - np.asarray(dice_loss)[:, 0], np.asarray(dsc), rtol=1e-6)
  np.testing.assert_allclose(
    np.asarray(dsc), np.asarray(M.dice(hard, labels, mask=~bad)), rtol=1e-6
  )
  # and both raise on concrete labels
  with pytest.raises(ValueError, match=r"values \[3\] outside"):
    losses.dice_loss(two_channel, corrupted, from_logits=False)
  with pytest.raises(ValueError, match=r"values \[3\] outside"):
    M.dice(hard, corrupted)


def test_ignore_index_in_metrics(rng):
  probs, labels = random_case(rng)
  keep = rng.random(labels.shape) < 0.7
  ignored = np.where(keep, labels, 255).astype(np.int32)
  expected = M.all_metrics(probs, labels, mask=keep)
  got = M.all_metrics(probs, ignored, ignore_index=255)
  for name in expected:
    np.testing.assert_allclose(np.asarray(got[name]), np.asarray(expected[name]),
                               rtol=1e-7, err_msg=name)
  with pytest.raises(ValueError, match="ignore_index=1 is a class index"):
    M.average_precision(probs, labels, ignore_index=1)
