"""Tests of lungct.metrics: hand-computed values, and scikit-learn where installed."""

import time
import warnings

import numpy as np
import pytest

from lungct import metrics

# The running example: y=[0,0,1,1], p=[0.1,0.4,0.35,0.8].
Y4 = np.array([0, 0, 1, 1])
P4 = np.array([0.1, 0.4, 0.35, 0.8])


def _random_binary(n, seed, decimals=2):
  """Labels correlated with rounded (hence tied) probabilities."""
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 2, n)
  p = np.clip(0.5 + 0.25 * (2 * y - 1) + 0.3 * rng.standard_normal(n), 0, 1)
  return y, np.round(p, decimals)


# ----------------------------------------------------------------------------
# Confusion counts and binary metrics by hand.
# ----------------------------------------------------------------------------


def test_confusion_counts_and_matrix_by_hand():
  y = [1, 1, 1, 0, 0, 0, 0]
  pred = [1, 0, 0, 1, 0, 0, 0]
  assert metrics.confusion_counts(y, pred) == {"tp": 1, "fp": 1, "tn": 3, "fn": 2}
  np.testing.assert_array_equal(metrics.confusion_matrix(y, pred), [[3, 1], [2, 1]])
  cm = metrics.confusion_matrix([0, 1, 2, 2, 1], [0, 2, 2, 1, 1], num_classes=3)
  np.testing.assert_array_equal(cm, [[1, 0, 0], [0, 1, 1], [0, 1, 1]])


def test_binary_metrics_running_example():
  m = metrics.binary_metrics(Y4, P4, threshold=0.5)
  assert (m["tp"], m["fp"], m["tn"], m["fn"], m["n"]) == (1, 0, 2, 1, 4)
  assert m["sensitivity"] == pytest.approx(0.5)
  assert m["specificity"] == pytest.approx(1.0)
  assert m["ppv"] == pytest.approx(1.0)
  assert m["npv"] == pytest.approx(2 / 3)
  assert m["accuracy"] == pytest.approx(0.75)
  assert m["f1"] == pytest.approx(2 / 3)
  assert m["balanced_accuracy"] == pytest.approx(0.75)
  assert m["roc_auc"] == pytest.approx(0.75)
  # Descending: 0.8 (pos, P=1, R=.5), 0.4 (neg), 0.35 (pos, P=2/3, R=1).
  assert m["pr_auc"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
  assert m["brier"] == pytest.approx((0.01 + 0.16 + 0.65**2 + 0.04) / 4)
  assert m["threshold"] == 0.5
  assert isinstance(m["tp"], int)


def test_threshold_is_inclusive():
  m = metrics.binary_metrics(Y4, P4, threshold=0.35)
  assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 1, 0)


def test_auc_counts_ties_as_half():
  # Pairs (pos, neg): .5/.5 tie -> .5; .5/.2 -> 1; .8/.5 -> 1; .8/.2 -> 1.
  assert metrics.roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.8]) == pytest.approx(3.5 / 4)
  assert metrics.roc_auc([0, 1, 0, 1], [0.3] * 4) == pytest.approx(0.5)
  assert metrics.roc_auc([1, 1, 0], [0.1, 0.2, 0.9]) == pytest.approx(0.0)
  assert metrics.roc_auc(Y4, P4) == pytest.approx(0.75)
  assert metrics.average_precision(Y4, P4) == pytest.approx(5 / 6)


def test_roc_curve_by_hand():
  fpr, tpr, thr = metrics.roc_curve(Y4, P4)
  np.testing.assert_allclose(thr, [np.inf, 0.8, 0.4, 0.35, 0.1])
  np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
  np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])


