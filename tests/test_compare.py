"""Paired comparison of two classifiers: DeLong's test and the paired (patient) bootstrap (lungct.metrics), and
`python -m experiments.compare` on two workdirs' predictions."""
import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from lungct import metrics


def _brute_components(y, s):
  """DeLong's structural components straight from the U-statistic kernel psi(x, y) = [x > y] + [x == y] / 2."""
  x, z = s[y == 1], s[y == 0]
  psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])
  return psi.mean(), psi.mean(axis=1), psi.mean(axis=0)


def _brute_delong(y, a, b):
  """Var(AUC_a - AUC_b) written out from DeLong et al. (1988), eq. for the two-test case."""
  auc_a, v10a, v01a = _brute_components(y, a)
  auc_b, v10b, v01b = _brute_components(y, b)
  m, n = len(v10a), len(v01a)
  s10 = lambda u, v, cu, cv: np.sum((u - cu) * (v - cv)) / (m - 1)  # noqa: E731
  s01 = lambda u, v, cu, cv: np.sum((u - cu) * (v - cv)) / (n - 1)  # noqa: E731
  var = (s10(v10a, v10a, auc_a, auc_a) + s10(v10b, v10b, auc_b, auc_b) - 2 * s10(v10a, v10b, auc_a, auc_b)) / m \
      + (s01(v01a, v01a, auc_a, auc_a) + s01(v01b, v01b, auc_b, auc_b) - 2 * s01(v01a, v01b, auc_a, auc_b)) / n
  return auc_a - auc_b, var


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_delong_components_match_the_u_statistic_with_ties(seed):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 2, 57)
  y[:2] = [0, 1]
  s = np.round(rng.normal(size=(3, 57)) + y, 1)  # rounding makes many ties, within and across classes
  aucs, v10, v01 = metrics.delong_components(y, s)
  for k in range(3):
    auc, b10, b01 = _brute_components(y, s[k])
    assert aucs[k] == pytest.approx(auc, abs=1e-12) and aucs[k] == pytest.approx(roc_auc_score(y, s[k]), abs=1e-12)
    np.testing.assert_allclose(v10[k], b10, atol=1e-12)
    np.testing.assert_allclose(v01[k], b01, atol=1e-12)
    assert v01[k].mean() == pytest.approx(auc, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_delong_test_matches_the_brute_force_formula(seed):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 2, 80)
  common = rng.normal(size=80)
  a = np.round(common + 1.2 * y + 0.5 * rng.normal(size=80), 2)
  b = np.round(common + 0.6 * y + 0.5 * rng.normal(size=80), 2)
  out = metrics.delong_test(y, a, b)
  diff, var = _brute_delong(y, a, b)
  assert out["diff"] == pytest.approx(diff, abs=1e-12)
  assert out["se"] == pytest.approx(np.sqrt(var), rel=1e-10)
  z = diff / np.sqrt(var)
  assert out["z"] == pytest.approx(z, rel=1e-10)
  assert out["p_value"] == pytest.approx(2 * stats.norm.sf(abs(z)), rel=1e-10)
  assert out["lo"] == pytest.approx(diff - 1.959963984540054 * np.sqrt(var), abs=1e-10)
  # Swapping the two scores flips the sign, not the p-value.
  rev = metrics.delong_test(y, b, a)
  assert rev["diff"] == pytest.approx(-out["diff"]) and rev["p_value"] == pytest.approx(out["p_value"])


