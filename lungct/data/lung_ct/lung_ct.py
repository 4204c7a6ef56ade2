"""`LungCt`: a TFDS GeneratorBasedBuilder writing preprocessed CT volumes to ArrayRecord.

Sources (`data.source`, listed and read by `lungct.data.sources`): synthetic chest
phantoms, synthetic nodule crops, a folder of NIfTI scans + labels CSV, a folder of
DICOM series + labels CSV, MosMedData, a MedMNIST 3D .npz.

Configs are made from the data config (`builder_for`); the config name encodes every
field that changes the written data, so two geometries never share a cache. Builds
need no TensorFlow: `download_and_prepare(file_format="array_record")` runs TFDS's
plain-Python writer, and `as_data_source(split)` reads the records back. With
`data.beam_options` set, both stages below run on Apache Beam (`lungct.data.beam_build`).

A build reads every study first (in parallel threads or Beam workers, spilling each
preprocessed example to a scratch file), skips the bad ones (`ScanError`; data.on_bad_scan="skip",
or stops on the first with "fail"), and only then splits the kept studies by patient,
so validation and test keep both classes whatever was skipped. `build_report.json`
(read with `read_build_report`) counts read / kept / skipped studies, the reasons, and
each split's classes; `index_<split>.json` lists each split's study_id, patient_id,
label and grade in the data source's order (read with `split_index`, no volume read).
This module uses no `os` / `open` (TFDS's rule for builders): paths go through epath.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import hashlib
import io
import json
import logging
import multiprocessing
import re
from typing import Any, Callable, Iterator, Mapping, Sequence

from etils import epath
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from lungct.data import beam_build
from lungct.data import preprocess
from lungct.data import sources
from lungct.data.errors import DataError, ScanError
from lungct.data.sources import Item, SOURCES, list_folder_items, list_mosmeddata_items

SPLITS = ("train", "validation", "test")
REPORT_FILE = "build_report.json"
FILES_FILE = "files.json"  # the build's `sources.source_files`: what it was read from
INDEX_FILE = "index_{split}.json"
MAX_GRADE = sources.MAX_GRADE
# Above this fraction of skipped studies the build summary is a loud warning.
LOUD_SKIP_FRACTION = 0.03
# Skipped files printed one per line during a build; the rest are counted.
MAX_SKIP_LINES = 10
# Data-config keys that do not change the written data (loader, augmentation, paths
# of the output, label interpretation); every other key goes into the config name's hash.
_NOT_DATA_KEYS = frozenset(
    {"data_dir", "num_threads", "prefetch", "augment", "label", "num_classes", "class_names", "on_bad_scan",
     "build_workers", "beam_options"})
_SOURCE_KEYS = {
    "synthetic": {"num_scans", "phantom_seed", "phantom_shape"},
    "nodules": {"num_scans", "phantom_seed"},
    "folder": {"manual_dir", "labels_csv"},
    "dicom": {"manual_dir", "labels_csv"},
    "mosmeddata": {"manual_dir"},
    "medmnist": {"manual_dir", "medmnist_flag", "medmnist_size", "medmnist_spacing"},
}
_ALL_SOURCE_KEYS = frozenset().union(*_SOURCE_KEYS.values())
HOMEPAGES = {
    "mosmeddata": "https://mosmed.ai/datasets/covid19_1110/",
    "medmnist": "https://medmnist.com/",
    "nodules": "https://www.cancerimagingarchive.net/collection/lidc-idri/",
    "dicom": "https://www.cancerimagingarchive.net/collection/lidc-idri/",
}
_KERAS_TUTORIAL = "https://keras.io/examples/vision/3D_image_classification/"
CITATION = r"""
@article{morozov2020mosmeddata,
  title={MosMedData: Chest CT Scans With COVID-19 Related Findings Dataset},
  author={Morozov, S. P. and Andreychenko, A. E. and Pavlov, N. A. and others},
  journal={arXiv preprint arXiv:2005.06465}, year={2020}}
@article{armato2011lidc,
  title={The Lung Image Database Consortium (LIDC) and Image Database Resource Initiative (IDRI):
         a completed reference database of lung nodules on CT scans},
  author={Armato III, Samuel G. and McLennan, Geoffrey and Bidaut, Luc and others},
  journal={Medical Physics}, volume={38}, number={2}, pages={915--931}, year={2011}}