def test_undefined_metrics_are_nan_without_warnings():
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    m = metrics.binary_metrics([0, 0, 0], [0.1, 0.2, 0.3])  # No positives, none predicted.
    assert m["specificity"] == 1.0 and m["accuracy"] == 1.0
    for k in ("sensitivity", "ppv", "f1", "balanced_accuracy", "roc_auc", "pr_auc"):
      assert np.isnan(m[k]), k
    m = metrics.binary_metrics([1, 1], [0.9, 0.2])  # No negatives.
    assert m["sensitivity"] == 0.5 and np.isnan(m["specificity"]) and np.isnan(m["roc_auc"])
    assert m["pr_auc"] == pytest.approx(1.0)
    assert np.isnan(metrics.youden_threshold([1, 1], [0.9, 0.2]))
    assert np.isnan(metrics.threshold_for_sensitivity([0, 0], [0.9, 0.2], 0.9))
    fpr, tpr, _ = metrics.roc_curve([0, 0], [0.9, 0.2])
    assert np.all(np.isnan(tpr)) and fpr[-1] == 1.0
    m = metrics.binary_metrics([], [])
    assert m["n"] == 0 and np.isnan(m["accuracy"]) and np.isnan(m["brier"])


def test_bad_inputs_raise_with_the_problem_named():
  with pytest.raises(ValueError, match="0/1"):
    metrics.binary_metrics([0, 2], [0.1, 0.2])
  with pytest.raises(ValueError, match="same length"):
    metrics.binary_metrics([0, 1, 1], [0.1, 0.2])
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    metrics.binary_metrics([0, 1], [0.1, 1.2])
  with pytest.raises(ValueError, match="NaN"):
    metrics.roc_auc([0, 1], [0.1, np.nan])
  with pytest.raises(ValueError, match="shape"):
    metrics.dice(np.zeros((2, 2)), np.zeros((2, 3)))


# ----------------------------------------------------------------------------
# Calibration.
# ----------------------------------------------------------------------------


def test_ece_by_hand_two_bins():
  y = [0, 1, 1, 0]
  p = [0.2, 0.3, 0.7, 0.9]
  # Bin [0, .5): conf .25, acc .5; bin [.5, 1]: conf .8, acc .5.
  expected = (2 * 0.25 + 2 * 0.3) / 4
  assert metrics.expected_calibration_error(y, p, n_bins=2) == pytest.approx(expected)
  assert metrics.binary_metrics(y, p, n_bins=2)["ece"] == pytest.approx(expected)
  bins = metrics.calibration_bins(y, p, n_bins=2)
  np.testing.assert_allclose(bins["bin_confidence"], [0.25, 0.8])
  np.testing.assert_allclose(bins["bin_accuracy"], [0.5, 0.5])
  np.testing.assert_array_equal(bins["bin_counts"], [2, 2])
  np.testing.assert_allclose(bins["bin_edges"], [0, 0.5, 1])


def test_calibration_bins_edges_and_empty_bins():
  bins = metrics.calibration_bins([1, 0, 1, 1], [0.0, 0.3, 0.5, 1.0], n_bins=10)
  # 0.3 lands in [0.3, 0.4), 0.5 in [0.5, 0.6), 1.0 in the closed last bin.
  np.testing.assert_array_equal(bins["bin_counts"], [1, 0, 0, 1, 0, 1, 0, 0, 0, 1])
  empty = bins["bin_counts"] == 0
  assert np.all(np.isnan(bins["bin_confidence"][empty]))
  assert np.all(np.isnan(bins["bin_accuracy"][empty]))
  assert bins["bin_accuracy"][3] == 0.0 and bins["bin_confidence"][9] == 1.0


def test_perfect_calibration_and_brier_by_hand():
  assert metrics.expected_calibration_error([0, 1], [0.0, 1.0]) == 0.0
  assert metrics.brier_score([0, 1], [0.0, 1.0]) == 0.0
  assert metrics.brier_score([0, 1, 1], [0.5, 0.5, 1.0]) == pytest.approx((0.25 + 0.25 + 0) / 3)
  assert metrics.brier_score(Y4, P4) == pytest.approx(0.158125)


# ----------------------------------------------------------------------------
# Operating points.
# ----------------------------------------------------------------------------