def _binormal(rng, n_sims, n, shift_a, shift_b, rho=0.6):
  """n_sims data sets of n cases (half positive), two scores correlated rho within each case."""
  y = np.tile(np.r_[np.zeros(n // 2), np.ones(n - n // 2)].astype(int), (n_sims, 1))
  z1, z2 = rng.normal(size=(2, n_sims, n))
  a = z1 + shift_a * y
  b = rho * z1 + np.sqrt(1 - rho ** 2) * z2 + shift_b * y
  return y, a, b


def test_delong_variance_and_p_value_hold_over_simulated_data_sets():
  """The DeLong variance of AUC_a - AUC_b matches the spread of the difference over 2000 simulated studies,
  and under the null (equal AUCs) the test rejects at 5% about 5% of the time."""
  rng = np.random.default_rng(0)
  y, a, b = _binormal(rng, 2000, 60, 1.0, 0.5)
  res = [metrics.delong_test(y[i], a[i], b[i]) for i in range(2000)]
  diffs = np.array([r["diff"] for r in res])
  mean_var = np.mean([r["se"] ** 2 for r in res])
  assert mean_var == pytest.approx(np.var(diffs, ddof=1), rel=0.12)
  true_diff = stats.norm.cdf(1.0 / np.sqrt(2)) - stats.norm.cdf(0.5 / np.sqrt(2))  # binormal AUCs
  assert np.mean(diffs) == pytest.approx(true_diff, abs=0.01)
  covered = np.mean([(r["lo"] <= true_diff <= r["hi"]) for r in res])
  assert 0.92 <= covered <= 0.975
  y, a, b = _binormal(rng, 2000, 60, 0.8, 0.8)
  p = np.array([metrics.delong_test(y[i], a[i], b[i])["p_value"] for i in range(2000)])
  assert 0.03 <= np.mean(p < 0.05) <= 0.07


def test_delong_needs_both_classes():
  with pytest.raises(ValueError, match="both classes"):
    metrics.delong_test([1, 1, 1], [0.1, 0.2, 0.3], [0.3, 0.2, 0.1])


def test_paired_bootstrap_agrees_with_delong_on_independent_cases():
  rng = np.random.default_rng(3)
  y, a, b = _binormal(rng, 1, 200, 1.0, 0.5)
  d = metrics.delong_test(y[0], a[0], b[0])
  boot = metrics.paired_bootstrap_auc(y[0], a[0], b[0], n_boot=2000, seed=0)
  assert boot["diff"] == pytest.approx(d["diff"], abs=1e-12)
  assert (boot["hi"] - boot["lo"]) == pytest.approx(d["hi"] - d["lo"], rel=0.15)
  assert boot["p_value"] == pytest.approx(d["p_value"], abs=0.03)
  same = metrics.paired_bootstrap_auc(y[0], a[0], a[0], n_boot=200)
  assert same["diff"] == 0 and same["lo"] == 0 and same["hi"] == 0 and same["p_value"] == 1.0


def test_patient_bootstrap_is_not_fooled_by_repeated_studies():
  """Each patient's case copied 3 times: DeLong (cases independent) shrinks its interval by about sqrt(3), the
  patient bootstrap keeps the interval of the original patients."""
  rng = np.random.default_rng(4)
  y, a, b = _binormal(rng, 1, 120, 1.0, 0.4)
  y, a, b = y[0], a[0], b[0]
  rep = lambda x: np.repeat(x, 3)  # noqa: E731
  groups = rep(np.arange(120))
  once = metrics.paired_bootstrap_auc(y, a, b, n_boot=2000, seed=0)
  per_patient = metrics.paired_bootstrap_auc(rep(y), rep(a), rep(b), groups=groups, n_boot=2000, seed=0)
  naive = metrics.delong_test(rep(y), rep(a), rep(b))
  assert per_patient["diff"] == pytest.approx(once["diff"], abs=1e-12)
  width = lambda r: r["hi"] - r["lo"]  # noqa: E731
  # The same seed draws the same 120 patient ids: exactly the interval of the original cases.
  assert per_patient["lo"] == pytest.approx(once["lo"], abs=1e-12) and per_patient["hi"] == pytest.approx(once["hi"], abs=1e-12)
  assert width(naive) < 0.7 * width(per_patient)


def test_paired_bootstrap_averages_the_runs_of_each_side():
  rng = np.random.default_rng(5)
  y = rng.integers(0, 2, 40)
  y[:2] = [0, 1]
  a = rng.normal(size=(3, 40)) + y
  b = rng.normal(size=(2, 40)) + 0.3 * y
  out = metrics.paired_bootstrap_auc(y, a, b, n_boot=100)
  expected = np.mean([roc_auc_score(y, r) for r in a]) - np.mean([roc_auc_score(y, r) for r in b])
  assert out["diff"] == pytest.approx(expected, abs=1e-12)
  assert out["lo"] <= out["diff"] <= out["hi"] and out["n_used"] == 100


# ----------------------------------------------------------------------------- python -m experiments.compare

def _write_run(path, y, p, patients):
  import csv
  path.mkdir(parents=True, exist_ok=True)
  with open(path / "predictions_test.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["study_id", "patient_id", "label", "probability", "prediction", "threshold"])
    for i in np.random.default_rng(len(str(path))).permutation(len(y)):  # each file in its own order
      w.writerow([f"s{i:03d}", patients[i], int(y[i]), f"{p[i]:.6f}", int(p[i] >= 0.5), 0.5])


def test_compare_two_ablation_variants_over_seeds(tmp_path):
  from experiments import compare
  rng = np.random.default_rng(0)
  n = 90
  y = (np.arange(n) % 3 == 0).astype(int)
  patients = [f"p{i // 2}" for i in range(n)]
  shared = rng.normal(size=n)
  a = [1 / (1 + np.exp(-(shared + 2.0 * y + 0.4 * rng.normal(size=n)))) for _ in range(3)]
  b = [1 / (1 + np.exp(-(shared + 0.7 * y + 0.4 * rng.normal(size=n)))) for _ in range(3)]
  for s in range(3):
    _write_run(tmp_path / "A" / f"seed_{s}", y, a[s], patients)
    _write_run(tmp_path / "B" / f"seed_{s}", y, b[s], patients)
  out = compare.main([str(tmp_path / "A"), str(tmp_path / "B"), "--n-boot", "500",
                      "--json", str(tmp_path / "cmp.json")])
  yy, pa = y, np.round(a, 6)
  assert out["n_studies"] == n and out["n_patients"] == 45 and len(out["delong"]) == 3
  assert out["a"]["auc"] == pytest.approx([roc_auc_score(yy, r) for r in pa], abs=1e-12)
  d0 = metrics.delong_test(y, np.round(a[0], 6), np.round(b[0], 6))
  assert out["delong"][0]["diff"] == pytest.approx(d0["diff"]) and out["delong"][0]["p_value"] == pytest.approx(d0["p_value"])
  per_seed = [roc_auc_score(y, np.round(a[s], 6)) - roc_auc_score(y, np.round(b[s], 6)) for s in range(3)]
  assert out["bootstrap"]["diff"] == pytest.approx(np.mean(per_seed), abs=1e-12)
  assert out["seeds"]["diff_sd"] == pytest.approx(np.std(per_seed, ddof=1), abs=1e-12)
  assert out["bootstrap"]["lo"] > 0 and out["bootstrap"]["p_value"] < 0.01  # A is clearly better here
  assert "difference +" in compare.summary_line(out)
  # A against itself: no difference.
  same = compare.compare(str(tmp_path / "A"), str(tmp_path / "A"), n_boot=100)
  assert same["bootstrap"]["diff"] == 0 and same["bootstrap"]["p_value"] == 1.0


def test_compare_refuses_runs_on_other_studies(tmp_path):
  from experiments import compare
  y = np.array([0, 1] * 10)
  _write_run(tmp_path / "A", y, np.linspace(0, 1, 20), [f"p{i}" for i in range(20)])
  _write_run(tmp_path / "B", y[:18], np.linspace(0, 1, 18), [f"p{i}" for i in range(18)])
  with pytest.raises(compare.CompareError, match="other studies"):
    compare.compare(str(tmp_path / "A"), str(tmp_path / "B"))
  (tmp_path / "C").mkdir()
  (tmp_path / "C" / "metrics.json").write_text("{}")
  with pytest.raises(compare.CompareError, match="run --mode=eval on it first"):
    compare.compare(str(tmp_path / "A"), str(tmp_path / "C"))
