"""Nodule attributes: several per-study targets predicted at once from one volume (multi-output).

    python -m lungct.main --config configs/nodule_attributes.py --workdir runs/attributes \
        --config.data.manual_dir=../shared/data/lidc_indeterminate               # LIDC ratings + diameter
    python -m lungct.main --config configs/nodule_attributes.py --workdir runs/attributes --mode=eval

The targets are `data.targets` (stored by the dataset build as one float vector per study, NaN = missing).
A target listed in `attributes.levels` (name -> K) is a rating 1..K (LIDC's subtlety, spiculation, texture...),
any other is continuous in its own units (diameter in mm).

* Continuous: one output z; prediction = location + spread * z (`attributes.location` / `attributes.spread`,
  per target, default 0 / 1: a fixed prior scale, not fitted to the data); Huber loss on the standardised
  error with `attributes.huber_delta`.
* Rating 1..K: K-1 ordinal logits, one per threshold k = 1..K-1 for "rating > k" (the ordinal binary
  decomposition of Frank & Hall 2001 / Niu et al. 2016): the loss is the sum of their binary cross-entropies,
  so predicting 2 for a 5 costs more than predicting 4; prediction = 1 + sum_k sigmoid(logit_k) (the expected
  rating if the thresholds are consistent), rounded for agreement and kappa.
* A missing target (NaN) is masked out of the loss and of that target's metrics; the loss is the mean over
  targets of each target's mean over the studies that have it.

Evaluation per target (`lungct.metrics`, 95% patient-bootstrap CIs in --mode=eval): MAE and RMSE in the
target's units, Spearman and Pearson correlation; for ratings also exact and within-one agreement and Cohen's
quadratic-weighted kappa. The best metric `neg_mae` is minus the mean over targets of MAE / scale (scale = spread
for continuous targets, K - 1 for ratings), so every target counts alike whatever its unit.
"""
from __future__ import annotations

import csv
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lungct import inferers, metrics, runtime
from lungct.data import augment as augment_lib

NAME = "attributes"
MODES = ("train", "eval", "cv", "predict", "report")
BEST_METRIC = "neg_mae"
HEADLINE_METRICS = ("mean_spearman",)
CONFIG = "configs/nodule_attributes.py"   # its reference config (with a seconds-long `:tiny` variant)
CONFIG_GROUP = "attributes"
EXECUTION_KEYS = ()
REGRESSION_METRICS = {"mae": metrics.mae, "rmse": metrics.rmse, "spearman": metrics.spearman,
                      "pearson": metrics.pearson}
RATING_METRICS = {"exact": metrics.exact_agreement, "within_one": metrics.within_one}


# ----------------------------------------------------------------------------- the targets

class Target:
  """One target: its name, its column in data.targets, and (ratings) its number of levels K."""

  def __init__(self, name: str, column: int, levels: int, location: float, spread: float):
    self.name, self.column, self.levels = name, column, levels
    self.location, self.spread = location, spread

  @property
  def is_rating(self) -> bool:
    return self.levels > 0

  @property
  def width(self) -> int:
    """Model outputs of this target."""
    return self.levels - 1 if self.is_rating else 1

  @property
  def scale(self) -> float:
    return float(self.levels - 1) if self.is_rating else float(self.spread)


def targets_of(config) -> list[Target]:
  ac = config.attributes
  levels, loc, spread = dict(ac.levels), dict(ac.location), dict(ac.spread)
  return [Target(n, i, int(levels.get(n, 0)), float(loc.get(n, 0.0)), float(spread.get(n, 1.0)))
          for i, n in enumerate(config.data.targets)]


def _slices(targets: list[Target]) -> list[slice]:
  out, start = [], 0
  for t in targets:
    out.append(slice(start, start + t.width))
    start += t.width
  return out


