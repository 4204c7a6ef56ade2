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

from lungct import metrics, runtime
from lungct.data import augment as augment_lib

NAME = "classify"
MODES = ("train", "eval", "cv", "predict", "report")
BEST_METRIC = "auc"


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
  from lungct.data import pipeline
  p = pipeline.patient_level(pred["prob"], pred["label"], pred["patient_id"])
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
