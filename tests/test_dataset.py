"""LungCt TFDS builder: synthetic, folder + CSV and MosMedData layouts (built without TensorFlow)."""
from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from tests import helpers  # noqa: F401  (puts the repo root on sys.path)
from configs import default
from lungct.data import lung_ct
from lungct.data import nifti
from lungct.data import phantom
from lungct.data import pipeline
from lungct.data import preprocess
from lungct.data.errors import DataError

SHAPE = (16, 32, 32)


def synthetic_cfg(data_dir, **overrides):
  d = default.get_data_config()
  d.data_dir = str(data_dir)
  d.num_scans = 16
  d.shape = SHAPE
  d.phantom_shape = (64, 64, 32)
  for k, v in overrides.items():
    d[k] = v
  return d


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
  d = synthetic_cfg(tmp_path_factory.mktemp("tfds"))
  t0 = time.perf_counter()
  builder = lung_ct.prepare(d)
  print(f"synthetic build of 16 scans at {SHAPE}: {time.perf_counter() - t0:.2f} s")
  return d, builder


def _all(builder, split):
  src = builder.as_data_source(split)
  return [src[i] for i in range(len(src))]


def test_synthetic_features_and_labels(synthetic):
  d, builder = synthetic
  truth = {sid: (pid, g) for sid, pid, g, _ in phantom.phantom_set(16, 0)}
  seen = []
  for split in lung_ct.SPLITS:
    for ex in _all(builder, split):
      assert ex["image"].shape == SHAPE + (1,) and ex["image"].dtype == np.float16
      assert ex["mask"].shape == SHAPE + (1,) and ex["mask"].dtype == np.uint8
      assert 0.0 <= ex["image"].min() and ex["image"].max() <= 1.0
      assert ex["image"].max() > 0.5  # body tissue is bright in the lung window
      sid = ex["study_id"].decode()
      pid, grade = truth[sid]
      assert ex["patient_id"].decode() == pid
      assert int(ex["grade"]) == grade and int(ex["label"]) == int(grade > 0)
      np.testing.assert_allclose(ex["spacing"], [5.0, 2.5, 2.5])  # (z, y, x) of the phantom
      np.testing.assert_array_equal(ex["orig_shape"], [32, 64, 64])
      if grade >= 2:
        assert ex["mask"].sum() > 0
      if grade == 0:
        assert ex["mask"].sum() == 0
      seen.append(sid)
  assert sorted(seen) == sorted(truth)
  report = lung_ct.read_build_report(builder)
  assert report["totals"] == {"read": 16, "kept": 16, "skipped": 0}


def test_decode_gives_typed_numpy(synthetic):
  _, builder = synthetic
  ex = pipeline.decode(builder.as_data_source("train")[0])
  assert ex["image"].dtype == np.float32 and ex["image"].shape == SHAPE + (1,)
  assert ex["mask"].dtype == np.uint8
  assert type(ex["label"]) is int and type(ex["grade"]) is int
  assert type(ex["study_id"]) is str and ex["study_id"].startswith("phantom_")
  assert type(ex["patient_id"]) is str and ex["patient_id"].startswith("patient_")
  # resize fit: the phantom's 64 x 64 x 32 voxels of 2.5 x 2.5 x 5 mm stretched to 16 x 32 x 32.
  np.testing.assert_allclose(ex["voxel_spacing"], [10.0, 5.0, 5.0])
  assert ex["voxel_spacing"].dtype == np.float32 and ex["orig_shape"].dtype == np.int32


def test_split_index_lists_each_split_in_source_order_without_volumes(synthetic, monkeypatch):
  _, builder = synthetic
  expected = {s: [pipeline.decode(e) for e in _all(builder, s)] for s in lung_ct.SPLITS}
  monkeypatch.setattr(type(builder), "as_data_source", lambda *a, **k: pytest.fail("read volumes"))
  for split in lung_ct.SPLITS:
    index = lung_ct.split_index(builder, split)
    assert index == [{k: e[k] for k in ("study_id", "patient_id", "label", "grade")} for e in expected[split]]
  assert len(lung_ct.split_index(builder, "train")) == 12


