"""Inference: a model applied to whole volumes or by sliding windows, and the patches training samples
(MONAI's vocabulary: SimpleInferer, SlidingWindowInferer, importance map, RandCropByPosNegLabel).

Every task uses these; none of them knows what the outputs mean.

* `whole_volume_batches`: every example of a split through a jitted ``apply``, once, in order, batched over the
  mesh (the classification and attribute tasks).
* `sliding_window_inference`: a whole-volume prediction from a patch predictor, windows blended by an
  `importance_map` (segmentation).
* `flip_averaged`: test-time augmentation of a patch predictor, its outputs averaged over the flips of its input
  (each flipped back).
* `random_patches`: the training crops of a patch-trained model.
"""
from __future__ import annotations

import itertools
import math
from typing import Any, Callable, Iterator

import numpy as np

from lungct import runtime


# ----------------------------------------------------------------------------- whole volumes

def whole_volume_batches(apply, variables: runtime.Variables, mesh, source, batch_size: int
                         ) -> Iterator[tuple[np.ndarray, dict]]:
  """(outputs of the valid examples, the decoded batch restricted to them) for every example of ``source``,
  exactly once and in order; every host reads the same global batch and feeds its share."""
  from lungct.data import pipeline
  for batch in pipeline.eval_batches(source, batch_size):
    out = runtime.fetch(apply(variables.params, variables.batch_stats,
                              runtime.to_global(mesh, runtime.host_slice(batch["image"]))))
    valid = np.asarray(batch["valid"], bool)
    yield out[valid], {k: np.asarray(v)[valid] for k, v in batch.items() if k != "valid"}


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


# ----------------------------------------------------------------------------- test-time augmentation

TTA = ("none", "flips")   # segment.tta: the predictor as it is, or averaged over the 8 flips of the 3 spatial axes


def flip_averaged(predict_fn: Callable[[np.ndarray], Any], axes: tuple[int, ...] = (1, 2, 3)
                  ) -> Callable[[np.ndarray], np.ndarray]:
  """``predict_fn`` averaged over all 2^len(axes) flips of its input, each output flipped back (MONAI's
  TestTimeAugmentation with RandFlip, exhaustively): exact on a voxel grid, no interpolation. ``axes`` index the
  (B, D, H, W, C) batch; the output must keep the input's spatial shape. Each call of the result calls
  ``predict_fn`` 2^len(axes) times with the same shape (a jitted predictor compiles once)."""
  subsets = [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]

  def averaged(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    total = None
    for flip in subsets:
      p = np.asarray(predict_fn(np.ascontiguousarray(np.flip(x, flip)) if flip else x), np.float32)
      p = np.flip(p, flip) if flip else p
      total = p.copy() if total is None else total + p
    return total / len(subsets)
  return averaged


# ----------------------------------------------------------------------------- patches (training)

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
