"""--mode=predict: raw scans -> one row of predictions.csv per scan, written by the task (`task.scan_predictor`:
classification the probability, decision and a Grad-CAM overlay; segmentation a mask NIfTI on the scan's own
grid and the lesion volume; attributes every predicted attribute).

The model is restored for inference with the data settings it was trained with, and each scan goes through
`preprocess.model_input`, the function the dataset build stores examples with: the model sees here exactly the
values it saw in training. Intensities are read as the training data's were (HU, or already scaled for a
MedMNIST-trained model), and a model trained on crops centred on the lesion mask (data.crop_center="mask") gets
each scan's mask or lesion centre from config.predict.lesions (or, with config.predict.without_lesion="center",
a crop centred on the scan: for volumes of interest already centred on their lesion). A scan that cannot be read,
or that has no lesion where the model needs one, is reported and skipped.
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
from lungct.data import nifti, preprocess, sources
from lungct.data.errors import DataError

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


WITHOUT_LESION = ("skip", "center")   # config.predict.without_lesion


def load_input(path: str, data_cfg, lesion: dict | None = None, *, without_lesion: str = "skip"
               ) -> tuple[nifti.Scan, np.ndarray, np.ndarray]:
  """(the scan, its float32 (D, H, W, 1) model input, the crop_start of the model's window in the resampled scan)
  for the file at ``path``, prepared as the training data was: intensities as the training source's
  (`sources.load_for_model`), and for a model trained on crops centred on the lesion mask, the crop centred on
  ``lesion`` (its `sources.read_lesions` entry), or without one on the scan's centre when ``without_lesion`` is
  "center" (a crop already centred on its lesion, such as an LIDC volume of interest). nifti.ScanError if it cannot
  be used, or if the model needs a lesion and none is given (``without_lesion`` "skip")."""
  scan = sources.load_for_model(path, data_cfg)
  mask = center = None
  if preprocess.needs_lesion(data_cfg):
    if lesion is not None:
      mask, center = sources.lesion_of(scan, lesion)
    elif without_lesion != "center":
      raise nifti.ScanError(path, "no lesion mask or centre for this scan in config.predict.lesions: the model "
                                  "was trained on crops centred on the lesion (data.crop_center='mask')")
  image, crop_start = preprocess.model_input_and_window(scan, data_cfg, mask, hu=sources.is_hu(data_cfg),
                                                        center_xyz=center)
  return scan, image, crop_start


def scan_input(path: str, data_cfg, lesion: dict | None = None) -> np.ndarray:
  """float32 (D, H, W, 1): the model input for the scan at ``path`` (`load_input`)."""
  return load_input(path, data_cfg, lesion)[1]


def lesion_key(path: str, root: str) -> str:
  """How predict.lesions names the scan at ``path``: relative to the predict.input folder, or its file name."""
  rel = os.path.relpath(path, root) if os.path.isdir(root) else os.path.basename(path)
  return os.path.normpath(rel).replace(os.sep, "/")


def data_line(data_cfg) -> str:
  """How predict prepares a scan, in words (from the checkpoint's data config)."""
  words = f"shape {tuple(data_cfg.shape)}, "
  words += (f"HU window {tuple(data_cfg.hu_window)}" if sources.is_hu(data_cfg) else
            "intensities already scaled to [0, 1] (MedMNIST; no HU window)")
  if preprocess.needs_lesion(data_cfg):
    words += ", crops centred on each scan's lesion (config.predict.lesions)"
  return words


def predict_scans(config: ml_collections.ConfigDict, workdir: str, checkpoint_path: str = "",
                  explicit: Sequence[str] = ()) -> list[dict]:
  predictor, task = tasks.restore(config, workdir, checkpoint_path, explicit, "predict")
  config = predictor.config
  files = list_scans(config.predict.input)
  lesions = sources.read_lesions(config.predict.lesions) if config.predict.get("lesions", "") else {}
  without_lesion = config.predict.get("without_lesion", "skip")
  if without_lesion not in WITHOUT_LESION:
    from lungct import config_check
    raise config_check.ConfigError(f"config.predict.without_lesion={without_lesion!r}: must be one of "
                                   f"{WITHOUT_LESION}")
  needs_lesion = preprocess.needs_lesion(config.data)
  if needs_lesion and not lesions and without_lesion != "center":
    raise DataError(f"the model {predictor.checkpoint} was trained on crops centred on the lesion mask "
                    "(data.crop_center='mask'): give each scan's mask or centre with --config.predict.lesions=<csv> "
                    "(filename,mask or filename,x,y,z[,coords]), or --config.predict.without_lesion=center for "
                    "crops already centred on their lesion")
  out_dir = os.path.join(workdir, "predictions")
  main = runtime.is_main_process()
  if main:
    os.makedirs(out_dir, exist_ok=True)
    print(f"Checkpoint {predictor.checkpoint}; data prepared as in training: {data_line(config.data)}.")
  predict_one = task.scan_predictor(predictor, workdir, out_dir)
  rows = []
  for path in files:
    lesion = lesions.get(lesion_key(path, config.predict.input))
    try:
      scan, image, crop_start = load_input(path, config.data, lesion, without_lesion=without_lesion)
    except nifti.ScanError as e:
      print(f"SKIPPED {e}")
      rows.append({"file": path, "error": e.reason})
      continue
    where = {}
    if needs_lesion:   # where the model's crop was centred: the given lesion, or the scan's centre
      where = {"crop_centre": "lesion" if lesion is not None else "scan centre"}
      if lesion is None and main:
        print(f"{path}: no entry in config.predict.lesions; crop centred on the scan (predict.without_lesion=center)")
    rows.append({"file": path, **where,
                 **predict_one(scan, image[None], output_name(path, config.predict.input), crop_start=crop_start),
                 "error": ""})
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