@article{yang2023medmnist,
  title={MedMNIST v2 - A large-scale lightweight benchmark for 2D and 3D biomedical image classification},
  author={Yang, Jiancheng and Shi, Rui and Wei, Donglai and others},
  journal={Scientific Data}, volume={10}, number={1}, pages={41}, year={2023}}
"""


class _DropTfdsConfigDump(logging.Filter):
  """Drops TFDS's one-line dump of the whole builder config (we print one short line)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Using custom data configuration")


logging.getLogger("absl").addFilter(_DropTfdsConfigDump())


@dataclasses.dataclass(eq=False)
class LungCtConfig(tfds.core.BuilderConfig):
  """What to build. Made by `builder_for` from the ml_collections data config.

  The fields are the defaults of a bare `tfds.builder("lung_ct")` (the declared
  "synthetic-default" config); `data_cfg` (the full data config as a dict, handed to
  `lungct.data.preprocess` and `lungct.data.sources`) overrides them.
  """
  source: str = "synthetic"
  shape: tuple[int, int, int] = (32, 64, 64)
  hu_window: tuple[float, float] = (-1000.0, 400.0)
  target_spacing: tuple[float, ...] = ()
  fit: str = "resize"
  crop_center: str = "center"
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
  # What the data is read from (`sources.source_files`); its digest is part of the name.
  files: Mapping[str, Any] = dataclasses.field(default_factory=dict, repr=False)

  def __repr__(self) -> str:  # TFDS logs builder configs; keep it one short line.
    return f"LungCtConfig({self.name})"


_CONFIG_FIELDS = ("source", "shape", "hu_window", "target_spacing", "fit", "crop_center", "num_scans",
                  "phantom_seed", "phantom_shape", "split_fractions", "split_seed", "on_bad_scan",
                  "manual_dir", "labels_csv", "build_workers")


def data_config(cfg: LungCtConfig) -> ml_collections.ConfigDict:
  """The data config a builder config stands for: its fields, overridden by cfg.data_cfg."""
  d = {k: getattr(cfg, k) for k in _CONFIG_FIELDS}
  d.update(dict(cfg.data_cfg))
  return ml_collections.ConfigDict(d)


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


def _abspath(path: str) -> str:
  return str(epath.Path(path).expanduser().absolute()) if path else ""


# Every data key that changes the written data, with the value its absence means: a
# config that omits a key and one that sets it to this default give the same dataset.
DATA_DEFAULTS: dict[str, Any] = {
    "source": "synthetic", "shape": (32, 64, 64), "hu_window": (-1000.0, 400.0), "target_spacing": (),
    "fit": "resize", "crop_center": "center", "anti_aliasing": False,
    "min_extent_mm": preprocess.DEFAULT_MIN_EXTENT_MM, "max_stretch": preprocess.DEFAULT_MAX_STRETCH,
    "num_scans": 160, "phantom_seed": 0, "phantom_shape": (),
    "split_fractions": (0.7, 0.15, 0.15), "split_seed": 0,
    "medmnist_flag": "nodulemnist3d", "medmnist_size": 28, "medmnist_spacing": 1.0,
}
# Where the data lives: not hashed as strings; the files they name are (`source_files`).
_LOCATION_KEYS = ("manual_dir", "labels_csv")


def _canonical(value: Any) -> Any:
  """One spelling per value: numbers as floats ((-1000, 400) == (-1000.0, 400.0)), tuples as lists."""
  value = _plain(value)
  if isinstance(value, bool) or value is None or isinstance(value, str):
    return value
  if isinstance(value, (int, float)):
    return float(value)
  if isinstance(value, list):
    return [_canonical(v) for v in value]
  if isinstance(value, dict):
    return {k: _canonical(v) for k, v in sorted(value.items())}
  return value


