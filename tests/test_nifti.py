"""Tests for lungct.data.nifti: orientation, spacing, HU scaling, and clear errors on bad files."""
import gzip
import os

import nibabel as nib
import numpy as np
import pytest

from lungct.data import nifti


def _ct_like(shape=(10, 12, 14)):
  """A small HU volume: air with a block of soft tissue (passes validate_volume)."""
  vol = np.full(shape, -1000, np.int16)
  vol[:, shape[1] // 2:, :] = 40
  return vol


def _save(data, affine, path, **header):
  img = nib.Nifti1Image(data, affine)
  for key, value in header.items():
    img.header[key] = value
  nib.save(img, str(path))
  return str(path)


def test_roundtrip_rounds_to_int16_and_keeps_spacing(tmp_path):
  vol = _ct_like().astype(np.float32)
  vol[3, 4, 5] = 123.6
  path = nifti.save_scan(vol, (0.7, 0.8, 2.5), tmp_path / "a.nii.gz")
  assert nib.load(path).get_data_dtype() == np.int16
  scan = nifti.load_scan(path)
  assert scan.volume.dtype == np.float32 and scan.volume.shape == (10, 12, 14)
  assert scan.volume[3, 4, 5] == 124.0
  np.testing.assert_allclose(scan.spacing, [0.7, 0.8, 2.5], rtol=1e-6)
  np.testing.assert_allclose(np.diag(scan.affine)[:3], [0.7, 0.8, 2.5], rtol=1e-6)
  assert scan.path == path


@pytest.mark.parametrize(
    "flips,expected",
    [((1, 1), (1, 2, 3)),      # RAS: unchanged
     ((-1, 1), (8, 2, 3)),     # LAS: x flipped, 10 - 1 - 1 = 8
     ((-1, -1), (8, 9, 3))])   # LPS: x and y flipped, 12 - 1 - 2 = 9
def test_orientation_las_lps_to_ras(tmp_path, flips, expected):
  data = _ct_like()
  data[1, 2, 3] = 1000
  affine = np.diag([2.0 * flips[0], 3.0 * flips[1], 4.0, 1.0])
  path = _save(data, affine, tmp_path / "o.nii")
  scan = nifti.load_scan(path)
  assert scan.volume.shape == (10, 12, 14)
  assert tuple(np.argwhere(scan.volume == 1000)[0]) == expected
  np.testing.assert_allclose(scan.spacing, [2.0, 3.0, 4.0])
  assert np.all(np.diag(scan.affine)[:3] > 0)
  # The marker keeps its world position.
  world = affine @ np.array([1, 2, 3, 1.0])
  np.testing.assert_allclose(scan.affine @ np.array([*expected, 1.0]), world)


def test_orientation_permuted_axes(tmp_path):
  """Voxel axis i runs along world y and j along world x: canonical swaps them."""
  data = _ct_like()
  data[1, 2, 3] = 1000
  affine = np.array([[0, 3.0, 0, 0], [2.0, 0, 0, 0], [0, 0, 4.0, 0], [0, 0, 0, 1]])
  scan = nifti.load_scan(_save(data, affine, tmp_path / "p.nii"))
  assert scan.volume.shape == (12, 10, 14)
  assert tuple(np.argwhere(scan.volume == 1000)[0]) == (2, 1, 3)
  np.testing.assert_allclose(scan.spacing, [3.0, 2.0, 4.0])


def test_scl_slope_and_inter_give_hu(tmp_path):
  raw = np.zeros((10, 10, 10), np.int16)
  raw[5:] = 532
  raw[0, 0, 0] = 1512
  img = nib.Nifti1Image(raw, np.eye(4))
  img.header.set_slope_inter(2.0, -1024.0)
  nib.save(img, str(tmp_path / "s.nii"))
  assert np.array_equal(np.unique(nib.load(str(tmp_path / "s.nii")).dataobj.get_unscaled()), [0, 532, 1512])
  scan = nifti.load_scan(tmp_path / "s.nii")
  # HU = 2 * raw - 1024.
  assert scan.volume[0, 0, 1] == -1024.0
  assert scan.volume[6, 0, 0] == 40.0
  assert scan.volume[0, 0, 0] == 2000.0


def test_4d_with_singleton_last_axis_is_squeezed(tmp_path):
  scan = nifti.load_scan(_save(_ct_like()[..., None], np.eye(4), tmp_path / "t.nii"))
  assert scan.volume.shape == (10, 12, 14)


def _raises(path, *words):
  with pytest.raises(nifti.ScanError) as info:
    nifti.load_scan(path)
  err = info.value
  assert err.path == str(path)
  assert str(err).startswith(f"{path}: ")
  for w in words:
    assert w in err.reason, err.reason
  return err


def test_missing_file(tmp_path):
  _raises(tmp_path / "nope.nii.gz", "not found")


def test_not_nifti(tmp_path):
  path = tmp_path / "text.nii"
  path.write_bytes(b"this is not an image" * 40)
  _raises(path, "NIfTI")


def test_not_gzip(tmp_path):
  path = tmp_path / "garbage.nii.gz"
  path.write_bytes(os.urandom(2000))
  _raises(path)


def test_truncated_gzip(tmp_path):
  path = nifti.save_scan(np.random.default_rng(0).uniform(-1000, 400, (40, 40, 40)), (1, 1, 1),
                         tmp_path / "full.nii.gz")
  blob = open(path, "rb").read()
  cut = tmp_path / "cut.nii.gz"
  cut.write_bytes(blob[: len(blob) // 2])
  _raises(cut, "truncated")


def test_truncated_plain_nifti(tmp_path):
  path = nifti.save_scan(_ct_like((20, 20, 20)), (1, 1, 1), tmp_path / "full.nii")
  blob = open(path, "rb").read()
  cut = tmp_path / "cut.nii"
  cut.write_bytes(blob[: 352 + 1000])
  _raises(cut)


def test_2d_and_4d(tmp_path):
  _raises(_save(np.full((20, 20), -1000, np.int16), np.eye(4), tmp_path / "2d.nii"), "2D")
  _raises(_save(np.stack([_ct_like()] * 2, -1), np.eye(4), tmp_path / "4d.nii"), "4D")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_voxels(tmp_path, bad):
  data = _ct_like().astype(np.float32)
  data[0, 0, 0] = bad
  data[1, 1, 1] = bad
  _raises(_save(data, np.eye(4), tmp_path / "nan.nii"), "2 voxels", "NaN")


def test_constant_volume(tmp_path):
  _raises(_save(np.full((10, 10, 10), -1000, np.int16), np.eye(4), tmp_path / "c.nii"), "constant")


def test_absurd_spacing(tmp_path):
  _raises(_save(_ct_like(), np.diag([25.0, 1, 1, 1]), tmp_path / "sp.nii"), "spacing")


def test_not_hounsfield(tmp_path):
  img8 = np.random.default_rng(0).integers(0, 256, (12, 12, 12)).astype(np.uint8)
  _raises(_save(img8, np.eye(4), tmp_path / "png_like.nii"), "Hounsfield")
  unit = np.random.default_rng(0).uniform(0, 1, (12, 12, 12)).astype(np.float32)
  _raises(_save(unit, np.eye(4), tmp_path / "unit.nii"), "Hounsfield")


def test_too_few_voxels(tmp_path):
  _raises(_save(_ct_like((4, 20, 20)), np.eye(4), tmp_path / "thin.nii"), "too few voxels")


def test_validate_volume_rules():
  ok = _ct_like().astype(np.float32)
  nifti.validate_volume(ok, (1.0, 1.0, 5.0), "x.nii")
  for spacing in [(0.0, 1, 1), (-1.0, 1, 1), (1, np.nan, 1), (1, 1, 20.5)]:
    with pytest.raises(nifti.ScanError, match=r"^x\.nii: implausible voxel spacing"):
      nifti.validate_volume(ok, spacing, "x.nii")
  # Air only (no tissue above -200) and tissue only (no air below -500) are rejected.
  with pytest.raises(nifti.ScanError, match="Hounsfield"):
    nifti.validate_volume(np.where(ok > 0, -300.0, -1000.0), (1, 1, 1), "x.nii")
  with pytest.raises(nifti.ScanError, match="Hounsfield"):
    nifti.validate_volume(np.where(ok > 0, 40.0, -400.0), (1, 1, 1), "x.nii")


def test_scan_error_is_value_error_and_pickles():
  import pickle
  err = nifti.ScanError("/d/a.nii", "bad")
  assert isinstance(err, ValueError)
  again = pickle.loads(pickle.dumps(err))
  assert (again.path, again.reason, str(again)) == ("/d/a.nii", "bad", "/d/a.nii: bad")


def test_gzip_module_sanity(tmp_path):
  """A .nii.gz written by save_scan is real gzip (the truncation test relies on it)."""
  path = nifti.save_scan(_ct_like(), (1, 1, 1), tmp_path / "g.nii.gz")
  with gzip.open(path, "rb") as f:
    assert len(f.read()) == 352 + 10 * 12 * 14 * 2
