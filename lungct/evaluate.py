"""--mode=eval and --mode=cv for every task.

eval: the best (or a given) checkpoint restored for inference (params and BatchNorm statistics only, with the
model/data settings it was trained with), then the task's `run_eval` on a split. For classification,
thresholds are chosen on the validation split and applied unchanged to the split being evaluated.

cv: patient-grouped k-fold cross-validation over train+validation through the one loop, stratified by label where
the studies have one (`cv_strata`); by default every selection inside a fold uses an inner validation split of its
training patients, and the held-out folds' predictions are pooled into one estimate with a patient-bootstrap CI.
"""
from __future__ import annotations

import copy
import csv
import json
import os
from typing import Any, Sequence

import ml_collections
import numpy as np

from lungct import config_check, metrics, runtime, tasks, train


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, split: str = "test",
                        checkpoint_path: str = "", explicit: Sequence[str] = ()) -> dict:
  """--mode=eval: the task writes eval_<split>.json (and per-case files) in the workdir; with
  ``config.eval.external_dir`` set, the external set instead (eval_external.json, `evaluate_external`)."""
  predictor, task = tasks.restore(config, workdir, checkpoint_path, explicit, "eval")
  if predictor.config.eval.get("external_dir", ""):
    return evaluate_external(predictor, workdir)
  return task.run_eval(predictor, runtime.data_sources(predictor.config), workdir, split)


# ----------------------------------------------------------------------------- external validation

EXTERNAL = "external"


def external_data_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The data config of ``config.eval.external_dir`` + ``external_csv``: the checkpoint's data settings
  (geometry, spacing, window, crop centre, extent rules...) with the external folder as its source, every study
  in the test split (split fractions (0, 0, 1))."""
  ec = config.eval
  if not ec.get("external_csv", ""):
    raise config_check.ConfigError("config.eval.external_dir needs config.eval.external_csv (filename,label"
                                   "[,patient_id][,grade][,mask] for the scans in that folder)")
  source = ec.get("external_source", "") or ("dicom" if config.data.source == "dicom" else "folder")
  if source not in ("folder", "dicom"):
    raise config_check.ConfigError(f"config.eval.external_source={source!r}: must be folder or dicom")
  d = ml_collections.ConfigDict(config.data.to_dict())
  d.source, d.manual_dir, d.labels_csv = source, ec.external_dir, ec.external_csv
  d.split_fractions = (0.0, 0.0, 1.0)
  return d


def external_sources(config: ml_collections.ConfigDict) -> tuple[dict, dict]:
  """({"train", "validation", "test": the internal splits, "external": every kept external study}, what the
  external build read / kept / skipped and the patients it shares with the internal dataset)."""
  from lungct.data import lung_ct
  ext_cfg = external_data_config(config)
  builder = runtime.prepare_dataset(ext_cfg)
  build = lung_ct.read_build_report(builder)
  internal = runtime.data_sources(config)
  internal_builder = lung_ct.builder_for(config.data)
  internal_patients = {r["patient_id"] for s in lung_ct.written_splits(internal_builder)
                       for r in lung_ct.split_index(internal_builder, s)}
  external_patients = {r["patient_id"] for r in lung_ct.split_index(builder, "test")}
  info = {"dir": ext_cfg.manual_dir, "csv": ext_cfg.labels_csv, "source": ext_cfg.source,
          "dataset": build["config"], "totals": build["totals"], "skip_reasons": build["skip_reasons"],
          "skipped": build.get("skipped", []), "labels": build["splits"]["test"],
          "n_patients": len(external_patients),
          "shared_patients": sorted(internal_patients & external_patients)}
  return {**internal, EXTERNAL: builder.as_data_source("test")}, info


def evaluate_external(predictor: runtime.Predictor, workdir: str, prepared: tuple[dict, dict] | None = None
                      ) -> dict:
  """The external set as one test set, through the task's own `run_eval`: thresholds (and anything else the task
  fits on validation) from the internal validation split, every kept external study scored; eval_external.json
  (with the external build summary under "external") and the task's per-case files (predictions_external.csv).
  ``prepared``: `external_sources`' result when the caller has it already."""
  from lungct.data import lung_ct
  task = tasks.get(predictor.config)
  sources, info = prepared or external_sources(predictor.config)
  if runtime.is_main_process():
    print("\n".join("external set: " + line for line in lung_ct.summary_lines(
        {"config": info["dataset"], "totals": info["totals"], "skip_reasons": info["skip_reasons"],
         "splits": {"test": info["labels"]}})))
    for s in info["skipped"][:10]:
      print(f"external set: skipped {s['file']}: {s['reason']}")
    if info["shared_patients"]:
      print(f"WARNING: the external set shares {len(info['shared_patients'])} patient id(s) with the training "
            f"dataset (e.g. {info['shared_patients'][:3]}): it is not independent of it")
  result = task.run_eval(predictor, sources, workdir, EXTERNAL)
  result = {**result, EXTERNAL: info}
  if runtime.is_main_process():
    path = os.path.join(workdir, f"eval_{EXTERNAL}.json")
    with open(path, "w") as f:
      json.dump(metrics.json_safe(result), f, indent=2, allow_nan=False)
  return result