def _data_fields(data_cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """The data-config settings that change the written data, in one canonical spelling:
  defaults filled in, empty values ("", (), None) dropped, numbers as floats, and keys
  that do nothing for this source or fit left out. The data's location is not here: the
  files are (`source_files`)."""
  plain = _plain(data_cfg)
  fields = {k: plain.get(k, v) for k, v in DATA_DEFAULTS.items()}
  fields.update({k: v for k, v in plain.items() if k not in _NOT_DATA_KEYS and k != "loader"})
  source = fields.get("source", "synthetic")
  for k in _ALL_SOURCE_KEYS - _SOURCE_KEYS.get(source, set()):
    fields.pop(k, None)  # Another source's fields do not change this source's data.
  for k in _LOCATION_KEYS:
    fields.pop(k, None)
  fields["target_spacing"] = list(preprocess.target_spacing(data_cfg))
  fields["fit"] = fields.get("fit") or "resize"
  fields["crop_center"] = fields.get("crop_center") or "center"
  if fields["fit"] == "resize":
    fields.pop("crop_center")  # resize does not crop
  else:
    fields.pop("max_stretch")  # crop_or_pad does not stretch
  return {k: _canonical(v) for k, v in sorted(fields.items()) if v not in ("", None, (), [])}


def files_digest(files: Mapping[str, Any]) -> str:
  return hashlib.sha256(json.dumps(_plain(files), sort_keys=True).encode()).hexdigest()[:8]


def config_name(data_cfg: ml_collections.ConfigDict, files: Mapping[str, Any] | None = None) -> str:
  """A TFDS config name unique to everything that changes the data: its identity.

  E.g. "synthetic-32x64x64-n160-s0-1a2b3c4d" (source, shape, generated sources' number
  of scans and seed, 8 hex digits of the canonical settings `_data_fields`) and, for
  sources read from files, "-f" + 8 hex digits of `sources.source_files` (the labels
  CSV's content, each file's size and modification time), e.g.
  "folder-32x32x32-5fea4371-fe11b16b4". Editing the CSV or replacing a scan gives a new
  name, so a new build; the same settings spelled otherwise ((-1000, 400) or
  (-1000.0, 400.0), a default set explicitly) and the same files elsewhere give the same name.
  """
  fields = _data_fields(data_cfg)
  digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:8]
  source = fields.get("source", "synthetic")
  parts = [source, "x".join(str(int(s)) for s in fields["shape"])]
  if source in ("synthetic", "nodules"):
    parts += [f"n{int(fields['num_scans'])}", f"s{int(fields['phantom_seed'])}"]
  parts.append(digest)
  if source not in ("synthetic", "nodules"):
    parts.append("f" + files_digest(sources.source_files(data_cfg) if files is None else files))
  return "-".join(parts)


def changes_dataset(key: str) -> bool:
  """Whether a config key ("data.shape", "shape", "loader.prefetch", ...) changes the built
  dataset: every data.* key except data_dir, build_workers, on_bad_scan and the label
  interpretation (label, num_classes). The one list of such keys (issue 9). The data's
  location (manual_dir, labels_csv) changes it through the files it names."""
  if key.startswith("data."):
    key = key[len("data."):]
  elif "." in key:
    return False  # loader.*, augment.*, model.*, train.*, ...
  return key.split(".")[0] not in _NOT_DATA_KEYS


