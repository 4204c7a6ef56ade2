"""Evaluation of trained checkpoints: metrics with bootstrap CIs at operating thresholds, per-case
predictions, and patient-level stratified k-fold cross-validation.

Thresholds are always chosen on the validation split and applied unchanged to the split being evaluated.
"""
from __future__ import annotations

import copy
import csv
import json
import os
from typing import Any, NamedTuple, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from lungct import checkpoint, metrics, train


class Loaded(NamedTuple):
  graphdef: Any
  state: dict
  predict: Any   # jitted (state, images) -> probabilities
  mesh: Any
  step: int


def restore_state(config: ml_collections.ConfigDict, workdir: str, checkpoint_path: str = ""):
  """(graphdef, state, tx, mesh, checkpoint dir, step): ``checkpoint_path`` or the workdir's best, replicated."""
  graphdef, state, tx = train.create_state(config, total_steps=1)
  mesh = train.make_mesh()
  state = jax.device_put(state, NamedSharding(mesh, P()))
  directory, step = checkpoint.find_checkpoint(checkpoint_path or workdir)
  mngr = checkpoint.ocp.CheckpointManager(directory, item_names=("state", "meta"))
  state, _ = checkpoint.restore(mngr, state, step)
  return graphdef, state, tx, mesh, directory, step


def load_model(config: ml_collections.ConfigDict, workdir: str, checkpoint_path: str = "") -> Loaded:
  """The model restored from ``checkpoint_path`` or the workdir's best checkpoint, ready to predict."""
  graphdef, state, tx, mesh, _, step = restore_state(config, workdir, checkpoint_path)
  _, predict = train.compile_steps(graphdef, tx, config, mesh)
  return Loaded(graphdef, state, predict, mesh, step)


def predict_split(config, predict, state, mesh, source) -> dict[str, np.ndarray]:
  return train.predict_source(predict, state, mesh, source, config)


def evaluate_predictions(val: dict, test: dict, *, n_boot: int = 1000, seed: int = 0,
                         sensitivity_targets: Sequence[float] = (0.9, 0.95)) -> dict[str, Any]:
  """Binary: metrics with patient-level bootstrap CIs at each operating point chosen on ``val``."""
  points = metrics.operating_points(val["label"], val["prob"], targets=tuple(sensitivity_targets))
  result = {"n": int(len(test["label"])), "n_positive": int(np.sum(test["label"] == 1)),
            "n_patients": int(len(set(test["patient_id"].tolist()))), "operating_points": {}}
  for name, threshold in points.items():
    result["operating_points"][name] = {
        "threshold": float(threshold),
        "counts": metrics.confusion_counts(test["label"], (test["prob"] >= threshold).astype(int)),
        "metrics": metrics.metrics_with_ci(test["label"], test["prob"], threshold,
                                           groups=test["patient_id"], n_boot=n_boot, seed=seed)}
  fpr, tpr, thr = metrics.roc_curve(test["label"], test["prob"])
  result["roc"] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
  result["calibration"] = {k: np.asarray(v).tolist() for k, v in metrics.calibration_bins(test["label"], test["prob"]).items()}
  return result


def write_predictions(path: str, pred: dict, threshold: float = 0.5) -> None:
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    multiclass = pred["prob"].ndim == 2
    if multiclass:
      k = pred["prob"].shape[1]
      w.writerow(["study_id", "patient_id", "grade", "predicted_grade"] + [f"prob_{i}" for i in range(k)])
      for i in range(len(pred["prob"])):
        w.writerow([pred["study_id"][i], pred["patient_id"][i], int(pred["grade"][i]),
                    int(np.argmax(pred["prob"][i]))] + [f"{p:.6f}" for p in pred["prob"][i]])
    else:
      w.writerow(["study_id", "patient_id", "label", "probability", "prediction", "threshold"])
      for i in range(len(pred["prob"])):
        p = float(pred["prob"][i])
        w.writerow([pred["study_id"][i], pred["patient_id"][i], int(pred["label"][i]), f"{p:.6f}",
                    int(p >= threshold), threshold])


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, split: str = "test",
                        checkpoint_path: str = "") -> dict:
  """--mode=eval: writes eval_<split>.json and predictions_<split>.csv in the workdir."""
  m = load_model(config, workdir, checkpoint_path)
  step = m.step
  sources = train.data_sources(config)
  val = predict_split(config, m.predict, m.state, m.mesh, sources["validation"])
  test = val if split == "validation" else predict_split(config, m.predict, m.state, m.mesh, sources[split])
  if config.data.label == "binary":
    result = evaluate_predictions(val, test, n_boot=config.eval.n_boot, seed=config.seed,
                                  sensitivity_targets=tuple(config.eval.sensitivity_targets))
    threshold = result["operating_points"]["youden"]["threshold"]
  else:
    result = {"n": int(len(test["grade"])), "metrics": metrics.multiclass_metrics(test["grade"], test["prob"])}
    threshold = 0.5
  result.update(split=split, checkpoint_step=int(step))
  with open(os.path.join(workdir, f"eval_{split}.json"), "w") as f:
    json.dump(result, f, indent=2, default=_json_default)
  write_predictions(os.path.join(workdir, f"predictions_{split}.csv"), test, threshold)
  if config.data.label == "binary":
    print(_summary_line(split, result))
  print(f"Wrote {workdir}/eval_{split}.json and predictions_{split}.csv")
  return result


