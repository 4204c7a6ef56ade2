"""`LungCt`: a TFDS GeneratorBasedBuilder writing preprocessed CT volumes to ArrayRecord.

Sources (`data_cfg.source`):
  synthetic   phantoms from `lungct.data.phantom`, generated inside `_generate_examples`.
  mosmeddata  `manual_dir/CT-0..CT-4/study_XXXX.nii.gz` (grade = the folder's number,
              label = grade > 0, patient = study); optional masks
              `manual_dir/masks/study_XXXX_mask.nii.gz`.
  folder      scans under `manual_dir` listed by `labels_csv` with columns
              `filename,label[,patient_id][,grade][,mask]`.

Configs are made from the data config (`builder_for`); the config name encodes every
field that changes the written data, so two shapes never share a cache. Builds need
neither TensorFlow nor Beam: `download_and_prepare(file_format="array_record")`
runs TFDS's plain-Python writer, and `as_data_source(split)` reads the records back
with `array_record` (see `prepare`).

Bad scans (`nifti.ScanError`) are skipped (`on_bad_scan="skip"`) or raised
(`"fail"`); `build_report.json` next to the dataset files lists read, kept and
skipped counts and each skipped file with its reason.
"""
from __future__ import annotations

import collections
import concurrent.futures
import csv
import dataclasses
import hashlib
import json
import os
from typing import Any, Callable, Iterator, Mapping, Sequence

import ml_collections
import nibabel as nib
import numpy as np
import tensorflow_datasets as tfds

from lungct.data import nifti
from lungct.data import phantom
from lungct.data import preprocess

SOURCES = ("synthetic", "mosmeddata", "folder")
SPLITS = ("train", "validation", "test")
REPORT_FILE = "build_report.json"
MAX_GRADE = 4
# Data-config keys that do not change the written data (loader, augmentation, paths
# of the output); every other key goes into the config name's hash.
_NOT_DATA_KEYS = frozenset(
    {"data_dir", "num_threads", "prefetch", "augment", "label", "num_classes", "on_bad_scan",
     "build_workers"})
_NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclasses.dataclass(eq=False)
class LungCtConfig(tfds.core.BuilderConfig):
  """What to build. Made by `builder_for` from the ml_collections data config.

  Attributes:
    source: synthetic | mosmeddata | folder.
    shape: preprocessed (D, H, W).
    hu_window: (low, high) HU mapped to [0, 1].
    target_spacing: (z, y, x) mm to resample to before resizing; () = resize only.
    num_scans: synthetic: number of phantoms.
    phantom_seed: synthetic: seed of the phantom set.
    phantom_shape: synthetic: phantom (x, y, z) voxels; () = `make_phantom`'s default.
    split_fractions: train / validation / test fractions of patients.
    split_seed: seed of the patient split.
    on_bad_scan: skip | fail.
    manual_dir: mosmeddata / folder: the folder holding the scans.
    labels_csv: folder: the labels CSV (relative paths are tried against `manual_dir`).
    build_workers: threads preprocessing scans in parallel (0 = one per CPU).
    data_cfg: the full data config as a dict (handed to `lungct.data.preprocess`).
  """
  source: str = "synthetic"
  shape: tuple[int, int, int] = (32, 64, 64)
  hu_window: tuple[float, float] = (-1000.0, 400.0)
  target_spacing: tuple[float, ...] = ()
  num_scans: int = 160
  phantom_seed: int = 0
  phantom_shape: tuple[int, ...] = ()
  split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
  split_seed: int = 0
  on_bad_scan: str = "skip"
  manual_dir: str = ""
  labels_csv: str = ""
  build_workers: int = 0
  data_cfg: Mapping[str, Any] = dataclasses.field(default_factory=dict, repr=False)


def _plain(value: Any) -> Any:
  """ConfigDict / tuples / numpy scalars -> JSON-friendly Python values."""
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {str(k): _plain(v) for k, v in sorted(value.items())}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  return value


