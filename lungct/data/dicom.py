"""Read a CT series from a folder of DICOM files (pydicom) as a `nifti.Scan`.

    scan = dicom.load_series("/data/LIDC-IDRI-0001/series_1")

One folder = one series. Slices are sorted by their position along the slice normal
(ImagePositionPatient . (row x column direction)), pixel values go through
RescaleSlope / RescaleIntercept to Hounsfield units, the in-plane voxel size is
PixelSpacing and the slice spacing the distance between consecutive positions. The
volume is returned like `nifti.load_scan` returns a NIfTI file: axes (x, y, z) in
nibabel's closest canonical orientation (RAS+; DICOM's patient frame is LPS), float32
HU, so both kinds of input go through the same preprocessing.

Anything that would give a wrong volume raises `ScanError` naming the folder: not CT
(Modality), several series mixed in one folder, duplicated or missing slices
(positions not evenly spaced), gantry tilt (positions not along the normal), slices
of different size or orientation.
"""
from __future__ import annotations

import os

import nibabel as nib
import numpy as np

from lungct.data import nifti
from lungct.data.errors import ScanError

# Consecutive slice gaps may differ from the median by this fraction before the
# series counts as having missing slices.
GAP_TOLERANCE = 0.2
# Positions may leave the slice normal by this much (mm per mm of travel): gantry tilt.
TILT_TOLERANCE = 0.01


def _read_headers(folder: str):
  import pydicom  # pylint: disable=g-import-not-at-top
  names = sorted(n for n in os.listdir(folder) if not n.startswith("."))
  slices = []
  for name in names:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
      continue
    try:
      ds = pydicom.dcmread(path, force=True)
    except Exception as e:  # pydicom raises many types for bad bytes.
      raise ScanError(folder, f"{name} is not a readable DICOM file ({type(e).__name__}: {e})") from e
    if "PixelData" not in ds:
      continue  # DICOMDIR, structured reports, ...: not image slices.
    slices.append((name, ds))
  return slices


def load_series(folder: str | os.PathLike) -> nifti.Scan:
  """Loads one DICOM CT series (a folder of slices) in canonical RAS orientation, HU."""
  folder = os.fspath(folder)
  if not os.path.isdir(folder):
    raise ScanError(folder, "DICOM series folder not found")
  slices = _read_headers(folder)
  if not slices:
    raise ScanError(folder, "no DICOM image slices in the folder")
  modalities = {str(ds.get("Modality", "")) for _, ds in slices}
  if modalities != {"CT"}:
    raise ScanError(folder, f"modality {sorted(modalities)} is not CT")
  series = {str(ds.get("SeriesInstanceUID", "")) for _, ds in slices}
  if len(series) > 1:
    raise ScanError(folder, f"{len(series)} series mixed in one folder "
                            f"(SeriesInstanceUID {sorted(series)[:2]}...): put one series per folder")
  if len(slices) < 2:
    raise ScanError(folder, "a single slice is not a 3D series")
  try:
    orient = {tuple(np.round(np.asarray(ds.ImageOrientationPatient, float), 4)) for _, ds in slices}
    if len(orient) != 1:
      raise ScanError(folder, f"slices have {len(orient)} different ImageOrientationPatient")
    (orient,) = orient
    row_dir, col_dir = np.asarray(orient[:3]), np.asarray(orient[3:])
    normal = np.cross(row_dir, col_dir)
    pixel = {tuple(float(v) for v in ds.PixelSpacing) for _, ds in slices}
    sizes = {(int(ds.Rows), int(ds.Columns)) for _, ds in slices}
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for _, ds in slices])
  except AttributeError as e:
    raise ScanError(folder, f"missing geometry tag ({e})") from e
  if len(pixel) != 1 or len(sizes) != 1:
    raise ScanError(folder, f"slices differ in PixelSpacing {sorted(pixel)} or size {sorted(sizes)}")
  tilt = {float(ds.get("GantryDetectorTilt", 0) or 0) for _, ds in slices}
  if any(abs(t) > 1e-3 for t in tilt):
    raise ScanError(folder, f"gantry tilt {sorted(tilt)} degrees: resample the series to an "
                            "orthogonal grid first")
  along = positions @ normal
  order = np.argsort(along, kind="stable")
  along, positions = along[order], positions[order]
  slices = [slices[i] for i in order]
  gaps = np.diff(along)
  if np.any(gaps < 1e-3):
    i = int(np.argmin(gaps))
    raise ScanError(folder, f"duplicated slice position {along[i]:.2f} mm "
                            f"({slices[i][0]} and {slices[i + 1][0]})")
  step = float(np.median(gaps))
  if np.any(np.abs(gaps - step) > GAP_TOLERANCE * step):
    i = int(np.argmax(np.abs(gaps - step)))
    raise ScanError(folder, f"missing slices: gap of {gaps[i]:.2f} mm after {slices[i][0]} where "
                            f"the series steps {step:.2f} mm ({len(slices)} slices)")
  travel = positions[-1] - positions[0]
  off_normal = travel - (travel @ normal) * normal
  if np.linalg.norm(off_normal) > TILT_TOLERANCE * np.linalg.norm(travel):
    raise ScanError(folder, "slice positions do not follow the slice normal (gantry tilt or "
                            "sheared series): resample it to an orthogonal grid first")
  try:
    planes = []
    for _, ds in slices:
      arr = ds.pixel_array.astype(np.float32)
      slope = float(ds.get("RescaleSlope", 1) or 1)
      inter = float(ds.get("RescaleIntercept", 0) or 0)
      planes.append(arr * np.float32(slope) + np.float32(inter))
  except Exception as e:
    raise ScanError(folder, f"cannot decode pixel data ({type(e).__name__}: {e})") from e
  # pixel_array[r, c]: c runs along row_dir (PixelSpacing[1]), r along col_dir (PixelSpacing[0]).
  volume = np.stack(planes, axis=-1).transpose(1, 0, 2)  # (c, r, k)
  (row_sp, col_sp), = pixel
  affine_lps = np.eye(4)
  affine_lps[:3, 0] = row_dir * col_sp
  affine_lps[:3, 1] = col_dir * row_sp
  affine_lps[:3, 2] = normal * step
  affine_lps[:3, 3] = positions[0]
  affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_lps  # LPS -> RAS
  img = nib.as_closest_canonical(nib.Nifti1Image(volume, affine))
  volume = np.asarray(img.dataobj, dtype=np.float32)
  spacing = nifti.spacing_from_affine(img.affine)
  nifti.validate_volume(volume, spacing, folder)
  return nifti.Scan(volume=volume, spacing=spacing, affine=np.asarray(img.affine, np.float64),
                    path=folder)


