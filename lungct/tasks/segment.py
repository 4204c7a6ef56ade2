"""Lesion segmentation: a voxel-wise model (3D U-Net) trained with Dice + binary cross-entropy on patches,
evaluated on whole volumes with sliding-window inference.

    python -m lungct.main --config configs/unet_seg.py --workdir runs/seg             # train
    python -m lungct.main --config configs/unet_seg.py --workdir runs/seg --mode=eval # eval_test.json + overlays

Training crops random patches of ``config.segment.patch`` (centred on a lesion voxel with probability
``config.segment.pos_fraction``); validation and test run on whole volumes with
`inferers.sliding_window_inference` (MONAI's semantics; with ``config.segment.tta="flips"`` each window's
prediction averaged over its 8 flips, `inferers.flip_averaged`), thresholded at ``config.segment.threshold``.
Metrics per case (MONAI names): Dice, IoU and Hausdorff-95 (mm) on cases with a lesion; the
false-positive volume (ml) on cases without one.
"""
from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lungct import inferers, metrics, runtime
from lungct.data import augment as augment_lib
from lungct.data.sources import safe_name

NAME = "segment"
MODES = ("train", "eval", "cv", "predict", "report")
BEST_METRIC = "dice"
HEADLINE_METRICS = ("iou", "hd95")
CONFIG = "configs/unet_seg.py"   # its reference config (with a seconds-long `:tiny` variant)
CONFIG_GROUP = "segment"
EXECUTION_KEYS = ("segment.num_overlays", "segment.sw_batch_size", "segment.overlap", "segment.mode",
                  "segment.threshold", "segment.roi", "segment.keep", "segment.tta")
KEEP = ("all", "center")   # config.segment.keep: every thresholded voxel, or the component at the crop's centre


# ----------------------------------------------------------------------------- loss

def soft_dice_loss(logits: jax.Array, masks: jax.Array, *, smooth_nr: float = 1e-5,
                   smooth_dr: float = 1e-5) -> jax.Array:
  """MONAI DiceLoss(sigmoid=True): mean over examples and channels of 1 - (2|P.T| + nr) / (|P| + |T| + dr)."""
  p = jax.nn.sigmoid(logits.astype(jnp.float32))
  t = masks.astype(jnp.float32)
  axes = tuple(range(1, logits.ndim - 1))
  inter = jnp.sum(p * t, axes)
  den = jnp.sum(p, axes) + jnp.sum(t, axes)
  return jnp.mean(1.0 - (2.0 * inter + smooth_nr) / (den + smooth_dr))


def dice_bce_loss(logits: jax.Array, masks: jax.Array, *, lambda_dice: float = 1.0,
                  lambda_ce: float = 1.0) -> jax.Array:
  """MONAI DiceCELoss for one sigmoid channel: soft Dice + mean voxel-wise binary cross-entropy.

  logits, masks: (B, D, H, W, C); masks in {0, 1}.
  """
  bce = jnp.mean(optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), masks.astype(jnp.float32)))
  return lambda_dice * soft_dice_loss(logits, masks) + lambda_ce * bce


# ----------------------------------------------------------------------------- volumes -> probabilities -> mask

def probabilities(predict_fn, images: np.ndarray, sc) -> np.ndarray:
  """(B, D, H, W, C) volumes -> (B, D, H, W) lesion probabilities: sliding windows of ``segment.roi`` (empty: the
  patch) through the patch predictor ``predict_fn``, averaged over the 8 flips of each window (each flipped back)
  with ``segment.tta="flips"``. The one inference path of eval, training's validation and predict."""
  tta = sc.get("tta", "none")   # configs saved before the key existed: none
  if tta == "flips":
    predict_fn = inferers.flip_averaged(predict_fn)
  elif tta != "none":
    raise ValueError(f"config.segment.tta={tta!r}: must be one of {inferers.TTA}")
  roi = tuple(sc.roi) if sc.roi else tuple(sc.patch)
  return inferers.sliding_window_inference(predict_fn, images, roi, sc.overlap, sc.mode,
                                           sw_batch_size=sc.sw_batch_size)[..., 0]