Y7 = np.array([0, 0, 0, 0, 1, 1, 1])
P7 = np.array([0.1, 0.2, 0.3, 0.6, 0.5, 0.7, 0.9])
# t:   .9    .7    .6     .5    .3   .2   .1
# tpr: 1/3   2/3   2/3    1     1    1    1
# fpr: 0     0     1/4    1/4   1/2  3/4  1
# J:   .33   .67   .42    .75   .5   .25  0


def test_youden_threshold_by_hand():
  assert metrics.youden_threshold(Y7, P7) == 0.5
  pred = P7 >= 0.5
  assert metrics.confusion_counts(Y7, pred) == {"tp": 3, "fp": 1, "tn": 3, "fn": 0}
  # Running example: J = .5 at both 0.8 and 0.35; ties go to the highest threshold.
  assert metrics.youden_threshold(Y4, P4) == 0.8


def test_threshold_for_sensitivity_by_hand():
  assert metrics.threshold_for_sensitivity(Y7, P7, 0.9) == 0.5
  assert metrics.threshold_for_sensitivity(Y7, P7, 0.6) == 0.7
  assert metrics.threshold_for_sensitivity(Y7, P7, 2 / 3) == 0.7
  assert metrics.threshold_for_sensitivity(Y7, P7, 1 / 3) == 0.9
  assert metrics.threshold_for_sensitivity(Y7, P7, 1.0) == 0.5
  y = np.array([1] * 10 + [0] * 5)
  p = np.concatenate([np.arange(10, 0, -1) / 10, np.full(5, 0.05)])
  assert metrics.threshold_for_sensitivity(y, p, 0.9) == pytest.approx(0.2)  # 9 of 10 >= 0.2.


def test_operating_points_names_and_values():
  points = metrics.operating_points(Y7, P7, targets=(0.5, 0.9, 0.95))
  assert list(points) == ["default@0.5", "youden", "sens>=0.50", "sens>=0.90", "sens>=0.95"]
  assert points == {"default@0.5": 0.5, "youden": 0.5, "sens>=0.50": 0.7,
                    "sens>=0.90": 0.5, "sens>=0.95": 0.5}


# ----------------------------------------------------------------------------
# Bootstrap.
# ----------------------------------------------------------------------------


def test_bootstrap_ci_contains_point_and_narrows_with_more_data():
  y_small, p_small = _random_binary(60, seed=1)
  y_big, p_big = _random_binary(1200, seed=2)
  point, lo, hi = metrics.bootstrap_ci(y_small, p_small, metrics.roc_auc, n_boot=300, seed=0)
  assert point == pytest.approx(metrics.roc_auc(y_small, p_small))
  assert lo < point < hi
  big = metrics.bootstrap_ci(y_big, p_big, metrics.roc_auc, n_boot=300, seed=0)
  assert big.lo < big.point < big.hi
  assert (big.hi - big.lo) < 0.5 * (hi - lo)  # Width ~ 1/sqrt(n): ~4.5x narrower.
  assert big.n_used == big.n_boot == 300


def test_bootstrap_is_reproducible_and_seeded():
  y, p = _random_binary(80, seed=3)
  a = metrics.bootstrap_ci(y, p, metrics.roc_auc, n_boot=100, seed=7)
  b = metrics.bootstrap_ci(y, p, metrics.roc_auc, n_boot=100, seed=7)
  c = metrics.bootstrap_ci(y, p, metrics.roc_auc, n_boot=100, seed=8)
  assert tuple(a) == tuple(b) and tuple(a) != tuple(c)


