"""--mode=eval and --mode=cv for every task.

eval: the best (or a given) checkpoint restored for inference (params and BatchNorm statistics only, with the
model/data settings it was trained with), then the task's `run_eval` on a split. For classification,
thresholds are chosen on the validation split and applied unchanged to the split being evaluated.

cv: patient-grouped, label-stratified k-fold cross-validation over train+validation through the one loop.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Any, Sequence

import ml_collections
import numpy as np

from lungct import metrics, runtime, tasks, train


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, split: str = "test",
                        checkpoint_path: str = "", explicit: Sequence[str] = ()) -> dict:
  """--mode=eval: the task writes eval_<split>.json (and per-case files) in the workdir."""
  predictor, task = tasks.restore(config, workdir, checkpoint_path, explicit, "eval")
  return task.run_eval(predictor, runtime.data_sources(predictor.config), workdir, split)


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


def _index(config, split: str) -> list[dict]:
  """Ids and labels of a split, read without decoding volumes (the builder's split index)."""
  from lungct.data import lung_ct
  return lung_ct.split_index(lung_ct.prepare(config.data), split)


def cross_validate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """--mode=cv: k-fold CV over train+validation (patient-grouped, label-stratified); one workdir per fold.

  Each fold trains on k-1 folds, picks its best checkpoint on the held-out fold and reports metrics there.
  Writes cv_summary.json and cv_summary.md (mean ± std and per-fold values).
  """
  tasks.check_mode(config, "cv")
  k = int(config.cv.folds)
  sources = runtime.data_sources(config)
  pool = Concat([sources["train"], sources["validation"]])
  rows = _index(config, "train") + _index(config, "validation")
  key = "grade" if config.data.label == "grade" else "label"
  folds = stratified_group_kfold([int(r[key]) for r in rows], [r["patient_id"] for r in rows], k,
                                 seed=config.cv.seed)
  per_fold = []
  for i, held_out in enumerate(folds):
    rest = np.sort(np.concatenate([f for j, f in enumerate(folds) if j != i]))
    fold_dir = os.path.join(workdir, f"fold_{i}")
    if runtime.is_main_process():
      print(f"=== fold {i + 1}/{k}: {len(rest)} train / {len(held_out)} held-out volumes -> {fold_dir}")
    summary = train.train_and_evaluate(
        copy.deepcopy(config), fold_dir,
        sources={"train": Subset(pool, rest), "validation": Subset(pool, held_out), "test": sources["test"]})
    per_fold.append({"fold": i, "n_train": len(rest), "n_heldout": len(held_out), **summary["validation"]})
  keys = [key_ for key_, v in per_fold[0].items()
          if key_ not in ("fold", "n_train", "n_heldout") and isinstance(v, (int, float))]
  table = {key_: {"mean": float(np.nanmean([f[key_] for f in per_fold])),
                  "std": float(np.nanstd([f[key_] for f in per_fold], ddof=1)) if k > 1 else 0.0,
                  "per_fold": [f[key_] for f in per_fold]} for key_ in keys}
  out = {"folds": k, "per_fold": per_fold, "summary": table}
  md = [f"# {k}-fold cross-validation (patient-grouped, label-stratified)", "",
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
