"""What the dataset builder reads: the studies of each source (`list_items`) and one
study's volume (`load_item`).

Sources (`data.source`):
  synthetic   chest-CT phantoms (`lungct.data.phantom`), generated at build time.
  nodules     nodule crops (`lungct.data.nodules`), generated at build time.
  folder      NIfTI scans under `data.manual_dir` listed by `data.labels_csv`
              (filename,label[,patient_id][,grade][,mask][,<data.targets>...]).
  dicom       the same CSV, each `filename` a folder holding one DICOM series.
  mosmeddata  `manual_dir/CT-0..CT-4/study_XXXX.nii.gz` (+ masks/study_XXXX_mask.nii.gz).
  medmnist    a MedMNIST 3D `.npz` (`manual_dir` = the file, or the folder holding
              `<data.medmnist_flag>.npz` for 28^3 / `<flag>_64.npz` for 64^3); its own
              train / val / test splits are kept.

Targets (`data.targets`, an open schema): numeric per-study values beyond label and grade, stored as one
float vector per example (NaN = missing): for folder / dicom the CSV columns of those names, for the generated
sources the fields they provide (`GENERATED_TARGETS`). Any other name is a DataError naming what is available.

Every problem with the listing (a CSV row, a folder layout) raises `DataError` with a
one-line message naming the file and row; every problem with one study raises
`ScanError` (the builder skips or stops, `data.on_bad_scan`).
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import io
import os
import re
from typing import Any, Mapping

import nibabel as nib
import numpy as np

from lungct.data import dicom
from lungct.data import nifti
from lungct.data import nodules
from lungct.data import phantom
from lungct.data.errors import DataError, ScanError

SOURCES = ("synthetic", "nodules", "folder", "dicom", "mosmeddata", "medmnist")
MAX_GRADE = 4
NIFTI_SUFFIXES = (".nii.gz", ".nii")
MEDMNIST_SPLITS = {"train": "train", "val": "validation", "test": "test"}
# Targets a generated source provides (data.targets); folder / dicom: any numeric CSV column.
GENERATED_TARGETS = {"nodules": ("diameter_mm", "malignancy"), "synthetic": ("lesion_ml",)}


@dataclasses.dataclass(frozen=True)
class Item:
  """One study to turn into an example (a scan file / series, an array, or a recipe)."""
  study_id: str
  patient_id: str
  label: int
  grade: int
  path: str = ""          # scan file or DICOM folder (folder / dicom / mosmeddata / medmnist)
  mask_path: str = ""     # optional lesion mask file
  phantom_seed: int = -1  # synthetic / nodules
  index: int = -1         # medmnist: row in the split's array
  split: str = ""         # a split fixed by the source (medmnist), else "" = by patient
  targets: tuple[tuple[str, float], ...] = ()  # folder / dicom: (name, value) of data.targets from the CSV


def study_id_of(filename: str) -> str:
  """The study id of a listed file or series folder: its path relative to the data dir
  with "/" separators and without the NIfTI suffix (`LIDC-0001/nodule_1.nii.gz` ->
  `LIDC-0001/nodule_1`), so per-patient folders holding files of the same name
  (`LIDC-0002/nodule_1.nii.gz`) give distinct ids. Shown as such in every table and CSV;
  `safe_name` turns it into a file name."""
  rel = os.path.normpath(filename).replace(os.sep, "/")
  for suffix in NIFTI_SUFFIXES:
    if rel.endswith(suffix):
      return rel[: -len(suffix)]
  return rel


def safe_name(study_id: str) -> str:
  """A file-name form of a study id: `/` -> `__`, anything but letters, digits, `.`, `_`, `-`
  -> `_` (`LIDC-0001/nodule_1` -> `LIDC-0001__nodule_1`)."""
  return re.sub(r"[^A-Za-z0-9._-]", "_", str(study_id).replace("/", "__"))


def _inside(root: str, rel: str, where: str, column: str, want_dir: bool = False) -> str:
  """Resolves `rel` under `root`; DataError if absolute, escaping root (by `..` or by a
  symbolic link leading outside it) or missing."""
  if not rel:
    raise DataError(f"{where}: empty {column}")
  if os.path.isabs(rel) or rel.startswith("~"):
    raise DataError(f"{where}: {column} {rel!r} must be a path relative to the data dir {root}")
  norm = os.path.normpath(rel)
  if norm == ".." or norm.startswith(".." + os.sep):
    raise DataError(f"{where}: {column} {rel!r} escapes the data dir {root}")
  path = os.path.join(root, norm)
  ok = os.path.isdir(path) if want_dir else os.path.isfile(path)
  if not ok:
    kind = "folder" if want_dir else "file"
    raise DataError(f"{where}: {column} {rel!r} not found (looked for the {kind} {path})")
  real_root, real = os.path.realpath(root), os.path.realpath(path)
  if os.path.commonpath([real_root, real]) != real_root:
    raise DataError(f"{where}: {column} {rel!r} is a symbolic link leading outside the data dir {root} "
                    f"(to {real}); copy the file into the data dir")
  return path


def labels_csv_path(manual_dir: str, labels_csv: str) -> str:
  """data.labels_csv as a path: absolute as given, a relative one inside data.manual_dir."""
  labels_csv = os.path.expanduser(str(labels_csv))
  return labels_csv if os.path.isabs(labels_csv) else os.path.join(manual_dir, labels_csv)


def _int_field(value: str, where: str, column: str, low: int, high: int | None) -> int:
  try:
    out = int(value.strip())
  except ValueError:
    raise DataError(f"{where}: {column} {value!r} is not an integer class") from None
  if out < low or (high is not None and out > high):
    bound = f">= {low}" if high is None else f"in [{low}, {high}]"
    raise DataError(f"{where}: unknown {column} {out} (must be {bound})")
  return out


def _read_csv(csv_path: str) -> tuple[list[str], list[dict[str, str]]]:
  """Header and rows; accepts a UTF-8 BOM (Excel's "CSV UTF-8") and ';' separators."""
  try:
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
      text = f.read()
  except UnicodeDecodeError as e:
    raise DataError(f"{csv_path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
  first = text.splitlines()[0] if text.strip() else ""
  delimiter = ";" if first.count(";") > first.count(",") else ","
  reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
  columns = [(c or "").strip() for c in (reader.fieldnames or [])]
  rows = []
  for i, r in enumerate(reader):
    if None in r:
      raise DataError(f"{csv_path} row {i + 2}: more fields than the header's {len(columns)} "
                      f"({delimiter!r}-separated)")
    rows.append({(k or "").strip(): (v or "").strip() for k, v in r.items()})
  return columns, rows


def _float_field(value: str, where: str, column: str) -> float:
  """A target value: a finite number, or empty / "nan" / "NA" for missing (NaN)."""
  if value.strip().lower() in ("", "nan", "na", "n/a"):
    return float("nan")
  try:
    out = float(value)
  except ValueError:
    raise DataError(f"{where}: {column} {value!r} is not a number (targets are numeric; empty = missing)") from None
  if not np.isfinite(out):
    raise DataError(f"{where}: {column} {value!r} is not finite (empty = missing)")
  return out


def list_folder_items(manual_dir: str, labels_csv: str, *, series_folders: bool = False,
                      targets: tuple[str, ...] = ()) -> list[Item]:
  """Reads and validates the labels CSV; DataError naming the CSV row on any problem.

  Columns (header required): filename, label (0 / 1; optional when `targets` or a mask column are given,
  then -1 = unknown), optional patient_id (default: the study id), grade (-1..4, default -1), mask (a mask
  file) and one column per target name (numbers; empty = missing). `labels_csv` is a path
  relative to `manual_dir` (or absolute); the listed paths are relative to `manual_dir`
  and must stay inside it. Study ids are the relative paths (`study_id_of`).
  series_folders: each filename is a folder holding one DICOM series (source "dicom").
  """
  if not os.path.isdir(manual_dir):
    raise DataError(f"data dir {manual_dir!r} (data.manual_dir) does not exist")
  csv_path = labels_csv_path(manual_dir, labels_csv)
  if not os.path.isfile(csv_path):
    raise DataError(f"labels CSV {labels_csv!r} (data.labels_csv) not found: looked for {csv_path} "
                    "(a relative data.labels_csv is read inside data.manual_dir)")
  columns, rows = _read_csv(csv_path)
  # A label is optional when the CSV gives other targets: data.targets columns, or lesion masks (segmentation).
  label_optional = bool(targets) or "mask" in columns
  missing = ({"filename"} if label_optional else {"filename", "label"}) - set(columns)
  if missing:
    raise DataError(f"{csv_path}: header must name columns filename,label[,patient_id][,grade]"
                    f"[,mask]; missing {sorted(missing)} in {columns}")
  absent = [t for t in targets if t not in columns]
  if absent:
    raise DataError(f"{csv_path}: data.targets {absent} are not columns of the CSV (columns: {columns})")
  items, seen_files, seen_ids = [], {}, {}
  for i, r in enumerate(rows):
    row = i + 2  # 1-based line number; line 1 is the header.
    where = f"{csv_path} row {row}"
    path = _inside(manual_dir, r["filename"], where, "filename", want_dir=series_folders)
    norm = os.path.normpath(r["filename"])
    if norm in seen_files:
      raise DataError(f"{where}: duplicate filename {r['filename']!r} (first at row {seen_files[norm]})")
    seen_files[norm] = row
    study_id = study_id_of(r["filename"])
    if study_id in seen_ids:
      raise DataError(f"{where}: duplicate study id {study_id!r} (first at row {seen_ids[study_id]}; "
                      "the id is the path without .nii / .nii.gz)")
    seen_ids[study_id] = row
    label = _int_field(r["label"], where, "label", 0, 1) if r.get("label", "") or not label_optional else -1
    grade = -1
    if r.get("grade", ""):
      grade = _int_field(r["grade"], where, "grade", -1, MAX_GRADE)
    mask_path = _inside(manual_dir, r["mask"], where, "mask") if r.get("mask", "") else ""
    values = tuple((t, _float_field(r[t], where, t)) for t in targets)
    items.append(Item(study_id=study_id, patient_id=r.get("patient_id", "") or study_id,
                      label=label, grade=grade, path=path, mask_path=mask_path, targets=values))
  if not items:
    raise DataError(f"{csv_path}: no rows")
  return items


def list_mosmeddata_items(manual_dir: str) -> list[Item]:
  """Lists `manual_dir/CT-<grade>/study_XXXX.nii[.gz]` (+ `masks/study_XXXX_mask.nii.gz`)."""
  if not os.path.isdir(manual_dir):
    raise DataError(f"MosMedData dir {manual_dir!r} (data.manual_dir) does not exist")
  items, seen = [], {}
  for grade in range(MAX_GRADE + 1):
    folder = os.path.join(manual_dir, f"CT-{grade}")
    if not os.path.isdir(folder):
      continue
    for name in sorted(os.listdir(folder)):
      if not name.endswith(NIFTI_SUFFIXES):
        continue
      study_id = study_id_of(name)
      path = os.path.join(folder, name)
      if study_id in seen:
        raise DataError(f"{path}: duplicate study id {study_id!r} (also {seen[study_id]})")
      seen[study_id] = path
      mask_path = ""
      for suffix in NIFTI_SUFFIXES:
        candidate = os.path.join(manual_dir, "masks", f"{study_id}_mask{suffix}")
        if os.path.isfile(candidate):
          mask_path = candidate
          break
      items.append(Item(study_id=study_id, patient_id=study_id, label=int(grade > 0),
                        grade=grade, path=path, mask_path=mask_path))
  if not items:
    raise DataError(f"{manual_dir}: no CT-0..CT-{MAX_GRADE}/*.nii.gz scans found (MosMedData layout)")
  return items


def medmnist_file(manual_dir: str, flag: str = "nodulemnist3d", size: int = 28) -> str:
  """The .npz: `manual_dir` itself, or `<manual_dir>/<flag>.npz` (28) / `<flag>_<size>.npz`."""
  if manual_dir.endswith(".npz"):
    path = manual_dir
  else:
    path = os.path.join(manual_dir, f"{flag}.npz" if int(size) == 28 else f"{flag}_{int(size)}.npz")
  if not os.path.isfile(path):
    raise DataError(f"MedMNIST file {path} not found (data.manual_dir: the .npz, or the folder "
                    f"holding {flag}.npz / {flag}_64.npz)")
  return path


def list_medmnist_items(path: str) -> list[Item]:
  """One item per row of train_/val_/test_images, in MedMNIST's own splits."""
  try:
    with np.load(path, mmap_mode="r") as z:
      keys = set(z.files)
      shapes = {s: (z[f"{s}_images"].shape, z[f"{s}_labels"].reshape(len(z[f"{s}_labels"]), -1)[:, 0])
                for s in MEDMNIST_SPLITS if f"{s}_images" in keys and f"{s}_labels" in keys}
  except Exception as e:
    raise DataError(f"{path}: not a readable .npz ({type(e).__name__}: {e})") from e
  if set(shapes) != set(MEDMNIST_SPLITS):
    raise DataError(f"{path}: a MedMNIST 3D file holds train_/val_/test_ images and labels; "
                    f"found {sorted(keys)}")
  items = []
  for split, (shape, labels) in shapes.items():
    if len(shape) not in (4, 5) or len(shape) == 5 and shape[-1] != 1:
      raise DataError(f"{path}: {split}_images has shape {shape}, expected (N, D, H, W) (a 3D MedMNIST set)")
    if len(labels) != shape[0]:
      raise DataError(f"{path}: {len(labels)} {split}_labels for {shape[0]} {split}_images")
    labels = np.asarray(labels, np.int64)
    binary = int(labels.max(initial=0)) <= 1
    for i, y in enumerate(labels):
      sid = f"{split}_{i:05d}"
      items.append(Item(study_id=sid, patient_id=sid, label=int(y) if binary else int(y > 0),
                        grade=int(y), path=path, index=i, split=MEDMNIST_SPLITS[split]))
  return items


def target_names(data_cfg: Mapping[str, Any]) -> tuple[str, ...]:
  """data.targets as a tuple of names; DataError for duplicates or a name the source cannot provide."""
  names = tuple(str(t) for t in (data_cfg.get("targets", ()) or ()))
  source = data_cfg.get("source", "synthetic")
  if len(set(names)) != len(names) or not all(names):
    raise DataError(f"data.targets={names}: names must be non-empty and distinct")
  if names and source not in ("folder", "dicom"):
    provided = GENERATED_TARGETS.get(source, ())
    unknown = [t for t in names if t not in provided]
    if unknown:
      raise DataError(f"data.targets {unknown}: data.source={source!r} provides "
                      f"{', '.join(provided) if provided else 'no targets'} (folder / dicom: any numeric CSV "
                      f"column)")
  return names


def list_items(data_cfg: Mapping[str, Any]) -> list[Item]:
  """The studies of data_cfg's source (no volume is read); DataError if the listing is bad."""
  source = data_cfg.get("source", "synthetic")
  targets = target_names(data_cfg)
  manual_dir = str(data_cfg.get("manual_dir", "") or "")
  if source == "synthetic":
    return [Item(study_id=str(s), patient_id=str(p), label=int(g > 0), grade=int(g), phantom_seed=int(seed))
            for s, p, g, seed in phantom.phantom_set(int(data_cfg.get("num_scans", 160)),
                                                     int(data_cfg.get("phantom_seed", 0)))]
  if source == "nodules":
    return [Item(study_id=n.study_id, patient_id=n.patient_id, label=n.label, grade=n.grade,
                 phantom_seed=n.seed)
            for n in nodules.nodule_set(int(data_cfg.get("num_scans", 400)),
                                        int(data_cfg.get("phantom_seed", 0)))]
  if not manual_dir:
    raise DataError(f"data.source={source!r} needs data.manual_dir")
  if source == "mosmeddata":
    return list_mosmeddata_items(manual_dir)
  if source in ("folder", "dicom"):
    if not data_cfg.get("labels_csv", ""):
      raise DataError(f"data.source={source!r} needs data.labels_csv "
                      "(filename,label[,patient_id][,grade][,mask])")
    return list_folder_items(manual_dir, str(data_cfg["labels_csv"]), series_folders=source == "dicom",
                             targets=targets)
  if source == "medmnist":
    return list_medmnist_items(medmnist_file(manual_dir, str(data_cfg.get("medmnist_flag", "nodulemnist3d")),
                                             int(data_cfg.get("medmnist_size", 28))))
  raise DataError(f"data.source must be one of {SOURCES}, got {source!r}")


def _stat(path: str) -> list[int]:
  st = os.stat(path)
  return [int(st.st_size), int(st.st_mtime_ns)]


def source_files(data_cfg: Mapping[str, Any]) -> dict[str, Any]:
  """What a dataset is read from, for its identity: the labels CSV's sha256 and each
  listed file's [size, modification time in ns] by its path relative to data.manual_dir
  ({} for the generated sources). Lists the source (DataError for a bad listing); reads
  no volume, only the CSV."""
  source = data_cfg.get("source", "synthetic")
  if source in ("synthetic", "nodules"):
    return {}
  items = list_items(data_cfg)
  root = str(data_cfg.get("manual_dir", ""))
  out: dict[str, Any] = {}
  if source in ("folder", "dicom"):
    with open(labels_csv_path(root, str(data_cfg["labels_csv"])), "rb") as f:
      out["labels_csv"] = hashlib.sha256(f.read()).hexdigest()
  if source == "medmnist":
    out["files"] = {os.path.basename(items[0].path): _stat(items[0].path)}
    return out
  files, real_root = {}, os.path.realpath(root)
  for it in items:
    paths = [it.path] + ([it.mask_path] if it.mask_path else [])
    if source == "dicom":  # every file of the series folder
      paths = [os.path.join(it.path, n) for n in sorted(os.listdir(it.path)) if not n.startswith(".")] + paths[1:]
    for p in paths:
      real = os.path.realpath(p)
      if os.path.commonpath([real_root, real]) != real_root:  # also a DICOM slice or a MosMedData file
        raise DataError(f"{p}: a symbolic link leading outside the data dir {root} (to {real}); copy the "
                        "file into the data dir")
      files[os.path.relpath(p, root).replace(os.sep, "/")] = _stat(p)
  out["files"] = files
  return out


@functools.lru_cache(maxsize=3)
def _medmnist_images(path: str, split: str, mtime: float) -> np.ndarray:
  """A split's image array, read once per build (an .npz member is read whole on access);
  `mtime` keys the cache so a rewritten file is read again."""
  del mtime
  with np.load(path) as z:
    return np.asarray(z[f"{split}_images"])


# A mask is on its scan's grid when its voxel-to-world affine (both in canonical
# orientation) places every corner of the volume within this fraction of the scan's
# smallest voxel of the scan's own corner. Real LIDC-IDRI masks (364 of
# ../shared/data/lidc_indeterminate) have affines identical to their scans'.
MASK_GRID_TOLERANCE_VOXELS = 0.1


def grid_mismatch(affine_a: np.ndarray, affine_b: np.ndarray, shape_xyz) -> float:
  """The largest distance (mm) between where two affines put the corners of a `shape_xyz` grid."""
  corners = np.array([[i, j, k, 1.0] for i in (0, shape_xyz[0] - 1) for j in (0, shape_xyz[1] - 1)
                      for k in (0, shape_xyz[2] - 1)]).T
  a, b = np.asarray(affine_a, np.float64) @ corners, np.asarray(affine_b, np.float64) @ corners
  return float(np.max(np.linalg.norm(a[:3] - b[:3], axis=0)))


def load_mask(path: str, scan: nifti.Scan) -> np.ndarray:
  """A lesion mask file -> uint8 (x, y, z) on `scan`'s grid (canonical orientation).

  ScanError naming both files when it cannot be read, or its shape or affine (within
  MASK_GRID_TOLERANCE_VOXELS of a voxel at every corner) differ from the scan's: a mask
  on another grid would overlap none of the lesion after resampling.
  """
  try:
    img = nib.as_closest_canonical(nib.squeeze_image(nib.load(path)))
    mask = np.asarray(img.dataobj)
  except Exception as e:
    raise ScanError(path, f"cannot read mask ({type(e).__name__}: {e})") from e
  shape_xyz = tuple(scan.volume.shape)
  if tuple(mask.shape) != shape_xyz:
    raise ScanError(path, f"mask shape {mask.shape} differs from its scan's {shape_xyz} ({scan.path})")
  off = grid_mismatch(img.affine, scan.affine, shape_xyz)
  tol = MASK_GRID_TOLERANCE_VOXELS * float(np.min(scan.spacing))
  if not off <= tol:
    raise ScanError(path, f"mask is not on the grid of its scan {scan.path}: their affines place the "
                          f"volume's corners up to {off:.2f} mm apart (tolerance {tol:.3f} mm); mask "
                          f"spacing {np.round(nifti.spacing_from_affine(img.affine), 3).tolist()} mm, "
                          f"scan {np.round(scan.spacing, 3).tolist()} mm")
  return (mask > 0).astype(np.uint8)


@dataclasses.dataclass(frozen=True, eq=False)
class Loaded:
  """One study's volume: a Scan (x, y, z), its lesion mask (x, y, z) or None, and
  whether the values are HU (False: already in [0, 1], e.g. MedMNIST), and the target values it has
  (name -> value; `target_vector` picks data.targets from them)."""
  scan: nifti.Scan
  mask: np.ndarray | None
  hu: bool = True
  targets: Mapping[str, float] = dataclasses.field(default_factory=dict)


def target_vector(loaded: Loaded, names: tuple[str, ...]) -> np.ndarray:
  """float32 (len(names),): the study's values of ``names``, NaN where it has none."""
  return np.asarray([loaded.targets.get(n, np.nan) for n in names], np.float32)


def is_hu(data_cfg: Mapping[str, Any]) -> bool:
  """Whether data_cfg's scans are in Hounsfield units (windowed by data.hu_window); False for MedMNIST,
  whose volumes are already scaled (`unit_intensities`)."""
  return data_cfg.get("source", "synthetic") != "medmnist"


def unit_intensities(vol: np.ndarray) -> np.ndarray:
  """An already-scaled volume (MedMNIST: uint8 0..255, or floats in [0, 1]) as float32 in [0, 1]."""
  vol = np.asarray(vol, dtype=np.float32)
  return vol / np.float32(255.0 if vol.max(initial=0) > 1.0 else 1.0)


def load_for_model(path: str, data_cfg: Mapping[str, Any]) -> nifti.Scan:
  """A NIfTI file read with the intensities of the data a model was trained on (`is_hu`): HU, or values
  already scaled to [0, 1] for a MedMNIST-trained model. ScanError if it cannot be used."""
  if is_hu(data_cfg):
    return nifti.load_scan(path)
  scan = nifti.load_scan(path, hu=False)
  return dataclasses.replace(scan, volume=unit_intensities(scan.volume))


LESION_COORDS = ("voxel", "world")


def read_lesions(csv_path: str) -> dict[str, dict[str, Any]]:
  """predict.lesions: where each scan's lesion is, for models trained on mask-centred crops.

  A CSV with a `filename` column (the scan, as listed in predict.input: relative to that folder, or its
  file name) and either `mask` (a mask NIfTI on the scan's grid, relative to the CSV's folder) or `x,y,z`
  with `coords` = `voxel` (indices of the file's array, as a viewer shows them) or `world` (RAS mm of the
  file's affine). Returns {filename: {"mask": path} or {"point": (x, y, z), "coords": ...}}; DataError
  naming the row for a bad one.
  """
  if not os.path.isfile(csv_path):
    raise DataError(f"lesions CSV {csv_path!r} (config.predict.lesions) not found")
  columns, rows = _read_csv(csv_path)
  if "filename" not in columns or not ({"mask"} <= set(columns) or {"x", "y", "z"} <= set(columns)):
    raise DataError(f"{csv_path}: header must name filename and mask, or filename,x,y,z[,coords]; got {columns}")
  out = {}
  for i, r in enumerate(rows):
    where = f"{csv_path} row {i + 2}"
    name = os.path.normpath(r["filename"]).replace(os.sep, "/")
    if name in out:
      raise DataError(f"{where}: duplicate filename {r['filename']!r}")
    if r.get("mask", ""):
      out[name] = {"mask": os.path.join(os.path.dirname(os.path.abspath(csv_path)), r["mask"])}
      continue
    coords = r.get("coords", "") or "voxel"
    if coords not in LESION_COORDS:
      raise DataError(f"{where}: coords {coords!r} must be one of {LESION_COORDS}")
    try:
      point = tuple(float(r[k]) for k in ("x", "y", "z"))
    except (KeyError, ValueError):
      raise DataError(f"{where}: neither a mask nor numeric x, y, z") from None
    out[name] = {"point": point, "coords": coords}
  return out


def lesion_of(scan: nifti.Scan, lesion: Mapping[str, Any]) -> tuple[np.ndarray | None, np.ndarray | None]:
  """(mask (x, y, z) on the scan's canonical grid or None, centre in its canonical voxel coordinates
  (x, y, z) or None) for one `read_lesions` entry. ScanError for a mask off the scan's grid."""
  if "mask" in lesion:
    return load_mask(lesion["mask"], scan), None
  point = np.asarray(lesion["point"], np.float64)
  world = point
  if lesion["coords"] == "voxel":  # the file's own index order -> world (RAS mm) -> canonical indices
    world = nib.load(scan.path).affine @ np.append(point, 1.0)
    world = world[:3]
  center = (np.linalg.inv(scan.affine) @ np.append(world, 1.0))[:3]
  shape = np.asarray(scan.volume.shape)
  if np.any(center < -0.5) or np.any(center > shape - 0.5):
    raise ScanError(scan.path, f"lesion centre {point.tolist()} ({lesion['coords']}) lies outside the scan "
                               f"(canonical voxel {np.round(center, 1).tolist()} of shape {shape.tolist()})")
  return None, center


def load_item(item: Item, data_cfg: Mapping[str, Any]) -> Loaded:
  """Reads / generates one study. ScanError if it cannot be used."""
  source = data_cfg.get("source", "synthetic")
  if source == "synthetic":
    shape = tuple(data_cfg.get("phantom_shape", ()) or ())
    ph = phantom.make_phantom(item.phantom_seed, item.grade, **({"shape_xyz": shape} if shape else {}))
    scan = nifti.Scan(volume=ph.hu, spacing=ph.spacing, affine=ph.affine, path=f"phantom {item.study_id}")
    lesion_ml = float(np.count_nonzero(ph.mask)) * float(np.prod(ph.spacing)) / 1000.0
    return Loaded(scan, ph.mask, targets={"lesion_ml": lesion_ml})
  if source == "nodules":
    nod = nodules.make_nodule(item.phantom_seed, item.grade)
    scan = nifti.Scan(volume=nod.hu, spacing=nod.spacing, affine=nod.affine, path=f"nodule {item.study_id}")
    # malignancy: an LIDC-like 1-5 rating (grades 0, 1 benign; 3, 4 malignant)
    return Loaded(scan, nod.mask, targets={"diameter_mm": float(nod.diameter_mm), "malignancy": item.grade + 1.0})
  if source == "medmnist":
    split = {v: k for k, v in MEDMNIST_SPLITS.items()}[item.split]
    images = _medmnist_images(item.path, split, os.path.getmtime(item.path))
    vol = np.asarray(images[item.index], dtype=np.float32).reshape(images.shape[1:4])
    # MedMNIST volumes are (D, H, W) uint8 0..255 (or floats in [0, 1]) at an assumed 1 mm.
    spacing = float(data_cfg.get("medmnist_spacing", 1.0) or 1.0)
    vol_xyz = np.transpose(unit_intensities(vol), (2, 1, 0))
    scan = nifti.Scan(volume=vol_xyz, spacing=np.full(3, spacing), affine=np.diag([spacing] * 3 + [1.0]),
                      path=f"{item.path}[{item.study_id}]")
    return Loaded(scan, None, hu=False)
  if source == "dicom":
    scan = dicom.load_series(item.path)
  else:
    scan = nifti.load_scan(item.path)
  mask = load_mask(item.mask_path, scan) if item.mask_path else None
  return Loaded(scan, mask, targets=dict(item.targets))