def _data_fields(data_cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """The data-config fields that change the written data, as plain values."""
  fields = {k: v for k, v in _plain(data_cfg).items() if k not in _NOT_DATA_KEYS}
  source = fields.get("source", "synthetic")
  # Fields of other sources do not change this source's data.
  if source == "synthetic":
    fields.pop("manual_dir", None)
    fields.pop("labels_csv", None)
  else:
    for k in ("num_scans", "phantom_seed", "phantom_shape"):
      fields.pop(k, None)
    for k in ("manual_dir", "labels_csv"):
      if fields.get(k):
        fields[k] = os.path.abspath(fields[k])
    if source == "mosmeddata":
      fields.pop("labels_csv", None)
  return fields


def config_name(data_cfg: ml_collections.ConfigDict) -> str:
  """A TFDS config name unique to everything that changes the data.

  E.g. "synthetic-32x64x64-n160-s0-1a2b3c4d": source, shape, (synthetic: number of
  scans and phantom seed) and an 8-hex-digit hash of all data fields.
  """
  fields = _data_fields(data_cfg)
  digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:8]
  parts = [fields.get("source", "synthetic"), "x".join(str(int(s)) for s in fields["shape"])]
  if parts[0] == "synthetic":
    parts += [f"n{int(fields['num_scans'])}", f"s{int(fields['phantom_seed'])}"]
  parts.append(digest)
  return "-".join(parts)


def builder_for(data_cfg: ml_collections.ConfigDict, *, data_dir: str | None = None) -> "LungCt":
  """The `LungCt` builder for `data_cfg`, writing under `data_dir` (default data_cfg.data_dir)."""
  source = data_cfg.source
  if source not in SOURCES:
    raise ValueError(f"data.source must be one of {SOURCES}, got {source!r}")
  if data_cfg.get("on_bad_scan", "skip") not in ("skip", "fail"):
    raise ValueError(f"data.on_bad_scan must be 'skip' or 'fail', got {data_cfg.on_bad_scan!r}")
  fractions = tuple(float(f) for f in data_cfg.split_fractions)
  if len(fractions) != 3 or min(fractions) < 0 or not np.isclose(sum(fractions), 1.0):
    raise ValueError(f"data.split_fractions must be 3 non-negative numbers summing to 1, got {fractions}")
  if source != "synthetic" and not data_cfg.get("manual_dir", ""):
    raise ValueError(f"data.source={source!r} needs data.manual_dir (the folder holding the scans)")
  if source == "folder" and not data_cfg.get("labels_csv", ""):
    raise ValueError("data.source='folder' needs data.labels_csv (filename,label[,patient_id][,grade])")
  config = LungCtConfig(
      name=config_name(data_cfg),
      version=LungCt.VERSION,
      description=f"LungCt built from {source}",
      source=source,
      shape=tuple(int(s) for s in data_cfg.shape),
      hu_window=tuple(float(h) for h in data_cfg.hu_window),
      target_spacing=tuple(float(s) for s in data_cfg.get("target_spacing", ())),
      num_scans=int(data_cfg.get("num_scans", 0)),
      phantom_seed=int(data_cfg.get("phantom_seed", 0)),
      phantom_shape=tuple(int(s) for s in data_cfg.get("phantom_shape", ())),
      split_fractions=fractions,
      split_seed=int(data_cfg.split_seed),
      on_bad_scan=data_cfg.get("on_bad_scan", "skip"),
      manual_dir=os.path.abspath(data_cfg.manual_dir) if data_cfg.get("manual_dir", "") else "",
      labels_csv=data_cfg.get("labels_csv", ""),
      build_workers=int(data_cfg.get("build_workers", 0)),
      data_cfg=_plain(data_cfg),
  )
  return LungCt(config=config, data_dir=os.path.abspath(data_dir or data_cfg.data_dir))