def center_component(pred: np.ndarray) -> np.ndarray:
  """The connected component (26-connected) of ``pred`` that holds the volume's centre voxel or, when none does,
  the one with the voxel nearest to the centre (ties: the larger component); empty if ``pred`` is."""
  from scipy import ndimage
  labels, n = ndimage.label(pred, structure=np.ones((3, 3, 3), bool))
  if n <= 1:
    return labels > 0
  center = (np.asarray(pred.shape) - 1) / 2.0
  coords = np.argwhere(labels > 0)
  dist = np.linalg.norm(coords - center, axis=1)
  ids = labels[tuple(coords.T)]
  near = np.full(n + 1, np.inf)
  np.minimum.at(near, ids, dist)
  sizes = np.bincount(ids, minlength=n + 1)
  best = min(range(1, n + 1), key=lambda i: (near[i], -sizes[i]))
  return labels == best


def lesion_mask(prob: np.ndarray, sc) -> np.ndarray:
  """(D, H, W) probabilities -> bool mask: above ``segment.threshold``; with ``segment.keep="center"`` only the
  component at the crop's centre (for crops centred on one lesion: the nodule recipe's geometry)."""
  pred = np.asarray(prob) > sc.threshold
  keep = sc.get("keep", "all")
  if keep == "center":
    pred = center_component(pred)
  elif keep != "all":
    raise ValueError(f"config.segment.keep={keep!r}: must be one of {KEEP}")
  return pred


# ----------------------------------------------------------------------------- evaluation

def case_metrics(pred: np.ndarray, true: np.ndarray, spacing: tuple[float, float, float]) -> dict:
  """Dice, IoU, HD95 (mm) where the true mask has a lesion; always the predicted and false-positive volume (ml)."""
  pred, true = np.asarray(pred) > 0, np.asarray(true) > 0
  voxel_ml = float(np.prod(spacing)) / 1000.0
  out = {"has_lesion": bool(true.any()), "true_ml": float(true.sum()) * voxel_ml,
         "pred_ml": float(pred.sum()) * voxel_ml, "fp_ml": float((pred & ~true).sum()) * voxel_ml}
  if out["has_lesion"]:
    hd = metrics.hausdorff95(pred, true, spacing)
    out.update(dice=metrics.dice(pred, true), iou=metrics.iou(pred, true),
               hd95=hd if math.isfinite(hd) else None)  # None: nothing predicted
  return out


def summarize(cases: list[dict]) -> dict[str, float]:
  """Means over lesion cases (HD95 over those with a prediction) and the false-positive volume of lesion-free ones."""
  les = [c for c in cases if c["has_lesion"]]
  free = [c for c in cases if not c["has_lesion"]]
  hd = [c["hd95"] for c in les if c["hd95"] is not None]
  mean = lambda v: float(np.mean(v)) if v else float("nan")  # noqa: E731
  return {"dice": mean([c["dice"] for c in les]), "iou": mean([c["iou"] for c in les]), "hd95": mean(hd),
          "num_lesion_cases": len(les), "num_hd95_undefined": len(les) - len(hd),
          "num_lesion_free_cases": len(free), "fp_ml_lesion_free": mean([c["pred_ml"] for c in free]),
          "lesion_free_with_fp": float(sum(c["pred_ml"] > 0 for c in free))}


CI_METRICS = ("dice", "iou", "hd95")


def with_confidence(cases: list[dict], *, n_boot: int, seed: int) -> dict[str, dict]:
  """Dice, IoU and HD95 over the lesion cases with 95% bootstrap CIs, patients resampled (all their cases
  together): the mean of the per-case values (HD95 over the cases where it is defined, as `summarize`)."""
  les = [c for c in cases if c["has_lesion"]]
  groups = np.array([str(c["patient_id"]) for c in les])
  out = {}
  for name in CI_METRICS:
    vals = np.array([np.nan if c.get(name) is None else float(c[name]) for c in les], np.float64)
    fn = lambda _, v: float(np.nanmean(v)) if np.any(np.isfinite(v)) else float("nan")  # noqa: E731
    if not len(vals):
      out[name] = {"value": None, "lo": None, "hi": None, "n_used": 0, "n_cases": 0}
      continue
    ci = metrics.bootstrap_ci(np.zeros(len(vals)), vals, fn, groups=groups, n_boot=n_boot, seed=seed)
    out[name] = {"value": ci.point, "lo": ci.lo, "hi": ci.hi, "n_used": ci.n_used,
                 "n_cases": int(np.isfinite(vals).sum())}
  out["n_patients"] = int(len(set(groups.tolist())))
  return out