# ----------------------------------------------------------------------------- cross-validation

class Subset:
  """A random-access view of ``source`` at ``indices`` (what grain and the loaders need: len and getitem)."""

  def __init__(self, source, indices: Sequence[int]):
    self.source, self.indices = source, np.asarray(indices, dtype=np.int64)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i):
    return self.source[int(self.indices[i])]


class Concat:
  """Random-access concatenation of several sources."""

  def __init__(self, sources: Sequence[Any]):
    self.sources = list(sources)
    self.offsets = np.cumsum([0] + [len(s) for s in self.sources])

  def __len__(self) -> int:
    return int(self.offsets[-1])

  def __getitem__(self, i):
    j = int(np.searchsorted(self.offsets, i, side="right") - 1)
    return self.sources[j][int(i - self.offsets[j])]


def stratified_group_kfold(labels: Sequence[int], groups: Sequence[str], k: int, seed: int = 0) -> list[np.ndarray]:
  """k folds of example indices: every group (patient) in exactly one fold, labels balanced across folds.

  Patients are taken in a seeded random order within each label (a patient's label is its highest) and dealt
  to the fold that currently holds the fewest examples of that label.
  """
  labels, groups = np.asarray(labels), np.asarray(groups)
  if labels.size and labels.min() < 0:
    raise ValueError(f"labels must be >= 0, got {int(labels.min())} (`cv_strata` gives a missing label its own "
                     f"stratum)")
  uniq = sorted(set(groups.tolist()))
  if len(uniq) < k:
    raise ValueError(f"cannot make {k} folds from {len(uniq)} patients")
  rng = np.random.default_rng(seed)
  members = {g: np.flatnonzero(groups == g) for g in uniq}
  glabel = {g: int(labels[members[g]].max()) for g in uniq}
  counts = np.zeros((k, int(labels.max()) + 1))
  folds: list[list[int]] = [[] for _ in range(k)]
  for lab in sorted(set(glabel.values())):
    gs = [g for g in uniq if glabel[g] == lab]
    for g in [gs[i] for i in rng.permutation(len(gs))]:
      f = int(np.lexsort((np.array([len(x) for x in folds]), counts[:, lab]))[0])
      folds[f].extend(members[g].tolist())
      counts[f, lab] += len(members[g])
  return [np.sort(np.asarray(f, dtype=np.int64)) for f in folds]


def _index(config, split: str) -> list[dict]:
  """Ids and labels of a split, read without decoding volumes (the builder's split index)."""
  from lungct.data import lung_ct
  return lung_ct.split_index(lung_ct.prepare(config.data), split)


def cv_strata(config, rows: Sequence[dict]) -> tuple[np.ndarray, str, str]:
  """(stratum of every study, what the folds are stratified by: "label", "grade" or "none", that in a sentence).

  Only a class is a stratum: ``grade`` with data.label="grade", else the binary ``label`` (both integers in the
  split index; continuous targets such as the attributes' diameter_mm are not in it and never stratify). A study
  without one (a labels CSV with no label column or an empty cell, as attributes allow: -1) is in a stratum of
  its own; when no study has one, the folds are grouped by patient only, not stratified, and the sentence says so.
  """
  key = "grade" if config.data.label == "grade" else "label"
  values = np.asarray([int(r[key]) for r in rows], dtype=np.int64)
  missing = int(np.sum(values < 0))
  if missing == len(values):
    return np.zeros(len(values), dtype=np.int64), "none", (
        f"Folds grouped by patient only, not stratified: no study has a {key}, so the folds' outcomes are not "
        f"balanced.")
  strata = np.unique(values, return_inverse=True)[1].astype(np.int64)
  note = f" ({missing} studies without one form a stratum of their own)" if missing else ""
  return strata, key, f"Folds grouped by patient and stratified by {key}{note}."


