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
  loader_only = synthetic_cfg(tmp_path, num_threads=7, prefetch=9)
  names = [lung_ct.config_name(c) for c in (base, other_shape, other_window, loader_only)]
  assert names[0].startswith("synthetic-16x32x32-n16-s0-")
  assert names[1].startswith("synthetic-16x32x48-n16-s0-")
  assert len({names[0], names[1], names[2]}) == 3
  assert names[3] == names[0]


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
  (skip,) = report["skipped"]
  assert skip["file"].endswith("broken.nii.gz") and skip["study_id"] == "broken"
  assert "NIfTI" in skip["reason"]
  ex = {e["study_id"].decode(): e for s in lung_ct.SPLITS for e in _all(builder, s)}
  assert int(ex["s6"]["grade"]) == 3 and int(ex["s6"]["label"]) == 1
  assert ex["s6"]["patient_id"] == b"pat6"
  np.testing.assert_array_equal(ex["s6"]["orig_shape"], [12, 24, 24])


def test_folder_fail_mode_names_the_file(tmp_path, scan_folder):
  with pytest.raises(nifti.ScanError, match="broken.nii.gz"):
    lung_ct.prepare(folder_cfg(tmp_path, scan_folder, on_bad_scan="fail"))


@pytest.mark.parametrize("line, message", [
    ("scans/missing.nii.gz,1", r"row 3: filename 'scans/missing.nii.gz' not found"),
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
  with pytest.raises(ValueError, match=message) as err:
    lung_ct.prepare(folder_cfg(tmp_path, scan_folder, labels_csv=str(tmp_path / "bad.csv")))
  assert "bad.csv" in str(err.value)
  assert not calls


def test_missing_csv_raises(tmp_path, scan_folder):
  with pytest.raises(ValueError, match="nope.csv.*not found"):
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
