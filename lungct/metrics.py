"""Evaluation metrics as pure numpy functions.

Binary classification (labels in {0, 1}, probabilities in [0, 1]), calibration,
operating-point selection, (patient-level) bootstrap confidence intervals,
multi-class metrics and segmentation overlap / surface distances.

Conventions:
  * A case is predicted positive when ``p >= threshold``.
  * Undefined ratios (0 / 0) are NaN, never an exception.
  * AUC is the Mann-Whitney statistic with ties counted 1/2; NaN when one
    class is absent. Average precision is the step-wise sum
    ``sum_k (R_k - R_{k-1}) P_k`` over distinct thresholds (as scikit-learn's
    ``average_precision_score``); NaN when there are no positives.

All binary metrics are computed by one weighted core (``_weighted_binary``):
the point estimate uses unit weights and the bootstrap uses resampling counts
as weights, so both are the same arithmetic and the bootstrap is vectorised.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import math

import numpy as np
from scipy import ndimage

# Metrics of `binary_metrics` that get a bootstrap interval in `metrics_with_ci`
# (the remaining keys tp/fp/tn/fn/n/threshold are counts or settings).
METRIC_NAMES = (
    "accuracy",
    "sensitivity",
    "specificity",
    "ppv",
    "npv",
    "f1",
    "balanced_accuracy",
    "roc_auc",
    "pr_auc",
    "brier",
    "ece",
)

# Bootstrap replicates x cases processed at once (bounds memory of the weights).
_CHUNK_ELEMENTS = 4_000_000


# ----------------------------------------------------------------------------
# Input checks.
# ----------------------------------------------------------------------------


def _as_1d(x: Any, name: str) -> np.ndarray:
  a = np.asarray(x)
  if a.ndim == 2 and a.shape[1] == 1:
    a = a[:, 0]
  if a.ndim != 1:
    raise ValueError(f"{name} must be 1-D (N,), got shape {a.shape}")
  return a


def _check_labels(y: Any, name: str = "y") -> np.ndarray:
  y = _as_1d(y, name)
  if y.dtype == bool:
    return y.astype(np.int64)
  if not np.all((y == 0) | (y == 1)):
    bad = np.unique(y[(y != 0) & (y != 1)])[:5]
    raise ValueError(f"{name} must contain only 0/1 labels, found {bad.tolist()}")
  return y.astype(np.int64)


def _check_binary(y: Any, p: Any, *, probabilities: bool) -> tuple[np.ndarray, np.ndarray]:
  """Validates labels and scores; `probabilities` also requires p in [0, 1]."""
  y = _check_labels(y)
  p = _as_1d(p, "p").astype(np.float64)
  if y.shape != p.shape:
    raise ValueError(f"y and p must have the same length, got {y.shape[0]} and {p.shape[0]}")
  if not np.all(np.isfinite(p)):
    raise ValueError("p contains NaN or infinite values")
  if probabilities and p.size and (p.min() < 0.0 or p.max() > 1.0):
    raise ValueError(f"p must be probabilities in [0, 1], got range [{p.min()}, {p.max()}]")
  return y, p


def _div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
  """num / den elementwise with NaN where den == 0."""
  num = np.asarray(num, dtype=np.float64)
  den = np.asarray(den, dtype=np.float64)
  out = np.full(np.broadcast(num, den).shape, np.nan)
  np.divide(num, den, out=out, where=den != 0)
  return out


# ----------------------------------------------------------------------------
# Confusion counts.
# ----------------------------------------------------------------------------


def confusion_counts(y: Any, pred: Any) -> dict[str, int]:
  """Binary confusion counts: dict(tp, fp, tn, fn) for 0/1 labels and predictions."""
  y = _check_labels(y)
  pred = _check_labels(pred, "pred")
  if y.shape != pred.shape:
    raise ValueError(f"y and pred must have the same length, got {y.shape[0]} and {pred.shape[0]}")
  pos, hit = y == 1, pred == 1
  return {
      "tp": int(np.sum(pos & hit)),
      "fp": int(np.sum(~pos & hit)),
      "tn": int(np.sum(~pos & ~hit)),
      "fn": int(np.sum(pos & ~hit)),
  }


def confusion_matrix(y: Any, pred: Any, num_classes: int = 2) -> np.ndarray:
  """(K, K) int64 confusion matrix; rows = true class, columns = predicted."""
  y = _as_1d(y, "y").astype(np.int64)
  pred = _as_1d(pred, "pred").astype(np.int64)
  if y.shape != pred.shape:
    raise ValueError(f"y and pred must have the same length, got {y.shape[0]} and {pred.shape[0]}")
  for name, a in (("y", y), ("pred", pred)):
    if a.size and (a.min() < 0 or a.max() >= num_classes):
      raise ValueError(f"{name} must be in [0, {num_classes - 1}], got range [{a.min()}, {a.max()}]")
  flat = np.bincount(y * num_classes + pred, minlength=num_classes * num_classes)
  return flat.reshape(num_classes, num_classes)


# ----------------------------------------------------------------------------
# Weighted core (point estimates use unit weights; the bootstrap uses counts).
# ----------------------------------------------------------------------------


def _bin_index(p: np.ndarray, n_bins: int) -> np.ndarray:
  """Equal-width bin of each probability: [k/n, (k+1)/n), the last bin closed."""
  if n_bins < 1:
    raise ValueError(f"n_bins must be >= 1, got {n_bins}")
  edges = np.arange(n_bins + 1) / n_bins
  return np.clip(np.searchsorted(edges, p, side="right") - 1, 0, n_bins - 1)


class _ScoreBlocks:
  """Cases sorted by descending score, grouped into blocks of tied scores."""

  def __init__(self, y: np.ndarray, p: np.ndarray):
    self.order = np.argsort(-p, kind="stable")
    sorted_p = p[self.order]
    new_block = np.ones(p.size, dtype=bool)
    new_block[1:] = sorted_p[1:] != sorted_p[:-1]
    self.starts = np.flatnonzero(new_block)
    self.scores = sorted_p[self.starts]  # Distinct scores, descending.
    self.pos = (y[self.order] == 1).astype(np.float64)

  def block_sums(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positive and negative weight per score block: two (B, U) arrays."""
    ws = w[:, self.order]
    if ws.shape[1] == 0:
      empty = np.zeros((w.shape[0], 0))
      return empty, empty
    pos_w = np.add.reduceat(ws * self.pos, self.starts, axis=1)
    neg_w = np.add.reduceat(ws * (1.0 - self.pos), self.starts, axis=1)
    return pos_w, neg_w