def builder_for(data_cfg: ml_collections.ConfigDict, *, data_dir: str | None = None) -> "LungCt":
  """The `LungCt` builder for `data_cfg`, writing under `data_dir` (default data_cfg.data_dir).

  Raises DataError (one line) for an unusable data config.
  """
  source = data_cfg.get("source", "synthetic")
  if source not in SOURCES:
    raise DataError(f"data.source must be one of {SOURCES}, got {source!r}")
  if data_cfg.get("on_bad_scan", "skip") not in ("skip", "fail"):
    raise DataError(f"data.on_bad_scan must be 'skip' or 'fail', got {data_cfg.on_bad_scan!r}")
  fractions = tuple(float(f) for f in data_cfg.get("split_fractions", (0.7, 0.15, 0.15)))
  if len(fractions) != 3 or min(fractions) < 0 or not np.isclose(sum(fractions), 1.0):
    raise DataError(f"data.split_fractions must be 3 non-negative numbers summing to 1, got {fractions}")
  if len(tuple(data_cfg.shape)) != 3 or min(int(s) for s in data_cfg.shape) < 1:
    raise DataError(f"data.shape must be 3 positive sizes (D, H, W), got {tuple(data_cfg.shape)}")
  try:
    target = preprocess.target_spacing(data_cfg)
    preprocess._fit(data_cfg)  # pylint: disable=protected-access
    preprocess._crop_center(data_cfg)  # pylint: disable=protected-access
  except ValueError as e:
    raise DataError(str(e)) from None
  if source not in ("synthetic", "nodules") and not data_cfg.get("manual_dir", ""):
    raise DataError(f"data.source={source!r} needs data.manual_dir (the folder holding the scans)")
  if source in ("folder", "dicom") and not data_cfg.get("labels_csv", ""):
    raise DataError(f"data.source={source!r} needs data.labels_csv (filename,label[,patient_id][,grade][,mask])")
  plain = _plain(data_cfg)
  plain.pop("loader", None)
  files = sources.source_files(data_cfg)  # DataError for a bad listing, before any file is written
  config = LungCtConfig(
      name=config_name(data_cfg, files),
      version=LungCt.VERSION,
      description=f"LungCt built from {source}",
      source=source,
      shape=tuple(int(s) for s in data_cfg.shape),
      hu_window=tuple(float(h) for h in data_cfg.get("hu_window", (-1000.0, 400.0))),
      target_spacing=target,
      fit=data_cfg.get("fit", "resize") or "resize",
      crop_center=data_cfg.get("crop_center", "center") or "center",
      num_scans=int(data_cfg.get("num_scans", 0)),
      phantom_seed=int(data_cfg.get("phantom_seed", 0)),
      phantom_shape=tuple(int(s) for s in data_cfg.get("phantom_shape", ())),
      split_fractions=fractions,
      split_seed=int(data_cfg.get("split_seed", 0)),
      on_bad_scan=data_cfg.get("on_bad_scan", "skip"),
      manual_dir=_abspath(data_cfg.get("manual_dir", "")),
      labels_csv=data_cfg.get("labels_csv", ""),
      build_workers=int(data_cfg.get("build_workers", 0)),
      data_cfg=plain,
      files=files,
  )
  return LungCt(config=config, data_dir=_abspath(data_dir or data_cfg.data_dir))


def prepare(data_cfg: ml_collections.ConfigDict, *, data_dir: str | None = None,
            verbose: bool = True) -> "LungCt":
  """Builds the dataset for `data_cfg` unless it is already prepared; returns the builder.

  The source's listing (CSV, folder layout) is validated before TFDS creates any file.
  Works without TensorFlow: the ArrayRecord writer of TFDS is plain Python.
  """
  builder = builder_for(data_cfg, data_dir=data_dir)  # lists the source: DataError before any file exists
  if not builder.is_prepared():
    if verbose:
      why = rebuild_reason(builder)
      print(f"lung_ct: building {builder.builder_config.name} in {builder.data_dir}"
            + (f": {why}" if why else ""))
    beam_args = data_cfg.get("beam_options", "")
    download_config = tfds.download.DownloadConfig(
        manual_dir=builder.builder_config.manual_dir or None,
        beam_options=beam_build.pipeline_options(beam_args) if beam_args else None)
    builder.download_and_prepare(file_format="array_record", download_config=download_config)
  elif verbose:
    print(f"lung_ct: using {builder.builder_config.name} ({builder.data_dir})")
  for split in written_splits(builder):
    if not _index_path(builder, split).exists():
      _write_index(builder, split)
  return builder


