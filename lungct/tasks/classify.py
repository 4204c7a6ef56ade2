"""Classification of whole volumes: binary (normal vs abnormal, sigmoid) or severity grades (softmax).

Evaluation: probabilities for every example of a split, then clinical metrics (`lungct.metrics`); --mode=eval
adds bootstrap confidence intervals at operating thresholds chosen on validation.
"""
from __future__ import annotations

import csv
import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lungct import checkpoint, metrics, runtime
from lungct.data import augment as augment_lib

NAME = "classify"
MODES = ("train", "eval", "cv", "predict", "report")
BEST_METRIC = "auc"


CALIBRATIONS = ("none", "temperature")


def check(config) -> list[str]:
  errors = []
  names = tuple(config.data.get("class_names", ("negative", "positive")))
  if config.data.label == "binary" and (len(names) != 2 or not all(isinstance(n, str) and n for n in names)):
    errors.append(f"config.data.class_names={names!r}: two names (label 0, label 1), e.g. ('benign', 'malignant')")
  calibration = config.eval.get("calibration", "none")
  if calibration not in CALIBRATIONS:
    errors.append(f"config.eval.calibration={calibration!r}: must be one of {CALIBRATIONS}")
  return errors


def input_shape(config) -> tuple[int, int, int]:
  return tuple(int(s) for s in config.data.shape)


def num_outputs(config) -> int:
  """1 logit for binary classification, else one per class."""
  return 1 if config.data.label == "binary" else int(config.data.num_classes)


def label_key(config) -> str:
  return "label" if config.data.label == "binary" else "grade"


# ----------------------------------------------------------------------------- training (on device)

def prepare_batch(batch: dict, config, step: int) -> dict[str, np.ndarray]:
  return {"image": batch["image"], "target": np.asarray(batch[label_key(config)], np.int32)}


def augment(key: jax.Array, batch: dict, config) -> dict:
  if not config.augment.enabled:
    return batch
  return {**batch, "image": augment_lib.augment_batch(key, batch["image"], config.augment)}


def loss(logits: jax.Array, batch: dict, config) -> tuple[jax.Array, dict]:
  """Mean (optionally class-weighted) binary or softmax cross-entropy, and the batch accuracy."""
  labels = batch["target"]
  if logits.shape[-1] == 1:
    per_example = optax.sigmoid_binary_cross_entropy(logits[:, 0], labels.astype(jnp.float32))
    correct = (logits[:, 0] > 0).astype(jnp.int32) == labels
  else:
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = jnp.argmax(logits, -1) == labels
  weights = tuple(config.train.class_weights)
  if weights:
    w = jnp.asarray(weights, jnp.float32)[labels]
    value = jnp.sum(w * per_example) / jnp.sum(w)
  else:
    value = jnp.mean(per_example)
  return value, {"accuracy": jnp.mean(correct)}


def probabilities(logits: jax.Array) -> jax.Array:
  return jax.nn.sigmoid(logits[:, 0]) if logits.shape[-1] == 1 else jax.nn.softmax(logits, -1)


def make_apply(graphdef, mesh, config):
  """jit: (params, batch_stats, images sharded over the mesh) -> probabilities (replicated)."""
  return runtime.compile_apply(graphdef, mesh, lambda model, x: probabilities(model(x, train=False)))


# ----------------------------------------------------------------------------- evaluation (host)

def predict_split(apply, variables: runtime.Variables, mesh, source, config) -> dict[str, np.ndarray]:
  """Probabilities and identities of every example of ``source``, exactly once."""
  out: dict[str, list] = {k: [] for k in ("prob", "label", "grade", "study_id", "patient_id")}
  for probs, batch in runtime.predict_batches(apply, variables, mesh, source, config.train.batch_size):
    out["prob"].append(probs)
    for k in ("label", "grade", "study_id", "patient_id"):
      out[k].append(batch[k])
  return {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in out.items()}


def summarize(pred: dict, config) -> dict[str, float]:
  """Loss and clinical metrics from per-case predictions (numpy); ``auc`` is the binary or macro ROC-AUC."""
  y = pred[label_key(config)]
  p = pred["prob"]
  eps = 1e-7
  if p.ndim == 1:
    value = float(-np.mean(y * np.log(p + eps) + (1 - y) * np.log(1 - p + eps))) if len(y) else float("nan")
    out = metrics.binary_metrics(y, p, threshold=0.5)
  else:
    value = float(-np.mean(np.log(p[np.arange(len(y)), y] + eps))) if len(y) else float("nan")
    out = metrics.multiclass_metrics(y, p)
  out = {k: v for k, v in out.items() if np.isscalar(v)}
  out["loss"] = value
  out["auc"] = out.get("roc_auc", out.get("macro_roc_auc", float("nan")))
  return {k: float(v) for k, v in out.items()}