def prepare(data_cfg: ml_collections.ConfigDict, *, data_dir: str | None = None) -> "LungCt":
  """Builds the dataset for `data_cfg` unless it is already prepared; returns the builder.

  Works without TensorFlow: the ArrayRecord writer of TFDS is plain Python.
  """
  builder = builder_for(data_cfg, data_dir=data_dir)
  if not builder.is_prepared():
    builder._list_items()  # Validates the CSV / folder layout before TFDS creates any file.
    download_config = tfds.download.DownloadConfig(
        manual_dir=builder.builder_config.manual_dir or None)
    builder.download_and_prepare(file_format="array_record", download_config=download_config)
  return builder


def read_build_report(builder: "LungCt") -> dict[str, Any]:
  """The `build_report.json` written next to the prepared dataset files."""
  with open(os.path.join(builder.data_dir, REPORT_FILE)) as f:
    return json.load(f)


# ----------------------------------------------------------------------------- items


@dataclasses.dataclass(frozen=True)
class Item:
  """One study to turn into an example (a scan file or a phantom recipe)."""
  study_id: str
  patient_id: str
  label: int
  grade: int
  path: str = ""          # scan file (mosmeddata / folder)
  mask_path: str = ""     # optional lesion mask file
  phantom_seed: int = -1  # synthetic


def _study_id(filename: str) -> str:
  base = os.path.basename(filename)
  for suffix in _NIFTI_SUFFIXES:
    if base.endswith(suffix):
      return base[: -len(suffix)]
  return os.path.splitext(base)[0]


def _inside(root: str, rel: str, csv_path: str, row: int, column: str) -> str:
  """Resolves `rel` under `root`; ValueError if absolute, escaping root or missing."""
  where = f"{csv_path} row {row}"
  if not rel:
    raise ValueError(f"{where}: empty {column}")
  if os.path.isabs(rel) or rel.startswith("~"):
    raise ValueError(f"{where}: {column} {rel!r} must be a path relative to the data dir {root}")
  norm = os.path.normpath(rel)
  if norm == ".." or norm.startswith(".." + os.sep):
    raise ValueError(f"{where}: {column} {rel!r} escapes the data dir {root}")
  path = os.path.join(root, norm)
  if not os.path.isfile(path):
    raise ValueError(f"{where}: {column} {rel!r} not found (looked for {path})")
  return path


def _int_field(value: str, csv_path: str, row: int, column: str, low: int, high: int | None) -> int:
  try:
    out = int(value.strip())
  except ValueError:
    raise ValueError(f"{csv_path} row {row}: {column} {value!r} is not an integer class") from None
  if out < low or (high is not None and out > high):
    bound = f">= {low}" if high is None else f"in [{low}, {high}]"
    raise ValueError(f"{csv_path} row {row}: unknown {column} {out} (must be {bound})")
  return out


def list_folder_items(manual_dir: str, labels_csv: str) -> list[Item]:
  """Reads and validates the labels CSV; ValueError naming the CSV row on any problem.

  Columns (header required): filename, label (0 normal / 1 abnormal), optional
  patient_id (default: the study id), grade (-1..4, default -1) and mask (a mask
  file). Paths are relative to `manual_dir` and must stay inside it.
  """
  csv_path = labels_csv
  if not os.path.isabs(csv_path) and not os.path.isfile(csv_path):
    csv_path = os.path.join(manual_dir, labels_csv)
  if not os.path.isfile(csv_path):
    raise ValueError(f"labels CSV {labels_csv!r} not found (also looked in {manual_dir})")
  if not os.path.isdir(manual_dir):
    raise ValueError(f"data dir {manual_dir!r} (data.manual_dir) does not exist")
  with open(csv_path, newline="") as f:
    reader = csv.DictReader(f)
    columns = [c.strip() for c in (reader.fieldnames or [])]
    missing = {"filename", "label"} - set(columns)
    if missing:
      raise ValueError(f"{csv_path}: header must name columns filename,label[,patient_id][,grade]"
                       f"[,mask]; missing {sorted(missing)} in {columns}")
    rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in reader]
  items, seen_files, seen_ids = [], {}, {}
  for i, r in enumerate(rows):
    row = i + 2  # 1-based line number; line 1 is the header.
    path = _inside(manual_dir, r["filename"], csv_path, row, "filename")
    norm = os.path.normpath(r["filename"])
    if norm in seen_files:
      raise ValueError(f"{csv_path} row {row}: duplicate filename {r['filename']!r} "
                       f"(first at row {seen_files[norm]})")
    seen_files[norm] = row
    study_id = _study_id(norm)
    if study_id in seen_ids:
      raise ValueError(f"{csv_path} row {row}: duplicate study id {study_id!r} "
                       f"(first at row {seen_ids[study_id]})")
    seen_ids[study_id] = row
    label = _int_field(r["label"], csv_path, row, "label", 0, 1)
    grade = -1
    if r.get("grade", ""):
      grade = _int_field(r["grade"], csv_path, row, "grade", -1, MAX_GRADE)
    mask_path = _inside(manual_dir, r["mask"], csv_path, row, "mask") if r.get("mask", "") else ""
    items.append(Item(study_id=study_id, patient_id=r.get("patient_id", "") or study_id,
                      label=label, grade=grade, path=path, mask_path=mask_path))
  if not items:
    raise ValueError(f"{csv_path}: no rows")
  return items