def _describe_change(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
  parts = []
  if old.get("labels_csv") != new.get("labels_csv"):
    parts.append("the labels CSV was edited")
  a, b = old.get("files", {}), new.get("files", {})
  for what, names in (("changed (size or modification time)", [k for k in b if k in a and a[k] != b[k]]),
                      ("added", [k for k in b if k not in a]), ("removed", [k for k in a if k not in b])):
    if names:
      parts.append(f"{len(names)} file(s) {what}: {', '.join(sorted(names)[:3])}"
                   + (", ..." if len(names) > 3 else ""))
  return "; ".join(parts)


def rebuild_reason(builder: "LungCt") -> str:
  """Why a dataset read from files is built although one with the same settings exists
  under data_dir (the newest such build): what changed in its files ("" if none exists)."""
  cfg = builder.builder_config
  if not cfg.files:
    return ""
  prefix = cfg.name.rsplit("-f", 1)[0] + "-f"
  root = epath.Path(builder.data_dir).parent.parent
  found = [d / str(LungCt.VERSION) / FILES_FILE for d in (root.iterdir() if root.exists() else [])
           if d.name.startswith(prefix) and d.name != cfg.name]
  found = [f for f in found if f.exists()]
  if not found:
    return ""
  newest = max(found, key=lambda f: f.stat().mtime)
  change = _describe_change(json.loads(newest.read_text()), cfg.files)
  return f"the data changed since {newest.parent.parent.name} was built ({change or 'its files differ'})"


def written_splits(builder: "LungCt") -> list[str]:
  """The splits the prepared dataset holds (all three, unless a split fraction was 0)."""
  return [s for s in SPLITS if s in builder.info.splits]


def read_build_report(builder: "LungCt") -> dict[str, Any]:
  """The `build_report.json` written next to the prepared dataset files."""
  return json.loads((epath.Path(builder.data_dir) / REPORT_FILE).read_text())


def _index_path(builder: "LungCt", split: str) -> epath.Path:
  return epath.Path(builder.data_dir) / INDEX_FILE.format(split=split)


def _write_index(builder: "LungCt", split: str) -> list[dict[str, Any]]:
  # Reads the split once, in the data source's order (TFDS shuffles records by key).
  from lungct.data import pipeline  # pylint: disable=g-import-not-at-top
  src = builder.as_data_source(split)
  index = []
  for i in range(len(src)):
    ex = pipeline.decode(src[i])
    index.append({k: ex[k] for k in ("study_id", "patient_id", "label", "grade")})
  try:
    _index_path(builder, split).write_text(json.dumps(index))
  except OSError:
    pass  # A read-only dataset dir: the index is computed again next time.
  return index


def split_index(builder: "LungCt", split: str) -> list[dict[str, Any]]:
  """[dict(study_id, patient_id, label, grade)] of `split`, in the order of
  `builder.as_data_source(split)`, without reading a volume (from index_<split>.json)."""
  if split not in SPLITS:
    raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
  path = _index_path(builder, split)
  if path.exists():
    return json.loads(path.read_text())
  return _write_index(builder, split)


def check_classes(builder: "LungCt", label: str = "binary", num_classes: int = 2) -> list[str]:
  """Checks the classes a classifier will learn and be scored on, before training starts (no volume read).

  label="grade": every study's grade must be in [0, num_classes) (a CSV without a grade column gives -1,
  "unknown"): else DataError naming the study, its split and the grade. label="binary": every split
  must hold both labels (a one-class validation split has no AUC and no threshold to choose): else
  DataError naming the split. Grades missing from a split are the documented fallback: returned as
  WARNING lines (that grade's one-vs-rest AUC is undefined there), since a rare grade (MosMedData's
  CT-4: 2 scans) cannot be in every split.
  """
  key, k = ("label", 2) if label == "binary" else ("grade", int(num_classes))
  name = builder.builder_config.name
  present = {}
  for split in SPLITS:
    index = split_index(builder, split)
    for e in index:
      if not 0 <= int(e[key]) < k:
        what = "unknown (-1: no grade column, or an empty grade)" if int(e[key]) < 0 else f"{e[key]}"
        raise DataError(f"lung_ct {name}: study {e['study_id']!r} ({split}) has grade {what}; "
                        f"data.label='grade' needs grades in [0, {k}) (data.num_classes={k})")
    present[split] = {int(e[key]) for e in index}
  every = set().union(*present.values())
  warnings = []
  for split in SPLITS:
    missing = sorted(every - present[split])
    if not missing:
      continue
    if key == "label":
      raise DataError(f"lung_ct {name}: split {split} holds no study with label {missing} (it has "
                      f"{sorted(present[split])}): its AUC and thresholds are undefined; add scans of that "
                      f"class (each class needs >= 3 patients), or change data.split_seed / data.split_fractions")
    warnings.append(f"WARNING: lung_ct split {split} holds no study of grade(s) {missing}: their one-vs-rest "
                    "AUC is undefined there")
  return warnings


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
  # Few patients per class can leave a split empty (TFDS cannot write an empty split):
  # move one patient there from the largest split, taken from its most common label.
  for split, f in zip(SPLITS, fractions):
    if f <= 0 or split in assignment.values() or len(assignment) < sum(1 for x in fractions if x > 0):
      continue
    counts = collections.Counter(assignment.values())
    donor = max(SPLITS, key=lambda s: (counts[s], -SPLITS.index(s)))
    by_label_in_donor = collections.Counter(patient_labels[p] for p, s in assignment.items() if s == donor)
    label = max(sorted(by_label_in_donor), key=lambda k: by_label_in_donor[k])
    pid = max(p for p, s in assignment.items() if s == donor and patient_labels[p] == label)
    assignment[pid] = split
  return assignment



# ----------------------------------------------------------------------------- examples


def make_example(item: Item, cfg: LungCtConfig | Mapping[str, Any]) -> dict[str, Any]:
  """Loads / generates and preprocesses one study. Raises ScanError for bad scans.

  The image is `preprocess.model_input` of the study (as STORED_DTYPE, which holds its
  values exactly), so predict feeds a model the values it was trained on.
  """
  data_cfg = data_config(cfg) if isinstance(cfg, LungCtConfig) else cfg
  loaded = sources.load_item(item, data_cfg)
  pre = preprocess.preprocess_scan(loaded.scan, data_cfg, loaded.mask, hu=loaded.hu)
  names = sources.target_names(data_cfg)
  targets = {"targets": sources.target_vector(loaded, names)} if names else {}
  return {
      "image": pre["image"][..., None].astype(preprocess.STORED_DTYPE),
      "mask": pre["mask"][..., None],
      "label": item.label,
      "grade": item.grade,
      "study_id": item.study_id,
      "patient_id": item.patient_id,
      "spacing": pre["spacing"],
      "voxel_spacing": pre["voxel_spacing"],
      "orig_shape": pre["orig_shape"],
      **targets,
  }


def _ordered_map(fn: Callable[[Any], Any], xs: Sequence[Any], workers: int) -> Iterator[Any]:
  """map(fn, xs) in order on a thread pool, at most 2 * workers in flight.

  Yields (x, result, error): ScanErrors are returned, not raised, so the caller decides.
  """
  def safe(x):
    try:
      return x, fn(x), None
    except ScanError as e:
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


def reason_kind(reason: str) -> str:
  """A skip reason without its specifics (numbers, quoted values): for counting."""
  head = re.split(r"[:(]", reason, maxsplit=1)[0]
  return re.sub(r"\d+(\.\d+)?", "N", head).strip() or reason[:60]


def _spill(item: Item, path: epath.Path, data_cfg: ml_collections.ConfigDict) -> None:
  """Preprocesses one study into a scratch file (raises ScanError for a bad scan)."""
  _save_npz(path, make_example(item, data_cfg))


def _save_npz(path: epath.Path, example: Mapping[str, Any]) -> None:
  buf = io.BytesIO()
  np.savez(buf, **{k: np.asarray(v) for k, v in example.items()})
  path.write_bytes(buf.getvalue())


def _load_npz(path: epath.Path) -> dict[str, Any]:
  with np.load(io.BytesIO(path.read_bytes())) as z:
    ex = {k: z[k] for k in z.files}
  for k in ("study_id", "patient_id"):
    ex[k] = str(ex[k])
  for k in ("label", "grade"):
    ex[k] = int(ex[k])
  return ex


class LungCt(tfds.core.GeneratorBasedBuilder):
  """Preprocessed 3D lung CT volumes with binary label, severity grade and lesion mask."""

  VERSION = tfds.core.Version("3.0.0")
  RELEASE_NOTES = {
      "1.0.0": "Initial release.",
      "2.0.0": "Geometry keeps millimetres (target_spacing, fit, crop_center); voxel_spacing "
               "feature; split after skipping bad scans; nodules, dicom and medmnist sources.",
      "3.0.0": "image and mask stored as raw bytes (tfds Encoding.BYTES): the same values, read ~30x faster.",
  }
  BUILDER_CONFIGS = [LungCtConfig(name="synthetic-default", description="160 phantoms, 32x64x64")]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  folder: put the NIfTI scans in data.manual_dir and list them in data.labels_csv
  (filename,label[,patient_id][,grade][,mask]). dicom: the same CSV, each filename a
  folder holding one DICOM series. mosmeddata: the MosMedData COVID19_1110 folders
  CT-0..CT-4 (study_XXXX.nii.gz) and optionally masks/. medmnist: a MedMNIST 3D .npz
  (e.g. nodulemnist3d.npz or nodulemnist3d_64.npz). See docs/data.md.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    shape = tuple(cfg.shape) + (1,)
    names = sources.target_names(data_config(cfg))
    targets = {"targets": tfds.features.Tensor(
        shape=(len(names),), dtype=np.float32,
        doc=f"data.targets {list(names)} in this order (float32; NaN = missing)")} if names else {}
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            # Volumes are stored as raw bytes (Encoding.BYTES), read back by one np.frombuffer: stored without an
            # encoding, TFDS writes every voxel as one element of a protobuf float/int64 list and turns it back
            # into numpy element by element (0.66 s per 64x128x128 example on a loaded 2-core machine, 10x the
            # on-device augmentation of a batch; benchmarks/README.md, input pipeline).
            "image": tfds.features.Tensor(
                shape=shape, dtype=preprocess.STORED_DTYPE, encoding=tfds.features.Encoding.BYTES,
                doc="(D, H, W, 1) = (z, y, x) volume in [0, 1]: data.hu_window of the HU values "
                    "after data.target_spacing and data.fit; exactly preprocess.model_input"),
            "mask": tfds.features.Tensor(shape=shape, dtype=np.uint8, encoding=tfds.features.Encoding.BYTES,
                                         doc="lesion mask on the image's grid (zeros when none)"),
            "label": tfds.features.Scalar(dtype=np.int64, doc="0 normal / benign, 1 abnormal / malignant"),
            "grade": tfds.features.Scalar(dtype=np.int64,
                                          doc="severity grade (MosMedData CT-0..4; nodules: LIDC-like "
                                              "malignancy - 1); -1 unknown"),
            "study_id": tfds.features.Text(doc="unique id of the scan (file name without suffix)"),
            "patient_id": tfds.features.Text(doc="patient id; splits never share a patient"),
            "spacing": tfds.features.Tensor(shape=(3,), dtype=np.float32,
                                            doc="original voxel size (z, y, x) mm"),
            "voxel_spacing": tfds.features.Tensor(shape=(3,), dtype=np.float32,
                                                  doc="mm of one image voxel (z, y, x) after preprocessing"),
            "orig_shape": tfds.features.Tensor(shape=(3,), dtype=np.int32,
                                               doc="original volume shape (z, y, x)"),
            **targets,
        }),
        metadata=tfds.core.MetadataDict(targets=list(names)),
        supervised_keys=("image", "label"),
        homepage=HOMEPAGES.get(cfg.source, _KERAS_TUTORIAL),
        citation=CITATION,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Scans are read from builder_config.manual_dir (validated up front).
    cfg = self.builder_config
    data_cfg = data_config(cfg)
    items = sources.list_items(data_cfg)
    scratch = epath.Path(self.data_dir) / "_scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    self._scratch = scratch
    spill = functools.partial(_spill, data_cfg=data_cfg)
    paths = [scratch / f"{i:06d}.npz" for i in range(len(items))]
    beam_args = data_cfg.get("beam_options", "")
    if beam_args:  # Preprocess on Beam's workers (lungct.data.beam_build).
      outcomes = beam_build.map_items(spill, items, paths, beam_args)
    else:
      path_of = {it.study_id: p for it, p in zip(items, paths)}

      def spill_here(item):
        spill(item, path_of[item.study_id])
        return path_of[item.study_id]
      outcomes = _ordered_map(spill_here, items, cfg.build_workers or multiprocessing.cpu_count())
    kept, skipped = [], []
    for item, path, error in outcomes:
      if error is not None:
        if cfg.on_bad_scan == "fail":
          raise error
        skipped.append({"study_id": item.study_id, "file": error.path, "reason": error.reason})
        if len(skipped) <= MAX_SKIP_LINES:
          print(f"lung_ct: skipping {error}")
        continue
      kept.append((item, path))
    if not kept:
      raise DataError(f"lung_ct: every one of the {len(items)} studies was skipped; first: "
                      f"{skipped[0]['file']}: {skipped[0]['reason']}")
    if any(it.split for it, _ in kept):  # The source's own splits (MedMNIST).
      assignment = {it.study_id: it.split for it, _ in kept}
    else:
      patient_labels = {}
      for it, _ in kept:
        patient_labels[it.patient_id] = max(it.label, patient_labels.get(it.patient_id, 0))
      by_patient = split_patients(patient_labels, cfg.split_fractions, cfg.split_seed)
      assignment = {it.study_id: by_patient[it.patient_id] for it, _ in kept}
    per_split = {s: [(it, p) for it, p in kept if assignment[it.study_id] == s] for s in SPLITS}
    # A split with fraction 0 may stay empty and is not written (an external test set: (0, 0, 1)).
    wanted = {s for s, f in zip(SPLITS, cfg.split_fractions) if f > 0 or any(it.split for it, _ in kept)}
    empty = [s for s, v in per_split.items() if not v and s in wanted]
    if empty:
      raise DataError(f"lung_ct: {len(kept)} usable studies of {len({it.patient_id for it, _ in kept})} "
                      f"patients leave split(s) {empty} empty (data.split_fractions="
                      f"{tuple(cfg.split_fractions)}); add scans or change the fractions")
    self._report = {
        "config": cfg.name, "source": cfg.source, "targets": list(sources.target_names(data_cfg)),
        "totals": {"read": len(items), "kept": len(kept), "skipped": len(skipped)},
        "skip_reasons": dict(collections.Counter(reason_kind(s["reason"]) for s in skipped).most_common()),
        "splits": {s: {"kept": len(v), "labels": {str(k): n for k, n in sorted(
            collections.Counter(it.label for it, _ in v).items())}} for s, v in per_split.items()},
        "skipped": skipped,
    }
    per_split = {s: v for s, v in per_split.items() if v}
    if beam_args:  # TFDS writes each split with its BeamWriter.
      return {split: beam_build.read_examples([(it.study_id, p) for it, p in entries], _load_npz)
              for split, entries in per_split.items()}
    return {split: self._generate_examples(entries) for split, entries in per_split.items()}

  def _generate_examples(self, entries: Sequence[tuple[Item, epath.Path]]):
    for item, path in entries:
      example = _load_npz(path)
      path.unlink()
      yield item.study_id, example

  def _download_and_prepare(self, dl_manager, download_config=None):
    super()._download_and_prepare(dl_manager=dl_manager, download_config=download_config)
    scratch = getattr(self, "_scratch", None)
    if scratch is not None and scratch.exists():
      scratch.rmtree()
    report = self._report
    # self.data_dir is the incomplete dir here; TFDS renames it when the build succeeds.
    (epath.Path(self.data_dir) / REPORT_FILE).write_text(json.dumps(report, indent=2))
    if self.builder_config.files:
      (epath.Path(self.data_dir) / FILES_FILE).write_text(json.dumps(_plain(self.builder_config.files)))
    for line in summary_lines(report):
      print(line)