def test_splits_by_patient_stratified(synthetic):
  _, builder = synthetic
  patients = {s: {ex["patient_id"] for ex in _all(builder, s)} for s in lung_ct.SPLITS}
  assert not patients["train"] & patients["validation"]
  assert not patients["train"] & patients["test"]
  assert not patients["validation"] & patients["test"]
  for split in lung_ct.SPLITS:
    assert {int(ex["label"]) for ex in _all(builder, split)} == {0, 1}, split
  # 16 phantoms, 15 patients (patient_0009 has 2 studies: grades 0 and 1 -> label 1).
  assert [len(builder.as_data_source(s)) for s in lung_ct.SPLITS] == [12, 2, 2]


def test_split_patients_deterministic_and_counts():
  labels = {f"p{i}": int(i < 10) for i in range(20)}
  a = lung_ct.split_patients(labels, (0.6, 0.2, 0.2), seed=3)
  assert a == lung_ct.split_patients(labels, (0.6, 0.2, 0.2), seed=3)
  assert a != lung_ct.split_patients(labels, (0.6, 0.2, 0.2), seed=4)
  for label in (0, 1):
    counts = [sum(1 for p, s in a.items() if s == split and labels[p] == label)
              for split in lung_ct.SPLITS]
    assert counts == [6, 2, 2]
  # 3 patients of a class, tiny fractions: still one per split.
  b = lung_ct.split_patients({"a": 1, "b": 1, "c": 1}, (0.9, 0.05, 0.05), seed=0)
  assert sorted(b.values()) == ["test", "train", "validation"]


def test_config_name_separates_data_changes(tmp_path):
  base = synthetic_cfg(tmp_path)
  other_shape = synthetic_cfg(tmp_path, shape=(16, 32, 48))
  other_window = synthetic_cfg(tmp_path, hu_window=(-1200.0, 600.0))
  loader_only = synthetic_cfg(tmp_path, num_threads=7, prefetch=9)  # legacy keys: ignored
  names = [lung_ct.config_name(c) for c in (base, other_shape, other_window, loader_only)]
  assert names[0].startswith("synthetic-16x32x32-n16-s0-")
  assert names[1].startswith("synthetic-16x32x48-n16-s0-")
  assert len({names[0], names[1], names[2]}) == 3
  assert names[3] == names[0]
  assert lung_ct.changes_dataset("data.shape") and lung_ct.changes_dataset("data.fit")
  assert lung_ct.changes_dataset("target_spacing")
  for key in ("data.data_dir", "data.label", "data.on_bad_scan", "loader.prefetch", "augment.rot90", "model.width"):
    assert not lung_ct.changes_dataset(key), key


# ----------------------------------------------------------------------------- folder


def _write_scan(path, seed, grade, shape_xyz=(24, 24, 12)):
  ph = phantom.make_phantom(seed, grade, shape_xyz=shape_xyz)
  nifti.save_scan(ph.hu, ph.spacing, path)
  return ph


@pytest.fixture(scope="module")
def scan_folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("scans")
  rows = ["filename,label,patient_id,grade"]
  for i in range(8):
    grade = [0, 0, 0, 0, 1, 2, 3, 4][i]
    _write_scan(root / "scans" / f"s{i}.nii.gz", 100 + i, grade)
    rows.append(f"scans/s{i}.nii.gz,{int(grade > 0)},pat{i},{grade}")
  (root / "scans" / "broken.nii.gz").write_bytes(b"\x1f\x8b not really a nifti")
  rows.append("scans/broken.nii.gz,1,pat9,2")
  (root / "labels.csv").write_text("\n".join(rows) + "\n")
  return root


def folder_cfg(tmp_path, root, csv="labels.csv", **overrides):
  d = synthetic_cfg(tmp_path, source="folder", manual_dir=str(root), labels_csv=str(root / csv))
  for k, v in overrides.items():
    d[k] = v
  return d


def test_folder_build_skips_corrupt_and_reports(tmp_path, scan_folder):
  builder = lung_ct.prepare(folder_cfg(tmp_path, scan_folder))
  n = sum(len(builder.as_data_source(s)) for s in lung_ct.SPLITS)
  assert n == 8
  path = os.path.join(builder.data_dir, "build_report.json")
  with open(path) as f:
    report = json.load(f)
  assert report["totals"] == {"read": 9, "kept": 8, "skipped": 1}
  assert report["skip_reasons"] == {"not a readable NIfTI file": 1}
  (skip,) = report["skipped"]
  assert skip["file"].endswith("broken.nii.gz") and skip["study_id"] == "scans/broken"
  assert "NIfTI" in skip["reason"]
  ex = {e["study_id"].decode(): e for s in lung_ct.SPLITS for e in _all(builder, s)}
  assert int(ex["scans/s6"]["grade"]) == 3 and int(ex["scans/s6"]["label"]) == 1
  assert ex["scans/s6"]["patient_id"] == b"pat6"
  np.testing.assert_array_equal(ex["scans/s6"]["orig_shape"], [12, 24, 24])