def decode_outputs(outputs: np.ndarray, config) -> np.ndarray:
  """(N, num_outputs) model outputs -> (N, T) predictions in each target's units (ratings: expected level)."""
  targets = targets_of(config)
  out = np.zeros((outputs.shape[0], len(targets)), np.float64)
  for j, (t, sl) in enumerate(zip(targets, _slices(targets))):
    z = np.asarray(outputs[:, sl], np.float64)
    out[:, j] = 1.0 + np.sum(1.0 / (1.0 + np.exp(-z)), 1) if t.is_rating else t.location + t.spread * z[:, 0]
  return out


# ----------------------------------------------------------------------------- the contract

def check(config) -> list[str]:
  errors = []
  names = tuple(config.data.targets)
  if not names:
    errors.append("config.data.targets=(): the attributes task needs at least one target (CSV columns or a "
                  "generated source's fields)")
  for name, k in dict(config.attributes.levels).items():
    if int(k) < 2:
      errors.append(f"config.attributes.levels.{name}={k!r}: a rating needs K >= 2 levels (1..K)")
  for name, s in dict(config.attributes.spread).items():
    if not float(s) > 0:
      errors.append(f"config.attributes.spread.{name}={s!r}: must be > 0")
  if not config.attributes.huber_delta > 0:
    errors.append(f"config.attributes.huber_delta={config.attributes.huber_delta!r}: must be > 0")
  return errors


def input_shape(config) -> tuple[int, int, int]:
  return tuple(int(s) for s in config.data.shape)


def num_outputs(config) -> int:
  return sum(t.width for t in targets_of(config))


def prepare_batch(batch: dict, config, step: int) -> dict[str, np.ndarray]:
  """{"image", "targets" (NaN -> 0), "present" (1 where the target is known)}; a rating outside 1..K or not
  an integer is a ValueError naming the target and the study."""
  values = np.asarray(batch["targets"], np.float32)
  present = np.isfinite(values)
  for t in targets_of(config):
    if t.is_rating:
      v = values[:, t.column]
      bad = present[:, t.column] & ((v != np.rint(v)) | (v < 1) | (v > t.levels))
      if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"study {batch['study_id'][i]}: {t.name}={float(v[i])!r} is not a rating in 1..{t.levels} "
                         f"(config.attributes.levels.{t.name})")
  return {"image": batch["image"], "targets": np.where(present, values, 0.0).astype(np.float32),
          "present": present.astype(np.float32)}


def augment(key: jax.Array, batch: dict, config) -> dict:
  if not config.augment.enabled:
    return batch
  return {**batch, "image": augment_lib.augment_batch(key, batch["image"], config.augment)}


def per_target_loss(outputs, targets, present, config):
  """(T,) each target's mean loss over the studies that have it (0 where none has it), and (T,) their counts."""
  values, counts = [], []
  delta = float(config.attributes.huber_delta)
  for t, sl in zip(targets_of(config), _slices(targets_of(config))):
    y, m = targets[:, t.column], present[:, t.column]
    z = outputs[:, sl].astype(jnp.float32)
    if t.is_rating:
      above = (y[:, None] > jnp.arange(1, t.levels)[None, :]).astype(jnp.float32)
      per = jnp.sum(optax.sigmoid_binary_cross_entropy(z, above), -1)
    else:
      per = optax.huber_loss(z[:, 0], (y - t.location) / t.spread, delta=delta)
    n = jnp.sum(m)
    values.append(jnp.sum(per * m) / jnp.maximum(n, 1.0))
    counts.append(n)
  return jnp.stack(values), jnp.stack(counts)


def loss(logits: jax.Array, batch: dict, config) -> tuple[jax.Array, dict]:
  """Mean over targets present in the batch of each target's masked loss; the share of known targets."""
  values, counts = per_target_loss(logits, batch["targets"], batch["present"], config)
  has = (counts > 0).astype(jnp.float32)
  value = jnp.sum(values * has) / jnp.maximum(jnp.sum(has), 1.0)
  return value, {"known_targets": jnp.mean(batch["present"])}


def make_apply(graphdef, mesh, config):
  """jit: (params, batch_stats, images sharded over the mesh) -> raw outputs (replicated)."""
  return runtime.compile_apply(graphdef, mesh, lambda model, x: model(x, train=False).astype(jnp.float32))


# ----------------------------------------------------------------------------- evaluation (host)