def test_patient_level_bootstrap_keeps_patients_together():
  sizes = [1, 2, 3, 4, 5, 1, 2, 3]
  # Cases of a patient are not contiguous.
  perm = np.random.default_rng(0).permutation(sum(sizes))
  groups = np.repeat([f"patient{i}" for i in range(len(sizes))], sizes)[perm]
  gid = np.repeat(np.arange(len(sizes)), sizes)[perm]
  y = np.arange(gid.size) % 2

  def whole_patients(y_b, p_b):
    """1 when every drawn patient brings all of its cases (any number of times)."""
    del y_b
    counts = np.bincount(p_b.astype(int), minlength=len(sizes))
    return float(np.all(counts % np.array(sizes) == 0))

  def distinct_patients(y_b, p_b):
    del y_b
    return float(np.unique(p_b).size)

  ci = metrics.bootstrap_ci(y, gid, whole_patients, groups=groups, n_boot=200, seed=0)
  assert tuple(ci) == (1.0, 1.0, 1.0)
  # Case-level resampling splits patients.
  ci = metrics.bootstrap_ci(y, gid, whole_patients, n_boot=200, seed=0)
  assert ci.lo == 0.0
  # Resampling 8 patients with replacement draws at most 8 distinct ones.
  ci = metrics.bootstrap_ci(y, gid, distinct_patients, groups=groups, n_boot=200, seed=0)
  # (all 8 distinct has probability 8!/8**8 ~ 0.002; the mean is 8(1 - (7/8)**8) ~ 5.3).
  assert ci.point == 8.0
  assert 3.0 <= ci.lo <= 5.0 and 6.0 <= ci.hi <= 7.0


def test_bootstrap_skips_nan_resamples_and_reports_count():
  y = np.array([1] + [0] * 9)
  p = np.linspace(0.05, 0.95, 10)
  ci = metrics.bootstrap_ci(y, p, metrics.roc_auc, n_boot=500, seed=0)
  # P(no positive drawn) = 0.9 ** 10 ~ 0.35.
  assert 250 < ci.n_used < 400 and ci.n_boot == 500
  assert not np.isnan(ci.lo) and not np.isnan(ci.hi)
  nothing = metrics.bootstrap_ci([0, 0, 0], [0.1, 0.2, 0.3], metrics.roc_auc, n_boot=20)
  assert np.isnan(nothing.point) and np.isnan(nothing.lo) and nothing.n_used == 0


def test_metrics_with_ci_matches_generic_bootstrap():
  y, p = _random_binary(120, seed=4)
  groups = np.arange(120) // 3
  fast = metrics.metrics_with_ci(y, p, 0.5, groups=groups, n_boot=200, seed=5)
  assert set(fast) == set(metrics.METRIC_NAMES)
  point = metrics.binary_metrics(y, p, 0.5)
  for name, fn in [
      ("roc_auc", metrics.roc_auc),
      ("pr_auc", metrics.average_precision),
      ("brier", metrics.brier_score),
      ("ece", metrics.expected_calibration_error),
      ("sensitivity", lambda yy, pp: metrics.binary_metrics(yy, pp)["sensitivity"]),
      ("f1", lambda yy, pp: metrics.binary_metrics(yy, pp)["f1"]),
  ]:
    slow = metrics.bootstrap_ci(y, p, fn, groups=groups, n_boot=200, seed=5)
    assert fast[name]["value"] == pytest.approx(point[name])
    assert fast[name]["lo"] == pytest.approx(slow.lo, abs=1e-12), name
    assert fast[name]["hi"] == pytest.approx(slow.hi, abs=1e-12), name
    assert fast[name]["n_used"] == slow.n_used
    assert fast[name]["lo"] <= fast[name]["value"] <= fast[name]["hi"]


def test_metrics_with_ci_is_fast():
  y, p = _random_binary(200, seed=6)
  groups = np.arange(200) // 2
  start = time.perf_counter()
  out = metrics.metrics_with_ci(y, p, 0.5, groups=groups, n_boot=1000, seed=0)
  assert time.perf_counter() - start < 2.0
  assert out["accuracy"]["n_used"] == 1000


