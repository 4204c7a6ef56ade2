"""Paired comparison of two models on the same test studies: is the AUC difference more than noise?

    python -m experiments.compare <A> <B> [--split test] [--n-boot 2000] [--json out.json]

A and B are each one run (a workdir holding predictions_<split>.csv from --mode=eval, or oof_predictions.csv from
--mode=cv) or a folder of runs (e.g. the seed_0, seed_1, ... workdirs of `experiments.run`). Both sides must have
scored the same studies with the same labels. Reported:

* each side's AUC per run and its seed-to-seed spread (mean ± sd);
* DeLong's test for correlated ROC curves for each pair of runs (seed i of A against seed i of B): the AUC
  difference, its 95% CI and two-sided p-value; it treats studies as independent;
* a paired patient bootstrap of the difference of the mean AUCs over all runs of each side (patients resampled,
  each with all its studies, the same draws scoring both sides): CI and p-value of the test-set sampling;
* with two or more seed pairs, the mean and sd of the per-seed differences and a t interval over seeds, which
  is the part of the uncertainty that retraining adds.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys

import numpy as np
from scipy import stats

from lungct import metrics

PREDICTION_FILES = ("predictions_{split}.csv", "oof_predictions.csv")


class CompareError(ValueError):
  """Runs that cannot be compared (no predictions, other studies, other labels): one line naming them."""


def _prediction_file(run_dir: str, split: str) -> str | None:
  for name in PREDICTION_FILES:
    path = os.path.join(run_dir, name.format(split=split))
    if os.path.exists(path):
      return path
  return None


def find_runs(path: str, split: str = "test") -> list[str]:
  """The prediction files of ``path``: its own, else those of its sub-folders (sorted by name)."""
  if not os.path.isdir(path):
    raise CompareError(f"{path}: not a folder")
  own = _prediction_file(path, split)
  if own:
    return [own]
  runs = [p for d in sorted(os.listdir(path)) if os.path.isdir(os.path.join(path, d))
          for p in [_prediction_file(os.path.join(path, d), split)] if p]
  if not runs:
    hint = (" (it has metrics.json: run --mode=eval on it first)"
            if os.path.exists(os.path.join(path, "metrics.json")) else "")
    raise CompareError(f"{path}: no {' or '.join(n.format(split=split) for n in PREDICTION_FILES)} in it or "
                       f"its sub-folders{hint}")
  return runs


def read_predictions(path: str) -> dict[str, tuple[int, float, str]]:
  """study_id -> (label, probability, patient_id) of one binary predictions file."""
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  if not rows or not {"study_id", "label", "probability"} <= set(rows[0]):
    raise CompareError(f"{path}: expected columns study_id,patient_id,label,probability (binary predictions)")
  return {r["study_id"]: (int(r["label"]), float(r["probability"]), r.get("patient_id") or r["study_id"])
          for r in rows}


def aligned(files_a: list[str], files_b: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                                                list[str]]:
  """(labels (N,), patient ids (N,), probabilities of A (S_a, N) and of B (S_b, N), study ids), in one order."""
  runs = {p: read_predictions(p) for p in files_a + files_b}
  first = runs[files_a[0]]
  studies = sorted(first)
  for path, run in runs.items():
    if set(run) != set(studies):
      missing, extra = sorted(set(studies) - set(run)), sorted(set(run) - set(studies))
      raise CompareError(f"{path} scored other studies than {files_a[0]} ({len(missing)} missing, e.g. "
                         f"{missing[:2]}; {len(extra)} extra, e.g. {extra[:2]}): compare runs on one test set")
    bad = [s for s in studies if run[s][0] != first[s][0]]
    if bad:
      raise CompareError(f"{path}: labels differ from {files_a[0]} for {len(bad)} studies (e.g. {bad[0]})")
  y = np.array([first[s][0] for s in studies])
  groups = np.array([first[s][2] for s in studies])
  probs = lambda files: np.array([[runs[f][s][1] for s in studies] for f in files])  # noqa: E731
  return y, groups, probs(files_a), probs(files_b), studies


def compare(path_a: str, path_b: str, *, split: str = "test", n_boot: int = 2000, seed: int = 0,
            alpha: float = 0.05) -> dict:
  """The comparison of A and B (see the module docstring) as a dict."""
  return compare_runs(find_runs(path_a, split), find_runs(path_b, split), names=(path_a, path_b), split=split,
                      n_boot=n_boot, seed=seed, alpha=alpha)


def compare_runs(files_a: list[str], files_b: list[str], *, names: tuple[str, str] = ("A", "B"),
                 split: str = "test", n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> dict:
  """`compare` on explicit prediction files (runs) of each side."""
  path_a, path_b = names
  y, groups, pa, pb, studies = aligned(files_a, files_b)
  if len(set(y.tolist())) < 2:
    raise CompareError(f"the {len(y)} common studies hold one class only: no AUC to compare")
  auc = lambda p: [metrics.roc_auc(y, row) for row in p]  # noqa: E731
  side = lambda name, files, p: {"path": name, "runs": files, "auc": auc(p), "auc_mean": float(np.mean(auc(p))),  # noqa: E731
                                 "auc_sd": float(np.std(auc(p), ddof=1)) if len(p) > 1 else 0.0}
  out = {"split": split, "n_studies": int(len(y)), "n_positive": int(y.sum()),
         "n_patients": int(len(set(groups.tolist()))), "a": side(path_a, files_a, pa), "b": side(path_b, files_b, pb)}
  out["delong"] = [{"run_a": files_a[i], "run_b": files_b[i], **metrics.delong_test(y, pa[i], pb[i], alpha=alpha)}
                   for i in range(min(len(pa), len(pb)))]
  out["bootstrap"] = metrics.paired_bootstrap_auc(y, pa, pb, groups=groups, n_boot=n_boot, seed=seed, alpha=alpha)
  diffs = np.array([d["diff"] for d in out["delong"]])
  if len(diffs) > 1:
    sd = float(np.std(diffs, ddof=1))
    half = float(stats.t.ppf(1 - alpha / 2, len(diffs) - 1)) * sd / math.sqrt(len(diffs))
    out["seeds"] = {"pairs": int(len(diffs)), "diff_mean": float(diffs.mean()), "diff_sd": sd,
                    "lo": float(diffs.mean() - half), "hi": float(diffs.mean() + half)}
  return out


def fmt_diff(x: float) -> str:
  return "n/a" if x is None or not np.isfinite(x) else f"{x:+.3f}"


def fmt_p(x: float) -> str:
  return "n/a" if x is None or not np.isfinite(x) else (f"{x:.3f}" if x >= 0.001 else "<0.001")


def summary_line(result: dict) -> str:
  """One sentence: the difference, its CI and p-value (paired patient bootstrap), and the seed spread."""
  b = result["bootstrap"]
  s = result.get("seeds")
  seeds = (f"; over {s['pairs']} seed pairs {s['diff_mean']:+.3f} ± {s['diff_sd']:.3f} (t interval "
           f"[{s['lo']:+.3f}, {s['hi']:+.3f}])" if s else "")
  return (f"AUC {result['a']['auc_mean']:.3f} vs {result['b']['auc_mean']:.3f}: difference {b['diff']:+.3f} "
          f"[{fmt_diff(b['lo'])}, {fmt_diff(b['hi'])}], p = {fmt_p(b['p_value'])} (paired patient bootstrap, "
          f"{result['n_studies']} studies of {result['n_patients']} patients){seeds}")


def lines(result: dict) -> list[str]:
  """The comparison as Markdown."""
  a, b = result["a"], result["b"]
  out = [f"# {a['path']} vs {b['path']}", "",
         f"{result['n_studies']} {result['split']} studies ({result['n_positive']} positive) of "
         f"{result['n_patients']} patients, scored by both.", "",
         "| side | runs | AUC per run | mean ± sd over runs |", "|---|---|---|---|"]
  for name, s in (("A", a), ("B", b)):
    out.append(f"| {name} | {len(s['runs'])} | {', '.join(f'{x:.3f}' for x in s['auc'])} | "
               f"{s['auc_mean']:.3f} ± {s['auc_sd']:.3f} |")
  out += ["", "DeLong's test per pair of runs (A - B; studies treated as independent):", "",
          "| run A | run B | AUC A | AUC B | difference [95% CI] | p |", "|---|---|---|---|---|---|"]
  for d in result["delong"]:
    out.append(f"| {os.path.basename(os.path.dirname(d['run_a']))} | {os.path.basename(os.path.dirname(d['run_b']))} "
               f"| {d['auc_a']:.3f} | {d['auc_b']:.3f} | {fmt_diff(d['diff'])} [{fmt_diff(d['lo'])}, {fmt_diff(d['hi'])}] | "
               f"{fmt_p(d['p_value'])} |")
  out += ["", summary_line(result) + "."]
  return out


def main(argv: list[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("a")
  p.add_argument("b")
  p.add_argument("--split", default="test", help="which predictions_<split>.csv to read (default test)")
  p.add_argument("--n-boot", type=int, default=2000)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", default="", help="also write the result here")
  args = p.parse_args(sys.argv[1:] if argv is None else argv)
  try:
    result = compare(args.a, args.b, split=args.split, n_boot=args.n_boot, seed=args.seed)
  except (CompareError, ValueError) as e:
    sys.exit(f"error: {e}")
  print("\n".join(lines(result)))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(metrics.json_safe(result), f, indent=2, allow_nan=False)
  return result


if __name__ == "__main__":
  main()
