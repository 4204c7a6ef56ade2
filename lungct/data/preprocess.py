"""Preprocessing of CT volumes: pure numpy/scipy functions, MONAI vocabulary.

Model-facing volumes are (D, H, W) = (z, y, x); spacings follow the same
axis order as the volume they describe.

Geometry (`preprocess_arrays`), in this order:
  1. `data.target_spacing` (mm; one number = isotropic, or (z, y, x); empty = keep):
     resample so that one voxel is exactly that size (MONAI Spacing), centred on the
     scan's centre, so a 4 mm nodule stays 4 mm.
  2. `data.fit`: "resize" stretches the volume to `data.shape` (the whole scan fits,
     millimetres are lost unless the aspect happens to match); "crop_or_pad" cuts or
     pads (with air, -1000 HU) to `data.shape` without rescaling (MONAI
     ResizeWithPadOrCrop), so millimetres are kept.
  3. `data.crop_center` ("crop_or_pad" only): "center" keeps the middle of the scan;
     "mask" keeps the centre of the lesion mask's bounding box (when a mask is given
     and not empty), so the lesion is inside the crop whenever it fits.
  4. `data.hu_window` -> [0, 1] (clipped), then rounded through `STORED_DTYPE`: what
     the dataset stores and what the model sees, in training and at predict time.

`model_input(scan, data_cfg)` is that whole chain for one scan; the dataset builder and
`--mode=predict` both call it, so they feed the model the same values.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from lungct.data import nifti
from lungct.data.errors import ScanError

AIR_HU = -1000.0
# The dtype the dataset stores images in; `model_input` rounds through it so predict
# feeds the model exactly the values training read back from the dataset.
STORED_DTYPE = np.float16
FITS = ("resize", "crop_or_pad")
CROP_CENTERS = ("center", "mask")
# data.min_extent_mm: an optional floor (mm along every axis); 0 = none. Nothing in the
# preparation needs one: crop_or_pad pads any crop, resize has its stretch limit.
DEFAULT_MIN_EXTENT_MM = 0.0
# Millimetre limits are compared with this tolerance: 4 slices x 1.25 mm read from a
# header as float32 are 5.0 mm within rounding and pass a 5 mm limit.
MM_TOLERANCE = 0.01
DEFAULT_MAX_STRETCH = 16.0


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


def crop_starts(in_shape: Sequence[int], shape: Sequence[int],
                center: Sequence[float] | None = None) -> tuple[int, ...]:
  """Start index per axis of a `shape` window in a volume of `in_shape`.

  center None: the middle (when the difference is odd, the extra voxel is cropped
  from / padded at the end). Otherwise the window is centred on `center` (voxel
  coordinates) and shifted to stay inside the volume where the volume is larger than
  the window, or to contain the whole volume where it is smaller.
  """
  starts = []
  for i, (n, m) in enumerate(zip(in_shape, shape)):
    if center is None:
      start = (n - m) // 2 if n >= m else -((m - n) // 2)
    else:
      start = int(np.floor(float(center[i]) - (m - 1) / 2.0 + 0.5))
      start = int(np.clip(start, 0, n - m)) if n >= m else int(np.clip(start, n - m, 0))
    starts.append(start)
  return tuple(starts)


def crop_or_pad(vol: np.ndarray, shape: Sequence[int], starts: Sequence[int],
                pad_value: float = 0.0) -> np.ndarray:
  """The `shape` window of `vol` starting at `starts` (may be negative / run past the
  end); voxels outside the volume are `pad_value`."""
  shape = tuple(int(s) for s in shape)
  if len(shape) != vol.ndim or len(starts) != vol.ndim:
    raise ValueError(f"shape {shape} / starts {tuple(starts)} do not match a {vol.ndim}D volume")
  src, pad = [], []
  for n, m, s in zip(vol.shape, shape, starts):
    lo, hi = max(s, 0), min(s + m, n)
    src.append(slice(lo, max(lo, hi)))
    before = lo - s
    pad.append((before, m - before - max(0, hi - lo)))
  out = vol[tuple(src)]
  if any(p != (0, 0) for p in pad):
    out = np.pad(out, pad, mode="constant", constant_values=pad_value)
  return out


def center_crop_or_pad(vol: np.ndarray, shape: Sequence[int], pad_value: float = 0.0) -> np.ndarray:
  """Centre-crops or pads (with `pad_value`) every axis to `shape`.

  When the difference is odd the extra voxel is cropped from / padded at the end.
  """
  shape = tuple(int(s) for s in shape)
  if len(shape) != vol.ndim:
    raise ValueError(f"shape {shape} does not match a {vol.ndim}D volume")
  return crop_or_pad(vol, shape, crop_starts(vol.shape, shape), pad_value)


def mask_center(mask: np.ndarray | None) -> np.ndarray | None:
  """Centre (voxel coordinates) of the bounding box of mask > 0; None if empty/absent."""
  if mask is None:
    return None
  nz = np.nonzero(mask)
  if not nz[0].size:
    return None
  return np.array([(a.min() + a.max()) / 2.0 for a in nz])


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
                        order: int = 1, anti_aliasing: bool = False) -> np.ndarray:
  """Resamples to exactly `target_spacing` mm per voxel (MONAI Spacing).

  Spacings are in the axis order of `vol`. The output has round(n * spacing / target)
  voxels per axis (at least 1), centred on the input's centre: output voxel i sits at
  (i - (m - 1) / 2) * target mm from the centre, input voxel j at (j - (n - 1) / 2) *
  spacing. Samples up to half a voxel beyond the edge repeat the edge voxel. So
  physical sizes are kept exactly, whatever the rounding of the shape.

  Args:
    vol: the volume; order 0 keeps its dtype (label masks).
    spacing: its voxel size (mm) per axis.
    target_spacing: the wanted voxel size (mm) per axis.
    order: 0 nearest neighbour, 1 linear.
    anti_aliasing: Gaussian-smooth axes that shrink first (sigma = (target/spacing - 1) / 2 voxels).
  """
  spacing = np.asarray(spacing, dtype=np.float64)
  target = np.asarray(target_spacing, dtype=np.float64)
  if spacing.shape != (vol.ndim,) or target.shape != (vol.ndim,):
    raise ValueError(f"spacing {spacing.tolist()} / target {target.tolist()} must have {vol.ndim} values")
  if np.any(target <= 0) or np.any(spacing <= 0):
    raise ValueError(f"spacings must be > 0, got {spacing.tolist()} -> {target.tolist()}")
  n = np.asarray(vol.shape, dtype=np.float64)
  shape = resampled_shape(vol.shape, spacing, target)
  if shape == vol.shape and np.allclose(spacing, target):
    return vol if order == 0 else vol.astype(np.float32, copy=False)
  step = target / spacing  # Input voxels per output voxel.
  offset = (n - 1) / 2.0 - (np.asarray(shape) - 1) / 2.0 * step
  if order == 0:
    # Nearest neighbour by index arithmetic (exact, keeps dtype and labels).
    idx = [np.clip(np.floor(offset[a] + step[a] * np.arange(shape[a]) + 0.5), 0, vol.shape[a] - 1)
           .astype(np.intp) for a in range(vol.ndim)]
    return vol[np.ix_(*idx)]
  vol = vol.astype(np.float32, copy=False)
  if anti_aliasing and np.any(step > 1):
    vol = ndimage.gaussian_filter(vol, np.maximum(0.0, (step - 1.0) / 2.0), mode="nearest")
  out = ndimage.affine_transform(vol, step, offset=offset, output_shape=shape, order=order,
                                 mode="nearest", prefilter=order > 1)
  return out.astype(np.float32, copy=False)


def resampled_shape(in_shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> tuple[int, ...]:
  """The shape `resample_to_spacing` gives: round(n * spacing / target) voxels per axis, at least 1."""
  n = np.asarray(in_shape, dtype=np.float64)
  return tuple(int(m) for m in np.maximum(1, np.rint(n * np.asarray(spacing, np.float64) / np.asarray(target, np.float64))))


def resampled_point(point: Sequence[float], in_shape: Sequence[int], spacing: Sequence[float],
                    target: Sequence[float]) -> np.ndarray:
  """Voxel coordinates `point` of a volume (in_shape, spacing) in the volume `resample_to_spacing` makes
  at `target` (the inverse of its sampling: input = offset + step * output)."""
  n = np.asarray(in_shape, dtype=np.float64)
  step = np.asarray(target, np.float64) / np.asarray(spacing, np.float64)
  offset = (n - 1) / 2.0 - (np.asarray(resampled_shape(in_shape, spacing, target)) - 1) / 2.0 * step
  return (np.asarray(point, np.float64) - offset) / step


def target_spacing(data_cfg: Any) -> tuple[float, ...]:
  """data.target_spacing as (z, y, x) mm, or () for "keep the scan's spacing".

  Accepts one number (isotropic; 0 or negative = keep), or 1 or 3 numbers.
  """
  value = data_cfg.get("target_spacing", ()) if hasattr(data_cfg, "get") else ()
  if value is None:
    return ()
  if isinstance(value, (int, float, np.number)):
    return (float(value),) * 3 if float(value) > 0 else ()
  value = tuple(float(v) for v in value)
  if not value:
    return ()
  if len(value) == 1:
    value = value * 3
  if len(value) != 3 or min(value) <= 0:
    raise ValueError(f"data.target_spacing must be one positive number or 3 (z, y, x), got {value}")
  return value


def _fit(data_cfg: Any) -> str:
  fit = data_cfg.get("fit", "resize") or "resize"
  if fit not in FITS:
    raise ValueError(f"data.fit must be one of {FITS}, got {fit!r}")
  return fit


def _crop_center(data_cfg: Any) -> str:
  center = data_cfg.get("crop_center", "center") or "center"
  if center not in CROP_CENTERS:
    raise ValueError(f"data.crop_center must be one of {CROP_CENTERS}, got {center!r}")
  return center


def check_geometry(shape_dhw: Sequence[int], spacing_dhw: Sequence[float], data_cfg: Any,
                   path: str = "<array>") -> None:
  """ScanError unless a scan of this shape and spacing can be prepared as configured.

  fit="crop_or_pad": any scan with >= 1 voxel per axis (the crop is padded with air to
  data.shape; padding is the point). Checked on the 364 real LIDC-IDRI crops of
  ../shared/data/lidc_indeterminate, 38 of which span under 5 mm along z (the thinnest:
  LIDC-IDRI-0341_R_4, 2 slices of 1.25 mm = 2.5 mm): all kept.
  fit="resize": the scan is stretched to data.shape, so an axis may not be stretched more
  than data.max_stretch (16) times its extent in output voxels (a 2-slice crop stretched
  to 48 slices is refused, naming crop_or_pad).
  data.min_extent_mm (default 0 = none) is an optional floor in mm per axis, compared
  with a tolerance of MM_TOLERANCE mm (4 x 1.25 mm passes a 5 mm floor).
  """
  shape = np.asarray(shape_dhw, dtype=np.float64)
  spacing = np.asarray(spacing_dhw, dtype=np.float64)
  extent = shape * spacing
  dims = "x".join(str(int(s)) for s in shape)
  min_mm = float(data_cfg.get("min_extent_mm", DEFAULT_MIN_EXTENT_MM) or 0.0)
  if np.any(shape < 1) or np.any(extent < min_mm - MM_TOLERANCE):
    axis = int(np.argmin(extent))
    raise ScanError(path, f"too small: {dims} voxels span {' x '.join(f'{e:.2f}' for e in extent)} mm "
                          f"(z, y, x); axis {axis} is under data.min_extent_mm={min_mm:g} mm")
  if _fit(data_cfg) == "resize":
    target = np.asarray(target_spacing(data_cfg) or spacing)
    n_after = np.maximum(1, np.rint(extent / target))
    stretch = np.asarray(data_cfg.shape, dtype=np.float64) / n_after
    max_stretch = float(data_cfg.get("max_stretch", DEFAULT_MAX_STRETCH) or np.inf)
    if np.any(stretch > max_stretch * (1 + 1e-9)):
      raise ScanError(path, f"{dims} voxels would be stretched {stretch.max():.0f}x to data.shape "
                            f"{tuple(data_cfg.shape)} (data.max_stretch={max_stretch:g}); "
                            "use data.fit='crop_or_pad'")


def round_stored(image: np.ndarray) -> np.ndarray:
  """float32 values exactly as the dataset stores and reads them back (via STORED_DTYPE)."""
  return np.asarray(image, dtype=np.float32).astype(STORED_DTYPE).astype(np.float32)


def preprocess_arrays(vol_dhw: np.ndarray, spacing_dhw: Sequence[float], data_cfg: Any,
                      mask_dhw: np.ndarray | None = None, *, hu: bool = True,
                      center_dhw: Sequence[float] | None = None) -> dict[str, np.ndarray]:
  """One volume (and optional lesion mask) -> the model-facing arrays.

  Args:
    vol_dhw: (D, H, W) in HU (hu=True), or already in [0, 1] (hu=False: e.g. MedMNIST).
    spacing_dhw: its voxel size (z, y, x) mm.
    data_cfg: shape, hu_window, target_spacing, fit, crop_center, anti_aliasing.
    mask_dhw: optional label mask (D, H, W), same grid as the volume.
    hu: window data.hu_window to [0, 1] (padding is air, -1000 HU); False: clip to
      [0, 1] (padding is 0).
    center_dhw: with crop_center="mask" and no (or an empty) mask, the lesion centre in
      voxel coordinates of `vol_dhw` (predict's data given as a centre, not a mask).

  Returns:
    dict(image=float32 data.shape in [0, 1], rounded through STORED_DTYPE;
    mask=uint8 data.shape (zeros without a mask); voxel_spacing=float32 (3,), the mm
    of one output voxel (z, y, x); crop_start=int64 (3,), with fit="crop_or_pad" where the
    model's window starts in the resampled volume (negative where it was padded; zeros for
    "resize"): what `to_scan_grid` needs to put a predicted mask back).
  """
  vol = np.asarray(vol_dhw, dtype=np.float32)
  spacing = np.asarray(spacing_dhw, dtype=np.float64)
  shape = tuple(int(s) for s in data_cfg.shape)
  fit, anti_alias = _fit(data_cfg), bool(data_cfg.get("anti_aliasing", False))
  mask = None if mask_dhw is None else np.asarray(mask_dhw).astype(np.uint8, copy=False)
  if mask is not None and mask.shape != vol.shape:
    raise ValueError(f"mask shape {mask.shape} differs from the volume's {vol.shape}")
  target = target_spacing(data_cfg)
  if center_dhw is not None:
    center_dhw = np.asarray(center_dhw, np.float64)
    if target:
      center_dhw = resampled_point(center_dhw, vol.shape, spacing, target)
  if target:
    vol = resample_to_spacing(vol, spacing, target, order=1, anti_aliasing=anti_alias)
    if mask is not None:
      mask = resample_to_spacing(mask, spacing, target, order=0)
    spacing = np.asarray(target, dtype=np.float64) * 1.0
  pad = AIR_HU if hu else 0.0
  if fit == "resize":
    voxel_spacing = spacing * np.asarray(vol.shape) / np.asarray(shape)
    vol = resize(vol, shape, order=1, anti_aliasing=anti_alias)
    mask = None if mask is None else resize(mask, shape, order=0)
    starts = np.zeros(3, np.int64)
  else:
    center = None
    if _crop_center(data_cfg) == "mask":
      center = mask_center(mask)
      center = center_dhw if center is None else center
    starts = crop_starts(vol.shape, shape, center)
    vol = crop_or_pad(vol, shape, starts, pad)
    mask = None if mask is None else crop_or_pad(mask, shape, starts, 0)
    voxel_spacing = spacing
  if hu:
    a_min, a_max = (float(v) for v in data_cfg.hu_window)
    vol = scale_intensity_range(vol, a_min, a_max, 0.0, 1.0, clip=True)
  image = round_stored(np.clip(vol, 0.0, 1.0))
  mask = np.zeros(shape, np.uint8) if mask is None else mask.astype(np.uint8, copy=False)
  return dict(image=image, mask=mask, voxel_spacing=np.asarray(voxel_spacing, np.float32),
              crop_start=np.asarray(starts, np.int64))


def preprocess_volume(vol_dhw_hu: np.ndarray, spacing_dhw: Sequence[float], data_cfg: Any) -> np.ndarray:
  """HU (D, H, W) -> float32 data.shape in [0, 1] (`preprocess_arrays`' image)."""
  return preprocess_arrays(vol_dhw_hu, spacing_dhw, data_cfg)["image"]


def preprocess_mask(mask_dhw: np.ndarray, spacing_dhw: Sequence[float], data_cfg: Any) -> np.ndarray:
  """Label mask (D, H, W) -> uint8 data.shape, the same geometry as its volume."""
  mask = np.asarray(mask_dhw)
  return preprocess_arrays(np.zeros(mask.shape, np.float32), spacing_dhw, data_cfg, mask)["mask"]


def preprocess_scan(scan: nifti.Scan, data_cfg: Any, mask_xyz: np.ndarray | None = None,
                    *, hu: bool = True, center_xyz: Sequence[float] | None = None) -> dict[str, np.ndarray]:
  """A loaded Scan (and optional lesion mask, (x, y, z), or lesion centre in its voxel
  coordinates (x, y, z)) -> what the dataset stores.

  Returns:
    dict(image=float32 (D, H, W) in [0, 1] exactly as stored, mask=uint8
    (D, H, W), voxel_spacing=float32 (3,) mm of one model voxel (z, y, x),
    spacing=float32 (3,) original (z, y, x) mm, orig_shape=int32 (3,) original (z, y, x),
    crop_start=int64 (3,) (`preprocess_arrays`)).
  """
  vol = to_dhw(scan.volume)
  spacing = np.asarray(scan.spacing, dtype=np.float32)[::-1].copy()
  check_geometry(vol.shape, spacing, data_cfg, scan.path)
  try:
    out = preprocess_arrays(vol, spacing, data_cfg, None if mask_xyz is None else to_dhw(mask_xyz),
                            hu=hu, center_dhw=None if center_xyz is None else np.asarray(center_xyz)[::-1])
  except ScanError:
    raise
  except ValueError as e:
    raise ScanError(scan.path, f"preprocessing failed: {e}") from e
  return dict(image=out["image"], mask=out["mask"], voxel_spacing=out["voxel_spacing"], spacing=spacing,
              orig_shape=np.asarray(vol.shape, dtype=np.int32), crop_start=out["crop_start"])


def to_scan_grid(mask_dhw: np.ndarray, scan_shape_dhw: Sequence[int], spacing_dhw: Sequence[float],
                 data_cfg: Any, crop_start: Sequence[int] | None = None) -> np.ndarray:
  """The inverse geometry of `preprocess_arrays` for a label mask: a mask on the model's grid (data.shape) ->
  uint8 on the scan's own (D, H, W) grid, nearest neighbour.

  Undoes data.fit (crop_or_pad: the model's window put back where it was cut, at ``crop_start`` — the
  `preprocess_arrays` value of that scan, which follows the lesion when data.crop_center="mask"; None = the
  centred window —, voxels outside it 0; resize: resized back to the resampled shape) and then
  data.target_spacing (each scan voxel takes the resampled voxel nearest its centre, the inverse of
  `resample_to_spacing`'s centred grids).
  """
  mask = np.asarray(mask_dhw).astype(np.uint8, copy=False)
  n = np.asarray(scan_shape_dhw, dtype=np.int64)
  spacing = np.asarray(spacing_dhw, dtype=np.float64)
  target = target_spacing(data_cfg)
  m = n if not target else np.asarray(resampled_shape(n, spacing, target), np.int64)
  shape = tuple(int(x) for x in data_cfg.shape)
  if _fit(data_cfg) == "resize":
    mid = resize(mask, tuple(int(x) for x in m), order=0)
  else:
    starts = crop_starts(tuple(int(x) for x in m), shape, None) if crop_start is None else crop_start
    mid = crop_or_pad(mask, tuple(int(x) for x in m), [-int(s) for s in starts], 0)
  if not target or (tuple(m) == tuple(n) and np.allclose(spacing, target)):
    return mid.astype(np.uint8, copy=False)
  step = np.asarray(target, np.float64) / spacing     # scan voxels per resampled voxel
  offset = (n - 1) / 2.0 - (m - 1) / 2.0 * step
  idx = [np.clip(np.floor((np.arange(n[a]) - offset[a]) / step[a] + 0.5), 0, m[a] - 1).astype(np.intp)
         for a in range(3)]
  return mid[np.ix_(*idx)].astype(np.uint8, copy=False)


def needs_lesion(data_cfg: Any) -> bool:
  """Whether a scan is prepared around its lesion (fit="crop_or_pad", crop_center="mask"): then a model
  input needs the lesion's mask or centre, as the training examples had."""
  return _fit(data_cfg) == "crop_or_pad" and _crop_center(data_cfg) == "mask"


def model_input(scan: nifti.Scan, data_cfg: Any, mask_xyz: np.ndarray | None = None, *, hu: bool = True,
                center_xyz: Sequence[float] | None = None) -> np.ndarray:
  """The float32 (D, H, W, 1) array the model sees for `scan`: the stored example's image.

  The dataset builder stores exactly this (its values survive the round trip through
  STORED_DTYPE unchanged) and `--mode=predict` feeds exactly this. With
  data.crop_center="mask" the crop follows `mask_xyz` (training builds pass the lesion
  mask) or `center_xyz` (voxel coordinates); predict refuses a scan with neither
  (`needs_lesion`). hu=False: intensities already in [0, 1] (MedMNIST), no HU window.
  """
  return model_input_and_window(scan, data_cfg, mask_xyz, hu=hu, center_xyz=center_xyz)[0]


def model_input_and_window(scan: nifti.Scan, data_cfg: Any, mask_xyz: np.ndarray | None = None, *,
                           hu: bool = True, center_xyz: Sequence[float] | None = None
                           ) -> tuple[np.ndarray, np.ndarray]:
  """(`model_input`, the crop_start of its window) : what predict needs to map an output back to the scan
  (`to_scan_grid`)."""
  out = preprocess_scan(scan, data_cfg, mask_xyz, hu=hu, center_xyz=center_xyz)
  return out["image"][..., None], out["crop_start"]