def write_series(volume_xyz: np.ndarray, spacing: tuple[float, float, float], folder: str | os.PathLike,
                 *, template: str | None = None, series_uid: str | None = None,
                 modality: str = "CT", slope: float = 1.0, intercept: float = -1024.0,
                 origin=(0.0, 0.0, 0.0), shuffle_seed: int | None = 0) -> list[str]:
  """Writes an (x, y, z) HU volume (RAS) as one axial DICOM series, one file per slice.

  For tests and examples: headers come from `template` (default: pydicom's CT_small.dcm
  test file), rows run along y and columns along x in LPS (the usual axial layout), and
  the files are written in a shuffled order (file names do not give the slice order).
  Returns the paths written.
  """
  import pydicom  # pylint: disable=g-import-not-at-top
  from pydicom.data import get_testdata_file  # pylint: disable=g-import-not-at-top
  from pydicom.uid import generate_uid  # pylint: disable=g-import-not-at-top
  folder = os.fspath(folder)
  os.makedirs(folder, exist_ok=True)
  template = template or get_testdata_file("CT_small.dcm")
  volume = np.asarray(volume_xyz, dtype=np.float64)
  nx, ny, nz = volume.shape
  sx, sy, sz = (float(s) for s in spacing)
  series_uid = series_uid or generate_uid()
  order = np.arange(nz)
  if shuffle_seed is not None:
    order = np.random.default_rng(shuffle_seed).permutation(nz)
  paths = []
  for k in order:
    ds = pydicom.dcmread(template)
    # LPS: columns (x index) run toward patient Left = -R; rows (y index) toward Posterior = -A.
    # Store the RAS x axis reversed so the LPS row direction is +x (i.e. 1, 0, 0).
    plane = volume[::-1, ::-1, k].T  # [row=y (reversed), col=x (reversed)]
    stored = np.rint((plane - intercept) / slope).astype(np.int16)
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceNumber = int(k) + 1
    ds.Rows, ds.Columns = stored.shape
    ds.PixelSpacing = [sy, sx]
    ds.SliceThickness = sz
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    # RAS voxel (i, j, k) at (origin + (i, j, k) * spacing); LPS = (-x, -y, z).
    x_last, y_last = origin[0] + (nx - 1) * sx, origin[1] + (ny - 1) * sy
    ds.ImagePositionPatient = [-x_last, -y_last, origin[2] + k * sz]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = stored.tobytes()
    for tag in ("SliceLocation",):
      if tag in ds:
        del ds[tag]
    path = os.path.join(folder, f"IM{len(paths):04d}.dcm")
    ds.save_as(path, enforce_file_format=False)
    paths.append(path)
  return paths
