"""Classification of whole volumes: binary (normal vs abnormal, sigmoid) or severity grades (softmax).

Evaluation: probabilities for every example of a split, then clinical metrics (`lungct.metrics`); --mode=eval
adds bootstrap confidence intervals at operating thresholds chosen on validation.
"""
from __future__ import annotations

import csv
import html
import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lungct import inferers, interpret, metrics, runtime, viz
from lungct.data import augment as augment_lib
from lungct.data import pipeline

NAME = "classify"
MODES = ("train", "eval", "cv", "predict", "report")
BEST_METRIC = "auc"
HEADLINE_METRICS = ("accuracy",)
CONFIG = "configs/default.py"   # its reference config (with a seconds-long `:tiny` variant)
CONFIG_GROUP = ""        # its settings live in data (label, num_classes) and train (class_weights)
EXECUTION_KEYS = ()


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


def unsupported_modes(config) -> dict[str, str]:
  """predict and report cover binary classifiers (one probability, a threshold, sensitivity / specificity); a
  K-class one (data.label="grade") has train, eval (its K-class metrics) and cv."""
  if config.data.label == "binary":
    return {}
  why = (f"config.data.label={config.data.label!r} (a {int(config.data.num_classes)}-class classifier; "
         f"predict and report cover binary ones)")
  return {"predict": why, "report": why}


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
  for probs, batch in inferers.whole_volume_batches(apply, variables, mesh, source,
                                                           config.train.batch_size):
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


def recalibrate(val: dict, test: dict, method: str, key: str = "label") -> tuple[dict, dict, dict]:
  """(val, test, record): with method "temperature", a temperature fitted on the validation probabilities
  (through their logits; (N,) P(class 1) against ``key`` "label", or (N, K) class probabilities against
  "grade") applied to both splits; ``prob_uncalibrated`` keeps the model's own output."""
  if method == "none":
    return val, test, {"method": "none"}
  temperature = metrics.fit_temperature(val[key], metrics.logits_of(val["prob"]))
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


def top_label(pred: dict) -> tuple[np.ndarray, np.ndarray]:
  """(correct, confidence) of a K-class prediction: whether the argmax is the grade, and its probability."""
  prob = np.asarray(pred["prob"], dtype=np.float64)
  return (np.argmax(prob, axis=1) == np.asarray(pred["grade"])).astype(int), prob.max(axis=1)


def multiclass_result(val: dict, test: dict, *, calibration: str = "none", n_boot: int = 1000,
                      seed: int = 0) -> tuple[dict, dict]:
  """(result, test) of a K-class evaluation: `metrics.multiclass_metrics` of ``test``; with calibration
  "temperature", one temperature fitted on ``val`` (softmax(log p / T)) applied to ``test``, which leaves the
  argmax and the AUCs unchanged, and the top-label calibration (confidence = the highest probability against
  the accuracy of the argmax: ECE with a patient-bootstrap CI and its bins) before and after."""
  raw = test
  val, test, record = recalibrate(val, test, calibration, key="grade")
  if record.get("temperature") is not None:
    groups = test["patient_id"]
    record["kind"] = "top-label (confidence = highest class probability, accuracy of the argmax)"
    record["before"] = _calibration(*top_label(raw), groups, n_boot, seed)
    record["after"] = _calibration(*top_label(test), groups, n_boot, seed)
  return {"n": int(len(test["grade"])), "metrics": metrics.multiclass_metrics(test["grade"], test["prob"]),
          "recalibration": record}, test


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
  pv = metrics.patient_level(val["prob"], val["label"], val["patient_id"])
  pt = metrics.patient_level(test["prob"], test["label"], test["patient_id"])
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
    result, test = multiclass_result(val, test, calibration=config.eval.get("calibration", "none"),
                                     n_boot=config.eval.n_boot, seed=config.seed)
    threshold, rule = 0.5, "argmax"
  result.update(split=split, checkpoint=predictor.checkpoint, checkpoint_step=predictor.step,
                checkpoint_fingerprint=runtime.fingerprint(predictor), decision_rule=rule)
  if runtime.is_main_process():
    with open(os.path.join(workdir, f"eval_{split}.json"), "w") as f:
      json.dump(metrics.json_safe(result), f, indent=2, allow_nan=False)
    write_predictions(os.path.join(workdir, f"predictions_{split}.csv"), test, threshold)
    if config.data.label == "binary":
      print(_summary_line(split, result))
    elif result["recalibration"].get("temperature") is not None:
      rec = result["recalibration"]
      print(f"{split}: temperature {rec['temperature']:.3f} fitted on validation: top-label ECE "
            f"{_ci(rec['before']['ece'])} -> {_ci(rec['after']['ece'])}")
    print(f"Wrote {workdir}/eval_{split}.json and predictions_{split}.csv")
  return result