def predict_split(apply, variables: runtime.Variables, mesh, source, config) -> dict[str, np.ndarray]:
  """Raw outputs, predictions (N, T), references (N, T; NaN = missing) and ids of every example, exactly once."""
  out: dict[str, list] = {k: [] for k in ("outputs", "targets", "study_id", "patient_id")}
  for outputs, batch in inferers.whole_volume_batches(apply, variables, mesh, source, config.train.batch_size):
    out["outputs"].append(outputs)
    for k in ("targets", "study_id", "patient_id"):
      out[k].append(batch[k])
  width = num_outputs(config)
  pred = {k: np.concatenate(v) if v else np.zeros((0, width if k == "outputs" else len(config.data.targets)))
          for k, v in out.items()}
  pred["pred"] = decode_outputs(pred["outputs"], config)
  return pred


def target_metrics(t: Target, y: np.ndarray, p: np.ndarray) -> dict[str, float]:
  """Point values of every metric of ``t`` on the studies that have it."""
  known = np.isfinite(y)
  y, p = y[known], p[known]
  out = {k: fn(y, p) for k, fn in REGRESSION_METRICS.items()}
  if t.is_rating:
    out.update({k: fn(y, p) for k, fn in RATING_METRICS.items()})
    out["kappa"] = metrics.weighted_kappa(y, p, range(1, t.levels + 1))
  out["n"] = int(known.sum())
  return out


def summarize(pred: dict, config) -> dict[str, float]:
  """loss, neg_mae (the best metric), mean_spearman and every target's metrics as "<target>/<metric>"."""
  summary: dict[str, float] = {}
  scaled, rhos = [], []
  for t in targets_of(config):
    m = target_metrics(t, pred["targets"][:, t.column], pred["pred"][:, t.column])
    summary.update({f"{t.name}/{k}": float(v) for k, v in m.items()})
    if m["n"]:
      scaled.append(m["mae"] / t.scale)
      rhos.append(m["spearman"])
  values = np.nan_to_num(pred["targets"].astype(np.float32), nan=0.0)
  present = np.isfinite(pred["targets"]).astype(np.float32)
  if len(values):
    per, counts = per_target_loss(jnp.asarray(pred["outputs"]), jnp.asarray(values), jnp.asarray(present), config)
    has = np.asarray(counts) > 0
    summary["loss"] = float(np.sum(np.asarray(per)[has]) / max(has.sum(), 1))
  else:
    summary["loss"] = float("nan")
  summary["neg_mae"] = -float(np.mean(scaled)) if scaled else float("nan")
  finite = [r for r in rhos if np.isfinite(r)]
  summary["mean_spearman"] = float(np.mean(finite)) if finite else float("nan")
  return summary


def evaluate(apply, variables, mesh, source, config) -> tuple[dict[str, float], dict[str, np.ndarray]]:
  pred = predict_split(apply, variables, mesh, source, config)
  return summarize(pred, config), pred


def with_confidence(pred: dict, config, *, n_boot: int, seed: int) -> dict[str, Any]:
  """Per target: every metric with a 95% bootstrap CI, patients resampled (all their studies together)."""
  result = {}
  for t in targets_of(config):
    y, p = pred["targets"][:, t.column], pred["pred"][:, t.column]
    known = np.isfinite(y)
    groups = np.asarray(pred["patient_id"])[known]
    fns = dict(REGRESSION_METRICS)
    if t.is_rating:
      fns.update(RATING_METRICS)
      fns["kappa"] = lambda a, b, k=t.levels: metrics.weighted_kappa(a, b, range(1, k + 1))
    entry = {"kind": f"rating 1-{t.levels}" if t.is_rating else "continuous", "n": int(known.sum()),
             "n_missing": int((~known).sum()), "n_patients": int(len(set(groups.tolist())))}
    for k, fn in fns.items():
      ci = metrics.bootstrap_ci(y[known], p[known], fn, groups=groups, n_boot=n_boot, seed=seed)
      entry[k] = {"value": ci.point, "lo": ci.lo, "hi": ci.hi, "n_used": ci.n_used}
    result[t.name] = entry
  return result