def test_stored_image_is_model_input_of_the_file(tmp_path, scan_folder):
  """What predict feeds (model_input of the file) equals the stored example, byte for byte."""
  d = folder_cfg(tmp_path, scan_folder, fit="crop_or_pad", target_spacing=(4.0, 2.0, 2.0))
  builder = lung_ct.prepare(d)
  ex = {e["study_id"]: e for s in lung_ct.SPLITS for e in map(pipeline.decode, _all(builder, s))}
  for sid in ("scans/s0", "scans/s5"):
    x = preprocess.model_input(nifti.load_scan(scan_folder / f"{sid}.nii.gz"), d)
    assert x.dtype == np.float32 and x.shape == ex[sid]["image"].shape
    assert x.tobytes() == ex[sid]["image"].tobytes()
  np.testing.assert_array_equal(ex["scans/s0"]["voxel_spacing"], [4.0, 2.0, 2.0])


def test_folder_fail_mode_names_the_file(tmp_path, scan_folder):
  with pytest.raises(nifti.ScanError, match="broken.nii.gz"):
    lung_ct.prepare(folder_cfg(tmp_path, scan_folder, on_bad_scan="fail"))


@pytest.mark.parametrize("line, message", [
    ("scans/missing.nii.gz,1", r"row 3: filename 'scans/missing.nii.gz' not found"),
    ("scans/s1.nii.gz,1,p,2,x,y", r"row 3: more fields than the header's 2"),
    ("scans/s0.nii.gz,1", r"row 3: duplicate filename"),
    ("scans/s1.nii.gz,abnormal", r"row 3: label 'abnormal' is not an integer"),
    ("scans/s1.nii.gz,-2", r"row 3: unknown label -2"),
    ("../outside.nii.gz,1", r"row 3: filename '../outside.nii.gz' escapes"),
    ("/etc/passwd,1", r"row 3: filename '/etc/passwd' must be a path relative"),
])
def test_bad_csv_raises_before_work(tmp_path, scan_folder, line, message, monkeypatch):
  (tmp_path / "bad.csv").write_text(f"filename,label\nscans/s0.nii.gz,0\n{line}\n")
  calls = []
  monkeypatch.setattr(lung_ct.lung_ct, "make_example", lambda *a: calls.append(a))
  with pytest.raises(DataError, match=message) as err:
    lung_ct.prepare(folder_cfg(tmp_path, scan_folder, labels_csv=str(tmp_path / "bad.csv")))
  assert "bad.csv" in str(err.value) and "\n" not in str(err.value)
  assert not calls


def test_missing_csv_raises(tmp_path, scan_folder):
  with pytest.raises(DataError, match="nope.csv.*not found"):
    lung_ct.prepare(folder_cfg(tmp_path, scan_folder, labels_csv="nope.csv"))


# ----------------------------------------------------------------------------- MosMedData


def test_mosmeddata_layout(tmp_path):
  root = tmp_path / "mosmed"
  grades = {"study_0001": 0, "study_0002": 0, "study_0003": 0, "study_0004": 1, "study_0005": 1,
            "study_0006": 1, "study_0007": 2}
  for i, (sid, g) in enumerate(grades.items()):
    ph = _write_scan(root / f"CT-{g}" / f"{sid}.nii.gz", 7 + i, g)
  # A mask for study_0007 (grade 2).
  mask = np.zeros((24, 24, 12), np.uint8)
  mask[4:8, 4:8, 2:5] = 1
  import nibabel as nib
  os.makedirs(root / "masks")
  nib.save(nib.Nifti1Image(mask, nib.load(str(root / "CT-2" / "study_0007.nii.gz")).affine),
           str(root / "masks" / "study_0007_mask.nii.gz"))
  d = synthetic_cfg(tmp_path, source="mosmeddata", manual_dir=str(root))
  builder = lung_ct.prepare(d)
  ex = {e["study_id"].decode(): e for s in lung_ct.SPLITS for e in _all(builder, s)}
  assert sorted(ex) == sorted(grades)
  for sid, g in grades.items():
    assert int(ex[sid]["grade"]) == g and int(ex[sid]["label"]) == int(g > 0)
    assert ex[sid]["patient_id"].decode() == sid
  # 4 of 192 (x,y) voxels x 3 of 12 slices of the mask -> resized to 16x32x32: about 1/12 * 1/36.
  assert ex["study_0007"]["mask"].sum() > 0
  assert ex["study_0001"]["mask"].sum() == 0
  del ph