SELECTIONS = {
    "inner": "checkpoint selection, early stopping and thresholds on an inner validation split ({frac:.0%} of each "
             "fold's training patients, grouped by patient, stratified like the folds); each held-out fold read "
             "only when it was scored, once, after training",
    "heldout": "OPTIMISTIC: checkpoint selection and early stopping on the held-out fold itself, which is then "
               "scored (thresholds from the same fold); kept only to measure how much that inflates the estimate",
}


def inner_split(labels: Sequence[int], groups: Sequence[str], indices: Sequence[int], fraction: float,
                seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(inner train, inner validation) of ``indices``: about ``fraction`` of their patients held out, grouped by
  patient and stratified by label (one fold of a round(1 / fraction)-fold `stratified_group_kfold`; with fewer
  patients than that, one fold of as many folds as there are patients)."""
  indices = np.asarray(indices, dtype=np.int64)
  labels, groups = np.asarray(labels)[indices], np.asarray(groups)[indices]
  k = max(2, min(int(round(1.0 / fraction)), len(set(groups.tolist()))))  # few patients: a larger share
  val = stratified_group_kfold(labels, groups, k, seed=seed)[0]
  return np.sort(np.delete(indices, val)), np.sort(indices[val])


def cross_validate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """--mode=cv: k-fold CV over train+validation (patient-grouped, stratified by `cv_strata`); one workdir per fold.

  With ``cv.selection="inner"`` (the default) each fold trains on its training folds less an inner validation
  split carved from them by patient, which alone picks the best checkpoint, stops early and sets the
  thresholds; the held-out fold is read only afterwards, to be scored once (`task.evaluate`, and the task's
  `run_eval` writes fold_<i>/eval_heldout.json with thresholds from the inner split). The out-of-fold
  predictions of every fold are pooled into one table (oof_predictions.csv) and one estimate with a patient
  bootstrap CI. ``cv.selection="heldout"`` is the optimistic variant (selection on the held-out fold), kept to
  measure the difference. Writes cv_summary.json and cv_summary.md.
  """
  task = tasks.check_mode(config, "cv")
  k = int(config.cv.folds)
  selection = config.cv.get("selection", "inner")
  fraction = float(config.cv.get("inner_fraction", 0.2))
  if selection not in SELECTIONS:
    raise config_check.ConfigError(f"config.cv.selection={selection!r}: must be one of {sorted(SELECTIONS)}")
  if selection == "inner" and not 0 < fraction < 1:
    raise config_check.ConfigError(f"config.cv.inner_fraction={fraction!r}: must be in (0, 1)")
  sources = runtime.data_sources(config)
  pool = Concat([sources["train"], sources["validation"]])
  rows = _index(config, "train") + _index(config, "validation")
  labels, stratified_by, stratification = cv_strata(config, rows)
  groups = [r["patient_id"] for r in rows]
  folds = stratified_group_kfold(labels, groups, k, seed=config.cv.seed)
  per_fold, oof = [], []
  for i, held_out in enumerate(folds):
    rest = np.sort(np.concatenate([f for j, f in enumerate(folds) if j != i]))
    if selection == "inner":
      fit, select = inner_split(labels, groups, rest, fraction, seed=config.cv.seed + 1 + i)
    else:
      fit, select = rest, held_out
    fold_dir = os.path.join(workdir, f"fold_{i}")
    if runtime.is_main_process():
      print(f"=== fold {i + 1}/{k}: {len(fit)} train / {len(select)} "
            f"{'inner validation' if selection == 'inner' else 'held-out (selection)'} / {len(held_out)} held-out "
            f"volumes -> {fold_dir}")
    trained = train.train_and_evaluate(copy.deepcopy(config), fold_dir, sources={
        "train": Subset(pool, fit), "validation": Subset(pool, select)})
    row, cases = score_fold(config, fold_dir, task, Subset(pool, select), Subset(pool, held_out))
    per_fold.append({"fold": i, "n_train": len(fit), "n_selection": len(select), "n_heldout": len(held_out),
                     "best_step": trained["best_step"], **row})
    oof.append(cases)
  numeric = [k_ for k_, v in per_fold[0].items()
             if k_ not in ("fold", "n_train", "n_selection", "n_heldout", "best_step")
             and isinstance(v, (int, float))]
  table = {k_: {"mean": float(np.nanmean([f[k_] for f in per_fold])),
                "std": float(np.nanstd([f[k_] for f in per_fold], ddof=1)) if k > 1 else 0.0,
                "per_fold": [f[k_] for f in per_fold]} for k_ in numeric}
  pooled = pool_out_of_fold(task, oof, config, workdir)
  how = SELECTIONS[selection].format(frac=fraction)
  out = {"folds": k, "stratified_by": stratified_by, "stratification": stratification, "selection": selection,
         "inner_fraction": fraction if selection == "inner" else None,
         "selection_note": how, "per_fold": per_fold, "summary": table, "pooled": pooled}
  md = [f"# {k}-fold cross-validation (grouped by patient)", "", stratification, "",
        f"Selection: {how}.", ""]
  md += pooled_lines(pooled)
  md += ["", "Per fold, on each held-out fold (threshold 0.5 here; fold_<i>/eval_heldout.json has CIs at thresholds "
         "chosen on the fold's selection split):", "",
         "| metric | mean ± std | " + " | ".join(f"fold {i}" for i in range(k)) + " |",
         "|---|---|" + "---|" * k]
  for key_, v in table.items():
    md.append(f"| {key_} | {v['mean']:.3f} ± {v['std']:.3f} | " + " | ".join(f"{x:.3f}" for x in v["per_fold"])
              + " |")
  if runtime.is_main_process():
    with open(os.path.join(workdir, "cv_summary.json"), "w") as f:
      json.dump(metrics.json_safe(out), f, indent=2, allow_nan=False)
    with open(os.path.join(workdir, "cv_summary.md"), "w") as f:
      f.write("\n".join(md) + "\n")
    print("\n".join(md))
  return out


def score_fold(config, fold_dir: str, task, select_src, heldout_src) -> tuple[dict, dict]:
  """The fold's best (else latest) checkpoint, restored for inference, scores the held-out fold once: the task's
  scalar summary and cases (`task.evaluate`); the task's `run_eval` writes eval_heldout.json (thresholds from
  ``select_src``). Classification cases also get the threshold chosen on ``select_src`` (Youden's J)."""
  predictor, _ = tasks.restore(config, fold_dir, "", (), "cv")
  v = predictor.variables
  apply = task.make_apply(v.graphdef, predictor.mesh, predictor.config)
  summary, cases = task.evaluate(apply, v, predictor.mesh, heldout_src, predictor.config)
  task.run_eval(predictor, {"validation": select_src, "heldout": heldout_src}, fold_dir, "heldout")
  if _is_binary_cases(cases):
    val = task.evaluate(apply, v, predictor.mesh, select_src, predictor.config)[1]
    t = metrics.youden_threshold(val["label"], val["prob"])
    rule = "youden"
    if not np.isfinite(t):  # the selection split lacks a class: said in the table, not hidden as NaN decisions
      t, rule = 0.5, "0.5 (the selection split has one class: no Youden threshold)"
    cases = {**cases, "threshold": np.full(len(cases["prob"]), t), "rule": np.full(len(cases["prob"]), rule)}
  return summary, cases


def _is_binary_cases(cases) -> bool:
  return isinstance(cases, dict) and "prob" in cases and np.asarray(cases["prob"]).ndim == 1


def pool_out_of_fold(task, oof: list, config, workdir: str) -> dict:
  """One estimate over every study's out-of-fold prediction, CIs by resampling patients.

  Binary classification: AUC (and PR-AUC, Brier) of the pooled probabilities, and sensitivity / specificity /
  accuracy of the pooled decisions, each study decided at its own fold's threshold (Youden's J on the fold's
  selection split); oof_predictions.csv. Cases as a list of per-case metric dicts (segmentation): the mean of
  each numeric per-case metric; oof_cases.csv. A task with its own ``pool_out_of_fold(oof, config, workdir)``
  (attributes: each target's metrics over every study): that. Anything else: {} (the per-fold table only)."""
  n_boot, seed = int(config.eval.n_boot), int(config.seed)
  if hasattr(task, "pool_out_of_fold"):  # a task whose cases need its own metrics (attributes)
    return task.pool_out_of_fold(oof, config, workdir)
  if all(_is_binary_cases(c) for c in oof):
    cat = {k: np.concatenate([np.asarray(c[k]) for c in oof]) for k in ("prob", "label", "study_id",
                                                                         "patient_id", "threshold", "rule")}
    fold = np.concatenate([np.full(len(c["prob"]), i) for i, c in enumerate(oof)])
    y, p, g = cat["label"].astype(int), cat["prob"].astype(float), cat["patient_id"]
    decision = (p >= cat["threshold"]).astype(int)
    with_ci = metrics.metrics_with_ci(y, p, 0.5, groups=g, n_boot=n_boot, seed=seed)
    out = {"level": "study", "n": int(len(y)), "n_positive": int(y.sum()),
           "threshold_rules": sorted(set(cat["rule"].tolist())),
           "n_patients": int(len(set(g.tolist()))),
           **{k: with_ci[k] for k in ("roc_auc", "pr_auc", "brier")}}
    share = lambda x: float(np.mean(x)) if len(x) else float("nan")  # noqa: E731
    rates = {"sensitivity": lambda yy, dd: share(dd[yy == 1]), "specificity": lambda yy, dd: share(1 - dd[yy == 0]),
             "accuracy": lambda yy, dd: share(yy == dd)}
    for name, fn in rates.items():
      ci = metrics.bootstrap_ci(y, decision, fn, groups=g, n_boot=n_boot, seed=seed)
      out[f"{name}@fold_youden"] = {"value": ci.point, "lo": ci.lo, "hi": ci.hi, "n_used": ci.n_used}
    if runtime.is_main_process():
      with open(os.path.join(workdir, "oof_predictions.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["fold", "study_id", "patient_id", "label", "probability", "threshold", "prediction",
                    "threshold_rule"])
        for i in range(len(y)):
          w.writerow([int(fold[i]), cat["study_id"][i], cat["patient_id"][i], int(y[i]), f"{p[i]:.6f}",
                      f"{cat['threshold'][i]:.6f}", int(decision[i]), cat["rule"][i]])
    return out
  if all(isinstance(c, dict) and isinstance(c.get("cases"), list) for c in oof):
    rows = [{"fold": i, **case} for i, c in enumerate(oof) for case in c["cases"]]
    names = [k_ for k_ in rows[0] if k_ not in ("fold", "study_id", "patient_id")
             and all(isinstance(r.get(k_), (int, float)) and not isinstance(r.get(k_), bool)
                     for r in rows if r.get(k_) is not None)]
    g = np.array([r["patient_id"] for r in rows])
    out = {"level": "study", "n": len(rows), "n_patients": int(len(set(g.tolist())))}
    for name in names:
      vals = [np.nan if r.get(name) is None else float(r[name]) for r in rows]
      out[name] = metrics.mean_with_ci(vals, g, n_boot=n_boot, seed=seed)
    if runtime.is_main_process():
      keys = list(rows[0])
      with open(os.path.join(workdir, "oof_cases.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return out
  return {}


def pooled_lines(pooled: dict) -> list[str]:
  """Markdown lines of the pooled out-of-fold estimate."""
  if not pooled:
    return ["Pooled out-of-fold estimate: not defined for this task's cases (see the per-fold table)."]
  head = (f"Pooled out-of-fold estimate over all {pooled['n']} studies"
          + (f" ({pooled['n_positive']} positive)" if "n_positive" in pooled else "")
          + f" of {pooled['n_patients']} patients, study level, 95% CIs resampling patients:")
  lines = [head, "", "| metric | value [95% CI] |", "|---|---|"]
  for name, v in pooled.items():
    if isinstance(v, dict) and "value" in v:
      lines.append(f"| {name} | {_ci(v)} |")
  if pooled.get("threshold_rules"):
    lines += ["", "`@fold_youden`: each study decided at its own fold's threshold, chosen on that fold's selection "
              f"split ({'; '.join(pooled['threshold_rules'])})."]
  return lines


def _ci(v: dict) -> str:
  f = lambda x: "n/a" if x is None or not np.isfinite(x) else f"{x:.3f}"  # noqa: E731
  return f"{f(v['value'])} [{f(v['lo'])}, {f(v['hi'])}]"