def write_predictions(path: str, pred: dict, config, fold=None) -> None:
  """One row per study: ids, then each target's reference (empty = missing) and prediction; ``fold`` (one per
  study, cross-validation's out-of-fold table) as a first column."""
  targets = targets_of(config)
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow((["fold"] if fold is not None else []) + ["study_id", "patient_id"]
               + [f"{t.name}{s}" for t in targets for s in ("", "_predicted")])
    for i in range(len(pred["pred"])):
      row = ([int(fold[i])] if fold is not None else []) + [pred["study_id"][i], pred["patient_id"][i]]
      for t in targets:
        y = pred["targets"][i, t.column]
        row += ["" if not np.isfinite(y) else f"{y:g}", f"{pred['pred'][i, t.column]:.4f}"]
      w.writerow(row)


def run_eval(predictor: runtime.Predictor, sources: dict, workdir: str, split: str) -> dict:
  """--mode=eval: eval_<split>.json (per-target metrics with patient-bootstrap CIs) and predictions_<split>.csv."""
  config = predictor.config
  v = predictor.variables
  apply = make_apply(v.graphdef, predictor.mesh, config)
  pred = predict_split(apply, v, predictor.mesh, sources[split], config)
  result = {"split": split, "checkpoint": predictor.checkpoint, "checkpoint_step": predictor.step,
            "checkpoint_fingerprint": runtime.fingerprint(predictor),
            "n": int(len(pred["pred"])), "n_patients": int(len(set(np.asarray(pred["patient_id"]).tolist()))),
            "summary": summarize(pred, config),
            "targets": with_confidence(pred, config, n_boot=config.eval.n_boot, seed=config.seed)}
  if runtime.is_main_process():
    path = os.path.join(workdir, f"eval_{split}.json")
    with open(path, "w") as f:
      json.dump(metrics.json_safe(result), f, indent=2, allow_nan=False)
    write_predictions(os.path.join(workdir, f"predictions_{split}.csv"), pred, config)
    print("\n".join(summary_lines(result)))
    print(f"Wrote {path} and predictions_{split}.csv")
  return result


def pool_out_of_fold(oof: list[dict], config, workdir: str) -> dict:
  """--mode=cv: every study's out-of-fold prediction (each from the fold that held it out) in one table,
  oof_predictions.csv (with its fold), and each target's metrics over all of them with 95% patient-bootstrap
  CIs, as "<target>/<metric>"."""
  pred = {k: np.concatenate([np.asarray(c[k]) for c in oof]) for k in ("pred", "targets", "study_id", "patient_id")}
  fold = np.concatenate([np.full(len(c["pred"]), i) for i, c in enumerate(oof)])
  per = with_confidence(pred, config, n_boot=int(config.eval.n_boot), seed=int(config.seed))
  if runtime.is_main_process():
    write_predictions(os.path.join(workdir, "oof_predictions.csv"), pred, config, fold=fold)
  return {"level": "study", "n": int(len(pred["pred"])),
          "n_patients": int(len(set(np.asarray(pred["patient_id"]).tolist()))),
          **{f"{name}/{k}": v for name, e in per.items() for k, v in e.items() if isinstance(v, dict)}}


def _ci(m: dict, digits: int = 2) -> str:
  if m is None or m.get("value") is None or not np.isfinite(m["value"]):
    return "n/a"
  lo, hi = m.get("lo"), m.get("hi")
  interval = "" if lo is None or not np.isfinite(lo) else f" [{lo:.{digits}f}, {hi:.{digits}f}]"
  return f"{m['value']:.{digits}f}{interval}"


TABLE_COLUMNS = (("mae", "MAE"), ("rmse", "RMSE"), ("spearman", "Spearman"), ("pearson", "Pearson"),
                 ("exact", "exact"), ("within_one", "within one"), ("kappa", "weighted kappa"))