# ----------------------------------------------------------------------------- the task

def check(config) -> list[str]:
  sc = config.segment
  errors = []
  if len(sc.patch) != 3 or min(sc.patch) < 1:
    errors.append(f"config.segment.patch={tuple(sc.patch)!r}: three positive sizes (D, H, W)")
  if sc.roi and (len(sc.roi) != 3 or min(sc.roi) < 1):
    errors.append(f"config.segment.roi={tuple(sc.roi)!r}: empty (= patch) or three positive sizes")
  if not 0 <= sc.overlap < 1:
    errors.append(f"config.segment.overlap={sc.overlap!r}: must be in [0, 1)")
  if not 0 <= sc.pos_fraction <= 1:
    errors.append(f"config.segment.pos_fraction={sc.pos_fraction!r}: must be in [0, 1]")
  if sc.get("keep", "all") not in KEEP:
    errors.append(f"config.segment.keep={sc.get('keep')!r}: must be one of {KEEP}")
  if sc.get("tta", "none") not in inferers.TTA:
    errors.append(f"config.segment.tta={sc.get('tta')!r}: must be one of {inferers.TTA}")
  return errors


def input_shape(config) -> tuple[int, int, int]:
  return tuple(int(p) for p in config.segment.patch)


def num_outputs(config) -> int:
  return 1  # one lesion logit per voxel


def prepare_batch(batch: dict, config, step: int) -> dict[str, np.ndarray]:
  """Random patches; the crops depend on (seed, step, host) only, so a resumed run crops the same."""
  rng = np.random.default_rng([config.seed, step, jax.process_index()])
  x, m = inferers.random_patches(batch["image"], batch["mask"], tuple(config.segment.patch),
                        config.segment.pos_fraction, rng)
  return {"image": x, "mask": m}


def augment(key: jax.Array, batch: dict, config) -> dict:
  """Images and masks get the same random geometry."""
  if not config.augment.enabled:
    return batch
  images, masks = augment_lib.augment_batch(key, batch["image"], config.augment, masks=batch["mask"])
  return {**batch, "image": images, "mask": masks}


def loss(logits: jax.Array, batch: dict, config) -> tuple[jax.Array, dict]:
  masks = batch["mask"].astype(jnp.float32)
  sc = config.segment
  value = dice_bce_loss(logits, masks, lambda_dice=sc.lambda_dice, lambda_ce=sc.lambda_ce)
  return value, {"dice_loss": soft_dice_loss(logits, masks)}


def make_apply(graphdef, mesh, config):
  """jit: (params, batch_stats, a batch of windows, replicated) -> lesion probabilities."""
  return runtime.compile_apply(graphdef, mesh, lambda model, x: jax.nn.sigmoid(model(x, train=False)),
                               split_batch=False)


def evaluate(apply, variables, mesh, source, config, *, keep: int = 0):
  """(summary over the split, per-case rows); the first ``keep`` lesion cases also get (image, true, pred)."""
  from lungct.data import pipeline
  sc = config.segment
  predict_fn = lambda x: runtime.fetch(apply(variables.params, variables.batch_stats, x))  # noqa: E731
  cases, kept = [], []
  for i in range(len(source)):
    ex = pipeline.decode(source[i])
    image = ex["image"]
    prob = probabilities(predict_fn, image[None], sc)[0]
    pred, true = lesion_mask(prob, sc), ex["mask"][..., 0] > 0
    case = {"study_id": ex["study_id"], "patient_id": ex["patient_id"],
            **case_metrics(pred, true, tuple(float(s) for s in ex["voxel_spacing"]))}
    cases.append(case)
    if len(kept) < keep and case["has_lesion"]:
      kept.append((case["study_id"], image[..., 0], true, pred))
  summary = summarize(cases)
  return (summary, {"cases": cases, "kept": kept})