def load_eval(workdir: str, split: str, predictor: runtime.Predictor) -> tuple[dict | None, str]:
  """(eval_<split>.json, "") when --mode=eval wrote it for ``predictor``'s checkpoint (same fingerprint of
  the arrays, `runtime.load_evaluation`) with the current eval.calibration; else (None, why it cannot be used)."""
  ev, why = runtime.load_evaluation(workdir, split, predictor)
  if ev is None:
    return None, why
  method = predictor.config.eval.get("calibration", "none")
  if ev.get("recalibration", {}).get("method", "none") != method:
    return None, (f"{os.path.join(workdir, f'eval_{split}.json')} was written with eval.calibration="
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


# ----------------------------------------------------------------------------- --mode=predict

def choose_threshold(config, workdir: str, predictor: runtime.Predictor
                     ) -> tuple[float, str, dict]:
  """(threshold, why, recalibration) for ``predictor``'s checkpoint.

  The threshold is config.predict.threshold if set (>= 0); else the Youden threshold --mode=eval chose on
  validation, read from an eval_test.json / eval_validation.json written for this very checkpoint (an
  evaluation of other weights is named and ignored); else 0.5. The recalibration (a temperature, with
  eval.calibration="temperature") comes from that same evaluation; {"method": "none"} without one.
  """
  ev, notes = None, []
  for split in ("test", "validation"):
    ev, why = load_eval(workdir, split, predictor)
    if ev is not None:
      name = f"eval_{split}.json"
      break
    if not why.startswith("no "):
      notes.append(f"ignored: {why}")
  for note in notes:
    print(note)
  rec = (ev or {}).get("recalibration", {"method": "none"})
  if config.eval.get("calibration", "none") != "none" and ev is None:
    raise FileNotFoundError(f"config.eval.calibration={config.eval.calibration!r}: no evaluation of "
                            f"{predictor.checkpoint} holds its temperature; run --mode=eval first")
  if config.predict.threshold >= 0:
    return float(config.predict.threshold), "config.predict.threshold", rec
  if ev is None:
    return 0.5, "default 0.5 (run --mode=eval first to choose one on validation)", rec
  youden = ev["operating_points"]["youden"]
  if youden.get("threshold") is None:
    return 0.5, f"default 0.5: Youden's threshold is undefined in {name} ({youden.get('undefined')})", rec
  return float(youden["threshold"]), f"Youden's J on validation ({name})", rec


def scan_predictor(predictor: runtime.Predictor, workdir: str, out_dir: str):
  """Per scan: P(positive) (recalibrated as --mode=eval chose), the decision at the chosen threshold, and a
  Grad-CAM overlay PNG in ``out_dir``."""
  config = predictor.config
  v = predictor.variables
  apply = make_apply(v.graphdef, predictor.mesh, config)
  threshold, why, rec = choose_threshold(config, workdir, predictor)
  neg, pos = class_names(config)
  main = runtime.is_main_process()
  if main:
    print(f"Decision threshold {threshold:.3f} ({why})."
          + (f" Probabilities recalibrated with temperature {rec['temperature']:.3f} (fitted on validation)."
             if rec.get("temperature") is not None else ""))
  n = runtime.data_size(predictor.mesh)

  def predict_one(scan, image: np.ndarray, name: str, crop_start=None) -> dict:  # crop_start: unused here
    batch = np.repeat(image, n, axis=0)  # one copy per batch shard keeps the batch shardable
    prob = float(runtime.fetch(apply(v.params, v.batch_stats,
                                     runtime.to_global(predictor.mesh, runtime.host_slice(batch))))[0])
    prob = float(calibrated(np.asarray([prob]), rec)[0])
    decision = pos if prob >= threshold else neg
    if main:
      cam = np.asarray(interpret.grad_cam(v.graphdef, v.params, v.batch_stats, image,
                                          layer=config.eval.gradcam_layer or None))[0]
      png = os.path.join(out_dir, f"{name}_gradcam.png")
      viz.save(viz.overlay_slices(image[0, ..., 0], cam, num_slices=6,
                                  title=f"{name}: P({pos})={prob:.3f} -> {decision} (t={threshold:.2f}); "
                                        f"Grad-CAM"), png)
      print(f"{scan.path}: P({pos}) = {prob:.3f} -> {decision}   overlay: {png}")
    return {"probability": f"{prob:.6f}", "decision": decision}
  return predict_one


# ----------------------------------------------------------------------------- --mode=report

def report_sections(predictor: runtime.Predictor, sources: dict, workdir: str, out_dir: str, split: str) -> dict:
  """The classification part of the report (`report_part`: metrics with CIs at each operating point per study
  and per patient, recalibration, per-100 and net-benefit wording; ROC / confusion / reliability /
  decision-curve and Grad-CAM figures) of ``split`` (test, or "external": `lungct.evaluate`'s external set);
  --mode=eval is run first when its result is missing or from another checkpoint or calibration."""
  config = predictor.config
  ev = _null_to_nan(runtime.current_evaluation(predictor, sources, workdir, split, run_eval, load=load_eval))
  v = predictor.variables
  test_pred = predict_split(make_apply(v.graphdef, predictor.mesh, config), v, predictor.mesh, sources[split],
                            config)
  test_pred["prob"] = calibrated(test_pred["prob"], ev.get("recalibration"))
  figs = make_figures(config, ev, test_pred, out_dir)
  figs.update(gradcam_figures(config, predictor, sources[split], test_pred, _decision(ev)[0], out_dir))
  return {**report_part(config, ev), "figures": figs}


LIMITATIONS = [
    "Thresholds were chosen on the validation split and applied unchanged to the test split; a new site, "
    "scanner or population needs its own validation before any threshold is trusted.",
    "Heatmaps (Grad-CAM) show where the model's evidence came from, not where disease is; they can highlight "
    "artefacts.",
]
CURVES = ("train/accuracy", "val/sensitivity", "val/specificity")  # drawn besides losses, best and headline


def report_part(config, ev: dict) -> dict:
  """Title, test-set line, sections (as `lungct.report` blocks) and limitations of an evaluation ``ev``
  (eval_<split>.json, nulls read as NaN); `lungct.report.render` lays them out with the rest of the page."""
  external = ev.get("split") == "external"
  where = "the external test set" if external else "the test split"
  names = tuple(ev.get("class_names") or class_names(config))
  ops = ev["operating_points"]
  pl = ev.get("patient_level") or {}
  multi = pl.get("max_studies_per_patient", 1) > 1
  test_line = (f"External test set: {ev['n']} studies from {ev['n_patients']} patients, {ev['n_positive']} "
               f"{names[1]}; thresholds from the internal validation split." if external else
               f"Test set: {ev['n']} studies from {ev['n_patients']} patients, {ev['n_positive']} {names[1]}.")
  rec = ev.get("recalibration", {"method": "none"})
  if rec.get("temperature") is not None:
    cal_line = (f"Probabilities are recalibrated by temperature scaling: T = {rec['temperature']:.3f}, fitted on the "
                f"validation split (a T above 1 softens over-confident outputs; ranking and AUC are unchanged). "
                f"Test ECE {_fmt(rec['before']['ece'])} before, <b>{_fmt(rec['after']['ece'])}</b> after. Every "
                f"number below uses the recalibrated probabilities.")
  elif rec.get("undefined"):
    cal_line = f"Recalibration was requested but not possible: {rec['undefined']}."
  else:
    cal_line = (f"No recalibration (eval.calibration = 'none'); test ECE {_fmt(ev['calibration']['ece'])}. With "
                f"--config.eval.calibration=temperature, --mode=eval fits a temperature on validation.")
  results = [
      ("p", f"Values are point estimates with 95% bootstrap confidence intervals (patients resampled, "
            f"{config.eval.n_boot} draws). Each column is one operating threshold chosen on the validation split: "
            f"the conventional 0.5, the threshold maximising sensitivity + specificity (Youden's J), and the "
            f"highest thresholds reaching a target sensitivity."),
      ("p", cal_line),
      ("h3", "Per study: each study is one case; thresholds chosen on per-study validation scores"),
      ("table", *metric_table(ops))]
  if multi:
    results += [("h3", f"Per patient: {pl['n_patients']} patients ({pl['n_positive']} with a {names[1]} study); a "
                       f"patient is positive if any study is and scores its highest probability; thresholds chosen "
                       f"on per-patient validation scores"),
                ("table", *metric_table(pl["operating_points"]))]
  interp = []
  for name, op in ops.items():
    if op.get("threshold") is None:
      interp.append(f"<b>{name}</b>: undefined — {html.escape(op['undefined'])}.")
      continue
    interp.append(f"<b>{name}</b> (threshold {op['threshold']:.3f}, per study): {per_100(op['metrics'], names)} "
                  f"{net_benefit_sentence(name, op, names, 'studies')}")
  if multi:
    for name, op in pl["operating_points"].items():
      if op.get("threshold") is not None:
        interp.append(f"<b>{name}</b> (threshold {op['threshold']:.3f}, per patient): "
                      f"{per_100(op['metrics'], names, 'patients')} "
                      f"{net_benefit_sentence(name, op, names, 'patients')}")
  meaning = [
      ("ul", interp),
      ("p", "Net benefit (Vickers &amp; Elkin, Med Decis Making 2006) weighs true positives against false "
            "positives at the exchange rate a threshold probability t implies (one false positive costs t/(1−t) "
            "true positives); it reads a threshold as a risk, which is only fair when the probabilities are "
            "calibrated (see above)."),
      ("p", f"A lower threshold finds more disease (higher sensitivity) at the cost of more false alarms (lower "
            f"specificity). PPV and NPV depend on how common the finding is: in this test set {ev['n_positive']} "
            f"of {ev['n']} studies are {html.escape(names[1])}; in a population where it is rarer, the PPV will be "
            f"lower.")]
  return {"title": f"{names[1]} vs {names[0]} ({config.data.source} data)", "test_line": test_line,
          "sections": [(f"Results on {where}", results), ("What these numbers mean", meaning)],
          "limitations": LIMITATIONS, "curves": CURVES}


def _fmt(m: dict) -> str:
  return f"{m['value']:.3f} ({m['lo']:.3f}–{m['hi']:.3f})" if np.isfinite(m["value"]) else "n/a"


def per_100(op_metrics: dict, class_names=("normal", "abnormal"), unit: str = "studies") -> str:
  """Sensitivity and specificity as counts out of 100 positive and 100 negative cases (studies or patients)."""
  sens, spec = op_metrics["sensitivity"]["value"], op_metrics["specificity"]["value"]
  if not (np.isfinite(sens) and np.isfinite(spec)):
    return f"Not enough {unit} of both kinds to express this threshold per 100 {unit}."
  neg, pos = class_names
  return (f"Of 100 <b>{pos}</b> {unit}, the model flags about <b>{round(100 * sens)}</b> and misses "
          f"about <b>{100 - round(100 * sens)}</b> (sensitivity {sens:.2f}). Of 100 <b>{neg}</b> {unit}, "
          f"the model clears about <b>{round(100 * spec)}</b> and wrongly flags about <b>{100 - round(100 * spec)}"
          f"</b> (specificity {spec:.2f}).")


def net_benefit_sentence(name: str, op: dict, class_names=("normal", "abnormal"), unit: str = "studies") -> str:
  """One sentence reading an operating point on the decision curve (its threshold taken as a risk threshold)."""
  nb = op.get("net_benefit")
  if op.get("threshold") is None or not nb or not np.isfinite(nb["model"]["value"]):
    return f"{name}: no net benefit can be computed at this threshold."
  t, m, a, adv = op["threshold"], nb["model"], nb["treat_all"], nb["advantage"]
  pos = class_names[1]
  head = (f"At the <b>{name}</b> threshold (acting when the predicted risk is at least {100 * t:.0f}%), the "
          f"model's net benefit is {_fmt(m)}, against {a['value']:.3f} for acting on every case (treat all) "
          f"and 0 for acting on none")
  if adv["value"] > 0:
    return (head + f": using the model is equivalent to finding <b>{100 * adv['value']:.1f}</b> "
            f"(95% CI {100 * adv['lo']:.1f} to {100 * adv['hi']:.1f}) more {pos} {unit} per 100 {unit} "
            f"without extra false positives, compared with the better of the two.")
  return head + (f": at this threshold the model does not beat the better of treat all and treat none "
                 f"(difference {100 * adv['value']:.1f} per 100 {unit}, 95% CI {100 * adv['lo']:.1f} to "
                 f"{100 * adv['hi']:.1f}).")


def _defined(ops: dict) -> dict:
  return {name: op for name, op in ops.items() if op.get("threshold") is not None}


def make_figures(config, ev: dict, test_pred: dict, out_dir: str) -> dict[str, str]:
  """ROC, confusion matrix, reliability diagram(s) and decision curve of an evaluation (PNGs in ``out_dir``)."""
  figs = {}
  names = class_names(config)
  ops = _defined(ev["operating_points"])
  y, p = test_pred["label"], test_pred["prob"]
  points = [{"name": name, "fpr": 1 - op["metrics"]["specificity"]["value"],
             "tpr": op["metrics"]["sensitivity"]["value"], "threshold": op["threshold"]} for name, op in ops.items()]
  auc = metrics.roc_auc(y, p)
  figs["ROC curve (per study)"] = viz.save(
      viz.roc_curve(np.asarray(ev["roc"]["fpr"]), np.asarray(ev["roc"]["tpr"]), auc=auc, operating_points=points),
      os.path.join(out_dir, "roc.png"))
  t, rule = _decision(ev)
  cm = metrics.confusion_matrix(y, (p >= t).astype(int))
  figs[f"Confusion matrix (per study, {rule} threshold)"] = viz.save(
      viz.confusion_matrix(cm, class_names=names, title=f"Test set, threshold {t:.3f}"),
      os.path.join(out_dir, "confusion.png"))
  rec = ev.get("recalibration", {})
  panels = ([("before recalibration", rec["before"], "reliability_before.png"),
             (f"after temperature scaling (T = {rec['temperature']:.2f}, fitted on validation)", rec["after"],
              "reliability.png")] if rec.get("temperature") is not None else
            [("no recalibration", ev["calibration"], "reliability.png")])
  for label, cal, png in panels:
    figs[f"Reliability diagram, {label}"] = viz.save(
        viz.reliability_diagram(np.asarray(cal["bin_confidence"], float), np.asarray(cal["bin_accuracy"], float),
                                np.asarray(cal["bin_counts"]), ece=cal["ece"]["value"],
                                title=f"Reliability, {label.split(' (')[0]}"), os.path.join(out_dir, png))
  dc = ev.get("decision_curve")
  if dc:
    figs["Decision curve (per study)"] = viz.save(
        viz.decision_curve(dc["thresholds"], dc["model"]["value"], dc["treat_all"]["value"],
                           model_lo=dc["model"]["lo"], model_hi=dc["model"]["hi"],
                           operating_points=[{"name": n, "threshold": op["threshold"],
                                              "net_benefit": op.get("net_benefit", {}).get("model", {}).get("value")}
                                             for n, op in ops.items()],
                           title=f"Decision curve: {names[1]} vs {names[0]}, per study"),
        os.path.join(out_dir, "decision_curve.png"))
  return figs


def _decision(ev: dict) -> tuple[float, str]:
  youden = ev["operating_points"]["youden"]
  return (youden["threshold"], "Youden") if youden.get("threshold") is not None else (0.5, "default 0.5")


def gradcam_figures(config, predictor: runtime.Predictor, source, test_pred: dict, threshold: float,
                    out_dir: str) -> dict[str, str]:
  """Grad-CAM overlays for the most confident true/false positives/negatives of the test split."""
  picks = interpret.explain_cases(test_pred["prob"], test_pred["label"], test_pred["study_id"], threshold=threshold)
  v = predictor.variables
  figs = {}
  positive = class_names(config)[1]
  names = {"true_positive": "True positive", "false_positive": "False positive",
           "false_negative": "False negative", "true_negative": "True negative"}
  for category, idx in picks.items():
    for j in np.asarray(idx)[:1]:
      sid = test_pred["study_id"][j]
      ex = pipeline.decode(source[int(j)])  # predict_split keeps the source's order
      image = ex["image"][None]
      cam = np.asarray(interpret.grad_cam(v.graphdef, v.params, v.batch_stats, image,
                                          layer=config.eval.gradcam_layer or None))[0]
      mask = ex["mask"][..., 0] if "mask" in ex and np.any(ex["mask"]) else None
      title = (f"{names.get(category, category)}: {sid}, P({positive})={test_pred['prob'][j]:.2f}, "
               f"label {test_pred['label'][j]}")
      figs[f"{names.get(category, category)} ({sid})"] = viz.save(
          viz.overlay_slices(image[0, ..., 0], cam, num_slices=6, mask=mask, title=title),
          os.path.join(out_dir, f"gradcam_{category}.png"))
  return figs


METRIC_ROWS = [("roc_auc", "ROC-AUC"), ("sensitivity", "Sensitivity"), ("specificity", "Specificity"),
               ("ppv", "PPV (precision)"), ("npv", "NPV"), ("accuracy", "Accuracy"),
               ("balanced_accuracy", "Balanced accuracy"), ("f1", "F1"), ("pr_auc", "PR-AUC"),
               ("brier", "Brier score"), ("ece", "Calibration error (ECE)")]


def metric_table(ops: dict) -> tuple[list[str], list[list[str]]]:
  """(header, rows) of one level's operating points; an undefined threshold is a column saying why."""
  head = ["Metric"] + [f"{name}<br>(t = {op['threshold']:.3f})" if op.get("threshold") is not None
                       else f"{name}<br>(undefined)" for name, op in ops.items()]
  rows = [[label] + [_fmt(op["metrics"][key]) if op.get("threshold") is not None else "undefined"
                     for op in ops.values()] for key, label in METRIC_ROWS]
  rows.append(["TP / FP / TN / FN"] + [_counts(op) if op.get("threshold") is not None else "–"
                                       for op in ops.values()])
  return head, rows


_KEEP_NONE = frozenset({"threshold", "temperature"})  # None there means "undefined", said as such


def _null_to_nan(obj):
  """eval_<split>.json writes undefined values as null (strict JSON); the report computes with NaN (thresholds
  and temperatures stay None: an undefined one is reported, not computed with)."""
  if isinstance(obj, dict):
    return {k: v if k in _KEEP_NONE and v is None else _null_to_nan(v) for k, v in obj.items()}
  if isinstance(obj, list):
    return [_null_to_nan(v) for v in obj]
  return float("nan") if obj is None else obj


def _counts(op) -> str:
  c = op["counts"]
  return f"{c['tp']} / {c['fp']} / {c['tn']} / {c['fn']}"
