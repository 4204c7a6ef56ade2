"""Runs one ablation: every variant for several seeds, each in its own workdir, then a mean ± std table and each
variant's paired test-AUC difference from the first variant, with its CI and p-value (`experiments.compare`).

    python -m experiments.run augment --seeds 3 --out experiments/results
    python -m experiments.run model --seeds 2 --set train.num_epochs=2 --variants cnn3d

Writes <out>/<name>.md and <out>/<name>.csv; workdirs go to <out>/runs/<name>/<variant>/seed_<s>, prerequisites
to <out>/runs/<name>/_<req> (a run whose workdir already holds metrics.json for the same config, and the same
prerequisite run when it starts from one, is not repeated).
A run that stops on its input (e.g. a missing data folder) ends the command with one line naming its workdir.
"""
from __future__ import annotations

import argparse
import ast
import csv
import json
import os
import shlex
import sys

import numpy as np

from experiments import ablations
from lungct import config_check

COLUMNS = [("val_auc", "validation", "auc"), ("test_auc", "test", "auc"), ("test_accuracy", "test", "accuracy"),
           ("test_sensitivity", "test", "sensitivity"), ("test_specificity", "test", "specificity"),
           ("wall_time_s", None, "wall_time_s")]


def _config(ablation: ablations.Ablation, overrides: dict, cli: dict, runs: dict[str, str] | None):
  """A variant's config: the ablation's base, `common`, the variant's overrides, the command line's; "@<name>"
  replaced by that prerequisite's workdir (kept as is when ``runs`` is None)."""
  c = config_check.apply_overrides(ablation.config(), {**ablation.common, **overrides, **cli})
  if c.init_from.startswith("@") and runs is not None:  # a prerequisite run's workdir
    c.init_from = runs[c.init_from[1:]]
  return c


def prerequisite_config(ablation: ablations.Ablation, req: str, cli: dict):
  """Prerequisite ``req``'s config: overrides of the ablation's base (and `common`), or (base, overrides) on a
  base config of its own; the command line's overrides on top either way."""
  spec = ablation.requires[req]
  if isinstance(spec, tuple):
    base, overrides = spec
    return config_check.apply_overrides(base(), {**overrides, **cli})
  return _config(ablation, spec, cli, None)


def needed_prerequisites(ablation: ablations.Ablation, variants: list[str] | None) -> list[str]:
  """The prerequisites that the selected variants (all when None) name as init_from="@<name>", in order."""
  named = {_config(ablation, o, {}, None).init_from[1:] for v, o in ablation.variants if not variants or v in variants}
  return [req for req in ablation.requires if req in named]


class RunError(Exception):
  """A run of the ablation stopped on its input (names the workdir and the problem)."""


def _train(config, workdir: str) -> dict:
  """The training run's summary (through the CLI's entry point, `lungct.main.run`), then --mode=eval on its
  best checkpoint (predictions_test.csv, for the paired comparisons); reuses <workdir>/metrics.json and the
  predictions if they were written by the same config."""
  from lungct import main
  try:
    return _train_once(config, workdir)
  except main.known_errors() as e:
    raise RunError(f"{workdir}: {str(e).strip()}") from e


RUN_CONFIG = "run_config.json"


def reuse_key(config) -> str:
  """What a finished run must have been trained from to be reused: its config and, when it starts from another
  run of this runner (`init_from` = a workdir holding run_config.json), that run's own key too, so a
  prerequisite retrained under the same path (its config changed) retrains every variant started from it."""
  key = config.to_json_best_effort(sort_keys=True)
  source = os.path.join(config.init_from, RUN_CONFIG) if config.init_from else ""
  if source and os.path.exists(source):
    with open(source) as f:
      key += "\ninit_from " + f.read()
  return key


def _train_once(config, workdir: str) -> dict:
  from lungct import main
  from lungct.data import lung_ct
  done, cfg_file = os.path.join(workdir, "metrics.json"), os.path.join(workdir, RUN_CONFIG)
  config_json = reuse_key(config)
  if os.path.exists(done) and os.path.exists(cfg_file) and open(cfg_file).read() == config_json:
    summary = json.load(open(done))
  else:
    lung_ct.prepare(config.data)  # build the dataset first: its one-off cost is not part of the wall time
    print(f"=== {workdir}", flush=True)
    summary = main.run(config, workdir, "train")
    with open(cfg_file, "w") as f:
      f.write(config_json)
    if os.path.exists(os.path.join(workdir, PREDICTIONS)):
      os.remove(os.path.join(workdir, PREDICTIONS))  # another config's
  if config.task == "classify" and config.data.label == "binary" and not os.path.exists(os.path.join(workdir, PREDICTIONS)):
    main.run(config, workdir, "eval")  # thresholds on validation, predictions_test.csv
  return summary


PREDICTIONS = "predictions_test.csv"