def run_eval(predictor: runtime.Predictor, sources: dict, workdir: str, split: str) -> dict:
  """--mode=eval: eval_<split>.json (summary and per-case metrics) and mask overlays in seg_overlays/."""
  config = predictor.config
  v = predictor.variables
  apply = make_apply(v.graphdef, predictor.mesh, config)
  summary, out = evaluate(apply, v, predictor.mesh, sources[split], config, keep=config.segment.num_overlays)
  result = {"checkpoint": predictor.checkpoint, "checkpoint_step": predictor.step,
            "checkpoint_fingerprint": runtime.fingerprint(predictor), "split": split,
            "threshold": config.segment.threshold, "keep": config.segment.get("keep", "all"), "tta": config.segment.get("tta", "none"), "summary": summary,
            "ci": with_confidence(out["cases"], n_boot=config.eval.n_boot, seed=config.seed),
            "cases": out["cases"]}
  if runtime.is_main_process():
    from lungct import viz
    out_dir = os.path.join(workdir, "seg_overlays")
    result["overlays"] = [
        viz.save(viz.mask_comparison(image, true, pred,
                                     title=f"{sid} ({split}): volume Dice {metrics.dice(pred, true):.2f}"),
                 os.path.join(out_dir, f"{split}_{safe_name(sid)}.png"))
        for sid, image, true, pred in out["kept"]]
    path = os.path.join(workdir, f"eval_{split}.json")
    with open(path, "w") as f:
      json.dump(metrics.json_safe(result), f, indent=2, allow_nan=False)
    s, ci = summary, result["ci"]
    def fmt(name, digits):
      m = ci[name]
      if m["value"] is None or not np.isfinite(m["value"]):
        return "n/a"
      return f"{m['value']:.{digits}f} [{m['lo']:.{digits}f}, {m['hi']:.{digits}f}]"
    print(f"{split}: Dice {fmt('dice', 3)} IoU {fmt('iou', 3)} HD95 {fmt('hd95', 1)} mm (95% CIs, patients "
          f"resampled) on {s['num_lesion_cases']} lesion cases of {ci['n_patients']} patients"
          + (f"; mean false-positive volume {s['fp_ml_lesion_free']:.2f} ml on {s['num_lesion_free_cases']} "
             "lesion-free cases" if s["num_lesion_free_cases"] else "")
          + f". Wrote {path} and {len(out['kept'])} overlays to {out_dir}")
  return result


# ----------------------------------------------------------------------------- --mode=predict

def scan_predictor(predictor: runtime.Predictor, workdir: str, out_dir: str):
  """Per scan: the lesion mask as NIfTI on the scan's own grid (``<name>_mask.nii.gz`` in ``out_dir``, same shape
  and affine as the input file; the model's window put back where `predict` cut it, around the given lesion for a
  model trained on lesion-centred crops) and the lesion volume in ml (scan grid; model grid alongside)."""
  from lungct.data import nifti, preprocess
  config = predictor.config
  sc = config.segment
  v = predictor.variables
  apply = make_apply(v.graphdef, predictor.mesh, config)
  predict_fn = lambda x: runtime.fetch(apply(v.params, v.batch_stats, x))  # noqa: E731

  def predict_one(scan, image: np.ndarray, name: str, crop_start=None) -> dict:
    prob = probabilities(predict_fn, image, sc)[0]
    pred = lesion_mask(prob, sc)
    spacing_dhw = np.asarray(scan.spacing, np.float64)[::-1]
    shape_dhw = scan.volume.shape[::-1]
    on_scan = preprocess.to_scan_grid(pred, shape_dhw, spacing_dhw, config.data, crop_start)
    target = preprocess.target_spacing(config.data)
    model_spacing = np.asarray(target, np.float64) if target else spacing_dhw
    row = {"lesion_ml": f"{float(on_scan.sum()) * float(np.prod(spacing_dhw)) / 1000.0:.4f}",
           "lesion_ml_model_grid": f"{float(pred.sum()) * float(np.prod(model_spacing)) / 1000.0:.4f}"}
    if runtime.is_main_process():
      path = nifti.save_mask_like(np.transpose(on_scan, (2, 1, 0)), scan,
                                  os.path.join(out_dir, f"{name}_mask.nii.gz"))
      row["mask_file"] = path
      print(f"{scan.path}: lesion {row['lesion_ml']} ml   mask: {path}")
    return row
  return predict_one


# ----------------------------------------------------------------------------- --mode=report