def table(result: dict) -> tuple[list[str], list[list[str]]]:
  """(header, rows): one row per target, each metric with its 95% CI ("n/a" where it does not apply)."""
  head = ["attribute", "kind", "n"] + [label for _, label in TABLE_COLUMNS]
  rows = [[name, e["kind"], str(e["n"])] + [_ci(e.get(k)) if k in e else "" for k, _ in TABLE_COLUMNS]
          for name, e in result["targets"].items()]
  return head, rows


def summary_lines(result: dict) -> list[str]:
  head, rows = table(result)
  lines = [f"{result['split']}: {result['n']} studies of {result['n_patients']} patients (95% patient-bootstrap CIs)"]
  for r in rows:
    lines.append("  " + "  ".join(f"{h} {c}" for h, c in zip(head, r) if c))
  return lines


# ----------------------------------------------------------------------------- --mode=predict / report

def scan_predictor(predictor: runtime.Predictor, workdir: str, out_dir: str):
  """Per scan: every attribute's prediction (ratings: the expected level and the rounded one)."""
  config = predictor.config
  v = predictor.variables
  apply = make_apply(v.graphdef, predictor.mesh, config)
  n = runtime.data_size(predictor.mesh)
  targets = targets_of(config)

  def predict_one(scan, image: np.ndarray, name: str, crop_start=None) -> dict:  # crop_start: unused here
    outputs = runtime.fetch(apply(v.params, v.batch_stats,
                                  runtime.to_global(predictor.mesh, runtime.host_slice(np.repeat(image, n, 0)))))
    pred = decode_outputs(outputs[:1], config)[0]
    row = {}
    for t in targets:
      row[t.name] = f"{pred[t.column]:.4f}"
      if t.is_rating:
        row[f"{t.name}_rating"] = str(int(np.clip(np.rint(pred[t.column]), 1, t.levels)))
    if runtime.is_main_process():
      print(f"{scan.path}: " + ", ".join(f"{k} {val}" for k, val in row.items()))
    return row
  return predict_one


def report_sections(predictor: runtime.Predictor, sources: dict, workdir: str, out_dir: str, split: str) -> dict:
  """The per-attribute table with CIs and the predicted-vs-reference plots of ``split`` (test, or the external
  set); its eval_<split>.json is rerun when missing or written for other weights."""
  from lungct import viz
  config = predictor.config
  result = metrics.null_to_nan(runtime.current_evaluation(predictor, sources, workdir, split, run_eval))
  v = predictor.variables
  pred = predict_split(make_apply(v.graphdef, predictor.mesh, config), v, predictor.mesh, sources[split], config)
  panels = [{"name": t.name, "y": pred["targets"][np.isfinite(pred["targets"][:, t.column]), t.column],
             "p": pred["pred"][np.isfinite(pred["targets"][:, t.column]), t.column],
             "levels": list(range(1, t.levels + 1)) if t.is_rating else None,
             "unit": "mm" if t.name.endswith("_mm") else ""} for t in targets_of(config)]
  where = "external test set" if split == "external" else f"{split} split"
  figs = {f"Predicted vs reference ({where})": viz.save(viz.predicted_vs_reference(panels),
                                                        os.path.join(out_dir, "predicted_vs_reference.png"))}
  head, rows = table(result)
  return {
      "title": "nodule attributes (" + ", ".join(config.data.targets) + ")",
      "test_line": f"{'External test' if split == 'external' else 'Test'} set: {result['n']} studies from "
                   f"{result['n_patients']} patients.",
      "sections": [(f"Attributes on the {where}", [
          ("p", "Each attribute with a 95% bootstrap confidence interval (patients resampled with all their "
                f"studies, {config.eval.n_boot} draws). MAE and RMSE are in the attribute's units (mm for a "
                "diameter, rating levels for a rating); exact and within-one agreement and the quadratic-weighted "
                "kappa compare the rounded prediction with the reference rating. Missing references are left out "
                "of that attribute only."),
          ("table", head, rows)])],
      "figures": figs,
      "limitations": ["Radiologist ratings are subjective and vary between readers; the reference here is one "
                      "consensus (max-voted) rating per nodule, so agreement with it is bounded by the readers' "
                      "own agreement."],
  }