def test_bad_csv_creates_no_files(tmp_path, scan_folder):
  (tmp_path / "bad.csv").write_text("filename,label\nscans/s0.nii.gz,x\n")
  out = tmp_path / "out"
  with pytest.raises(ValueError, match="row 2"):
    lung_ct.prepare(folder_cfg(out, scan_folder, labels_csv=str(tmp_path / "bad.csv")))
  assert not out.exists()


def test_csv_with_utf8_bom_and_semicolons(tmp_path, scan_folder):
  """Excel's "CSV UTF-8" starts with a BOM (before: missing ['filename'] in ['\\ufefffilename', ...]);
  European Excel separates with ';'."""
  rows = [f"scans/s{i}.nii.gz;{int(i >= 4)};pat{i}" for i in range(8)]
  (tmp_path / "bom.csv").write_bytes(("\ufeff" + "\r\n".join(["filename;label;patient_id", *rows]) + "\r\n")
                                     .encode("utf-8"))
  items = lung_ct.list_folder_items(str(scan_folder), str(tmp_path / "bom.csv"))
  assert [(it.study_id, it.label, it.patient_id) for it in items][:2] == [("scans/s0", 0, "pat0"), ("scans/s1", 0, "pat1")]
  assert len(items) == 8


def test_split_happens_after_skipping_bad_scans(tmp_path):
  """3 readable scans per class and 3 unreadable abnormal ones: every split keeps both classes.

  Before, the split was made over all 9 patients first: here test got
  only unreadable abnormal scans (split_seed 0: b0, b1 -> test), so test held one class (AUC NaN)."""
  root = tmp_path / "scans"
  rows = ["filename,label,patient_id"]
  for i in range(6):
    _write_scan(root / f"g{i}.nii.gz", 300 + i, 0 if i < 3 else 2)
    rows.append(f"g{i}.nii.gz,{int(i >= 3)},g{i}")
  for i in range(3):
    (root / f"bad{i}.nii.gz").write_bytes(b"not a nifti")
    rows.append(f"bad{i}.nii.gz,1,b{i}")
  (root / "labels.csv").write_text("\n".join(rows) + "\n")
  d = folder_cfg(tmp_path, root, split_fractions=(0.34, 0.33, 0.33), split_seed=0)
  builder = lung_ct.prepare(d)
  for split in lung_ct.SPLITS:
    assert sorted(e["label"] for e in lung_ct.split_index(builder, split)) == [0, 1], split
  report = lung_ct.read_build_report(builder)
  assert report["splits"]["test"] == {"kept": 2, "labels": {"0": 1, "1": 1}}


def test_build_summary_is_loud_when_many_are_skipped(tmp_path, scan_folder, capsys):
  lung_ct.prepare(folder_cfg(tmp_path, scan_folder))
  out = capsys.readouterr().out
  # 1 of 9 skipped (11% > 3%): a WARNING line with the reasons counted.
  assert "read 9, kept 8, skipped 1" in out
  assert "WARNING: lung_ct skipped 1 of 9 studies (11%): 1 x not a readable NIfTI file" in out
  assert "Using custom data configuration" not in out
  quiet = lung_ct.summary_lines({"config": "c", "totals": {"read": 100, "kept": 99, "skipped": 1},
                                 "skip_reasons": {"too small": 1},
                                 "splits": {"train": {"kept": 99, "labels": {"0": 50, "1": 49}}}})
  assert quiet[1] == "lung_ct: skipped 1 x too small (see build_report.json)"


