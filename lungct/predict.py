"""--mode=predict: raw scans -> probability, decision and a Grad-CAM overlay per scan (classification).

The model is restored for inference with the data settings it was trained with, and each scan goes through
`preprocess.model_input`, the function the dataset build stores examples with: the model sees here exactly the
values it saw in training. Intensities are read as the training data's were (HU, or already scaled for a
MedMNIST-trained model), and a model trained on crops centred on the lesion mask (data.crop_center="mask") gets
each scan's mask or lesion centre from config.predict.lesions. A scan that cannot be read, or that has no lesion
where the model needs one, is reported and skipped.
"""
from __future__ import annotations

import csv
import glob
import json
import os
import re
from typing import Sequence

import ml_collections
import numpy as np

from lungct import interpret, runtime, tasks, viz
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


def load_input(path: str, data_cfg, lesion: dict | None = None) -> tuple[nifti.Scan, np.ndarray]:
  """(the scan, its float32 (D, H, W, 1) model input) for the file at ``path``, prepared as the training data was:
  intensities as the training source's (`sources.load_for_model`), and for a model trained on crops centred on
  the lesion mask, the crop centred on ``lesion`` (its `sources.read_lesions` entry). nifti.ScanError if it cannot
  be used, or if the model needs a lesion and none is given."""
  scan = sources.load_for_model(path, data_cfg)
  mask = center = None
  if preprocess.needs_lesion(data_cfg):
    if lesion is None:
      raise nifti.ScanError(path, "no lesion mask or centre for this scan in config.predict.lesions: the model "
                                  "was trained on crops centred on the lesion (data.crop_center='mask')")
    mask, center = sources.lesion_of(scan, lesion)
  return scan, preprocess.model_input(scan, data_cfg, mask, hu=sources.is_hu(data_cfg), center_xyz=center)


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


def choose_threshold(config: ml_collections.ConfigDict, workdir: str, predictor: runtime.Predictor
                     ) -> tuple[float, str, dict]:
  """(threshold, why, recalibration) for ``predictor``'s checkpoint.

  The threshold is config.predict.threshold if set (>= 0); else the Youden threshold --mode=eval chose on
  validation, read from an eval_test.json / eval_validation.json written for this very checkpoint (an
  evaluation of other weights is named and ignored); else 0.5. The recalibration (a temperature, with
  eval.calibration="temperature") comes from that same evaluation; {"method": "none"} without one.
  """
  from lungct.tasks import classify
  ev, notes = None, []
  for split in ("test", "validation"):
    ev, why = classify.load_eval(workdir, split, predictor)
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


def restore_binary_classifier(config: ml_collections.ConfigDict, workdir: str, checkpoint_path: str,
                              explicit: Sequence[str], mode: str):
  """(predictor, task) for predict/report: the checkpoint restored for inference, which must be a binary
  classifier (TaskError naming the mode otherwise)."""
  predictor = runtime.restore_for_inference(config, workdir, checkpoint_path, explicit,
                                            num_outputs=tasks.num_outputs)
  task = tasks.check_mode(predictor.config, mode)
  if predictor.config.data.label != "binary":
    raise tasks.TaskError(f"--mode={mode} covers binary classifiers (config.data.label='binary')")
  return predictor, task


def predict_scans(config: ml_collections.ConfigDict, workdir: str, checkpoint_path: str = "",
                  explicit: Sequence[str] = ()) -> list[dict]:
  predictor, task = restore_binary_classifier(config, workdir, checkpoint_path, explicit, "predict")
  config = predictor.config
  files = list_scans(config.predict.input)
  lesions = sources.read_lesions(config.predict.lesions) if config.predict.get("lesions", "") else {}
  if preprocess.needs_lesion(config.data) and not lesions:
    raise DataError(f"the model {predictor.checkpoint} was trained on crops centred on the lesion mask "
                    "(data.crop_center='mask'): give each scan's mask or centre with --config.predict.lesions=<csv> "
                    "(filename,mask or filename,x,y,z[,coords])")
  v = predictor.variables
  apply = task.make_apply(v.graphdef, predictor.mesh, config)
  threshold, why, rec = choose_threshold(config, workdir, predictor)
  neg, pos = task.class_names(config)
  out_dir = os.path.join(workdir, "predictions")
  main = runtime.is_main_process()
  if main:
    os.makedirs(out_dir, exist_ok=True)
    print(f"Checkpoint {predictor.checkpoint}; data prepared as in training: {data_line(config.data)}. "
          f"Decision threshold {threshold:.3f} ({why})."
          + (f" Probabilities recalibrated with temperature {rec['temperature']:.3f} (fitted on validation)."
             if rec.get("temperature") is not None else ""))
  rows = []
  n = runtime.data_size(predictor.mesh)
  for path in files:
    try:
      image = scan_input(path, config.data, lesions.get(lesion_key(path, config.predict.input)))[None]
    except nifti.ScanError as e:
      print(f"SKIPPED {e}")
      rows.append({"file": path, "probability": "", "decision": "", "error": e.reason})
      continue
    batch = np.repeat(image, n, axis=0)  # one copy per batch shard keeps the batch shardable
    prob = float(runtime.fetch(apply(v.params, v.batch_stats,
                                     runtime.to_global(predictor.mesh, runtime.host_slice(batch))))[0])
    prob = float(task.calibrated(np.asarray([prob]), rec)[0])
    decision = pos if prob >= threshold else neg
    row = {"file": path, "probability": f"{prob:.6f}", "decision": decision, "error": ""}
    if main:
      cam = np.asarray(interpret.grad_cam(v.graphdef, v.params, v.batch_stats, image,
                                          layer=config.eval.gradcam_layer or None))[0]
      name = output_name(path, config.predict.input)
      png = os.path.join(out_dir, f"{name}_gradcam.png")
      viz.save(viz.overlay_slices(image[0, ..., 0], cam, num_slices=6,
                                  title=f"{name}: P({pos})={prob:.3f} -> {decision} (t={threshold:.2f}); "
                                        f"Grad-CAM"), png)
      print(f"{path}: P({pos}) = {prob:.3f} -> {decision}   overlay: {png}")
    rows.append(row)
  if main:
    csv_path = os.path.join(workdir, "predictions.csv")
    with open(csv_path, "w", newline="") as f:
      w = csv.DictWriter(f, fieldnames=["file", "probability", "decision", "error"])
      w.writeheader()
      w.writerows(rows)
    skipped = sum(1 for r in rows if r["error"])
    print(f"{len(rows) - skipped} scans predicted, {skipped} skipped; wrote {csv_path}")
  return rows
