"""Read and write CT scans as NIfTI: canonical (RAS) orientation, spacing, HU.

`load_scan` returns a `Scan` in nibabel's closest canonical orientation (RAS+),
axes (x, y, z), float32 Hounsfield units (scl_slope / scl_inter applied).
Every problem with a file raises `ScanError(path, reason)`, whose message is
"<path>: <reason>", so a bad scan in a folder of hundreds is easy to find.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import nibabel as nib
import numpy as np

# Plausibility rules for a CT volume (see `validate_volume`).
MIN_AXIS_VOXELS = 8
MAX_SPACING_MM = 20.0
# CT in HU always shows air (about -1000) and soft tissue (about 0..+60) in
# the field of view. Requiring min < -500 and max > -200 rejects raw
# 0..255 / 0..4095 images (min >= 0, slope/intercept lost), inverted or
# normalised images (e.g. [0, 1] or [-1, 1]) and volumes of air only.
HU_MIN_BELOW = -500.0
HU_MAX_ABOVE = -200.0


class ScanError(ValueError):
  """A scan that cannot be used; names the file and the problem."""

  def __init__(self, path: str | os.PathLike, reason: str):
    self.path = str(path)
    self.reason = reason
    super().__init__(f"{self.path}: {reason}")

  def __reduce__(self):  # Picklable across worker processes.
    return (type(self), (self.path, self.reason))


@dataclasses.dataclass(frozen=True, eq=False)
class Scan:
  """A CT volume in canonical RAS orientation.

  Attributes:
    volume: float32 (x, y, z) Hounsfield units.
    spacing: float64 (3,) voxel size (sx, sy, sz) in mm.
    affine: float64 (4, 4) voxel-to-world (RAS mm) affine of `volume`.
    path: the file it was read from.
  """
  volume: np.ndarray
  spacing: np.ndarray
  affine: np.ndarray
  path: str


def validate_volume(volume: np.ndarray, spacing: Sequence[float],
                    path: str | os.PathLike = "<array>") -> None:
  """Raises ScanError unless `volume` (x, y, z) HU and `spacing` look like CT.

  Checks: 3 dimensions, >= MIN_AXIS_VOXELS voxels per axis, finite spacing in
  (0, MAX_SPACING_MM] mm, finite voxels, not constant, and HU-like intensities
  (min < HU_MIN_BELOW and max > HU_MAX_ABOVE).
  """
  volume = np.asarray(volume)
  spacing = np.asarray(spacing, dtype=np.float64)
  if volume.ndim != 3:
    raise ScanError(path, f"expected a 3D volume, got {volume.ndim}D with shape {volume.shape}")
  if min(volume.shape) < MIN_AXIS_VOXELS:
    raise ScanError(path, f"too few voxels along an axis: shape {volume.shape} "
                          f"(need >= {MIN_AXIS_VOXELS} per axis)")
  if spacing.shape != (3,):
    raise ScanError(path, f"expected 3 spacing values, got {spacing.tolist()}")
  if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0) or np.any(spacing > MAX_SPACING_MM):
    raise ScanError(path, f"implausible voxel spacing {spacing.tolist()} mm "
                          f"(need finite, > 0 and <= {MAX_SPACING_MM})")
  finite = np.isfinite(volume)
  if not finite.all():
    n_bad = int(volume.size - np.count_nonzero(finite))
    raise ScanError(path, f"{n_bad} voxels are NaN or infinite")
  vmin, vmax = float(volume.min()), float(volume.max())
  if vmin == vmax:
    raise ScanError(path, f"constant volume (every voxel is {vmin:g})")
  if not (vmin < HU_MIN_BELOW and vmax > HU_MAX_ABOVE):
    raise ScanError(path, f"intensities [{vmin:g}, {vmax:g}] do not look like Hounsfield units "
                          f"(CT needs air: min < {HU_MIN_BELOW:g}, and tissue: max > {HU_MAX_ABOVE:g}); "
                          "missing scl_slope/scl_inter or not a CT?")


def load_scan(path: str | os.PathLike) -> Scan:
  """Loads a NIfTI CT scan in canonical RAS orientation, float32 HU.

  Raises:
    ScanError: the file is missing, unreadable, truncated, not 3D, or fails
      `validate_volume`.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ScanError(path, "file not found")
  try:
    img = nib.load(path)
  except Exception as e:  # nibabel raises many types for bad bytes.
    raise ScanError(path, f"not a readable NIfTI file ({type(e).__name__}: {e})") from e
  if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
    raise ScanError(path, f"not a NIfTI image (nibabel read it as {type(img).__name__})")
  shape = img.shape
  if len(shape) == 4 and shape[3] == 1:
    img = nib.squeeze_image(img)
    shape = img.shape
  if len(shape) != 3:
    raise ScanError(path, f"expected a 3D volume, got {len(shape)}D with shape {shape}")
  try:
    img = nib.as_closest_canonical(img)
    # Reading the data here makes truncated or corrupt files fail now.
    volume = img.get_fdata(dtype=np.float32)
  except Exception as e:
    raise ScanError(path, f"cannot read voxel data, truncated or corrupt file? "
                          f"({type(e).__name__}: {e})") from e
  spacing = np.asarray(img.header.get_zooms()[:3], dtype=np.float64)
  validate_volume(volume, spacing, path)
  return Scan(volume=volume, spacing=spacing, affine=np.asarray(img.affine, dtype=np.float64),
              path=path)


def save_scan(volume_xyz: np.ndarray, spacing: Sequence[float], path: str | os.PathLike,
              affine: np.ndarray | None = None) -> str:
  """Writes an (x, y, z) HU volume as an int16 NIfTI file (values rounded).

  Args:
    volume_xyz: HU values, axes (x, y, z).
    spacing: (sx, sy, sz) mm; used for the affine when `affine` is None
      (RAS, volume centred on the origin) and for the header zooms.
    path: destination, `.nii` or `.nii.gz`.
    affine: optional (4, 4) voxel-to-world affine.

  Returns:
    The path written, as str.
  """
  path = os.fspath(path)
  volume = np.asarray(volume_xyz)
  if volume.ndim != 3:
    raise ValueError(f"{path}: expected a 3D (x, y, z) volume, got shape {volume.shape}")
  spacing = np.asarray(spacing, dtype=np.float64)
  if affine is None:
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -0.5 * (np.asarray(volume.shape) - 1) * spacing
  info = np.iinfo(np.int16)
  data = np.clip(np.rint(volume), info.min, info.max).astype(np.int16)
  img = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64))
  img.header.set_zooms(tuple(float(s) for s in spacing))
  img.header.set_xyzt_units("mm")
  img.set_qform(img.affine, code=1)
  img.set_sform(img.affine, code=1)
  parent = os.path.dirname(path)
  if parent:
    os.makedirs(parent, exist_ok=True)
  nib.save(img, path)
  return path