def summary_lines(report: Mapping[str, Any]) -> list[str]:
  """The build summary: read / kept / skipped, the reasons counted, each split's classes;
  a WARNING line when more than LOUD_SKIP_FRACTION were skipped or a split lacks a class."""
  t = report["totals"]
  splits = ", ".join(f"{s} {c['kept']} (labels {c['labels']})" for s, c in report["splits"].items())
  lines = [f"lung_ct {report['config']}: read {t['read']}, kept {t['kept']}, skipped {t['skipped']}; {splits}"]
  if t["skipped"]:
    reasons = "; ".join(f"{n} x {k}" for k, n in report["skip_reasons"].items())
    frac = t["skipped"] / max(t["read"], 1)
    if frac > LOUD_SKIP_FRACTION:
      lines.append(f"WARNING: lung_ct skipped {t['skipped']} of {t['read']} studies ({100 * frac:.0f}%): "
                   f"{reasons}. The kept set may be biased; see build_report.json.")
    else:
      lines.append(f"lung_ct: skipped {reasons} (see build_report.json)")
  all_labels = set().union(*(c["labels"] for c in report["splits"].values()))
  for s, c in report["splits"].items():
    if c["kept"] and set(c["labels"]) != all_labels:
      lines.append(f"WARNING: lung_ct split {s} has only label(s) {sorted(c['labels'])} of "
                   f"{sorted(all_labels)}: its AUC is undefined")
  return lines