def run(name: str, seeds: int, out: str, cli: dict, variants: list[str] | None = None,
        command: str = "") -> list[dict]:
  """Trains every (variant, seed) of ablation ``name``; writes and returns the per-variant rows."""
  ablation = ablations.ABLATIONS[name]
  root = os.path.join(out, "runs", name)
  runs = {}
  for req in needed_prerequisites(ablation, variants):
    runs[req] = os.path.join(root, f"_{req}")
    _train(prerequisite_config(ablation, req, cli), runs[req])
  rows, files = [], {}
  for variant, overrides in ablation.variants:
    if variants and variant not in variants:
      continue
    per_seed = []
    for seed in range(seeds):
      config = _config(ablation, {**overrides, "seed": seed}, cli, runs)
      per_seed.append(_train(config, os.path.join(root, variant, f"seed_{seed}")))
    files[variant] = [os.path.join(root, variant, f"seed_{s}", PREDICTIONS) for s in range(seeds)]
    row = {"variant": variant, "seeds": len(per_seed)}
    for col, split, key in COLUMNS:
      values = np.array([float(s[split][key] if split else s[key]) for s in per_seed])
      row[col] = float(np.nanmean(values))
      row[col + "_std"] = float(np.nanstd(values, ddof=1)) if len(values) > 1 else 0.0
    rows.append(row)
  diffs = paired_differences(rows, files)
  _write(name, ablation, rows, out, command, diffs)
  return rows


def paired_differences(rows: list[dict], files: dict[str, list[str]], n_boot: int = 2000) -> list[dict]:
  """Each variant's test AUC against the first one's on the same test studies (`experiments.compare`): paired
  patient bootstrap of the difference of the seed-mean AUCs, DeLong per seed, spread of the per-seed
  differences. Adds test_auc_diff, _lo, _hi, _p to the rows; returns the comparisons."""
  from experiments import compare
  have = [r["variant"] for r in rows if all(os.path.exists(f) for f in files.get(r["variant"], [None]))]
  if len(have) < 2:
    return []
  ref, out = have[0], []
  for r in rows:
    if r["variant"] == ref or r["variant"] not in have:
      continue
    c = compare.compare_runs(files[r["variant"]], files[ref], names=(r["variant"], ref), n_boot=n_boot)
    b = c["bootstrap"]
    r.update(test_auc_diff=b["diff"], test_auc_diff_lo=b["lo"], test_auc_diff_hi=b["hi"],
             test_auc_diff_p=b["p_value"])
    out.append(c)
  return out


def _write(name: str, ablation: ablations.Ablation, rows: list[dict], out: str, command: str,
           diffs: list[dict] = ()) -> None:
  from experiments import compare
  os.makedirs(out, exist_ok=True)
  fields = ["variant", "seeds"] + [f for col, _, _ in COLUMNS for f in (col, col + "_std")]
  if diffs:
    fields += ["test_auc_diff", "test_auc_diff_lo", "test_auc_diff_hi", "test_auc_diff_p"]
  with open(os.path.join(out, f"{name}.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=fields, restval="")
    w.writeheader()
    w.writerows({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows)
  md = [f"# Ablation: {name}", "", f"`{command}`", "", ablation.description + ". Mean ± std over seeds; "
        "test metrics at the best-validation-AUC checkpoint, threshold 0.5.", "",
        "| variant | seeds | " + " | ".join(col for col, _, _ in COLUMNS) + " |",
        "|---|---|" + "---|" * len(COLUMNS)]
  for r in rows:
    cells = [f"{r[col]:.1f} ± {r[col + '_std']:.1f}" if col == "wall_time_s" else
             f"{r[col]:.3f} ± {r[col + '_std']:.3f}" for col, _, _ in COLUMNS]
    md.append(f"| {r['variant']} | {r['seeds']} | " + " | ".join(cells) + " |")
  if diffs:
    ref = diffs[0]["b"]["path"]
    md += ["", f"Paired differences in test AUC against `{ref}` on the same {diffs[0]['n_studies']} test studies "
           f"({diffs[0]['n_patients']} patients): paired patient bootstrap of the difference of the seed means "
           "(95% CI, two-sided p), the per-seed differences' spread, DeLong's p for each seed pair.", "",
           "| variant | AUC difference [95% CI] | p | per seed: mean ± sd | DeLong p per seed |", "|---|---|---|---|---|"]
    for c in diffs:
      b, s = c["bootstrap"], c.get("seeds")
      spread = f"{s['diff_mean']:+.3f} ± {s['diff_sd']:.3f}" if s else f"{c['delong'][0]['diff']:+.3f} (1 seed)"
      md.append(f"| {c['a']['path']} | {b['diff']:+.3f} [{compare.fmt_diff(b['lo'])}, {compare.fmt_diff(b['hi'])}] | "
                f"{compare.fmt_p(b['p_value'])} | {spread} | " + ", ".join(compare.fmt_p(d["p_value"]) for d in c["delong"])
                + " |")
  with open(os.path.join(out, f"{name}.md"), "w") as f:
    f.write("\n".join(md) + "\n")
  print("\n".join(md))


def _parse_set(items: list[str]) -> dict:
  out = {}
  for item in items:
    key, _, text = item.partition("=")
    try:
      out[key] = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      out[key] = text
  return out


def main(argv: list[str] | None = None) -> list[dict]:
  argv = sys.argv[1:] if argv is None else argv
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("name", choices=sorted(ablations.ABLATIONS))
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument("--out", default="experiments/results")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="config override for every run, e.g. train.num_epochs=2 (repeatable)")
  p.add_argument("--variants", nargs="*", help="only these variants")
  args = p.parse_args(argv)
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  command = "python -m experiments.run " + " ".join(shlex.quote(a) for a in argv)
  try:
    return run(args.name, args.seeds, args.out, _parse_set(args.set), args.variants, command)
  except RunError as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  main()
