"""--mode=predict: raw scans -> one row of predictions.csv per scan, written by the task (classification:
probability, decision and a Grad-CAM overlay; segmentation: a mask NIfTI and the lesion volume; attributes:
every predicted attribute).

The model is restored for inference with the data settings it was trained with, and each scan goes through
`preprocess.model_input`, the function the dataset build stores examples with: the model sees here exactly the
values it saw in training. A scan that cannot be read is reported and skipped (a row with its error).
"""
from __future__ import annotations

import csv
import glob
import os
import re
from typing import Sequence

import ml_collections
import numpy as np

from lungct import runtime, tasks
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


def output_name(path: str, root: str) -> str:
  """A file name unique to ``path`` under ``root``: its relative path with separators as '__'
  (``a/scan.nii.gz`` -> ``a__scan.nii.gz``, distinct from ``b/scan.nii.gz`` and ``a/scan.nii``)."""
  rel = os.path.relpath(path, root) if os.path.isdir(root) else os.path.basename(path)
  return re.sub(r"[^A-Za-z0-9._-]", "_", rel.replace(os.sep, "__"))


def scan_input(path: str, data_cfg) -> np.ndarray:
  """float32 (D, H, W, 1): the model input for the scan at ``path`` (nifti.ScanError if it cannot be used)."""
  return preprocess.model_input(nifti.load_scan(path), data_cfg)


def predict_scans(config: ml_collections.ConfigDict, workdir: str, checkpoint_path: str = "",
                  explicit: Sequence[str] = ()) -> list[dict]:
  predictor, task = tasks.restore(config, workdir, checkpoint_path, explicit, "predict")
  config = predictor.config
  files = list_scans(config.predict.input)
  out_dir = os.path.join(workdir, "predictions")
  main = runtime.is_main_process()
  if main:
    os.makedirs(out_dir, exist_ok=True)
    print(f"Checkpoint {predictor.checkpoint}; data prepared as in training: shape {tuple(config.data.shape)}, "
          f"HU window {tuple(config.data.hu_window)}.")
  predict_one = task.scan_predictor(predictor, workdir, out_dir)
  rows = []
  for path in files:
    try:
      scan = nifti.load_scan(path)
      image = preprocess.model_input(scan, config.data)[None]
    except nifti.ScanError as e:
      print(f"SKIPPED {e}")
      rows.append({"file": path, "error": e.reason})
      continue
    rows.append({"file": path, **predict_one(scan, image, output_name(path, config.predict.input)), "error": ""})
  fields = list(dict.fromkeys(["file"] + [k for r in rows for k in r if k != "error"] + ["error"]))
  rows = [{k: r.get(k, "") for k in fields} for r in rows]
  if main:
    csv_path = os.path.join(workdir, "predictions.csv")
    with open(csv_path, "w", newline="") as f:
      w = csv.DictWriter(f, fieldnames=fields)
      w.writeheader()
      w.writerows(rows)
    skipped = sum(1 for r in rows if r["error"])
    print(f"{len(rows) - skipped} scans predicted, {skipped} skipped; wrote {csv_path}")
  return rows
