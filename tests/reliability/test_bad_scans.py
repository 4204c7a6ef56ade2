"""Every kind of bad scan in one 15-file folder: skipped and reported, or the build stops naming the file.

Also the CSV checks that must fire before any scan is read (duplicate study id, a label other than 0/1,
a path escaping the data dir).
"""
from __future__ import annotations

import gzip
import json
import os

import nibabel as nib
import numpy as np
import pytest

from tests import helpers  # noqa: F401  (repo root on sys.path)
from configs import default
from lungct.data import lung_ct, nifti, phantom
from lungct.data.errors import DataError

SHAPE_XYZ = (24, 24, 12)


def _nii(path, data, spacing=(1.5, 1.5, 3.0)):
  img = nib.Nifti1Image(data, np.diag([*spacing, 1.0]))
  img.header.set_zooms(spacing[: data.ndim] + (1.0,) * max(0, data.ndim - 3))
  nib.save(img, str(path))


def _phantom_hu(seed):
  return phantom.make_phantom(seed, seed % 2, shape_xyz=SHAPE_XYZ).hu


# file name -> (writer, expected words of the reason); the 4 good scans have reason None.
def _truncated(p):
  nifti.save_scan(_phantom_hu(1), (1.5, 1.5, 3.0), p)
  raw = gzip.decompress(p.read_bytes())
  p.write_bytes(gzip.compress(raw)[: len(gzip.compress(raw)) // 2])  # cut mid-stream


def _not_nifti(p):
  p.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())


def _nan(p):
  hu = _phantom_hu(2).astype(np.float32)
  hu[3, 4, 5], hu[6, 7, 8] = np.nan, np.inf
  _nii(p, hu)


def _raw_0_255(p):
  hu = _phantom_hu(3)
  _nii(p, np.round((hu - hu.min()) / (hu.max() - hu.min()) * 255).astype(np.uint8))


def _mri(p):
  vol = np.full(SHAPE_XYZ, -1000, np.int16)
  vol[4:20, 4:20, 2:10] = np.random.default_rng(1).integers(200, 30394, (16, 16, 8))
  _nii(p, vol)


def _complex(p):
  _nii(p, _phantom_hu(5).astype(np.complex64) + 300j)


BAD = {
    "truncated.nii.gz": (_truncated, "truncated"),
    "garbage.nii": (_not_nifti, "not a readable NIfTI"),
    "flat2d.nii.gz": (lambda p: _nii(p, np.full((24, 24), -500, np.int16)), "got 2D"),
    "series4d.nii.gz": (lambda p: _nii(p, np.full((24, 24, 12, 3), -500, np.int16)), "got 4D"),
    "constant.nii.gz": (lambda p: _nii(p, np.full(SHAPE_XYZ, -1000, np.int16)), "constant volume"),
    "nan_inf.nii.gz": (_nan, "2 voxels are NaN or infinite"),
    "spacing.nii.gz": (lambda p: nifti.save_scan(_phantom_hu(4), (0.7, 0.7, 500.0), p),
                       "implausible voxel spacing"),
    "raw255.nii.gz": (_raw_0_255, "do not look like Hounsfield units"),
    "mri.nii.gz": (_mri, "not CT Hounsfield units"),
    "complex.nii.gz": (_complex, "complex-valued voxels"),
    "normalised.nii.gz": (lambda p: _nii(p, (_phantom_hu(6) / 1500.0).astype(np.float32)),
                          "within +-20"),
}
GOOD = [f"good{i}.nii.gz" for i in range(4)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("scans")
  rows = ["filename,label,patient_id"]
  for i, name in enumerate(GOOD):
    nifti.save_scan(_phantom_hu(10 + i), (1.5, 1.5, 3.0), root / name)
    rows.append(f"{name},{i % 2},p{i}")
  for i, (name, (write, _)) in enumerate(BAD.items()):
    write(root / name)
    rows.append(f"{name},{i % 2},q{i}")
  (root / "labels.csv").write_text("\n".join(rows) + "\n")
  assert len(os.listdir(root)) == 16  # 15 scans + the CSV
  return root


def _cfg(out, root, **overrides):
  d = default.get_data_config()
  d.update(dict(data_dir=str(out), source="folder", manual_dir=str(root), labels_csv="labels.csv",
                shape=(8, 16, 16), build_workers=1))
  d.update(overrides)
  return d


def test_every_bad_kind_is_skipped_and_reported(tmp_path, folder, capsys):
  builder = lung_ct.prepare(_cfg(tmp_path, folder))
  report = lung_ct.read_build_report(builder)
  assert report["totals"] == {"read": 15, "kept": 4, "skipped": 11}
  assert sum(report["skip_reasons"].values()) == 11
  reasons = {os.path.basename(s["file"]): s["reason"] for s in report["skipped"]}
  assert sorted(reasons) == sorted(BAD)
  for name, (_, words) in BAD.items():
    assert words in reasons[name], (name, reasons[name])
  assert "500.0] mm" in reasons["spacing.nii.gz"]
  kept = sorted(e["study_id"].decode() for s in lung_ct.SPLITS for e in
                (builder.as_data_source(s)[i] for i in range(len(builder.as_data_source(s)))))
  assert kept == ["good0", "good1", "good2", "good3"]
  out = capsys.readouterr().out
  assert "read 15, kept 4, skipped 11" in out
  assert out.count("lung_ct: skipping") == 10  # then counted only (lung_ct.MAX_SKIP_LINES)
  assert "WARNING: lung_ct skipped 11 of 15 studies (73%)" in out


def test_fail_mode_stops_naming_the_file(tmp_path, folder):
  with pytest.raises(nifti.ScanError) as err:
    lung_ct.prepare(_cfg(tmp_path, folder, on_bad_scan="fail"))
  name = os.path.basename(err.value.path)
  assert name in BAD and BAD[name][1] in err.value.reason
  assert str(err.value).startswith(str(folder / name))
  assert not lung_ct.builder_for(_cfg(tmp_path, folder)).is_prepared()


@pytest.mark.parametrize("rows, message", [
    (["good0.nii.gz,0", "good0.nii,1"], r"row 3: duplicate study id 'good0' \(first at row 2"),
    (["good0.nii.gz,0", "good1.nii.gz,2"], r"row 3: unknown label 2 \(must be in \[0, 1\]\)"),
    (["good0.nii.gz,0", "../scans/good1.nii.gz,1"], r"row 3: filename '../scans/good1.nii.gz' escapes"),
    (["good0.nii.gz,0", "sub/../../x.nii.gz,1"], r"row 3: filename 'sub/../../x.nii.gz' escapes"),
])
def test_csv_problems_stop_before_any_scan_is_read(tmp_path, folder, rows, message, monkeypatch):
  os.makedirs(folder / "sub", exist_ok=True)
  (folder / "sub" / "good0.nii").write_bytes(b"")
  (folder / "good0.nii").write_bytes(b"")
  (tmp_path / "bad.csv").write_text("\n".join(["filename,label", *rows]) + "\n")
  calls = []
  monkeypatch.setattr(lung_ct.lung_ct, "make_example", lambda *a: calls.append(a))
  monkeypatch.setattr(nifti, "load_scan", lambda *a: calls.append(a))
  with pytest.raises(DataError, match=message) as err:
    lung_ct.prepare(_cfg(tmp_path / "out", folder, labels_csv=str(tmp_path / "bad.csv")))
  assert "\n" not in str(err.value) and str(err.value).startswith(str(tmp_path / "bad.csv"))
  assert not calls and not (tmp_path / "out").exists()