def evaluate(apply, variables, mesh, source, config) -> tuple[dict[str, float], dict[str, np.ndarray]]:
  pred = predict_split(apply, variables, mesh, source, config)
  return summarize(pred, config), pred


def class_names(config) -> tuple[str, str]:
  """Names of label 0 and 1 of a binary task (``config.data.class_names``, e.g. benign / malignant)."""
  names = tuple(config.data.get("class_names", ("negative", "positive")))
  return (str(names[0]), str(names[1])) if len(names) == 2 else ("negative", "positive")


def _undefined(name: str, y_val: np.ndarray, level: str) -> str:
  """Why an operating point could not be chosen on validation (one class missing)."""
  n_pos, n_neg = int(np.sum(y_val == 1)), int(np.sum(y_val == 0))
  missing = "positive" if n_pos == 0 else "negative" if n_neg == 0 else None
  if missing is None:  # cannot happen for the rules of metrics.operating_points; said plainly if it does
    return f"{name}: no threshold on the {level}-level validation scores"
  units = {"study": "studies", "patient": "patients"}.get(level, level + "s")
  return (f"the validation split has no {missing} {units} ({n_pos} positive, {n_neg} negative): "
          f"{name} cannot be chosen")


def operating_point_table(y_val, p_val, y, p, groups, *, level: str, n_boot: int, seed: int,
                          sensitivity_targets: Sequence[float] = (0.9, 0.95)) -> dict[str, dict]:
  """Thresholds chosen on validation scores (y_val, p_val), applied to (y, p) with bootstrap CIs resampling
  ``groups``; both at one ``level`` ("study" or "patient"). A threshold that validation cannot define (one
  class missing) is reported as {"threshold": None, "undefined": why}, never as metrics at NaN."""
  points = metrics.operating_points(y_val, p_val, targets=tuple(sensitivity_targets))
  table = {}
  for name, threshold in points.items():
    if not np.isfinite(threshold):
      table[name] = {"threshold": None, "undefined": _undefined(name, np.asarray(y_val), level)}
      continue
    table[name] = {"threshold": float(threshold),
                   "counts": metrics.confusion_counts(y, (p >= threshold).astype(int)),
                   "metrics": metrics.metrics_with_ci(y, p, threshold, groups=groups, n_boot=n_boot, seed=seed)}
    if 0.0 < threshold < 1.0:  # the decision curve at this threshold read as a risk (Vickers & Elkin 2006)
      dc = metrics.decision_curve(y, p, (threshold,), groups=groups, n_boot=n_boot, seed=seed)
      table[name]["net_benefit"] = {k: {s: dc[k][s][0] for s in ("value", "lo", "hi")}
                                    for k in ("model", "treat_all", "advantage")}
  return table


def recalibrate(val: dict, test: dict, method: str) -> tuple[dict, dict, dict]:
  """(val, test, record): with method "temperature", a temperature fitted on the validation probabilities
  (through their logits) applied to both splits; ``prob_uncalibrated`` keeps the model's own output."""
  if method == "none":
    return val, test, {"method": "none"}
  temperature = metrics.fit_temperature(val["label"], metrics.logits_of(val["prob"]))
  if not np.isfinite(temperature):
    return val, test, {"method": method, "temperature": None,
                       "undefined": "the validation split holds one class: no temperature to fit; "
                                    "probabilities left as the model gave them"}
  out = []
  for d in (val, test):
    out.append({**d, "prob_uncalibrated": d["prob"],
                "prob": metrics.apply_temperature(metrics.logits_of(d["prob"]), temperature)})
  return out[0], out[1], {"method": method, "temperature": temperature, "fitted_on": "validation"}


def calibrated(prob: np.ndarray, record: dict | None) -> np.ndarray:
  """``prob`` through the temperature of an evaluation's ``recalibration`` record (unchanged without one)."""
  t = (record or {}).get("temperature")
  return prob if t is None else metrics.apply_temperature(metrics.logits_of(prob), float(t))


def _calibration(y, p, groups, n_boot, seed) -> dict:
  bins = {k: np.asarray(v).tolist() for k, v in metrics.calibration_bins(y, p).items()}
  ci = metrics.bootstrap_ci(y, p, metrics.expected_calibration_error, groups=groups, n_boot=n_boot, seed=seed)
  return {**bins, "ece": {"value": ci.point, "lo": ci.lo, "hi": ci.hi, "n_used": ci.n_used}}