def _summary_line(split, result) -> str:
  lines = [f"{split}: {result['n']} cases ({result['n_positive']} abnormal)"]
  for name, op in result["operating_points"].items():
    m = op["metrics"]
    f = lambda k: f"{m[k]['value']:.3f} [{m[k]['lo']:.3f}, {m[k]['hi']:.3f}]"
    lines.append(f"  {name:>14} (t={op['threshold']:.3f}): AUC {f('roc_auc')}  sens {f('sensitivity')}  "
                 f"spec {f('specificity')}  acc {f('accuracy')}")
  return "\n".join(lines)


def _json_default(o):
  if isinstance(o, np.generic):
    return o.item()
  if isinstance(o, np.ndarray):
    return o.tolist()
  return str(o)


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


def _read_labels(source, key: str) -> tuple[np.ndarray, np.ndarray]:
  labels, groups = [], []
  for i in range(len(source)):
    ex = source[i]
    labels.append(int(ex[key]))
    pid = ex["patient_id"]
    groups.append(pid.decode() if isinstance(pid, bytes) else str(pid))
  return np.asarray(labels), np.asarray(groups)


def cross_validate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """--mode=cv: k-fold CV over train+validation (patient-grouped, label-stratified); one workdir per fold.

  Each fold trains on k-1 folds, picks its best checkpoint on the held-out fold and reports metrics there.
  Writes cv_summary.json and cv_summary.md (mean ± std and per-fold values).
  """
  k = int(config.cv.folds)
  sources = train.data_sources(config)
  pool = Concat([sources["train"], sources["validation"]])
  labels, groups = _read_labels(pool, train.label_key(config))
  folds = stratified_group_kfold(labels, groups, k, seed=config.cv.seed)
  per_fold = []
  for i, held_out in enumerate(folds):
    rest = np.sort(np.concatenate([f for j, f in enumerate(folds) if j != i]))
    fold_dir = os.path.join(workdir, f"fold_{i}")
    print(f"=== fold {i + 1}/{k}: {len(rest)} train / {len(held_out)} held-out volumes -> {fold_dir}")
    fold_config = copy.deepcopy(config)
    summary = train.train_and_evaluate(
        fold_config, fold_dir,
        sources={"train": Subset(pool, rest), "validation": Subset(pool, held_out), "test": sources["test"]})
    per_fold.append({"fold": i, "n_train": len(rest), "n_heldout": len(held_out), **summary["validation"]})
  keys = [k_ for k_ in ("auc", "accuracy", "sensitivity", "specificity", "balanced_accuracy", "f1", "loss",
                        "brier", "ece", "macro_roc_auc", "macro_sensitivity", "quadratic_kappa") if k_ in per_fold[0]]
  table = {key: {"mean": float(np.nanmean([f[key] for f in per_fold])),
                 "std": float(np.nanstd([f[key] for f in per_fold], ddof=1)) if k > 1 else 0.0,
                 "per_fold": [f[key] for f in per_fold]} for key in keys}
  out = {"folds": k, "per_fold": per_fold, "summary": table}
  with open(os.path.join(workdir, "cv_summary.json"), "w") as f:
    json.dump(out, f, indent=2, default=_json_default)
  md = [f"# {k}-fold cross-validation (patient-grouped, label-stratified)", "",
        "| metric | mean ± std | " + " | ".join(f"fold {i}" for i in range(k)) + " |",
        "|---|---|" + "---|" * k]
  for key, v in table.items():
    md.append(f"| {key} | {v['mean']:.3f} ± {v['std']:.3f} | " + " | ".join(f"{x:.3f}" for x in v["per_fold"]) + " |")
  with open(os.path.join(workdir, "cv_summary.md"), "w") as f:
    f.write("\n".join(md) + "\n")
  print("\n".join(md))
  return out
