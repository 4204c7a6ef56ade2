"""Lesion segmentation: 3D U-Net trained with Dice + binary cross-entropy, sliding-window inference.

    python -m lungct.main --config configs/unet_seg.py --workdir runs/seg             # train
    python -m lungct.main --config configs/unet_seg.py --workdir runs/seg --mode=eval # eval_test.json + overlays

Training reuses train.py's mesh, optimizer, sharding helpers, MetricWriter, data sources and
checkpoints; only the step (voxel-wise loss, joint image/mask augmentation) and the loop differ.
Training crops random patches of ``config.seg.patch`` (centred on a lesion voxel with probability
``config.seg.pos_fraction``); validation and test run on whole volumes with
`sliding_window_inference` (MONAI's semantics), thresholded at ``config.seg.threshold``.
Metrics per case (MONAI names): Dice, IoU and Hausdorff-95 (mm) on cases with a lesion; the
false-positive volume (ml) on cases without one.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from lungct import checkpoint, config_check, metrics, train
from lungct.data import augment, pipeline

State = dict[str, Any]
BEST_METRIC = "val_dice"


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


# ----------------------------------------------------------------------------- sliding window

def window_starts(size: int, roi: int, overlap: float) -> list[int]:
  """Window start offsets along one axis: stride int(roi * (1 - overlap)), last window flush with the end."""
  if size <= roi:
    return [0]
  interval = max(int(roi * (1.0 - overlap)), 1)
  n = math.ceil((size - roi) / interval) + 1
  return sorted({min(i * interval, size - roi) for i in range(n)})


def importance_map(roi_size: tuple[int, ...], mode: str = "gaussian", sigma_scale: float = 0.125) -> np.ndarray:
  """Per-voxel weight of a window: 'constant' ones, or 'gaussian' (sigma = sigma_scale * roi, max 1)."""
  if mode == "constant":
    return np.ones(roi_size, np.float32)
  if mode != "gaussian":
    raise ValueError(f"sliding window mode must be 'gaussian' or 'constant', got {mode!r}")
  w = np.ones((), np.float64)
  for r in roi_size:
    i = np.arange(r) - (r - 1) / 2.0
    w = np.multiply.outer(w, np.exp(-0.5 * (i / max(sigma_scale * r, 1e-6)) ** 2))
  w = w / w.max()
  return np.maximum(w, w[w > 0].min()).astype(np.float32)


def sliding_window_inference(predict_fn: Callable[[np.ndarray], Any], volume: np.ndarray,
                             roi_size: tuple[int, int, int], overlap: float = 0.5,
                             mode: str = "gaussian", *, sw_batch_size: int = 4,
                             sigma_scale: float = 0.125) -> np.ndarray:
  """Whole-volume prediction from a patch predictor (MONAI's sliding_window_inference, channels-last).

  Args:
    predict_fn: (sw_batch_size, *roi_size, C) -> (sw_batch_size, *roi_size, C_out). Always called
      with exactly `sw_batch_size` windows (the last batch is padded), so a jitted function compiles once.
    volume: (B, D, H, W, C). Axes smaller than the roi are zero-padded (evenly on both sides)
      and the result cropped back.
    roi_size: window (D, H, W).
    overlap: fraction of a window shared with its neighbour, in [0, 1).
    mode: 'gaussian' (weights fall off towards the window border) or 'constant'.

  Returns:
    float32 (B, D, H, W, C_out): the importance-weighted average of the overlapping window predictions.
  """
  volume = np.asarray(volume, np.float32)
  roi = tuple(int(r) for r in roi_size)
  if volume.ndim != 5 or len(roi) != 3 or min(roi) < 1:
    raise ValueError(f"sliding_window_inference: volume (B, D, H, W, C) and a 3D roi_size, "
                     f"got volume {volume.shape} and roi_size {roi_size}")
  if not 0.0 <= overlap < 1.0:
    raise ValueError(f"sliding_window_inference: overlap must be in [0, 1), got {overlap}")
  spatial = volume.shape[1:4]
  pad = [(max(r - s, 0) // 2, max(r - s, 0) - max(r - s, 0) // 2) for r, s in zip(roi, spatial)]
  x = np.pad(volume, [(0, 0), *pad, (0, 0)])
  padded = x.shape[1:4]
  weight = importance_map(roi, mode, sigma_scale)
  starts = [window_starts(s, r, overlap) for s, r in zip(padded, roi)]
  corners = [(a, b, c) for a in starts[0] for b in starts[1] for c in starts[2]]
  norm = np.zeros(padded, np.float32)
  for a, b, c in corners:
    norm[a:a + roi[0], b:b + roi[1], c:c + roi[2]] += weight
  windows = [(i, *corner) for i in range(x.shape[0]) for corner in corners]
  out = None
  for k in range(0, len(windows), sw_batch_size):
    chunk = windows[k:k + sw_batch_size]
    patches = np.stack([x[i, a:a + roi[0], b:b + roi[1], c:c + roi[2]] for i, a, b, c in chunk])
    if len(chunk) < sw_batch_size:
      patches = np.concatenate([patches, np.repeat(patches[-1:], sw_batch_size - len(chunk), 0)])
    preds = np.asarray(predict_fn(patches), np.float32)
    if preds.shape[1:4] != roi:
      raise ValueError(f"predict_fn must keep the window's spatial shape {roi}, returned {preds.shape}")
    if out is None:
      out = np.zeros((x.shape[0], *padded, preds.shape[-1]), np.float32)
    for (i, a, b, c), p in zip(chunk, preds):
      out[i, a:a + roi[0], b:b + roi[1], c:c + roi[2]] += p * weight[..., None]
  out /= norm[None, ..., None]
  return out[:, pad[0][0]:pad[0][0] + spatial[0], pad[1][0]:pad[1][0] + spatial[1],
             pad[2][0]:pad[2][0] + spatial[2]]


# ----------------------------------------------------------------------------- patches

def random_patches(images: np.ndarray, masks: np.ndarray, patch: tuple[int, int, int],
                   pos_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """One random (D, H, W) crop per example (MONAI RandCropByPosNegLabel-like).

  With probability `pos_fraction` (and a non-empty mask) the crop is centred on a random lesion
  voxel, else on a uniformly random position; crops are shifted to lie inside the volume, which
  is zero-padded first where it is smaller than `patch`.
  """
  patch = tuple(int(p) for p in patch)
  grow = [(0, 0), *[(0, max(p - s, 0)) for p, s in zip(patch, images.shape[1:4])], (0, 0)]
  images, masks = np.pad(images, grow), np.pad(masks, grow)
  shape = images.shape[1:4]
  out_x, out_m = [], []
  for img, msk in zip(images, masks):
    fg = np.argwhere(msk[..., 0] > 0)
    if len(fg) and rng.random() < pos_fraction:
      center = fg[rng.integers(len(fg))]
    else:
      center = [rng.integers(s) for s in shape]
    lo = [int(min(max(c - p // 2, 0), s - p)) for c, p, s in zip(center, patch, shape)]
    sl = tuple(slice(l, l + p) for l, p in zip(lo, patch))
    out_x.append(img[sl])
    out_m.append(msk[sl])
  return np.stack(out_x), np.stack(out_m)


# ----------------------------------------------------------------------------- state and steps

def train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, config: ml_collections.ConfigDict,
               state: State, images: jax.Array, masks: jax.Array, key: jax.Array) -> tuple[State, dict]:
  """One optimisation step on a batch of patches; images and masks get the same random geometry."""
  aug_key, dropout_key = jax.random.split(jax.random.fold_in(key, state["step"]))
  images, masks = augment.augment_batch(aug_key, images, config.data.augment, masks=masks)
  masks = masks.astype(jnp.float32)
  sc = config.seg

  def compute_loss(params):
    model = nnx.merge(graphdef, params, state["batch_stats"])
    logits = model(images, train=True, dropout_key=dropout_key)
    new_stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
    return dice_bce_loss(logits, masks, lambda_dice=sc.lambda_dice, lambda_ce=sc.lambda_ce), (logits, new_stats)

  (loss, (logits, new_stats)), grads = jax.value_and_grad(compute_loss, has_aux=True)(state["params"])
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  new_state = {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
               "batch_stats": new_stats, "opt_state": opt_state}
  return new_state, {"loss": loss, "dice_loss": soft_dice_loss(logits, masks),
                     "grad_norm": optax.global_norm(grads)}


def compile_steps(graphdef, tx, config, mesh):
  """(train step sharded over ``data``, predict: (state, windows) -> lesion probabilities, replicated)."""
  repl, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  step = jax.jit(lambda s, x, m, k: train_step(graphdef, tx, config, s, x, m, k),
                 in_shardings=(repl, split, split, repl), out_shardings=(repl, repl), donate_argnums=0)

  def predict(s, x):
    return jax.nn.sigmoid(nnx.merge(graphdef, s["params"], s["batch_stats"])(x, train=False))

  return step, jax.jit(predict, in_shardings=(repl, repl), out_shardings=repl)


# ----------------------------------------------------------------------------- evaluation

def voxel_spacing(example: dict, shape: tuple[int, ...]) -> tuple[float, float, float]:
  """(z, y, x) mm of a preprocessed voxel: the original extent over the model-facing shape."""
  if "spacing" not in example or "orig_shape" not in example:
    return (1.0, 1.0, 1.0)
  extent = np.asarray(example["spacing"], np.float64) * np.asarray(example["orig_shape"], np.float64)
  return tuple(float(e / s) for e, s in zip(extent, shape))


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


def segment_source(predict, state: State, source, config, *, keep: int = 0):
  """Per-case metrics for every example of ``source``; also (image, true, pred) of the first ``keep`` lesion cases."""
  sc = config.seg
  roi = tuple(sc.roi) if sc.roi else tuple(sc.patch)
  predict_fn = lambda x: np.asarray(jax.device_get(predict(state, x)))  # noqa: E731
  cases, kept = [], []
  for i in range(len(source)):
    ex = source[i]
    image = np.asarray(ex["image"], np.float32)
    prob = sliding_window_inference(predict_fn, image[None], roi, sc.overlap, sc.mode,
                                    sw_batch_size=sc.sw_batch_size)[0, ..., 0]
    pred, true = prob > sc.threshold, np.asarray(ex["mask"])[..., 0] > 0
    sid = ex.get("study_id", str(i))
    case = {"study_id": sid.decode() if isinstance(sid, bytes) else str(sid),
            **case_metrics(pred, true, voxel_spacing(ex, image.shape[:3]))}
    cases.append(case)
    if len(kept) < keep and case["has_lesion"]:
      kept.append((case["study_id"], image[..., 0], true, pred))
  return cases, kept


# ----------------------------------------------------------------------------- loop

def _check(config) -> None:
  sc = config.seg
  errors = []
  if len(sc.patch) != 3 or min(sc.patch) < 1:
    errors.append(f"config.seg.patch={tuple(sc.patch)!r}: three positive sizes (D, H, W)")
  if sc.roi and (len(sc.roi) != 3 or min(sc.roi) < 1):
    errors.append(f"config.seg.roi={tuple(sc.roi)!r}: empty (= patch) or three positive sizes")
  if not 0 <= sc.overlap < 1:
    errors.append(f"config.seg.overlap={sc.overlap!r}: must be in [0, 1)")
  if not 0 <= sc.pos_fraction <= 1:
    errors.append(f"config.seg.pos_fraction={sc.pos_fraction!r}: must be in [0, 1]")
  if errors:
    raise config_check.ConfigError("invalid config:\n  " + "\n  ".join(errors))


def train_segmentation(config: ml_collections.ConfigDict, workdir: str, sources: dict | None = None) -> dict:
  """Trains the segmentation model; writes checkpoints (best by val Dice), metrics.jsonl, TensorBoard, metrics.json."""
  config_check.validate(config, num_devices=jax.device_count())
  _check(config)
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  t_start = time.time()
  sources = sources or train.data_sources(config)
  train_src, val_src = sources["train"], sources["validation"]
  tc = config.train
  spe = pipeline.steps_per_epoch(len(train_src), tc.batch_size)
  total_steps = tc.num_steps if tc.num_steps > 0 else tc.num_epochs * spe
  eval_every = tc.eval_every_steps or spe

  graphdef, state, tx = train.create_state(config, total_steps)
  mesh = train.make_mesh()
  state = jax.device_put(state, NamedSharding(mesh, P()))
  step_fn, predict = compile_steps(graphdef, tx, config, mesh)
  latest, best = checkpoint.managers(workdir, keep=tc.keep_checkpoints, best_metric=BEST_METRIC)
  config_json = json.loads(config.to_json_best_effort())
  book = {"best_dice": -1.0, "best_step": -1}
  if config.resume and (restored := checkpoint.restore(latest, state)) is not None:
    config_check.same_run(restored[1].get("config", {}), config_json, workdir)
    state, meta = restored
    book.update(meta.get("bookkeeping", {}))
  start_step = int(state["step"])
  ds = pipeline.make_dataset(train_src, global_batch_size=tc.batch_size, seed=config.seed, shuffle=True,
                             num_epochs=None, drop_remainder=True,
                             process_index=jax.process_index(), process_count=jax.process_count())
  batches = pipeline.iterate(ds, start_step=start_step, num_threads=config.data.num_threads,
                             prefetch=config.data.prefetch)
  writer = train.MetricWriter(workdir, enabled=is_main)
  key = jax.random.PRNGKey(config.seed)
  window: list[dict] = []
  logged = {"train/loss": float("nan")}
  step = start_step
  try:
    while step < total_steps:
      batch = next(batches)
      rng = np.random.default_rng([config.seed, step, jax.process_index()])  # same crops on resume
      x, m = random_patches(batch["image"], batch["mask"], tuple(config.seg.patch), config.seg.pos_fraction, rng)
      state, out = step_fn(state, train.to_global(mesh, x), train.to_global(mesh, m), key)
      step += 1
      window.append(out)
      if step % tc.log_every_steps == 0 or step == total_steps:
        logged = {f"train/{k}": float(np.mean([float(w[k]) for w in window])) for k in window[0]}
        if not math.isfinite(logged["train/loss"]):
          raise FloatingPointError(f"non-finite segmentation loss {logged['train/loss']} at step {step}")
        writer.write(step, logged)
        window = []
      val = None
      if step % eval_every == 0 or step == total_steps:
        val = summarize(segment_source(predict, state, val_src, config)[0])
        writer.write(step, {f"val/{k}": v for k, v in val.items()})
        if val["dice"] > book["best_dice"]:
          book.update(best_dice=val["dice"], best_step=step)
        if is_main:
          print(f"step {step}: loss {logged['train/loss']:.4f} val Dice {val['dice']:.3f} "
                f"IoU {val['iou']:.3f} HD95 {val['hd95']:.1f} mm")
        meta = {"config": config_json, "bookkeeping": book}
        checkpoint.save(latest, step, state, meta)
        if math.isfinite(val["dice"]):
          checkpoint.save(best, step, state, meta, metrics={BEST_METRIC: val["dice"]})
  finally:
    latest.wait_until_finished()
    best.wait_until_finished()
    writer.close()

  if best.latest_step() is not None:
    state, _ = checkpoint.restore(best, state, best.best_step())
  summary = {"steps": step, "best_step": book["best_step"], "wall_time_s": time.time() - t_start}
  for split in ("validation", "test"):
    summary[split] = summarize(segment_source(predict, state, sources[split], config)[0])
  if is_main:
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
      json.dump(summary, f, indent=2, default=float)
    print(f"Done. Best step {summary['best_step']}: val Dice {summary['validation']['dice']:.3f}, "
          f"test Dice {summary['test']['dice']:.3f}. Wrote {workdir}/metrics.json")
  return summary


def evaluate_segmentation(config: ml_collections.ConfigDict, workdir: str, split: str = "test",
                          checkpoint_path: str = "") -> dict:
  """Restores the best (or given) checkpoint; writes eval_<split>.json and mask overlays to seg_overlays/."""
  _check(config)
  from lungct import evaluate
  graphdef, state, tx, mesh, directory, step = evaluate.restore_state(config, workdir, checkpoint_path)
  _, predict = compile_steps(graphdef, tx, config, mesh)
  source = train.data_sources(config)[split]
  cases, kept = segment_source(predict, state, source, config, keep=config.seg.num_overlays)
  result = {"checkpoint": f"{directory}/{step}", "split": split, "threshold": config.seg.threshold,
            "summary": summarize(cases), "cases": cases}
  if jax.process_index() == 0:
    from lungct import viz
    out_dir = os.path.join(workdir, "seg_overlays")
    result["overlays"] = [
        viz.save(viz.mask_comparison(image, true, pred, title=f"{sid} ({split}): volume Dice {metrics.dice(pred, true):.2f}"),
                 os.path.join(out_dir, f"{split}_{sid}.png"))
        for sid, image, true, pred in kept]
    path = os.path.join(workdir, f"eval_{split}.json")
    with open(path, "w") as f:
      json.dump(result, f, indent=2, default=float)
    s = result["summary"]
    print(f"{split}: Dice {s['dice']:.3f} IoU {s['iou']:.3f} HD95 {s['hd95']:.1f} mm on {s['num_lesion_cases']} "
          f"lesion cases; mean false-positive volume {s['fp_ml_lesion_free']:.2f} ml on "
          f"{s['num_lesion_free_cases']} lesion-free cases. Wrote {path} and {len(kept)} overlays to {out_dir}")
  return result
