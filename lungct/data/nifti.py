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

from lungct.data.errors import ScanError

# Plausibility rules for a CT volume (see `validate_volume`). They reject what cannot be
# CT in Hounsfield units, never what is merely unusual. Whether a scan is big enough is a
# rule of the geometry chosen (`lungct.data.preprocess.check_geometry`), not of the reader:
# any 3D volume with at least one voxel per axis is read.
MAX_SPACING_MM = 20.0
# A CT image of the chest in HU always holds something below 0 HU (lung about -850, air
# -1000, fat -100). An image with no negative voxel is raw stored values (scl_slope /
# scl_inter lost: 0..4095), an 8-bit export (0..255), [0, 1]-normalised data or an MRI
# magnitude image. Checked on the 364 real LIDC-IDRI crops of ../shared/data/lidc_indeterminate
# (their minima span -1072..-789 HU) and on a tight lung crop with no soft tissue
# (LIDC-IDRI-0269_R_1: [-935, -506] HU), both kept.
HU_NEEDS_BELOW = 0.0
# A volume whose every voxel lies within +-20 is normalised data ([-1, 1], z-scores), not
# HU: no tissue but water sits within 20 HU of 0, and CT noise alone spans more (the
# smallest span of the 364 real crops is 429 HU, their smallest standard deviation 47 HU).
NORMALISED_WITHIN = 20.0
# The standard 12-bit CT range ends at 3071 HU (dense bone, contrast, metal clips).
# Metal or streak artefacts can exceed it in a few voxels; an MRI or any other
# non-HU image puts much of its tissue above it. More than this fraction of voxels
# above 3071 HU is not CT. (Real crops: at most a few voxels at exactly 3071.)
HU_TOP = 3071.0
MAX_FRACTION_ABOVE_TOP = 0.005


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
                    path: str | os.PathLike = "<array>", *, hu: bool = True) -> None:
  """Raises ScanError unless `volume` (x, y, z) HU and `spacing` can be CT.

  Checks: 3 dimensions with >= 1 voxel each, real-valued, finite spacing in
  (0, MAX_SPACING_MM] mm, finite voxels, not constant, and Hounsfield units: some voxel
  below HU_NEEDS_BELOW (0 HU), not every voxel within +-NORMALISED_WITHIN, at most
  MAX_FRACTION_ABOVE_TOP of the voxels above HU_TOP. A tight crop of lung with no soft
  tissue (max -506 HU) or of air with noise is CT and passes.
  hu=False (a volume for a model trained on MedMNIST's scaled intensities): instead of
  the HU rules, values must lie in [0, 255] (uint8-like) or [0, 1].
  """
  volume = np.asarray(volume)
  spacing = np.asarray(spacing, dtype=np.float64)
  if volume.ndim != 3:
    raise ScanError(path, f"expected a 3D volume, got {volume.ndim}D with shape {volume.shape}")
  if np.iscomplexobj(volume):
    raise ScanError(path, f"complex-valued voxels ({volume.dtype}): not a CT magnitude image")
  if min(volume.shape) < 1:
    raise ScanError(path, f"empty volume: shape {volume.shape}")
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
  if not hu:
    if vmin < 0 or vmax > 255:
      raise ScanError(path, f"intensities [{vmin:g}, {vmax:g}]: the model was trained on volumes already "
                            "scaled to [0, 1] or 0..255 (MedMNIST), not Hounsfield units")
    return
  if vmin >= HU_NEEDS_BELOW:
    raise ScanError(path, f"intensities [{vmin:g}, {vmax:g}] do not look like Hounsfield units: no voxel "
                          f"below {HU_NEEDS_BELOW:g} (CT of the chest holds lung, air or fat); raw stored "
                          "values (scl_slope/scl_inter lost), an 8-bit or normalised export, or not a CT?")
  if max(abs(vmin), abs(vmax)) <= NORMALISED_WITHIN:
    raise ScanError(path, f"intensities [{vmin:g}, {vmax:g}] do not look like Hounsfield units: every voxel "
                          f"within +-{NORMALISED_WITHIN:g} (normalised data such as [-1, 1] or z-scores?)")
  above = float(np.count_nonzero(volume > HU_TOP)) / volume.size
  if above > MAX_FRACTION_ABOVE_TOP:
    raise ScanError(path, f"{100 * above:.1f}% of voxels exceed {HU_TOP:g} HU (max {vmax:g}): "
                          "not CT Hounsfield units (an MRI or a rescaled image?)")


def load_scan(path: str | os.PathLike, *, hu: bool = True) -> Scan:
  """Loads a NIfTI CT scan in canonical RAS orientation, float32 HU (hu=False: values
  already scaled, checked by `validate_volume(hu=False)`).

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
  if np.dtype(img.get_data_dtype()).kind == "c":
    raise ScanError(path, f"complex-valued voxels ({img.get_data_dtype()}): not a CT magnitude image")
  try:
    img = nib.as_closest_canonical(img)
    # Reading the data here makes truncated or corrupt files fail now.
    volume = img.get_fdata(dtype=np.float32)
  except Exception as e:
    raise ScanError(path, f"cannot read voxel data, truncated or corrupt file? "
                          f"({type(e).__name__}: {e})") from e
  # The voxel size is that of the affine used to reorient (the sform or qform nibabel
  # chose), not the header's pixdim: the two can disagree.
  spacing = spacing_from_affine(img.affine)
  validate_volume(volume, spacing, path, hu=hu)
  return Scan(volume=volume, spacing=spacing, affine=np.asarray(img.affine, dtype=np.float64),
              path=path)


def spacing_from_affine(affine: np.ndarray) -> np.ndarray:
  """Voxel size (mm) per array axis: the lengths of the affine's first three columns."""
  affine = np.asarray(affine, dtype=np.float64)
  return np.sqrt(np.sum(affine[:3, :3] ** 2, axis=0))


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


def save_mask_like(mask_xyz: np.ndarray, scan: Scan, path: str | os.PathLike) -> str:
  """Writes a uint8 mask on ``scan``'s canonical (x, y, z) grid as NIfTI in the orientation of the file the scan
  was read from (same shape and affine as that file), so it overlays the original scan in any viewer."""
  path = os.fspath(path)
  img = nib.Nifti1Image(np.asarray(mask_xyz).astype(np.uint8), np.asarray(scan.affine, np.float64))
  try:
    original = nib.load(scan.path)
    ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(scan.affine),
                                           nib.orientations.io_orientation(original.affine))
    img = img.as_reoriented(ornt)
  except (OSError, nib.filebasedimages.ImageFileError):
    pass  # no file behind the scan (generated): keep the canonical grid
  parent = os.path.dirname(path)
  if parent:
    os.makedirs(parent, exist_ok=True)
  img.set_data_dtype(np.uint8)
  nib.save(img, path)
  return path