REPORT_ROWS = (("dice", "Dice", "lesion cases"), ("iou", "IoU", "lesion cases"),
               ("hd95", "HD95 (mm)", "lesion cases with a prediction"),
               ("volume_error_ml", "absolute volume error (ml)", "lesion cases"),
               ("fp_ml", "false-positive volume (ml)", "lesion-free cases"))


def report_table(cases: list[dict], *, n_boot: int, seed: int) -> tuple[list[str], list[list[str]]]:
  """(header, rows): each metric's mean over the cases it applies to, with a 95% bootstrap CI resampling
  patients (with all their cases)."""
  les = [c for c in cases if c["has_lesion"]]
  free = [c for c in cases if not c["has_lesion"]]
  values = {"dice": [c["dice"] for c in les], "iou": [c["iou"] for c in les],
            "hd95": [np.nan if c["hd95"] is None else c["hd95"] for c in les],
            "volume_error_ml": [abs(c["pred_ml"] - c["true_ml"]) for c in les],
            "fp_ml": [c["pred_ml"] for c in free]}
  groups = {"fp_ml": [c["patient_id"] for c in free]}
  rows = []
  for key, label, over in REPORT_ROWS:
    vals = values[key]
    if not len(vals):
      rows.append([label, over, "0", "n/a"])
      continue
    m = metrics.mean_with_ci(vals, groups.get(key, [c["patient_id"] for c in les]), n_boot=n_boot, seed=seed)
    cell = "n/a" if not np.isfinite(m["value"]) else f"{m['value']:.3f} ({m['lo']:.3f}–{m['hi']:.3f})"
    rows.append([label, over, f"{m['n_cases']} of {len(vals)}" if m["n_cases"] < len(vals) else str(len(vals)),
                 cell])
  return ["Metric", "over", "n", "mean (95% CI)"], rows


def report_sections(predictor: runtime.Predictor, sources: dict, workdir: str, out_dir: str, split: str) -> dict:
  """Dice / IoU / HD95 / volume errors with patient-bootstrap CIs of ``split`` (test, or the external set), the
  predicted vs reference lesion volumes and the mask overlays --mode=eval drew; eval_<split>.json is rerun when
  missing or written for other weights."""
  from lungct import viz
  config = predictor.config
  result = runtime.current_evaluation(predictor, sources, workdir, split, run_eval)
  cases = result["cases"]
  les = [c for c in cases if c["has_lesion"]]
  where = "external test set" if split == "external" else f"{split} split"
  figs = {}
  if les:
    figs[f"Lesion volume, predicted vs reference ({where})"] = viz.save(viz.predicted_vs_reference([
        {"name": "lesion volume", "y": np.array([c["true_ml"] for c in les]),
         "p": np.array([c["pred_ml"] for c in les]), "levels": None, "unit": "ml"}]),
        os.path.join(out_dir, "lesion_volume.png"))
  for path in result.get("overlays") or []:
    if os.path.exists(path):
      figs[f"Mask overlay: {os.path.splitext(os.path.basename(path))[0]}"] = path
  head, rows = report_table(cases, n_boot=int(config.eval.n_boot), seed=int(config.seed))
  n_patients = len({c["patient_id"] for c in cases})
  return {
      "title": "lesion segmentation",
      "test_line": f"{'External test' if split == 'external' else 'Test'} set: {len(cases)} studies from "
                   f"{n_patients} patients, {len(les)} with a lesion.",
      "sections": [(f"Segmentation on the {where}", [
          ("p", f"Whole volumes, sliding-window inference"
                f"{' averaged over the 8 flips of each window' if result.get('tta') == 'flips' else ''}, lesion "
                f"where the probability exceeds {result.get('threshold', config.segment.threshold)}. Each metric is a mean over the cases it "
                f"applies to, with a 95% bootstrap confidence interval (patients resampled with all their studies, "
                f"{config.eval.n_boot} draws). Dice and IoU: overlap with the reference mask (1 = identical); HD95: "
                f"the 95th percentile of the surface distance in mm, undefined where nothing was predicted; "
                f"volumes in ml at the voxel spacing of the preprocessed volume."),
          ("table", head, rows)])],
      "figures": figs,
      "limitations": ["Overlap and distances are measured on the preprocessed volume the model sees (its geometry "
                      "and spacing), against one reference mask per lesion; readers' masks of the same lesion differ "
                      "too."],
  }