def test_thin_crops_are_kept_with_crop_or_pad(tmp_path):
  """Real nodule crops: 44 x 44 x 3..6 voxels, 0.7 mm in-plane, 2.5 mm slices. Before, every crop
  under 8 slices was skipped ("too few voxels along an axis")."""
  root = tmp_path / "crops"
  rows = ["filename,label,patient_id"]
  rng = np.random.default_rng(0)
  for i, depth in enumerate([3, 4, 5, 6, 3, 6]):
    vol = np.full((44, 44, depth), -850.0) + rng.normal(0, 20, (44, 44, depth))
    vol[18:26, 18:26, :] = 40.0
    nifti.save_scan(vol, (0.7, 0.7, 2.5), root / f"n{i}.nii.gz")
    rows.append(f"n{i}.nii.gz,{i % 2},p{i}")
  (root / "labels.csv").write_text("\n".join(rows) + "\n")
  d = folder_cfg(tmp_path, root, shape=(32, 32, 32), target_spacing=(1.0, 1.0, 1.0), fit="crop_or_pad")
  builder = lung_ct.prepare(d)
  assert lung_ct.read_build_report(builder)["totals"] == {"read": 6, "kept": 6, "skipped": 0}
  ex = pipeline.decode(builder.as_data_source("train")[0])
  np.testing.assert_array_equal(ex["voxel_spacing"], [1.0, 1.0, 1.0])
  # 8 voxels of 0.7 mm = 5.6 mm of tissue -> 5 or 6 voxels at 1 mm on a row through the centre.
  assert int((ex["image"][16, 16, :, 0] > 0.5).sum()) in (5, 6)


def test_declared_default_config_is_buildable(tmp_path):
  """tfds.builder("lung_ct")'s own config (synthetic-default) used to fail: AttributeError 'hu_window'."""
  builder = lung_ct.LungCt(config="synthetic-default", data_dir=str(tmp_path))
  d = lung_ct.data_config(builder.builder_config)
  assert tuple(d.hu_window) == (-1000.0, 400.0) and tuple(d.shape) == (32, 64, 64)
  item = lung_ct.lung_ct.sources.list_items(d)[0]
  ex = lung_ct.make_example(item, builder.builder_config)
  assert ex["image"].shape == (32, 64, 64, 1) and ex["image"].dtype == np.float16
  info = builder.info
  assert info.citation.strip().startswith("@article") and "keras.io" in info.homepage
  assert "mm of one image voxel" in str(info.features["voxel_spacing"].doc.desc)


def test_builder_module_uses_no_os_or_open(tmp_path, monkeypatch):
  """TFDS's DatasetBuilderTestCase forbids `os` and `open` in a builder module (use epath)."""
  import ast, inspect, unittest.mock as mock  # pylint: disable=g-import-not-at-top,multiple-imports
  tree = ast.parse(inspect.getsource(lung_ct.lung_ct))
  names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
  imports = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
  assert "os" not in imports and "open" not in names
  # And a build runs with the module's `os` and `open` replaced the way TFDS's test does.
  err = AssertionError("Do not use `os`")
  monkeypatch.setattr(lung_ct.lung_ct, "os", mock.Mock(side_effect=err), raising=False)
  builtins = dict(lung_ct.lung_ct.__builtins__) if isinstance(lung_ct.lung_ct.__builtins__, dict) else \
      dict(vars(lung_ct.lung_ct.__builtins__))
  builtins["open"] = mock.Mock(side_effect=err)
  monkeypatch.setattr(lung_ct.lung_ct, "__builtins__", builtins)
  d = synthetic_cfg(tmp_path, num_scans=6, phantom_shape=(32, 32, 16), shape=(8, 16, 16))
  builder = lung_ct.prepare(d)
  assert lung_ct.read_build_report(builder)["totals"]["kept"] == 6


def test_tfds_config_dump_is_replaced_by_one_short_line(tmp_path, caplog, capsys):
  """TFDS logged the whole builder config on one ~500-character line for every builder made."""
  import logging  # pylint: disable=g-import-not-at-top
  caplog.set_level(logging.INFO)
  d = synthetic_cfg(tmp_path, num_scans=6, phantom_shape=(32, 32, 16), shape=(8, 16, 16))
  lung_ct.prepare(d)
  lung_ct.prepare(d)
  assert not [r for r in caplog.records if "Using custom data configuration" in r.getMessage()]
  out = capsys.readouterr().out
  line = [l for l in out.splitlines() if l.startswith("lung_ct: using")]
  assert len(line) == 1 and len(line[0]) < 200 and lung_ct.config_name(d) in line[0]
  assert repr(lung_ct.builder_for(d).builder_config) == f"LungCtConfig({lung_ct.config_name(d)})"