def with_confidence(val: dict, test: dict, *, n_boot: int = 1000, seed: int = 0,
                    sensitivity_targets: Sequence[float] = (0.9, 0.95), calibration: str = "none",
                    dca_thresholds: Sequence[float] = metrics.DCA_THRESHOLDS) -> dict[str, Any]:
  """Binary evaluation of ``test`` with thresholds (and the optional temperature) from ``val``.

  Study level: every study (scan, nodule) is a case, thresholds chosen on per-study validation scores.
  Patient level (``patient_level``): a patient is positive if any of its studies is and scores its highest
  probability; thresholds chosen on the patients of validation scored the same way. CIs resample patients.
  Also: ROC, calibration (ECE with CI; before and after recalibration when there is one) and the decision
  curve (net benefit with CIs) at both levels.
  """
  raw_test = test
  val, test, record = recalibrate(val, test, calibration)
  groups = test["patient_id"]
  result = {"n": int(len(test["label"])), "n_positive": int(np.sum(test["label"] == 1)),
            "n_patients": int(len(set(test["patient_id"].tolist()))), "level": "study",
            "operating_points": operating_point_table(
                val["label"], val["prob"], test["label"], test["prob"], groups, level="study", n_boot=n_boot,
                seed=seed, sensitivity_targets=sensitivity_targets)}
  fpr, tpr, _ = metrics.roc_curve(test["label"], test["prob"])
  result["roc"] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
  result["calibration"] = _calibration(test["label"], test["prob"], groups, n_boot, seed)
  if record.get("temperature") is not None:
    record["before"] = _calibration(raw_test["label"], raw_test["prob"], groups, n_boot, seed)
    record["after"] = result["calibration"]
  result["recalibration"] = record
  result["decision_curve"] = metrics.decision_curve(test["label"], test["prob"], dca_thresholds, groups=groups,
                                                    n_boot=n_boot, seed=seed)
  result["patient_level"] = patient_level(val, test, n_boot=n_boot, seed=seed,
                                          sensitivity_targets=sensitivity_targets, dca_thresholds=dca_thresholds)
  return result


def patient_level(val: dict, test: dict, *, n_boot: int = 1000, seed: int = 0,
                  sensitivity_targets: Sequence[float] = (0.9, 0.95),
                  dca_thresholds: Sequence[float] = metrics.DCA_THRESHOLDS) -> dict[str, Any]:
  """Per-patient evaluation (e.g. several nodules per patient): a patient is positive if any of its studies
  is and scores its highest probability, on validation (where the thresholds are chosen) and on ``test``;
  CIs resample patients."""
  from lungct.data import pipeline
  pv = pipeline.patient_level(val["prob"], val["label"], val["patient_id"])
  pt = pipeline.patient_level(test["prob"], test["label"], test["patient_id"])
  return {"level": "patient", "n_patients": int(len(pt["prob"])),
          "n_positive": int(np.sum(pt["label"] == 1)),
          "max_studies_per_patient": int(pt["count"].max(initial=0)),
          "operating_points": operating_point_table(
              pv["label"], pv["prob"], pt["label"], pt["prob"], pt["patient_id"], level="patient",
              n_boot=n_boot, seed=seed, sensitivity_targets=sensitivity_targets),
          "decision_curve": metrics.decision_curve(pt["label"], pt["prob"], dca_thresholds,
                                                   groups=pt["patient_id"], n_boot=n_boot, seed=seed)}


def decision_threshold(result: dict) -> tuple[float, str]:
  """(threshold, rule) for per-case decisions: Youden's J on validation, else 0.5 when it is undefined."""
  youden = result["operating_points"]["youden"]
  if youden.get("threshold") is not None:
    return float(youden["threshold"]), "youden"
  return 0.5, f"default@0.5 ({youden['undefined']})"


def write_predictions(path: str, pred: dict, threshold: float = 0.5) -> None:
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    if pred["prob"].ndim == 2:
      k = pred["prob"].shape[1]
      w.writerow(["study_id", "patient_id", "grade", "predicted_grade"] + [f"prob_{i}" for i in range(k)])
      for i in range(len(pred["prob"])):
        w.writerow([pred["study_id"][i], pred["patient_id"][i], int(pred["grade"][i]),
                    int(np.argmax(pred["prob"][i]))] + [f"{p:.6f}" for p in pred["prob"][i]])
    else:
      raw = pred.get("prob_uncalibrated")
      w.writerow(["study_id", "patient_id", "label", "probability", "prediction", "threshold"]
                 + (["probability_uncalibrated"] if raw is not None else []))
      for i in range(len(pred["prob"])):
        p = float(pred["prob"][i])
        w.writerow([pred["study_id"][i], pred["patient_id"][i], int(pred["label"][i]), f"{p:.6f}",
                    int(p >= threshold), threshold] + ([f"{float(raw[i]):.6f}"] if raw is not None else []))


