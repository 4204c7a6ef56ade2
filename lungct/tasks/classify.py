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

from lungct import inferers, metrics, runtime
from lungct.data import augment as augment_lib

NAME = "classify"
MODES = ("train", "eval", "cv", "predict", "report")
BEST_METRIC = "auc"
HEADLINE_METRICS = ("accuracy",)
CONFIG = "configs/default.py"   # its reference config (with a seconds-long `:tiny` variant)
CONFIG_GROUP = ""        # its settings live in data (label, num_classes) and train (class_weights)
EXECUTION_KEYS = ()


def check(config) -> list[str]:
  return []


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


def with_confidence(val: dict, test: dict, *, n_boot: int = 1000, seed: int = 0,
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
  fpr, tpr, _ = metrics.roc_curve(test["label"], test["prob"])
  result["roc"] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
  result["calibration"] = {k: np.asarray(v).tolist()
                           for k, v in metrics.calibration_bins(test["label"], test["prob"]).items()}
  return result


def patient_level(pred: dict, threshold: float, *, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
  """Per-patient metrics when a patient has several studies (e.g. nodules): a patient is positive if any of
  its studies is, and scores its highest probability; CIs resample patients."""
  p = metrics.patient_level(pred["prob"], pred["label"], pred["patient_id"])
  return {"n_patients": int(len(p["prob"])), "max_studies_per_patient": int(p["count"].max(initial=0)),
          "threshold": float(threshold),
          "metrics": metrics.metrics_with_ci(p["label"], p["prob"], threshold, groups=p["patient_id"],
                                             n_boot=n_boot, seed=seed)}


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
      w.writerow(["study_id", "patient_id", "label", "probability", "prediction", "threshold"])
      for i in range(len(pred["prob"])):
        p = float(pred["prob"][i])
        w.writerow([pred["study_id"][i], pred["patient_id"][i], int(pred["label"][i]), f"{p:.6f}",
                    int(p >= threshold), threshold])


def run_eval(predictor: runtime.Predictor, sources: dict, workdir: str, split: str) -> dict:
  """--mode=eval: thresholds chosen on validation, ``split`` evaluated with CIs; eval_<split>.json and
  predictions_<split>.csv in the workdir (written by the main process only)."""
  config = predictor.config
  v = predictor.variables
  apply = make_apply(v.graphdef, predictor.mesh, config)
  val = predict_split(apply, v, predictor.mesh, sources["validation"], config)
  test = val if split == "validation" else predict_split(apply, v, predictor.mesh, sources[split], config)
  if config.data.label == "binary":
    result = with_confidence(val, test, n_boot=config.eval.n_boot, seed=config.seed,
                             sensitivity_targets=tuple(config.eval.sensitivity_targets))
    threshold = result["operating_points"]["youden"]["threshold"]
    result["patient_level"] = patient_level(test, threshold, n_boot=config.eval.n_boot, seed=config.seed)
  else:
    result = {"n": int(len(test["grade"])), "metrics": metrics.multiclass_metrics(test["grade"], test["prob"])}
    threshold = 0.5
  result.update(split=split, checkpoint=predictor.checkpoint, checkpoint_step=predictor.step)
  if runtime.is_main_process():
    with open(os.path.join(workdir, f"eval_{split}.json"), "w") as f:
      json.dump(metrics.json_safe(result), f, indent=2, allow_nan=False)
    write_predictions(os.path.join(workdir, f"predictions_{split}.csv"), test, threshold)
    if config.data.label == "binary":
      print(_summary_line(split, result))
    print(f"Wrote {workdir}/eval_{split}.json and predictions_{split}.csv")
  return result


def _summary_line(split, result) -> str:
  lines = [f"{split}: {result['n']} cases ({result['n_positive']} abnormal)"]
  for name, op in result["operating_points"].items():
    m = op["metrics"]
    f = lambda k: f"{m[k]['value']:.3f} [{m[k]['lo']:.3f}, {m[k]['hi']:.3f}]"  # noqa: E731
    lines.append(f"  {name:>14} (t={op['threshold']:.3f}): AUC {f('roc_auc')}  sens {f('sensitivity')}  "
                 f"spec {f('specificity')}  acc {f('accuracy')}")
  pl = result.get("patient_level")
  if pl and pl["max_studies_per_patient"] > 1:
    m = pl["metrics"]
    lines.append(f"  per patient ({pl['n_patients']} patients, max over their studies): AUC "
                 f"{m['roc_auc']['value']:.3f} [{m['roc_auc']['lo']:.3f}, {m['roc_auc']['hi']:.3f}]")
  return "\n".join(lines)


# ----------------------------------------------------------------------------- --mode=predict

def _need_binary(config, mode: str) -> None:
  if config.data.label != "binary":
    from lungct import config_check
    raise config_check.ConfigError(f"config.data.label={config.data.label!r}: --mode={mode} covers binary "
                                   f"classifiers (config.data.label='binary')")


def choose_threshold(config, workdir: str) -> tuple[float, str]:
  """config.predict.threshold if set (>= 0); else the Youden threshold --mode=eval chose on validation; else 0.5."""
  if config.predict.threshold >= 0:
    return float(config.predict.threshold), "config.predict.threshold"
  for name in ("eval_test.json", "eval_validation.json"):
    path = os.path.join(workdir, name)
    if os.path.exists(path):
      with open(path) as f:
        return float(json.load(f)["operating_points"]["youden"]["threshold"]), f"Youden's J on validation ({name})"
  return 0.5, "default 0.5 (run --mode=eval first to choose one on validation)"


def scan_predictor(predictor: runtime.Predictor, workdir: str, out_dir: str):
  """Per scan: P(abnormal), the decision at the chosen threshold, and a Grad-CAM overlay PNG in ``out_dir``."""
  from lungct import interpret, viz
  config = predictor.config
  _need_binary(config, "predict")
  v = predictor.variables
  apply = make_apply(v.graphdef, predictor.mesh, config)
  threshold, why = choose_threshold(config, workdir)
  main = runtime.is_main_process()
  if main:
    print(f"Decision threshold {threshold:.3f} ({why}).")
  n = runtime.data_size(predictor.mesh)

  def predict_one(scan, image: np.ndarray, name: str) -> dict:
    batch = np.repeat(image, n, axis=0)  # one copy per batch shard keeps the batch shardable
    prob = float(runtime.fetch(apply(v.params, v.batch_stats,
                                     runtime.to_global(predictor.mesh, runtime.host_slice(batch))))[0])
    decision = "abnormal" if prob >= threshold else "normal"
    if main:
      cam = np.asarray(interpret.grad_cam(v.graphdef, v.params, v.batch_stats, image,
                                          layer=config.eval.gradcam_layer or None))[0]
      png = os.path.join(out_dir, f"{name}_gradcam.png")
      viz.save(viz.overlay_slices(image[0, ..., 0], cam, num_slices=6,
                                  title=f"{name}: P(abnormal)={prob:.3f} -> {decision} (t={threshold:.2f}); "
                                        f"Grad-CAM"), png)
      print(f"{scan.path}: P(abnormal) = {prob:.3f} -> {decision}   overlay: {png}")
    return {"probability": f"{prob:.6f}", "decision": decision}
  return predict_one


# ----------------------------------------------------------------------------- --mode=report

LIMITATIONS = [
    "Thresholds were chosen on the validation split and applied unchanged to the test split; a new site, "
    "scanner or population needs its own validation before any threshold is trusted.",
    "Heatmaps (Grad-CAM) show where the model's evidence came from, not where disease is; they can highlight "
    "artefacts.",
]


def fmt_ci(m: dict) -> str:
  return f"{m['value']:.3f} ({m['lo']:.3f}–{m['hi']:.3f})" if np.isfinite(m["value"]) else "n/a"


def per_100(op_metrics: dict) -> str:
  """Sensitivity and specificity as counts out of 100 patients with and 100 without the finding."""
  sens, spec = op_metrics["sensitivity"]["value"], op_metrics["specificity"]["value"]
  if not (np.isfinite(sens) and np.isfinite(spec)):
    return "Not enough cases of both kinds to express this threshold per 100 patients."
  return (f"Of 100 patients <b>with</b> the finding, the model flags about <b>{round(100 * sens)}</b> and misses "
          f"about <b>{100 - round(100 * sens)}</b> (sensitivity {sens:.2f}). Of 100 patients <b>without</b> it, "
          f"the model clears about <b>{round(100 * spec)}</b> and wrongly flags about <b>{100 - round(100 * spec)}"
          f"</b> (specificity {spec:.2f}).")


def make_figures(config, ev: dict, test_pred: dict, out_dir: str) -> dict[str, str]:
  from lungct import viz
  figs = {}
  ops = ev["operating_points"]
  y, p = test_pred["label"], test_pred["prob"]
  points = []
  for name, op in ops.items():
    m = op["metrics"]
    points.append({"name": name, "fpr": 1 - m["specificity"]["value"], "tpr": m["sensitivity"]["value"],
                   "threshold": op["threshold"]})
  auc = ops["youden"]["metrics"]["roc_auc"]["value"]
  figs["ROC curve"] = viz.save(viz.roc_curve(np.asarray(ev["roc"]["fpr"]), np.asarray(ev["roc"]["tpr"]), auc=auc,
                                             operating_points=points), os.path.join(out_dir, "roc.png"))
  t = ops["youden"]["threshold"]
  cm = metrics.confusion_matrix(y, (p >= t).astype(int))
  figs["Confusion matrix (Youden threshold)"] = viz.save(
      viz.confusion_matrix(cm, title=f"Test set, threshold {t:.3f}"), os.path.join(out_dir, "confusion.png"))
  cal = ev["calibration"]
  ece = ops["youden"]["metrics"]["ece"]["value"]
  figs["Reliability diagram"] = viz.save(
      viz.reliability_diagram(np.asarray(cal["bin_confidence"], float), np.asarray(cal["bin_accuracy"], float),
                              np.asarray(cal["bin_counts"]), ece=ece), os.path.join(out_dir, "reliability.png"))
  return figs


def gradcam_figures(config, predictor: runtime.Predictor, source, test_pred: dict, threshold: float,
                    out_dir: str) -> dict[str, str]:
  """Grad-CAM overlays for the most confident true/false positives/negatives of the test split."""
  from lungct import interpret, viz
  from lungct.data import pipeline
  picks = interpret.explain_cases(test_pred["prob"], test_pred["label"], test_pred["study_id"], threshold=threshold)
  v = predictor.variables
  figs = {}
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
      title = f"{names.get(category, category)}: {sid}, P(abnormal)={test_pred['prob'][j]:.2f}, label {test_pred['label'][j]}"
      figs[f"{names.get(category, category)} ({sid})"] = viz.save(
          viz.overlay_slices(image[0, ..., 0], cam, num_slices=6, mask=mask, title=title),
          os.path.join(out_dir, f"gradcam_{category}.png"))
  return figs


METRIC_ROWS = [("roc_auc", "ROC-AUC"), ("sensitivity", "Sensitivity"), ("specificity", "Specificity"),
               ("ppv", "PPV (precision)"), ("npv", "NPV"), ("accuracy", "Accuracy"),
               ("balanced_accuracy", "Balanced accuracy"), ("f1", "F1"), ("pr_auc", "PR-AUC"),
               ("brier", "Brier score"), ("ece", "Calibration error (ECE)")]


def report_sections(predictor: runtime.Predictor, sources: dict, workdir: str, out_dir: str) -> dict:
  """The report's classification part: metrics with CIs at each operating point, per-100-patients wording,
  ROC / confusion / reliability figures and Grad-CAM for true/false positives/negatives (eval run if missing)."""
  config = predictor.config
  _need_binary(config, "report")
  ev_path = os.path.join(workdir, "eval_test.json")
  if not os.path.exists(ev_path):
    run_eval(predictor, sources, workdir, "test")
  with open(ev_path) as f:
    ev = metrics.null_to_nan(json.load(f))
  v = predictor.variables
  test_pred = predict_split(make_apply(v.graphdef, predictor.mesh, config), v, predictor.mesh, sources["test"], config)
  figs = make_figures(config, ev, test_pred, out_dir)
  figs.update(gradcam_figures(config, predictor, sources["test"], test_pred,
                              ev["operating_points"]["youden"]["threshold"], out_dir))
  ops = ev["operating_points"]
  head = ["Metric"] + [f"{name}<br>(t = {op['threshold']:.3f})" for name, op in ops.items()]
  rows = [[label] + [fmt_ci(op["metrics"][key]) for op in ops.values()] for key, label in METRIC_ROWS]
  rows.append(["TP / FP / TN / FN"] + [_counts(op) for op in ops.values()])
  interp = [f"<b>{name}</b> (threshold {op['threshold']:.3f}): {per_100(op['metrics'])}" for name, op in ops.items()]
  return {
      "title": "normal vs abnormal chest CT",
      "test_line": f"Test set: {ev['n']} studies from {ev['n_patients']} patients, {ev['n_positive']} abnormal.",
      "checkpoint_step": ev.get("checkpoint_step"),
      "sections": [
          ("Results on the test split", [
              ("p", f"Values are point estimates with 95% bootstrap confidence intervals (patients resampled, "
                    f"{config.eval.n_boot} draws). Each column is one operating threshold chosen on the validation "
                    f"split: the conventional 0.5, the threshold maximising sensitivity + specificity (Youden's J), "
                    f"and the highest thresholds reaching a target sensitivity."),
              ("table", head, rows)]),
          ("What these numbers mean", [
              ("ul", interp),
              ("p", f"A lower threshold finds more disease (higher sensitivity) at the cost of more false alarms "
                    f"(lower specificity). PPV and NPV depend on how common the finding is: in this test set "
                    f"{ev['n_positive']} of {ev['n']} studies are abnormal; in a population where it is rarer, the "
                    f"PPV will be lower.")])],
      "figures": figs,
      "limitations": LIMITATIONS,
  }


def _counts(op) -> str:
  c = op["counts"]
  return f"{c['tp']} / {c['fp']} / {c['tn']} / {c['fn']}"