def _auc_ap(blocks: _ScoreBlocks, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Weighted ROC AUC (Mann-Whitney, ties 1/2) and average precision, (B,) each."""
  pos_w, neg_w = blocks.block_sums(w)
  cum_pos = np.cumsum(pos_w, axis=1)
  cum_neg = np.cumsum(neg_w, axis=1)
  total_pos = cum_pos[:, -1] if cum_pos.shape[1] else np.zeros(w.shape[0])
  total_neg = cum_neg[:, -1] if cum_neg.shape[1] else np.zeros(w.shape[0])
  # Negatives scored strictly lower than the block, plus half of the tied ones.
  below = total_neg[:, None] - cum_neg + 0.5 * neg_w
  auc = _div(np.sum(pos_w * below, axis=1), total_pos * total_neg)
  precision = np.nan_to_num(_div(cum_pos, cum_pos + cum_neg))  # 0 only where pos_w is 0.
  ap = _div(np.sum(pos_w * precision, axis=1), total_pos)
  return auc, ap


def _weighted_binary(
    y: np.ndarray, p: np.ndarray, w: np.ndarray, threshold: float, n_bins: int,
    blocks: _ScoreBlocks | None = None,
) -> dict[str, np.ndarray]:
  """All binary metrics for each row of case weights w (B, N); values (B,)."""
  pos = y == 1
  hit = p >= threshold
  ind = np.stack([pos & hit, ~pos & hit, ~pos & ~hit, pos & ~hit], axis=1).astype(np.float64)
  tp, fp, tn, fn = (w @ ind).T
  n = tp + fp + tn + fn
  sens, spec = _div(tp, tp + fn), _div(tn, tn + fp)
  # ECE = sum_bins |sum(y) - sum(p)| / n over the cases of each bin.
  onehot = np.eye(n_bins)[_bin_index(p, n_bins)]
  gap = w @ (onehot * (y - p)[:, None])
  auc, ap = _auc_ap(blocks if blocks is not None else _ScoreBlocks(y, p), w)
  return {
      "accuracy": _div(tp + tn, n),
      "sensitivity": sens,
      "specificity": spec,
      "ppv": _div(tp, tp + fp),
      "npv": _div(tn, tn + fn),
      "f1": _div(2 * tp, 2 * tp + fp + fn),
      "balanced_accuracy": (sens + spec) / 2,
      "roc_auc": auc,
      "pr_auc": ap,
      "brier": _div(w @ (p - y) ** 2, n),
      "ece": _div(np.sum(np.abs(gap), axis=1), n),
      "tp": tp, "fp": fp, "tn": tn, "fn": fn, "n": n,
  }


# ----------------------------------------------------------------------------
# Binary metrics.
# ----------------------------------------------------------------------------


def binary_metrics(y: Any, p: Any, threshold: float = 0.5, *, n_bins: int = 10) -> dict[str, float]:
  """Threshold, ranking and calibration metrics of a binary classifier.

  Args:
    y: (N,) labels in {0, 1}.
    p: (N,) predicted probabilities of class 1.
    threshold: a case is predicted positive when p >= threshold.
    n_bins: equal-width bins of the expected calibration error.

  Returns:
    accuracy, sensitivity, specificity, ppv, npv, f1, balanced_accuracy,
    roc_auc, pr_auc, brier, ece (floats, NaN where undefined) and
    tp, fp, tn, fn, n (ints), threshold (float).
  """
  y, p = _check_binary(y, p, probabilities=True)
  out = _weighted_binary(y, p, np.ones((1, y.size)), threshold, n_bins)
  result: dict[str, float] = {k: float(v[0]) for k, v in out.items()}
  for k in ("tp", "fp", "tn", "fn", "n"):
    result[k] = int(round(result[k]))
  result["threshold"] = float(threshold)
  return result


def roc_curve(y: Any, p: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """ROC curve like sklearn's (drop_intermediate=False).

  Returns:
    fpr, tpr, thresholds: thresholds are the distinct scores in decreasing
    order preceded by +inf (the all-negative point); fpr/tpr[i] are the rates
    of `p >= thresholds[i]`. Rates are NaN when their class is absent.
  """
  y, p = _check_binary(y, p, probabilities=False)
  blocks = _ScoreBlocks(y, p)
  pos_w, neg_w = blocks.block_sums(np.ones((1, y.size)))
  tps = np.concatenate([[0.0], np.cumsum(pos_w[0])])
  fps = np.concatenate([[0.0], np.cumsum(neg_w[0])])
  thresholds = np.concatenate([[np.inf], blocks.scores])
  return _div(fps, fps[-1]), _div(tps, tps[-1]), thresholds


def roc_auc(y: Any, p: Any) -> float:
  """Area under the ROC curve (Mann-Whitney, ties 1/2); NaN if a class is absent."""
  y, p = _check_binary(y, p, probabilities=False)
  return float(_auc_ap(_ScoreBlocks(y, p), np.ones((1, y.size)))[0][0])


def average_precision(y: Any, p: Any) -> float:
  """Step-wise average precision (area under the PR curve); NaN without positives."""
  y, p = _check_binary(y, p, probabilities=False)
  return float(_auc_ap(_ScoreBlocks(y, p), np.ones((1, y.size)))[1][0])


# ----------------------------------------------------------------------------
# Calibration.
# ----------------------------------------------------------------------------


def calibration_bins(y: Any, p: Any, n_bins: int = 10) -> dict[str, np.ndarray]:
  """Reliability-diagram statistics over equal-width probability bins.

  Returns:
    bin_confidence (mean p), bin_accuracy (fraction of positives), both NaN in
    empty bins; bin_counts (int); bin_edges (n_bins + 1,).
  """
  y, p = _check_binary(y, p, probabilities=True)
  idx = _bin_index(p, n_bins)
  counts = np.bincount(idx, minlength=n_bins)
  return {
      "bin_confidence": _div(np.bincount(idx, weights=p, minlength=n_bins), counts),
      "bin_accuracy": _div(np.bincount(idx, weights=y.astype(np.float64), minlength=n_bins), counts),
      "bin_counts": counts,
      "bin_edges": np.arange(n_bins + 1) / n_bins,
  }


def expected_calibration_error(y: Any, p: Any, n_bins: int = 10) -> float:
  """ECE = sum_b (n_b / N) |accuracy_b - confidence_b| over non-empty bins."""
  bins = calibration_bins(y, p, n_bins)
  counts = bins["bin_counts"]
  total = counts.sum()
  if total == 0:
    return float("nan")
  full = counts > 0
  gaps = np.abs(bins["bin_accuracy"][full] - bins["bin_confidence"][full])
  return float(np.sum(counts[full] * gaps) / total)


def brier_score(y: Any, p: Any) -> float:
  """Mean squared error between probabilities and 0/1 labels."""
  y, p = _check_binary(y, p, probabilities=True)
  return float(np.mean((p - y) ** 2)) if y.size else float("nan")


# ----------------------------------------------------------------------------
# Operating points.
# ----------------------------------------------------------------------------


def youden_threshold(y: Any, p: Any) -> float:
  """Threshold t maximising sensitivity + specificity - 1 for pred = p >= t.

  Candidates are the distinct scores; ties go to the highest threshold.
  NaN when a class is absent.
  """
  fpr, tpr, thresholds = roc_curve(y, p)
  if thresholds.size < 2 or np.isnan(fpr[-1]) or np.isnan(tpr[-1]):
    return float("nan")
  j = tpr[1:] - fpr[1:]
  return float(thresholds[1:][np.argmax(j)])


def threshold_for_sensitivity(y: Any, p: Any, min_sensitivity: float) -> float:
  """Highest threshold t (a distinct score) with sensitivity of p >= t >= target.

  NaN when there are no positives.
  """
  if not 0.0 <= min_sensitivity <= 1.0:
    raise ValueError(f"min_sensitivity must be in [0, 1], got {min_sensitivity}")
  _, tpr, thresholds = roc_curve(y, p)
  if thresholds.size < 2 or np.isnan(tpr[-1]):
    return float("nan")
  ok = np.flatnonzero(tpr[1:] >= min_sensitivity - 1e-12)
  return float(thresholds[1:][ok[0]])


def operating_points(
    y_val: Any, p_val: Any, targets: Sequence[float] = (0.9, 0.95)
) -> dict[str, float]:
  """Thresholds chosen on validation data, to be applied to test data.

  Returns:
    {"default@0.5": 0.5, "youden": ..., "sens>=0.90": ..., ...}.
  """
  points = {"default@0.5": 0.5, "youden": youden_threshold(y_val, p_val)}
  for target in targets:
    points[f"sens>={target:.2f}"] = threshold_for_sensitivity(y_val, p_val, target)
  return points


# ----------------------------------------------------------------------------
# Bootstrap.
# ----------------------------------------------------------------------------


class BootstrapCI(tuple):
  """(point, lo, hi) that also carries n_used and n_boot.

  Unpacks as a 3-tuple: `point, lo, hi = bootstrap_ci(...)`.
  """

  n_used: int
  n_boot: int

  def __new__(cls, point: float, lo: float, hi: float, n_used: int, n_boot: int):
    self = super().__new__(cls, (point, lo, hi))
    self.n_used = n_used
    self.n_boot = n_boot
    return self

  @property
  def point(self) -> float:
    return self[0]

  @property
  def lo(self) -> float:
    return self[1]

  @property
  def hi(self) -> float:
    return self[2]

  def __repr__(self) -> str:
    return (f"BootstrapCI(point={self[0]!r}, lo={self[1]!r}, hi={self[2]!r}, "
            f"n_used={self.n_used}, n_boot={self.n_boot})")


class _Resampler:
  """Case- or group-level bootstrap draws, shared by all bootstrap functions.

  Each replicate draws M units (cases, or groups when `groups` is given) with
  replacement; a drawn group contributes all of its cases.
  """

  def __init__(self, n: int, groups: Any | None):
    if n == 0:
      raise ValueError("cannot bootstrap an empty set of cases")
    self.n = n
    if groups is None:
      self.unit_of_case = np.arange(n)
    else:
      groups = _as_1d(groups, "groups")
      if groups.shape[0] != n:
        raise ValueError(f"groups must have one id per case ({n}), got {groups.shape[0]}")
      _, self.unit_of_case = np.unique(groups, return_inverse=True)
      self.unit_of_case = self.unit_of_case.reshape(-1)
    self.m = int(self.unit_of_case.max()) + 1
    # Cases sorted by unit, with the start and size of each unit's run.
    self.case_order = np.argsort(self.unit_of_case, kind="stable")
    self.unit_size = np.bincount(self.unit_of_case, minlength=self.m)
    self.unit_start = np.concatenate([[0], np.cumsum(self.unit_size)[:-1]])

  def draws(self, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Yields (b, M) arrays of drawn unit ids, n_boot rows in all."""
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_ELEMENTS // max(self.n, 1))
    for start in range(0, n_boot, chunk):
      yield rng.integers(0, self.m, size=(min(chunk, n_boot - start), self.m))

  def case_indices(self, draw: np.ndarray) -> np.ndarray:
    """Case indices of one replicate (1-D draw of unit ids)."""
    sizes = self.unit_size[draw]
    offsets = np.arange(sizes.sum()) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    return self.case_order[np.repeat(self.unit_start[draw], sizes) + offsets]

  def case_weights(self, draws: np.ndarray) -> np.ndarray:
    """(b, N) multiplicity of each case in each replicate."""
    b = draws.shape[0]
    flat = (draws + self.m * np.arange(b)[:, None]).ravel()
    unit_counts = np.bincount(flat, minlength=b * self.m).reshape(b, self.m)
    return unit_counts[:, self.unit_of_case].astype(np.float64)


def _percentile_interval(values: np.ndarray, alpha: float) -> tuple[float, float, int]:
  valid = values[~np.isnan(values)]
  if valid.size == 0:
    return float("nan"), float("nan"), 0
  lo, hi = np.quantile(valid, [alpha / 2, 1 - alpha / 2])
  return float(lo), float(hi), int(valid.size)


def bootstrap_ci(
    y: Any,
    p: Any,
    metric_fn: Callable[[np.ndarray, np.ndarray], float],
    *,
    groups: Any | None = None,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> BootstrapCI:
  """Percentile bootstrap interval of metric_fn(y, p).

  Args:
    y, p: (N,) arrays passed (resampled) to metric_fn.
    metric_fn: f(y, p) -> float; NaN results (e.g. one class missing in a
      resample) are skipped.
    groups: optional (N,) patient ids: patients are resampled with
      replacement and each drawn patient contributes all of its cases.
    n_boot: number of resamples.
    alpha: 1 - coverage of the interval.
    seed: numpy Generator seed.

  Returns:
    BootstrapCI (point, lo, hi), with .n_used resamples that gave a number.
  """
  y = _as_1d(y, "y")
  p = np.asarray(p)
  if p.shape[0] != y.shape[0]:
    raise ValueError(f"y and p must have the same length, got {y.shape[0]} and {p.shape[0]}")
  point = float(metric_fn(y, p))
  sampler = _Resampler(y.shape[0], groups)
  values = []
  for draws in sampler.draws(n_boot, seed):
    for draw in draws:
      idx = sampler.case_indices(draw)
      values.append(float(metric_fn(y[idx], p[idx])))
  lo, hi, n_used = _percentile_interval(np.asarray(values, dtype=np.float64), alpha)
  return BootstrapCI(point, lo, hi, n_used, n_boot)


def mean_with_ci(values: Any, groups: Any | None = None, *, n_boot: int = 1000, alpha: float = 0.05,
                 seed: int = 0) -> dict[str, float]:
  """Mean of the finite ``values`` (per-case metrics; NaN = undefined for that case) with a percentile bootstrap
  CI resampling ``groups`` (patients, with all their cases): {"value", "lo", "hi", "n_used", "n_cases"}."""
  v = np.asarray(values, dtype=np.float64)
  ci = bootstrap_ci(np.zeros(len(v)), v, lambda _, x: float(np.nanmean(x)) if np.any(np.isfinite(x))
                    else float("nan"), groups=groups, n_boot=n_boot, alpha=alpha, seed=seed)
  return {"value": ci.point, "lo": ci.lo, "hi": ci.hi, "n_used": ci.n_used, "n_cases": int(np.sum(np.isfinite(v)))}


def metrics_with_ci(
    y: Any,
    p: Any,
    threshold: float = 0.5,
    groups: Any | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    *,
    alpha: float = 0.05,
    n_bins: int = 10,
) -> dict[str, dict[str, float]]:
  """Every metric of `binary_metrics` (METRIC_NAMES) with a bootstrap interval.

  Vectorised over resamples (resampling counts act as case weights); uses the
  same draws as `bootstrap_ci` with the same seed and groups.

  Returns:
    name -> {"value", "lo", "hi", "n_used"}.
  """
  y, p = _check_binary(y, p, probabilities=True)
  point = _weighted_binary(y, p, np.ones((1, y.size)), threshold, n_bins)
  sampler = _Resampler(y.size, groups)
  blocks = _ScoreBlocks(y, p)
  chunks = [
      _weighted_binary(y, p, sampler.case_weights(d), threshold, n_bins, blocks)
      for d in sampler.draws(n_boot, seed)
  ]
  out = {}
  for name in METRIC_NAMES:
    boot = np.concatenate([c[name] for c in chunks]) if chunks else np.zeros(0)
    lo, hi, n_used = _percentile_interval(boot, alpha)
    out[name] = {"value": float(point[name][0]), "lo": lo, "hi": hi, "n_used": n_used}
  return out


# ----------------------------------------------------------------------------
# Multi-class.
# ----------------------------------------------------------------------------


def _nanmean(x: np.ndarray) -> float:
  x = np.asarray(x, dtype=np.float64)
  return float(np.mean(x[~np.isnan(x)])) if np.any(~np.isnan(x)) else float("nan")


def quadratic_weighted_kappa(cm: np.ndarray) -> float:
  """Cohen's kappa with quadratic weights (i - j)^2 from a KxK confusion matrix."""
  cm = np.asarray(cm, dtype=np.float64)
  k = cm.shape[0]
  total = cm.sum()
  if total == 0:
    return float("nan")
  i, j = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
  weights = (i - j) ** 2
  expected = np.outer(cm.sum(1), cm.sum(0)) / total
  return float(1.0 - _div(np.sum(weights * cm), np.sum(weights * expected)))


def multiclass_metrics(y: Any, probs: Any) -> dict[str, Any]:
  """Metrics of a K-class classifier (prediction = argmax of probs).

  Args:
    y: (N,) labels in 0..K-1.
    probs: (N, K) class probabilities (or any scores, for the AUCs).

  Returns:
    accuracy; per-class lists sensitivity, specificity, ppv, f1, roc_auc
    (one-vs-rest); macro_* averages over classes where defined;
    quadratic_kappa (for ordinal grades); confusion_matrix (list of lists,
    rows = true); num_classes; n.
  """
  probs = np.asarray(probs, dtype=np.float64)
  if probs.ndim != 2 or probs.shape[1] < 2:
    raise ValueError(f"probs must have shape (N, K) with K >= 2, got {probs.shape}")
  if not np.all(np.isfinite(probs)):
    raise ValueError("probs contains NaN or infinite values")
  y = _as_1d(y, "y")
  if y.shape[0] != probs.shape[0]:
    raise ValueError(f"y and probs must have the same length, got {y.shape[0]} and {probs.shape[0]}")
  k = probs.shape[1]
  y = y.astype(np.int64)
  cm = confusion_matrix(y, np.argmax(probs, axis=1), num_classes=k)
  tp = np.diag(cm).astype(np.float64)
  fn = cm.sum(1) - tp
  fp = cm.sum(0) - tp
  tn = cm.sum() - tp - fn - fp
  per_class = {
      "sensitivity": _div(tp, tp + fn),
      "specificity": _div(tn, tn + fp),
      "ppv": _div(tp, tp + fp),
      "f1": _div(2 * tp, 2 * tp + fp + fn),
      "roc_auc": np.array([roc_auc(y == c, probs[:, c]) for c in range(k)]),
  }
  out: dict[str, Any] = {"accuracy": float(_div(tp.sum(), cm.sum()))}
  for name, values in per_class.items():
    out[name] = values.tolist()
    out[f"macro_{name}"] = _nanmean(values)
  out["quadratic_kappa"] = quadratic_weighted_kappa(cm)
  out["confusion_matrix"] = cm.tolist()
  out["num_classes"] = k
  out["n"] = int(y.size)
  return out


# ----------------------------------------------------------------------------
# Segmentation.
# ----------------------------------------------------------------------------


def _check_masks(pred: Any, true: Any) -> tuple[np.ndarray, np.ndarray]:
  pred = np.asarray(pred).astype(bool)
  true = np.asarray(true).astype(bool)
  if pred.shape != true.shape:
    raise ValueError(f"pred and true masks must have the same shape, got {pred.shape} and {true.shape}")
  return pred, true


def dice(pred: Any, true: Any) -> float:
  """Dice = 2|A & B| / (|A| + |B|) of binary masks; 1.0 when both are empty."""
  pred, true = _check_masks(pred, true)
  den = pred.sum() + true.sum()
  return 1.0 if den == 0 else float(2.0 * np.sum(pred & true) / den)


def iou(pred: Any, true: Any) -> float:
  """Intersection over union (Jaccard) of binary masks; 1.0 when both are empty."""
  pred, true = _check_masks(pred, true)
  union = np.sum(pred | true)
  return 1.0 if union == 0 else float(np.sum(pred & true) / union)


def _surface(mask: np.ndarray) -> np.ndarray:
  """Voxels of the mask with a face neighbour outside it (array edge = outside)."""
  structure = ndimage.generate_binary_structure(mask.ndim, 1)
  return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def hausdorff95(pred: Any, true: Any, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> float:
  """95th-percentile symmetric Hausdorff distance between mask surfaces.

  The maximum of the two directed 95th percentiles of surface-to-surface
  distances (as MONAI's HausdorffDistanceMetric(percentile=95)), in the
  units of `spacing` (one value per axis). 0 when both masks are empty,
  inf when exactly one is.
  """
  pred, true = _check_masks(pred, true)
  spacing = tuple(float(s) for s in spacing)
  if len(spacing) != pred.ndim:
    raise ValueError(f"spacing has {len(spacing)} values for masks with {pred.ndim} dims")
  if not pred.any() and not true.any():
    return 0.0
  if not pred.any() or not true.any():
    return float("inf")
  surf_pred, surf_true = _surface(pred), _surface(true)
  dist_to_true = ndimage.distance_transform_edt(~surf_true, sampling=spacing)
  dist_to_pred = ndimage.distance_transform_edt(~surf_pred, sampling=spacing)
  d_pt = np.percentile(dist_to_true[surf_pred], 95)
  d_tp = np.percentile(dist_to_pred[surf_true], 95)
  return float(max(d_pt, d_tp))


# ----------------------------------------------------------------------------
# Paired comparison of two classifiers on the same cases (DeLong; paired bootstrap).
# ----------------------------------------------------------------------------


def delong_components(y: Any, scores: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """DeLong's structural components of K scores on the same cases (DeLong, DeLong & Clarke-Pearson,
  Biometrics 1988), computed from midranks (Sun & Xu, IEEE Signal Process. Lett. 2014).

  Args:
    y: (N,) labels in {0, 1}.
    scores: (K, N) or (N,) scores (higher = more likely positive).

  Returns:
    aucs (K,), v10 (K, m) and v01 (K, n): for positive i, v10[k, i] is the fraction of negatives it outscores
    (ties 1/2); for negative j, v01[k, j] the fraction of positives that outscore it. mean(v10) = mean(v01) = AUC.
  """
  from scipy import stats
  y = _check_labels(y)
  s = np.atleast_2d(np.asarray(scores, dtype=np.float64))
  if s.shape[1] != y.size:
    raise ValueError(f"scores must have one column per case ({y.size}), got shape {s.shape}")
  pos, neg = y == 1, y == 0
  m, n = int(pos.sum()), int(neg.sum())
  if m == 0 or n == 0:
    raise ValueError(f"DeLong needs both classes, got {m} positive and {n} negative cases")
  r_all = stats.rankdata(s, axis=1)
  r_pos = stats.rankdata(s[:, pos], axis=1)
  r_neg = stats.rankdata(s[:, neg], axis=1)
  v10 = (r_all[:, pos] - r_pos) / n
  v01 = 1.0 - (r_all[:, neg] - r_neg) / m
  return v10.mean(axis=1), v10, v01


def delong_covariance(y: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
  """(aucs (K,), their (K, K) covariance) by DeLong's method: S10 / m + S01 / n."""
  aucs, v10, v01 = delong_components(y, scores)
  s10 = np.atleast_2d(np.cov(v10)) if v10.shape[1] > 1 else np.zeros((len(aucs), len(aucs)))
  s01 = np.atleast_2d(np.cov(v01)) if v01.shape[1] > 1 else np.zeros((len(aucs), len(aucs)))
  return aucs, s10 / v10.shape[1] + s01 / v01.shape[1]


def delong_test(y: Any, p_a: Any, p_b: Any, *, alpha: float = 0.05) -> dict[str, float]:
  """DeLong's test of two correlated ROC curves (two scores of the same cases).

  Returns auc_a, auc_b, diff (= auc_a - auc_b), se, lo/hi (Wald interval at 1 - alpha), z and the two-sided
  p_value (NaN when both scores rank every pair alike, se = 0), n_positive, n_negative. Cases are assumed
  independent: with several studies per patient, also read `paired_bootstrap_auc` (patients resampled).
  """
  from scipy import stats
  aucs, cov = delong_covariance(y, np.stack([np.asarray(p_a, float), np.asarray(p_b, float)]))
  diff = float(aucs[0] - aucs[1])
  var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
  se = math.sqrt(max(var, 0.0))
  zq = float(stats.norm.ppf(1 - alpha / 2))
  z = diff / se if se > 0 else float("nan")
  y = _check_labels(y)
  return {"auc_a": float(aucs[0]), "auc_b": float(aucs[1]), "diff": diff, "se": se,
          "lo": diff - zq * se, "hi": diff + zq * se, "z": z,
          "p_value": float(2 * stats.norm.sf(abs(z))) if se > 0 else float("nan"),
          "n_positive": int(np.sum(y == 1)), "n_negative": int(np.sum(y == 0))}


def paired_bootstrap_auc(y: Any, p_a: Any, p_b: Any, *, groups: Any | None = None, n_boot: int = 2000,
                         seed: int = 0, alpha: float = 0.05) -> dict[str, float]:
  """Paired bootstrap of the AUC difference: the same resampled cases (or patients, ``groups``) score both.

  ``p_a`` and ``p_b`` are (N,) or (S, N): S runs (seeds) of each side on the same N cases; the statistic is
  mean over a's runs of their AUC minus the same for b. Returns diff, lo, hi (percentile interval), p_value
  (two-sided: twice the smaller share of replicates on either side of 0, at least 1 / n_used), n_used.
  The interval covers the test cases' sampling only, not the training seeds' spread.
  """
  y = _check_labels(y)
  a, b = np.atleast_2d(np.asarray(p_a, float)), np.atleast_2d(np.asarray(p_b, float))
  if a.shape[1] != y.size or b.shape[1] != y.size:
    raise ValueError(f"p_a and p_b must hold one score per case ({y.size}), got {a.shape} and {b.shape}")
  blocks_a = [_ScoreBlocks(y, row) for row in a]
  blocks_b = [_ScoreBlocks(y, row) for row in b]

  def stat(w: np.ndarray) -> np.ndarray:
    return (np.mean([_auc_ap(blk, w)[0] for blk in blocks_a], axis=0)
            - np.mean([_auc_ap(blk, w)[0] for blk in blocks_b], axis=0))
  point = float(stat(np.ones((1, y.size)))[0])
  sampler = _Resampler(y.size, groups)
  boot = np.concatenate([stat(sampler.case_weights(d)) for d in sampler.draws(n_boot, seed)])
  lo, hi, n_used = _percentile_interval(boot, alpha)
  valid = boot[~np.isnan(boot)]
  p = (min(1.0, max(2 * min(np.mean(valid <= 0), np.mean(valid >= 0)), 1.0 / valid.size))
       if valid.size else float("nan"))
  return {"diff": point, "lo": lo, "hi": hi, "p_value": float(p), "n_used": n_used, "n_boot": n_boot}


# ----------------------------------------------------------------------------
# Decision curve analysis (Vickers & Elkin, Med Decis Making 26(6):565-574, 2006).
# ----------------------------------------------------------------------------

# Threshold probabilities of a decision curve: 1%, 2%, ..., 99%.
DCA_THRESHOLDS = tuple(round(0.01 * k, 2) for k in range(1, 100))


def _check_thresholds(thresholds: Any) -> np.ndarray:
  t = np.asarray(thresholds, dtype=np.float64).reshape(-1)
  if t.size == 0 or np.any(~np.isfinite(t)) or np.any(t <= 0) or np.any(t >= 1):
    raise ValueError(f"threshold probabilities must lie in (0, 1), got {t.tolist()[:5]}")
  return t


def _weighted_net_benefit(y: np.ndarray, p: np.ndarray, w: np.ndarray, t: np.ndarray
                          ) -> tuple[np.ndarray, np.ndarray]:
  """Net benefit of the model and of treating all, (B, T) each, for case weights w (B, N)."""
  pos = (y == 1)[:, None]
  hit = p[:, None] >= t[None, :]
  tp = w @ (hit & pos).astype(np.float64)
  fp = w @ (hit & ~pos).astype(np.float64)
  n = w.sum(axis=1)[:, None]
  n_pos = (w @ pos.astype(np.float64))
  odds = t / (1.0 - t)
  model = _div(tp, n) - _div(fp, n) * odds
  treat_all = _div(n_pos, n) - _div(n - n_pos, n) * odds
  return model, treat_all


def net_benefit(y: Any, p: Any, threshold: float) -> float:
  """Net benefit of acting on ``p >= threshold``: TP/N - FP/N * t / (1 - t) (Vickers & Elkin 2006).

  The threshold probability t is the risk at which a clinician is indifferent between acting and not:
  one false positive is worth t / (1 - t) true positives. NaN for an empty set.
  """
  y, p = _check_binary(y, p, probabilities=True)
  t = _check_thresholds([threshold])
  return float(_weighted_net_benefit(y, p, np.ones((1, y.size)), t)[0][0, 0])


def decision_curve(y: Any, p: Any, thresholds: Sequence[float] = DCA_THRESHOLDS, *, groups: Any | None = None,
                   n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict[str, Any]:
  """Net benefit of the model, of treating all and of treating none over threshold probabilities, with
  percentile bootstrap intervals (patients resampled when ``groups`` is given).

  Returns:
    thresholds (T,); model, treat_all, advantage: each {"value", "lo", "hi"} lists of T, where advantage is
    the model's net benefit minus the better of treat-all and treat-none (the interval is of that difference,
    per draw); treat_none: T zeros; prevalence; n.
  """
  y, p = _check_binary(y, p, probabilities=True)
  t = _check_thresholds(thresholds)
  model, treat_all = _weighted_net_benefit(y, p, np.ones((1, y.size)), t)
  sampler = _Resampler(y.size, groups)
  boots = [_weighted_net_benefit(y, p, sampler.case_weights(d), t) for d in sampler.draws(n_boot, seed)]
  bm = np.concatenate([b[0] for b in boots]) if boots else np.zeros((0, t.size))
  ba = np.concatenate([b[1] for b in boots]) if boots else np.zeros((0, t.size))

  def interval(point: np.ndarray, boot: np.ndarray) -> dict[str, list[float]]:
    lo_hi = [_percentile_interval(boot[:, j], alpha)[:2] for j in range(t.size)]
    return {"value": point.tolist(), "lo": [a for a, _ in lo_hi], "hi": [b for _, b in lo_hi]}

  advantage = model[0] - np.maximum(treat_all[0], 0.0)
  return {"thresholds": t.tolist(), "model": interval(model[0], bm), "treat_all": interval(treat_all[0], ba),
          "treat_none": [0.0] * t.size, "advantage": interval(advantage, bm - np.maximum(ba, 0.0)),
          "prevalence": float(np.mean(y)) if y.size else float("nan"), "n": int(y.size), "n_boot": int(n_boot)}


# ----------------------------------------------------------------------------
# Recalibration: temperature scaling (Guo et al., ICML 2017), fitted on validation.
# ----------------------------------------------------------------------------

_PROB_EPS = 1e-7  # float32 sigmoid saturates near 1 - 6e-8: logits of stored probabilities are clipped to +-16


def logits_of(p: Any) -> np.ndarray:
  """Logits recovered from probabilities: log(p / (1 - p)) for (N,) P(class 1), log p for (N, K) (softmax
  logits up to a constant per case, which softmax ignores). Probabilities are clipped to [1e-7, 1 - 1e-7]."""
  p = np.clip(np.asarray(p, dtype=np.float64), _PROB_EPS, 1.0 - _PROB_EPS)
  return np.log(p) - np.log1p(-p) if p.ndim == 1 else np.log(p)


def apply_temperature(logits: Any, temperature: float) -> np.ndarray:
  """Probabilities of ``logits / temperature``: sigmoid for (N,), softmax over the last axis for (N, K)."""
  if not (np.isfinite(temperature) and temperature > 0):
    raise ValueError(f"temperature must be a positive number, got {temperature}")
  z = np.asarray(logits, dtype=np.float64) / temperature
  if z.ndim == 1:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # sigmoid without overflow
  z = z - z.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=-1, keepdims=True)


def _nll(y: np.ndarray, logits: np.ndarray, temperature: float) -> float:
  z = logits / temperature
  if z.ndim == 1:  # -[y log s(z) + (1 - y) log(1 - s(z))] = softplus(z) - y z
    return float(np.mean(np.logaddexp(0.0, z) - y * z))
  z = z - z.max(axis=-1, keepdims=True)
  return float(np.mean(np.log(np.exp(z).sum(axis=-1)) - z[np.arange(len(y)), y]))


def fit_temperature(y: Any, logits: Any, *, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
  """The temperature T > 0 minimising the negative log-likelihood of ``logits / T`` on labels ``y``.

  Binary: (N,) logits of class 1 and 0/1 labels; multi-class: (N, K) logits and labels in 0..K-1. T > 1
  softens over-confident outputs, T < 1 sharpens; ranking (AUC) is unchanged. The NLL is convex in 1/T; it is
  minimised over log T within ``bounds``. NaN when ``y`` is empty or holds one class only (nothing to fit).
  """
  from scipy import optimize
  logits = np.asarray(logits, dtype=np.float64)
  y = _as_1d(y, "y").astype(np.int64)
  if logits.shape[0] != y.shape[0]:
    raise ValueError(f"y and logits must have the same length, got {y.shape[0]} and {logits.shape[0]}")
  if not np.all(np.isfinite(logits)):
    raise ValueError("logits contain NaN or infinite values")
  if y.size == 0 or np.unique(y).size < 2:
    return float("nan")
  res = optimize.minimize_scalar(lambda log_t: _nll(y, logits, math.exp(log_t)),
                                 bounds=(math.log(bounds[0]), math.log(bounds[1])), method="bounded",
                                 options={"xatol": 1e-6})
  return float(math.exp(res.x))


# ----------------------------------------------------------------------------- strict JSON

JSON_NULL_NOTE = ("null marks a value that is undefined for these data (e.g. ROC-AUC of a split with one class, "
                  "HD95 with nothing predicted); strict JSON has no not-a-number value.")


# ----------------------------------------------------------------------------
# Continuous targets and ordinal ratings (pure numpy; feed them to bootstrap_ci).
# ----------------------------------------------------------------------------


def _pair(y: Any, p: Any) -> tuple[np.ndarray, np.ndarray]:
  y, p = np.asarray(y, np.float64).ravel(), np.asarray(p, np.float64).ravel()
  if y.shape != p.shape:
    raise ValueError(f"y and p must have the same length, got {y.size} and {p.size}")
  return y, p


def mae(y: Any, p: Any) -> float:
  """Mean absolute error (NaN for no cases)."""
  y, p = _pair(y, p)
  return float(np.mean(np.abs(p - y))) if y.size else float("nan")


def rmse(y: Any, p: Any) -> float:
  y, p = _pair(y, p)
  return float(np.sqrt(np.mean((p - y) ** 2))) if y.size else float("nan")


def pearson(y: Any, p: Any) -> float:
  """Pearson's r; NaN when either side is constant (or fewer than 2 cases)."""
  y, p = _pair(y, p)
  if y.size < 2 or np.ptp(y) == 0 or np.ptp(p) == 0:
    return float("nan")
  yc, pc = y - y.mean(), p - p.mean()
  return float(np.sum(yc * pc) / np.sqrt(np.sum(yc ** 2) * np.sum(pc ** 2)))


def spearman(y: Any, p: Any) -> float:
  """Spearman's rho: Pearson's r of the ranks, ties given their average rank (as scipy.stats.spearmanr)."""
  from scipy import stats
  y, p = _pair(y, p)
  return pearson(stats.rankdata(y), stats.rankdata(p)) if y.size >= 2 else float("nan")


def exact_agreement(y: Any, p: Any) -> float:
  """Share of cases whose rounded prediction equals the (integer) rating."""
  y, p = _pair(y, p)
  return float(np.mean(np.rint(p) == np.rint(y))) if y.size else float("nan")


def within_one(y: Any, p: Any) -> float:
  """Share of cases whose rounded prediction is at most one level from the rating."""
  y, p = _pair(y, p)
  return float(np.mean(np.abs(np.rint(p) - np.rint(y)) <= 1)) if y.size else float("nan")


def weighted_kappa(y: Any, p: Any, levels: Sequence[int], weights: str = "quadratic") -> float:
  """Cohen's weighted kappa between ratings ``y`` and rounded predictions ``p`` over the rating ``levels``
  (e.g. range(1, 6)): weights (i - j)^2 ("quadratic") or |i - j| ("linear"); NaN when undefined."""
  y, p = _pair(y, p)
  levels = np.asarray(list(levels))
  k = len(levels)
  if y.size == 0 or k < 2:
    return float("nan")
  idx = lambda v: np.clip(np.searchsorted(levels, np.rint(v)), 0, k - 1)  # noqa: E731
  cm = np.zeros((k, k))
  np.add.at(cm, (idx(y), idx(p)), 1)
  if weights == "quadratic":
    return quadratic_weighted_kappa(cm)
  if weights != "linear":
    raise ValueError(f"weights must be 'quadratic' or 'linear', got {weights!r}")
  i, j = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
  w = np.abs(i - j)
  expected = np.outer(cm.sum(1), cm.sum(0)) / cm.sum()
  return float(1.0 - _div(np.sum(w * cm), np.sum(w * expected)))


# ----------------------------------------------------------------------------
# Per patient.
# ----------------------------------------------------------------------------


def patient_level(prob: Sequence[float], label: Sequence[int], patient_id: Sequence[Any]
                  ) -> dict[str, np.ndarray]:
  """Per-nodule (per-study) scores -> per-patient scores: max over a patient's studies.

  A patient is positive when any of its studies is (max of labels) and scores the
  highest probability among its studies (a patient with one malignant nodule is a
  malignant patient). Pure numpy; feed the result to the same metrics as per-study.

  Returns:
    dict(patient_id=object (P,) str sorted, prob=float64 (P,), label=int32 (P,),
    count=int32 (P,) studies per patient).
  """
  prob = np.asarray(prob, dtype=np.float64)
  label = np.asarray(label)
  pids = np.asarray([p.decode() if isinstance(p, bytes) else str(p) for p in patient_id], dtype=object)
  if not (len(prob) == len(label) == len(pids)):
    raise ValueError(f"prob, label and patient_id differ in length: {len(prob)}, {len(label)}, {len(pids)}")
  uniq, inverse = np.unique(pids.astype(str), return_inverse=True)
  p_prob = np.full(len(uniq), -np.inf)
  np.maximum.at(p_prob, inverse, prob)
  p_label = np.zeros(len(uniq), np.int64)
  np.maximum.at(p_label, inverse, label.astype(np.int64))
  out_ids = np.empty(len(uniq), dtype=object)
  out_ids[:] = [str(u) for u in uniq]
  return dict(patient_id=out_ids, prob=p_prob, label=p_label.astype(np.int32),
              count=np.bincount(inverse, minlength=len(uniq)).astype(np.int32))


def json_safe(obj: Any) -> Any:
  """numpy -> Python, NaN/inf -> None, recursively: output for ``json.dump(..., allow_nan=False)``."""
  if isinstance(obj, dict):
    return {str(k): json_safe(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [json_safe(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return json_safe(obj.tolist())
  if isinstance(obj, np.generic):
    obj = obj.item()
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  return obj


def null_to_nan(obj: Any) -> Any:
  """The inverse of `json_safe` for readers: eval_<split>.json writes undefined values as null; compute with NaN."""
  if isinstance(obj, dict):
    return {k: null_to_nan(v) for k, v in obj.items()}
  if isinstance(obj, list):
    return [null_to_nan(v) for v in obj]
  return float("nan") if obj is None else obj