def run_eval(predictor: runtime.Predictor, sources: dict, workdir: str, split: str) -> dict:
  """--mode=eval: thresholds (and, with eval.calibration="temperature", a temperature) chosen on validation,
  ``split`` evaluated with CIs at study and patient level; eval_<split>.json (which names the checkpoint: path,
  step and a fingerprint of its arrays) and predictions_<split>.csv in the workdir (main process only)."""
  config = predictor.config
  v = predictor.variables
  apply = make_apply(v.graphdef, predictor.mesh, config)
  val = predict_split(apply, v, predictor.mesh, sources["validation"], config)
  test = val if split == "validation" else predict_split(apply, v, predictor.mesh, sources[split], config)
  if config.data.label == "binary":
    result = with_confidence(val, test, n_boot=config.eval.n_boot, seed=config.seed,
                             sensitivity_targets=tuple(config.eval.sensitivity_targets),
                             calibration=config.eval.get("calibration", "none"))
    result["class_names"] = list(class_names(config))
    if result["recalibration"].get("temperature") is not None:
      test = {**test, "prob_uncalibrated": test["prob"], "prob": calibrated(test["prob"], result["recalibration"])}
    threshold, rule = decision_threshold(result)
  else:
    result = {"n": int(len(test["grade"])), "metrics": metrics.multiclass_metrics(test["grade"], test["prob"])}
    threshold, rule = 0.5, "argmax"
  result.update(split=split, checkpoint=predictor.checkpoint, checkpoint_step=predictor.step,
                checkpoint_fingerprint=checkpoint.fingerprint(v.params, v.batch_stats), decision_rule=rule)
  if runtime.is_main_process():
    with open(os.path.join(workdir, f"eval_{split}.json"), "w") as f:
      json.dump(metrics.json_safe(result), f, indent=2, allow_nan=False)
    write_predictions(os.path.join(workdir, f"predictions_{split}.csv"), test, threshold)
    if config.data.label == "binary":
      print(_summary_line(split, result))
    print(f"Wrote {workdir}/eval_{split}.json and predictions_{split}.csv")
  return result


def load_eval(workdir: str, split: str, predictor: runtime.Predictor) -> tuple[dict | None, str]:
  """(eval_<split>.json, "") when --mode=eval wrote it for ``predictor``'s checkpoint (same fingerprint of
  the arrays) with the current eval.calibration; else (None, why it cannot be used)."""
  path = os.path.join(workdir, f"eval_{split}.json")
  if not os.path.exists(path):
    return None, f"no {path}"
  with open(path) as f:
    ev = json.load(f)
  v = predictor.variables
  mine = checkpoint.fingerprint(v.params, v.batch_stats)
  if ev.get("checkpoint_fingerprint") != mine:
    return None, (f"{path} was written for checkpoint {ev.get('checkpoint')} (step {ev.get('checkpoint_step')}, "
                  f"fingerprint {ev.get('checkpoint_fingerprint')}), not for {predictor.checkpoint} "
                  f"(step {predictor.step}, fingerprint {mine})")
  method = predictor.config.eval.get("calibration", "none")
  if ev.get("recalibration", {}).get("method", "none") != method:
    return None, (f"{path} was written with eval.calibration="
                  f"{ev.get('recalibration', {}).get('method', 'none')!r}, not {method!r}")
  return ev, ""


def _ci(m: dict) -> str:
  return "undefined" if m["value"] is None or not np.isfinite(m["value"]) else \
      f"{m['value']:.3f} [{m['lo']:.3f}, {m['hi']:.3f}]"


def _summary_line(split, result) -> str:
  names = result.get("class_names", ["negative", "positive"])
  lines = [f"{split}: {result['n']} studies ({result['n_positive']} {names[1]}), per study "
           f"(thresholds chosen on per-study validation scores):"]
  rec = result.get("recalibration", {})
  if rec.get("temperature") is not None:
    lines.append(f"  temperature {rec['temperature']:.3f} fitted on validation: ECE {_ci(rec['before']['ece'])} "
                 f"-> {_ci(rec['after']['ece'])}")
  elif rec.get("undefined"):
    lines.append(f"  recalibration: {rec['undefined']}")

  def table(ops):
    for name, op in ops.items():
      if op.get("threshold") is None:
        lines.append(f"  {name:>14}: undefined ({op['undefined']})")
        continue
      m = op["metrics"]
      lines.append(f"  {name:>14} (t={op['threshold']:.3f}): AUC {_ci(m['roc_auc'])}  sens {_ci(m['sensitivity'])}  "
                   f"spec {_ci(m['specificity'])}  acc {_ci(m['accuracy'])}")
  table(result["operating_points"])
  pl = result.get("patient_level")
  if pl and pl["max_studies_per_patient"] > 1:
    lines.append(f"per patient ({pl['n_patients']} patients, {pl['n_positive']} {names[1]}; a patient scores its "
                 f"highest study; thresholds chosen on per-patient validation scores):")
    table(pl["operating_points"])
  return "\n".join(lines)