# ----------------------------------------------------------------------------
# Against scikit-learn.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_against_sklearn(seed):
  skm = pytest.importorskip("sklearn.metrics")
  y, p = _random_binary(300, seed=seed, decimals=2)  # Plenty of ties.
  threshold = 0.45
  pred = (p >= threshold).astype(int)
  m = metrics.binary_metrics(y, p, threshold)
  assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, p), abs=1e-12)
  assert m["pr_auc"] == pytest.approx(skm.average_precision_score(y, p), abs=1e-12)
  assert m["brier"] == pytest.approx(skm.brier_score_loss(y, p), abs=1e-12)
  assert m["f1"] == pytest.approx(skm.f1_score(y, pred))
  assert m["sensitivity"] == pytest.approx(skm.recall_score(y, pred))
  assert m["specificity"] == pytest.approx(skm.recall_score(y, pred, pos_label=0))
  assert m["ppv"] == pytest.approx(skm.precision_score(y, pred))
  assert m["npv"] == pytest.approx(skm.precision_score(y, pred, pos_label=0))
  assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
  assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
  tn, fp, fn, tp = skm.confusion_matrix(y, pred).ravel()
  assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (tp, fp, tn, fn)
  fpr, tpr, thr = metrics.roc_curve(y, p)
  sk_fpr, sk_tpr, sk_thr = skm.roc_curve(y, p, drop_intermediate=False)
  np.testing.assert_allclose(fpr, sk_fpr)
  np.testing.assert_allclose(tpr, sk_tpr)
  np.testing.assert_allclose(thr[1:], sk_thr[1:])
  assert np.isinf(thr[0])
  # Youden's threshold really maximises sensitivity + specificity - 1.
  t = metrics.youden_threshold(y, p)
  j = lambda tt: skm.recall_score(y, p >= tt) + skm.recall_score(y, p >= tt, pos_label=0) - 1
  assert j(t) == pytest.approx(np.max(sk_tpr - sk_fpr))