def list_mosmeddata_items(manual_dir: str) -> list[Item]:
  """Lists `manual_dir/CT-<grade>/study_XXXX.nii[.gz]` (+ `masks/study_XXXX_mask.nii.gz`)."""
  if not os.path.isdir(manual_dir):
    raise ValueError(f"MosMedData dir {manual_dir!r} (data.manual_dir) does not exist")
  items, seen = [], {}
  for grade in range(MAX_GRADE + 1):
    folder = os.path.join(manual_dir, f"CT-{grade}")
    if not os.path.isdir(folder):
      continue
    for name in sorted(os.listdir(folder)):
      if not name.endswith(_NIFTI_SUFFIXES):
        continue
      study_id = _study_id(name)
      path = os.path.join(folder, name)
      if study_id in seen:
        raise ValueError(f"{path}: duplicate study id {study_id!r} (also {seen[study_id]})")
      seen[study_id] = path
      mask_path = ""
      for suffix in _NIFTI_SUFFIXES:
        candidate = os.path.join(manual_dir, "masks", f"{study_id}_mask{suffix}")
        if os.path.isfile(candidate):
          mask_path = candidate
          break
      items.append(Item(study_id=study_id, patient_id=study_id, label=int(grade > 0),
                        grade=grade, path=path, mask_path=mask_path))
  if not items:
    raise ValueError(f"{manual_dir}: no CT-0..CT-{MAX_GRADE}/*.nii.gz scans found (MosMedData layout)")
  return items


def _synthetic_items(num_scans: int, seed: int) -> list[Item]:
  return [Item(study_id=str(study_id), patient_id=str(patient_id), label=int(grade > 0),
               grade=int(grade), phantom_seed=int(phantom_seed))
          for study_id, patient_id, grade, phantom_seed in phantom.phantom_set(num_scans, seed)]


# ----------------------------------------------------------------------------- splits


def _allocate(n: int, fractions: Sequence[float]) -> list[int]:
  """Splits n into counts proportional to fractions (largest remainder); every split
  with a positive fraction gets at least one when n allows it."""
  raw = [n * f for f in fractions]
  counts = [int(np.floor(r)) for r in raw]
  order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
  for i in order[: n - sum(counts)]:
    counts[i] += 1
  positive = [i for i, f in enumerate(fractions) if f > 0]
  if n >= len(positive):
    for i in positive:
      if counts[i] == 0:
        donor = max(positive, key=lambda j: counts[j])
        counts[donor] -= 1
        counts[i] += 1
  return counts


