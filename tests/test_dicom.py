"""DICOM series (pydicom): slice order, HU, spacing and orientation; one-line errors naming the series."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pydicom
import pytest

from tests import helpers  # noqa: F401  (repo root on sys.path)
from configs import default
from lungct.data import dicom, lung_ct, nifti, pipeline, preprocess


def _volume(seed=0, shape=(20, 16, 8)):
  """(x, y, z) HU: air, a soft-tissue half, noise, and a bright marker at (3, 5, 2)."""
  rng = np.random.default_rng(seed)
  vol = np.full(shape, -1000.0) + np.rint(rng.normal(0, 10, shape))
  vol[10:, :, :] = 40.0
  vol[3, 5, 2] = 1500.0
  return vol


def test_series_loads_like_the_same_nifti(tmp_path):
  vol = _volume()
  # Files written in shuffled order, slope 2 / intercept -1024 (stored = (HU + 1024) / 2).
  dicom.write_series(vol, (0.7, 0.8, 2.5), tmp_path / "s", slope=2.0, intercept=-1024.0, shuffle_seed=3)
  scan = dicom.load_series(tmp_path / "s")
  assert scan.volume.shape == (20, 16, 8) and scan.volume.dtype == np.float32
  np.testing.assert_allclose(scan.spacing, [0.7, 0.8, 2.5], rtol=1e-6)
  assert tuple(np.argwhere(scan.volume == 1500.0)[0]) == (3, 5, 2)
  # HU back through the slope: even values exactly, odd ones rounded to the stored step of 2 HU.
  assert np.abs(scan.volume - vol).max() <= 1.0
  ref = nifti.load_scan(nifti.save_scan(vol, (0.7, 0.8, 2.5), tmp_path / "s.nii.gz"))
  np.testing.assert_allclose(scan.affine[:3, :3], ref.affine[:3, :3])
  assert scan.path == str(tmp_path / "s")


def test_real_ct_header_is_kept(tmp_path):
  """Headers come from pydicom's own CT slice (CT_small.dcm): a real scanner's tags survive."""
  paths = dicom.write_series(_volume(), (0.66, 0.66, 5.0), tmp_path / "s")
  ds = pydicom.dcmread(paths[0])
  assert ds.Modality == "CT" and ds.RescaleIntercept == -1024 and "PatientName" in ds


def _series(tmp_path, name="s", **kw):
  folder = tmp_path / name
  dicom.write_series(_volume(), (0.7, 0.8, 2.5), folder, **kw)
  return folder


def _edit(folder, fn):
  for name in sorted(os.listdir(folder)):
    ds = pydicom.dcmread(folder / name)
    fn(ds)
    ds.save_as(folder / name, enforce_file_format=False)


def _error(folder):
  with pytest.raises(nifti.ScanError) as err:
    dicom.load_series(folder)
  assert err.value.path == str(folder) and "\n" not in str(err.value)
  return err.value.reason


def test_non_ct_modality(tmp_path):
  assert _error(_series(tmp_path, modality="MR")) == "modality ['MR'] is not CT"


def test_mixed_series(tmp_path):
  a = _series(tmp_path, "a")
  b = _series(tmp_path, "b")
  for name in os.listdir(b)[:3]:
    shutil.copy(b / name, a / f"b_{name}")
  assert "2 series mixed in one folder" in _error(a)


def test_duplicated_slice(tmp_path):
  s = _series(tmp_path)
  ds = pydicom.dcmread(s / "IM0000.dcm")
  ds.SOPInstanceUID = pydicom.uid.generate_uid()
  ds.save_as(s / "IM9999.dcm", enforce_file_format=False)
  assert "duplicated slice position" in _error(s)


def test_missing_slice(tmp_path):
  s = _series(tmp_path, shuffle_seed=None)  # IM0003 is slice 3 (z = 7.5 mm)
  os.remove(s / "IM0003.dcm")
  assert _error(s).startswith("missing slices: gap of 5.00 mm after IM0002.dcm where the series steps 2.50 mm")


def test_gantry_tilt(tmp_path):
  s = _series(tmp_path)
  _edit(s, lambda ds: setattr(ds, "GantryDetectorTilt", 15.0))
  assert _error(s).startswith("gantry tilt [15.0] degrees")
  # Tilt without the tag: positions drift sideways slice by slice.
  t = _series(tmp_path, "t")
  def shear(ds):
    ds.ImagePositionPatient = [float(ds.ImagePositionPatient[0]), float(ds.ImagePositionPatient[1]) +
                               0.5 * float(ds.ImagePositionPatient[2]) / 2.5, float(ds.ImagePositionPatient[2])]
  _edit(t, shear)
  assert "do not follow the slice normal" in _error(t)


def test_dicom_source_builds_and_skips_a_bad_series(tmp_path):
  root = tmp_path / "dicom"
  rows = ["filename,label,patient_id"]
  for i in range(6):
    dicom.write_series(_volume(i), (0.7, 0.8, 2.5), root / f"series{i}")
    rows.append(f"series{i},{i % 2},p{i}")
  dicom.write_series(_volume(9), (0.7, 0.8, 2.5), root / "mri", modality="MR")
  rows.append("mri,1,p9")
  (root / "labels.csv").write_text("\n".join(rows) + "\n")
  d = default.get_data_config()
  d.update(dict(source="dicom", data_dir=str(tmp_path / "tfds"), manual_dir=str(root), labels_csv="labels.csv",
                shape=(16, 16, 16), target_spacing=(1.0, 1.0, 1.0), fit="crop_or_pad", build_workers=1))
  builder = lung_ct.prepare(d)
  report = lung_ct.read_build_report(builder)
  assert report["totals"] == {"read": 7, "kept": 6, "skipped": 1}
  assert report["skipped"][0]["file"] == str(root / "mri") and "is not CT" in report["skipped"][0]["reason"]
  ex = {e["study_id"]: e for s in lung_ct.SPLITS for e in map(pipeline.decode, (
      builder.as_data_source(s)[i] for i in range(len(builder.as_data_source(s)))))}
  assert sorted(ex) == [f"series{i}" for i in range(6)]
  x = preprocess.model_input(dicom.load_series(root / "series2"), d)
  assert x.tobytes() == ex["series2"]["image"].tobytes()
  # A CSV row naming a file instead of a series folder: one line naming the row.
  (root / "bad.csv").write_text("filename,label\nseries0/IM0000.dcm,0\n")
  with pytest.raises(lung_ct.lung_ct.DataError, match=r"bad.csv row 2: filename 'series0/IM0000.dcm' not found "
                                                       r"\(looked for the folder"):
    lung_ct.prepare(_with(d, labels_csv="bad.csv"))


def _with(d, **kw):
  d = d.copy_and_resolve_references()
  d.update(kw)
  return d