@pytest.mark.parametrize("seed", [0, 1])
def test_multiclass_against_sklearn(seed):
  skm = pytest.importorskip("sklearn.metrics")
  rng = np.random.default_rng(seed)
  k, n = 4, 200
  y = rng.integers(0, k, n)
  logits = rng.standard_normal((n, k)) + 1.2 * np.eye(k)[y]
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  pred = probs.argmax(1)
  m = metrics.multiclass_metrics(y, probs)
  assert m["num_classes"] == k and m["n"] == n
  assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
  np.testing.assert_array_equal(m["confusion_matrix"], skm.confusion_matrix(y, pred))
  np.testing.assert_allclose(m["sensitivity"], skm.recall_score(y, pred, average=None))
  np.testing.assert_allclose(m["ppv"], skm.precision_score(y, pred, average=None))
  np.testing.assert_allclose(m["f1"], skm.f1_score(y, pred, average=None))
  assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
  assert m["macro_sensitivity"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
  specificity = [skm.recall_score(y == c, pred == c, pos_label=False) for c in range(k)]
  np.testing.assert_allclose(m["specificity"], specificity)
  np.testing.assert_allclose(
      m["roc_auc"], [skm.roc_auc_score(y == c, probs[:, c]) for c in range(k)])
  assert m["macro_roc_auc"] == pytest.approx(
      skm.roc_auc_score(y, probs, multi_class="ovr", average="macro"))
  assert m["quadratic_kappa"] == pytest.approx(
      skm.cohen_kappa_score(y, pred, weights="quadratic"))


def test_multiclass_by_hand():
  y = [0, 1, 2, 2]
  probs = np.eye(3)[[0, 1, 2, 1]]  # Predictions 0, 1, 2, 1.
  m = metrics.multiclass_metrics(y, probs)
  assert m["accuracy"] == 0.75
  assert m["confusion_matrix"] == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
  np.testing.assert_allclose(m["sensitivity"], [1, 1, 0.5])
  np.testing.assert_allclose(m["ppv"], [1, 0.5, 1])
  # Quadratic weights (i-j)^2: observed disagreement 1 (2 vs 1);
  # expected = sum w * outer(rows=[1,1,2], cols=[1,2,1]) / 4 = (6 + 2 + 12) / 4 = 5.
  assert m["quadratic_kappa"] == pytest.approx(1 - 1 / 5)
  perfect = metrics.multiclass_metrics([0, 1, 2], np.eye(3))
  assert perfect["quadratic_kappa"] == 1.0 and perfect["macro_roc_auc"] == 1.0


# ----------------------------------------------------------------------------
# Segmentation.
# ----------------------------------------------------------------------------


def _cube(shape=(24, 24, 24), start=(5, 5, 5), size=8):
  mask = np.zeros(shape, dtype=np.uint8)
  sl = tuple(slice(s, s + size) for s in start)
  mask[sl] = 1
  return mask


def test_dice_and_iou():
  cube = _cube()
  assert metrics.dice(cube, cube) == 1.0 and metrics.iou(cube, cube) == 1.0
  far = _cube(start=(15, 15, 15), size=5)
  assert metrics.dice(cube, far) == 0.0 and metrics.iou(cube, far) == 0.0
  empty = np.zeros_like(cube)
  assert metrics.dice(empty, empty) == 1.0 and metrics.iou(empty, empty) == 1.0
  assert metrics.dice(cube, empty) == 0.0
  a = np.array([1, 1, 1, 1, 0, 0])
  b = np.array([0, 0, 1, 1, 0, 0])
  assert metrics.dice(a, b) == pytest.approx(4 / 6)
  assert metrics.iou(a, b) == pytest.approx(2 / 4)


def test_hausdorff95_of_a_shifted_cube():
  cube = _cube(size=10)
  shifted = np.roll(cube, 2, axis=0)
  assert metrics.hausdorff95(shifted, cube) == pytest.approx(2.0)
  assert metrics.hausdorff95(cube, shifted) == pytest.approx(2.0)
  assert metrics.hausdorff95(shifted, cube, spacing=(2.5, 1.0, 1.0)) == pytest.approx(5.0)
  assert metrics.hausdorff95(cube, cube) == 0.0
  # One stray voxel far away is under 5% of the surface: HD95 ignores it.
  stray = cube.copy()
  stray[22, 22, 22] = 1
  assert metrics.hausdorff95(stray, cube) == 0.0
  empty = np.zeros_like(cube)
  assert metrics.hausdorff95(empty, empty) == 0.0
  assert metrics.hausdorff95(cube, empty) == np.inf
  with pytest.raises(ValueError, match="spacing"):
    metrics.hausdorff95(cube, cube, spacing=(1.0, 1.0))


# ----------------------------------------------------------------------------
# Decision curves and temperature scaling.
# ----------------------------------------------------------------------------


def test_net_benefit_by_hand():
  # Y4/P4 at t = 0.3: p >= 0.3 flags 0.4 (negative), 0.35 and 0.8 (positives): TP 2, FP 1 of 4.
  assert metrics.net_benefit(Y4, P4, 0.3) == pytest.approx(2 / 4 - 1 / 4 * 0.3 / 0.7, abs=1e-12)
  assert metrics.net_benefit(Y4, P4, 0.5) == pytest.approx(1 / 4, abs=1e-12)          # only 0.8: TP 1, FP 0
  assert metrics.net_benefit(Y4, P4, 0.1) == pytest.approx(2 / 4 - 2 / 4 * 1 / 9, abs=1e-12)  # all flagged
  dc = metrics.decision_curve(Y4, P4, thresholds=(0.1, 0.3, 0.5), n_boot=20)
  np.testing.assert_allclose(dc["model"]["value"], [0.5 - 0.5 / 9, 0.5 - 0.25 * 3 / 7, 0.25], atol=1e-12)
  # Treat all: prevalence 1/2 minus (1/2) t / (1 - t); treat none: 0.
  np.testing.assert_allclose(dc["treat_all"]["value"], [0.5 - 0.5 / 9, 0.5 - 0.5 * 3 / 7, 0.0], atol=1e-12)
  np.testing.assert_allclose(dc["advantage"]["value"], [0.0, 0.5 * 3 / 7 - 0.25 * 3 / 7, 0.25], atol=1e-12)
  assert dc["treat_none"] == [0.0, 0.0, 0.0] and dc["prevalence"] == 0.5
  with pytest.raises(ValueError, match=r"\(0, 1\)"):
    metrics.decision_curve(Y4, P4, thresholds=(0.0, 0.5))


@pytest.mark.parametrize("seed", [0, 1])
def test_decision_curve_intervals_resample_patients_like_bootstrap_ci(seed):
  y, p = _random_binary(60, seed)
  groups = np.repeat(np.arange(20), 3)
  dc = metrics.decision_curve(y, p, thresholds=(0.2, 0.6), groups=groups, n_boot=200, seed=seed)
  for j, t in enumerate((0.2, 0.6)):
    ref = metrics.bootstrap_ci(y, p, lambda a, b: metrics.net_benefit(a, b, t), groups=groups, n_boot=200,
                               seed=seed)  # the one-draw-at-a-time path
    assert dc["model"]["value"][j] == pytest.approx(ref.point, abs=1e-12)
    assert dc["model"]["lo"][j] == pytest.approx(ref.lo, abs=1e-12)
    assert dc["model"]["hi"][j] == pytest.approx(ref.hi, abs=1e-12)
    assert dc["model"]["lo"][j] < dc["model"]["value"][j] < dc["model"]["hi"][j]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("true_t", [2.5, 0.6])
def test_temperature_scaling_recovers_a_known_temperature(seed, true_t):
  rng = np.random.default_rng(seed)
  z = 2.0 * rng.standard_normal(20000)                     # calibrated logits
  y = (rng.random(z.size) < 1 / (1 + np.exp(-z))).astype(int)
  t = metrics.fit_temperature(y, z * true_t)               # the model's logits are z * T
  assert t == pytest.approx(true_t, rel=0.05)
  # Through stored probabilities (what eval keeps), and the calibrated probabilities are z's sigmoid again.
  p = metrics.apply_temperature(z * true_t, 1.0)
  assert metrics.fit_temperature(y, metrics.logits_of(p)) == pytest.approx(true_t, rel=0.05)
  inside = np.abs(z * true_t) < 15  # stored probabilities are clipped to 1e-7 from 0 and 1 (logits +-16)
  np.testing.assert_allclose(metrics.apply_temperature(metrics.logits_of(p), true_t)[inside],
                             1 / (1 + np.exp(-z[inside])), atol=1e-6)
  ece_raw = metrics.expected_calibration_error(y, p)
  ece_cal = metrics.expected_calibration_error(y, metrics.apply_temperature(z * true_t, t))
  assert ece_cal < 0.02 < ece_raw


def test_temperature_scaling_multiclass_and_degenerate():
  rng = np.random.default_rng(3)
  z = 1.5 * rng.standard_normal((20000, 3))
  probs = metrics.apply_temperature(z, 1.0)
  y = np.array([rng.choice(3, p=row) for row in probs])
  assert metrics.fit_temperature(y, z * 3.0) == pytest.approx(3.0, rel=0.05)
  assert np.isnan(metrics.fit_temperature([1, 1, 1], [0.1, 2.0, 3.0]))  # one class: nothing to fit
  with pytest.raises(ValueError, match="positive"):
    metrics.apply_temperature([0.0], float("nan"))


def test_patient_level_is_the_max_over_nodules():
  prob = [0.1, 0.8, 0.3, 0.2, 0.6]
  label = [0, 1, 0, 0, 0]
  pids = ["b", "a", "a", "c", b"c"]
  out = metrics.patient_level(prob, label, pids)
  assert out["patient_id"].tolist() == ["a", "b", "c"]
  np.testing.assert_allclose(out["prob"], [0.8, 0.1, 0.6])
  assert out["label"].tolist() == [1, 0, 0] and out["count"].tolist() == [2, 1, 2]
  with pytest.raises(ValueError, match="differ in length"):
    metrics.patient_level([0.1], [0, 1], ["a"])