def split_patients(patient_labels: Mapping[str, int], fractions: Sequence[float],
                   seed: int) -> dict[str, str]:
  """Assigns each patient to train / validation / test, stratified by label.

  Deterministic in `seed` (patients are sorted before a seeded shuffle); each label's
  patients are divided by `fractions` separately, so every split gets every class
  that has at least 3 patients.
  """
  rng = np.random.default_rng(seed)
  by_label = collections.defaultdict(list)
  for pid in sorted(patient_labels):
    by_label[patient_labels[pid]].append(pid)
  assignment = {}
  for label in sorted(by_label):
    pids = by_label[label]
    pids = [pids[i] for i in rng.permutation(len(pids))]
    start = 0
    for split, count in zip(SPLITS, _allocate(len(pids), fractions)):
      for pid in pids[start:start + count]:
        assignment[pid] = split
      start += count
  return assignment


# ----------------------------------------------------------------------------- examples


def _load_mask(path: str, shape_xyz: Sequence[int]) -> np.ndarray:
  """A lesion mask file -> uint8 (x, y, z) in canonical orientation; ScanError if bad."""
  try:
    img = nib.as_closest_canonical(nib.squeeze_image(nib.load(path)))
    mask = np.asarray(img.dataobj)
  except Exception as e:
    raise nifti.ScanError(path, f"cannot read mask ({type(e).__name__}: {e})") from e
  if tuple(mask.shape) != tuple(shape_xyz):
    raise nifti.ScanError(path, f"mask shape {mask.shape} differs from its scan's {tuple(shape_xyz)}")
  return (mask > 0).astype(np.uint8)


def make_example(item: Item, cfg: LungCtConfig) -> dict[str, Any]:
  """Loads / generates and preprocesses one study. Raises nifti.ScanError for bad scans."""
  data_cfg = ml_collections.ConfigDict(dict(cfg.data_cfg))
  if item.phantom_seed >= 0:
    kwargs = {"shape_xyz": tuple(cfg.phantom_shape)} if cfg.phantom_shape else {}
    ph = phantom.make_phantom(item.phantom_seed, item.grade, **kwargs)
    vol_xyz, mask_xyz, spacing_xyz, where = ph.hu, ph.mask, ph.spacing, f"phantom {item.study_id}"
  else:
    scan = nifti.load_scan(item.path)
    vol_xyz, spacing_xyz, where = scan.volume, scan.spacing, item.path
    mask_xyz = _load_mask(item.mask_path, vol_xyz.shape) if item.mask_path else None
  vol = preprocess.to_dhw(vol_xyz)
  spacing_dhw = np.asarray(spacing_xyz, np.float32)[::-1].copy()
  try:
    image = preprocess.preprocess_volume(vol, spacing_dhw, data_cfg)
    if mask_xyz is not None:
      mask = preprocess.preprocess_mask(preprocess.to_dhw(mask_xyz), spacing_dhw, data_cfg)
    else:
      mask = np.zeros(cfg.shape, np.uint8)
  except ValueError as e:
    if isinstance(e, nifti.ScanError):
      raise
    raise nifti.ScanError(where, f"preprocessing failed: {e}") from e
  return {
      "image": np.asarray(image, np.float16)[..., None],
      "mask": np.asarray(mask, np.uint8)[..., None],
      "label": item.label,
      "grade": item.grade,
      "study_id": item.study_id,
      "patient_id": item.patient_id,
      "spacing": spacing_dhw,
      "orig_shape": np.asarray(vol.shape, np.int32),
  }


def _ordered_map(fn: Callable[[Any], Any], xs: Sequence[Any], workers: int) -> Iterator[Any]:
  """map(fn, xs) in order on a thread pool, at most 2 * workers in flight.

  Yields (x, result, error): errors are returned, not raised, so the caller decides.
  """
  def safe(x):
    try:
      return x, fn(x), None
    except nifti.ScanError as e:
      return x, None, e
  if workers <= 1:
    yield from map(safe, xs)
    return
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    pending = collections.deque()
    for x in xs:
      pending.append(pool.submit(safe, x))
      if len(pending) >= 2 * workers:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()


