"""Preprocessing of CT volumes: pure numpy/scipy functions, MONAI vocabulary.

Model-facing volumes are (D, H, W) = (z, y, x); spacings follow the same
axis order as the volume they describe.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from lungct.data import nifti


def to_dhw(vol_xyz: np.ndarray) -> np.ndarray:
  """(x, y, z) -> (D, H, W) = (z, y, x)."""
  return np.transpose(vol_xyz, (2, 1, 0))


def scale_intensity_range(vol: np.ndarray, a_min: float, a_max: float, b_min: float = 0.0,
                          b_max: float = 1.0, clip: bool = True) -> np.ndarray:
  """Linearly maps [a_min, a_max] to [b_min, b_max] (MONAI ScaleIntensityRange); float32."""
  if a_max == a_min:
    raise ValueError(f"empty intensity window [{a_min}, {a_max}]")
  vol = np.asarray(vol, dtype=np.float32)
  out = (vol - np.float32(a_min)) * np.float32((b_max - b_min) / (a_max - a_min)) + np.float32(b_min)
  if clip:
    out = np.clip(out, min(b_min, b_max), max(b_min, b_max))
  return out.astype(np.float32, copy=False)


def center_crop_or_pad(vol: np.ndarray, shape: Sequence[int], pad_value: float = 0.0) -> np.ndarray:
  """Centre-crops or pads (with `pad_value`) every axis to `shape`.

  When the difference is odd the extra voxel is cropped from / padded at the end.
  """
  shape = tuple(int(s) for s in shape)
  if len(shape) != vol.ndim:
    raise ValueError(f"shape {shape} does not match a {vol.ndim}D volume")
  crop = []
  pad = []
  for n, m in zip(vol.shape, shape):
    if n >= m:
      start = (n - m) // 2
      crop.append(slice(start, start + m))
      pad.append((0, 0))
    else:
      before = (m - n) // 2
      crop.append(slice(None))
      pad.append((before, m - n - before))
  out = vol[tuple(crop)]
  if any(p != (0, 0) for p in pad):
    out = np.pad(out, pad, mode="constant", constant_values=pad_value)
  return out


def _fit_to_shape(vol: np.ndarray, shape: Sequence[int]) -> np.ndarray:
  """Crops / edge-pads at the end of each axis: fixes zoom's rounding."""
  vol = vol[tuple(slice(0, int(m)) for m in shape)]
  pad = [(0, int(m) - n) for n, m in zip(vol.shape, shape)]
  if any(p[1] for p in pad):
    vol = np.pad(vol, pad, mode="edge")
  return vol


def resize(vol: np.ndarray, shape: Sequence[int], order: int = 1,
           anti_aliasing: bool = False) -> np.ndarray:
  """Resizes to exactly `shape` with scipy.ndimage.zoom (corner-aligned grid).

  Args:
    vol: the volume, any dtype (order 0 keeps label values).
    shape: output shape.
    order: spline order; 0 nearest neighbour (masks), 1 linear.
    anti_aliasing: Gaussian-smooth axes that shrink first (sigma = (1/zoom - 1)/2).

  Returns:
    Array of `shape`, dtype of `vol` for order 0, else float32.
  """
  shape = tuple(int(s) for s in shape)
  if len(shape) != vol.ndim:
    raise ValueError(f"shape {shape} does not match a {vol.ndim}D volume")
  if vol.shape == shape:
    return vol if order == 0 else vol.astype(np.float32, copy=False)
  factors = np.asarray(shape, dtype=np.float64) / np.asarray(vol.shape, dtype=np.float64)
  if order != 0:
    vol = vol.astype(np.float32, copy=False)
    if anti_aliasing and np.any(factors < 1):
      sigma = np.maximum(0.0, (1.0 / factors - 1.0) / 2.0)
      vol = ndimage.gaussian_filter(vol, sigma, mode="nearest")
  out = ndimage.zoom(vol, factors, order=order, mode="nearest", prefilter=order > 1)
  return _fit_to_shape(out, shape)


def resample_to_spacing(vol: np.ndarray, spacing: Sequence[float], target_spacing: Sequence[float],
                        order: int = 1) -> np.ndarray:
  """Resamples to `target_spacing` (MONAI Spacing); spacings in the axis order of `vol`.

  The output shape is round(shape * spacing / target_spacing), at least 1.
  """
  spacing = np.asarray(spacing, dtype=np.float64)
  target = np.asarray(target_spacing, dtype=np.float64)
  if spacing.shape != (vol.ndim,) or target.shape != (vol.ndim,):
    raise ValueError(f"spacing {spacing.tolist()} / target {target.tolist()} must have {vol.ndim} values")
  if np.any(target <= 0):
    raise ValueError(f"target spacing must be > 0, got {target.tolist()}")
  shape = np.maximum(1, np.rint(np.asarray(vol.shape) * spacing / target)).astype(int)
  return resize(vol, tuple(shape), order=order)


def _target_spacing(data_cfg: Any) -> tuple[float, ...]:
  return tuple(float(s) for s in (data_cfg.get("target_spacing", ()) or ()))


def preprocess_volume(vol_dhw_hu: np.ndarray, spacing_dhw: Sequence[float], data_cfg: Any) -> np.ndarray:
  """HU (D, H, W) -> float32 data_cfg.shape in [0, 1].

  Steps: resample to data_cfg.target_spacing (if non-empty), window
  data_cfg.hu_window -> [0, 1] clipped, resize to data_cfg.shape.
  """
  vol = np.asarray(vol_dhw_hu, dtype=np.float32)
  target = _target_spacing(data_cfg)
  if target:
    vol = resample_to_spacing(vol, spacing_dhw, target, order=1)
  a_min, a_max = (float(v) for v in data_cfg.hu_window)
  vol = scale_intensity_range(vol, a_min, a_max, 0.0, 1.0, clip=True)
  vol = resize(vol, data_cfg.shape, order=1, anti_aliasing=bool(data_cfg.get("anti_aliasing", False)))
  return np.clip(vol, 0.0, 1.0).astype(np.float32, copy=False)


def preprocess_mask(mask_dhw: np.ndarray, spacing_dhw: Sequence[float], data_cfg: Any) -> np.ndarray:
  """Label mask (D, H, W) -> uint8 data_cfg.shape, same geometry, nearest neighbour."""
  mask = np.asarray(mask_dhw).astype(np.uint8, copy=False)
  target = _target_spacing(data_cfg)
  if target:
    mask = resample_to_spacing(mask, spacing_dhw, target, order=0)
  return resize(mask, data_cfg.shape, order=0).astype(np.uint8, copy=False)


def preprocess_scan(scan: nifti.Scan, data_cfg: Any) -> dict[str, np.ndarray]:
  """A loaded Scan -> model input and its original geometry.

  Returns:
    dict(image=float32 (D, H, W) in [0, 1], spacing=float32 (3,) original
    (z, y, x) mm, orig_shape=int32 (3,) original (z, y, x)).
  """
  vol = to_dhw(scan.volume)
  spacing = np.asarray(scan.spacing, dtype=np.float32)[::-1].copy()
  return dict(image=preprocess_volume(vol, spacing, data_cfg),
              spacing=spacing,
              orig_shape=np.asarray(vol.shape, dtype=np.int32))


def model_input(scan: nifti.Scan, data_cfg: Any) -> np.ndarray:
  """float32 (D, H, W): exactly what the stored training example holds for ``scan`` (rounded through float16)."""
  return preprocess_scan(scan, data_cfg)["image"].astype(np.float16).astype(np.float32)
