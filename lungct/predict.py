"""--mode=predict: raw NIfTI scans -> probability, decision and a Grad-CAM overlay per scan.

Scans go through `preprocess.preprocess_scan`, the same function the dataset build uses, so a scan seen
here is exactly what the model saw in training. A scan that cannot be read is reported and skipped.
"""
from __future__ import annotations

import csv
import glob
import json
import os

import jax
import ml_collections
import numpy as np

from lungct import evaluate, interpret, train, viz
from lungct.data import nifti, preprocess

SCAN_PATTERNS = ("*.nii", "*.nii.gz")


def list_scans(path: str) -> list[str]:
  if os.path.isdir(path):
    files = sorted({f for p in SCAN_PATTERNS for f in glob.glob(os.path.join(path, "**", p), recursive=True)})
    if not files:
      raise FileNotFoundError(f"{path}: no .nii or .nii.gz files in this folder")
    return files
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such file or folder (config.predict.input)")
  return [path]


def choose_threshold(config: ml_collections.ConfigDict, workdir: str) -> tuple[float, str]:
  """config.predict.threshold if set (>= 0); else the Youden threshold --mode=eval chose on validation; else 0.5."""
  if config.predict.threshold >= 0:
    return float(config.predict.threshold), "config.predict.threshold"
  for name in ("eval_test.json", "eval_validation.json"):
    path = os.path.join(workdir, name)
    if os.path.exists(path):
      with open(path) as f:
        return float(json.load(f)["operating_points"]["youden"]["threshold"]), f"Youden's J on validation ({name})"
  return 0.5, "default 0.5 (run --mode=eval first to choose one on validation)"


def predict_scans(config: ml_collections.ConfigDict, workdir: str, checkpoint_path: str = "") -> list[dict]:
  if config.data.label != "binary":
    raise NotImplementedError("--mode=predict covers binary models (config.data.label='binary')")
  files = list_scans(config.predict.input)
  m = evaluate.load_model(config, workdir, checkpoint_path)
  threshold, why = choose_threshold(config, workdir)
  out_dir = os.path.join(workdir, "predictions")
  os.makedirs(out_dir, exist_ok=True)
  print(f"Decision threshold {threshold:.3f} ({why}).")
  rows = []
  n = jax.device_count()
  for path in files:
    try:
      scan = nifti.load_scan(path)
    except nifti.ScanError as e:
      print(f"SKIPPED {e}")
      rows.append({"file": path, "probability": "", "decision": "", "error": e.reason})
      continue
    pre = preprocess.preprocess_scan(scan, config.data)
    image = pre["image"][None, ..., None].astype(np.float32)
    batch = np.repeat(image, n, axis=0)  # one copy per device keeps the batch shardable
    prob = float(np.asarray(m.predict(m.state, train.to_global(m.mesh, train.host_slice(batch))))[0])
    cam = np.asarray(interpret.grad_cam(m.graphdef, m.state["params"], m.state["batch_stats"], image,
                                   layer=config.eval.gradcam_layer or None))[0]
    decision = "abnormal" if prob >= threshold else "normal"
    name = os.path.basename(path).replace(".nii.gz", "").replace(".nii", "")
    png = os.path.join(out_dir, f"{name}_gradcam.png")
    viz.save(viz.overlay_slices(pre["image"], cam, num_slices=6,
                                title=f"{name}: P(abnormal)={prob:.3f} -> {decision} (t={threshold:.2f}); Grad-CAM"), png)
    print(f"{path}: P(abnormal) = {prob:.3f} -> {decision}   overlay: {png}")
    rows.append({"file": path, "probability": f"{prob:.6f}", "decision": decision, "error": ""})
  csv_path = os.path.join(workdir, "predictions.csv")
  with open(csv_path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=["file", "probability", "decision", "error"])
    w.writeheader()
    w.writerows(rows)
  skipped = sum(1 for r in rows if r["error"])
  print(f"{len(rows) - skipped} scans predicted, {skipped} skipped; wrote {csv_path}")
  return rows