class LungCt(tfds.core.GeneratorBasedBuilder):
  """Preprocessed 3D lung CT volumes with binary label, severity grade and lesion mask."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [LungCtConfig(name="synthetic-default", description="160 phantoms, 32x64x64")]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  mosmeddata: put the MosMedData COVID19_1110 folders CT-0..CT-4 (study_XXXX.nii.gz) and
  optionally masks/ in data.manual_dir. folder: put the scans in data.manual_dir and list
  them in data.labels_csv (filename,label[,patient_id][,grade][,mask]).
  """

  def _info(self) -> tfds.core.DatasetInfo:
    shape = tuple(self.builder_config.shape) + (1,)
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=shape, dtype=np.float16),
            "mask": tfds.features.Tensor(shape=shape, dtype=np.uint8),
            "label": tfds.features.Scalar(dtype=np.int64),
            "grade": tfds.features.Scalar(dtype=np.int64),
            "study_id": tfds.features.Text(),
            "patient_id": tfds.features.Text(),
            "spacing": tfds.features.Tensor(shape=(3,), dtype=np.float32),
            "orig_shape": tfds.features.Tensor(shape=(3,), dtype=np.int32),
        }),
        supervised_keys=("image", "label"),
    )

  def _list_items(self) -> list[Item]:
    cfg = self.builder_config
    if cfg.source == "synthetic":
      return _synthetic_items(cfg.num_scans, cfg.phantom_seed)
    if cfg.source == "mosmeddata":
      return list_mosmeddata_items(cfg.manual_dir)
    if cfg.source == "folder":
      return list_folder_items(cfg.manual_dir, cfg.labels_csv)
    raise ValueError(f"unknown source {cfg.source!r}; expected one of {SOURCES}")

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Scans are read from builder_config.manual_dir (validated up front).
    cfg = self.builder_config
    items = self._list_items()  # Validates the CSV / folder layout before any work.
    patient_labels = {}
    for it in items:
      patient_labels[it.patient_id] = max(it.label, patient_labels.get(it.patient_id, 0))
    assignment = split_patients(patient_labels, cfg.split_fractions, cfg.split_seed)
    self._report = {"config": cfg.name, "source": cfg.source, "splits": {}, "skipped": []}
    return {split: self._generate_examples(split, [it for it in items
                                                   if assignment[it.patient_id] == split])
            for split in SPLITS}

  def _generate_examples(self, split: str, items: Sequence[Item]):
    cfg = self.builder_config
    counts = {"read": 0, "kept": 0, "skipped": 0}
    self._report["splits"][split] = counts
    workers = cfg.build_workers or os.cpu_count() or 1
    for item, example, error in _ordered_map(lambda it: make_example(it, cfg), items, workers):
      counts["read"] += 1
      if error is not None:
        if cfg.on_bad_scan == "fail":
          raise error
        counts["skipped"] += 1
        self._report["skipped"].append(
            {"split": split, "study_id": item.study_id, "file": error.path, "reason": error.reason})
        print(f"lung_ct: skipping {error}")
        continue
      counts["kept"] += 1
      yield item.study_id, example

  def _download_and_prepare(self, dl_manager, download_config=None):
    super()._download_and_prepare(dl_manager=dl_manager, download_config=download_config)
    report = dict(self._report)
    report["totals"] = {k: sum(c[k] for c in report["splits"].values())
                        for k in ("read", "kept", "skipped")}
    # self.data_dir is the incomplete dir here; TFDS renames it when the build succeeds.
    with open(os.path.join(self.data_dir, REPORT_FILE), "w") as f:
      json.dump(report, f, indent=2)
    per_split = ", ".join(f"{s} {c['kept']}" for s, c in report["splits"].items())
    t = report["totals"]
    print(f"lung_ct {self.builder_config.name}: read {t['read']}, kept {t['kept']}, "
          f"skipped {t['skipped']} ({per_split})")


def split_index(builder: "LungCt", split: str) -> list[dict[str, Any]]:
  """study_id, patient_id, label and grade of every example of ``split``, in order."""
  from lungct.data import pipeline
  source = builder.as_data_source(split)
  rows = []
  for i in range(len(source)):
    ex = pipeline.decode(source[i])
    rows.append({k: ex[k] if k.endswith("_id") else int(ex[k]) for k in ("study_id", "patient_id", "label", "grade")})
  return rows
