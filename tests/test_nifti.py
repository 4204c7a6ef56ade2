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


def test_any_3d_volume_is_read_whatever_its_size(tmp_path):
  # Whether a scan is big enough is the geometry's rule (preprocess.check_geometry): the reader
  # takes one slice (before: "too few voxels", >= 2 per axis) and 3-slice crops.
  assert nifti.load_scan(_save(_ct_like((1, 20, 20)), np.eye(4), tmp_path / "flat.nii")).volume.shape == (1, 20, 20)
  scan = nifti.load_scan(_save(_ct_like((20, 20, 3)), np.diag([0.7, 0.7, 2.5, 1]), tmp_path / "thin.nii"))
  assert scan.volume.shape == (20, 20, 3)


def test_spacing_comes_from_the_affine_not_pixdim(tmp_path):
  # sform says 6 mm slices, pixdim says 1 mm: the affine used to reorient wins (before: 1 mm).
  img = nib.Nifti1Image(_ct_like(), np.diag([0.8, 0.8, 6.0, 1.0]))
  img.header.set_zooms((1.0, 1.0, 1.0))
  img.set_sform(np.diag([0.8, 0.8, 6.0, 1.0]), code=1)
  img.set_qform(None, code=0)
  nib.save(img, str(tmp_path / "disagree.nii"))
  assert nib.load(str(tmp_path / "disagree.nii")).header.get_zooms() == (1.0, 1.0, 1.0)
  scan = nifti.load_scan(tmp_path / "disagree.nii")
  np.testing.assert_allclose(scan.spacing, [0.8, 0.8, 6.0])
  # An oblique affine: 2 mm voxels rotated 30 degrees in-plane still measure 2 mm.
  c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
  aff = np.array([[2 * c, -2 * s, 0, 0], [2 * s, 2 * c, 0, 0], [0, 0, 3, 0], [0, 0, 0, 1.0]])
  np.testing.assert_allclose(nifti.spacing_from_affine(aff), [2.0, 2.0, 3.0])


def test_mri_range_intensities_are_not_ct(tmp_path):
  # An MRI-like volume: background -1000 after an offset, tissue 200..30393 (before: accepted).
  rng = np.random.default_rng(0)
  vol = np.full((12, 12, 12), -1000, np.int16)
  vol[2:10, 2:10, 2:10] = rng.integers(200, 30394, (8, 8, 8))
  _raises(_save(vol, np.eye(4), tmp_path / "mri.nii"), "exceed 3071 HU")
  # A CT with a few metal-artefact voxels (0.1%) above 3071 is still CT.
  ct = _ct_like((10, 10, 10))
  ct[0, 0, 0] = 8000
  assert nifti.load_scan(_save(ct, np.eye(4), tmp_path / "metal.nii")).volume.max() == 8000


def test_complex_data_is_refused(tmp_path):
  vol = _ct_like().astype(np.complex64) + 500j
  path = _save(vol, np.eye(4), tmp_path / "complex.nii")
  import warnings  # pylint: disable=g-import-not-at-top
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # before: numpy's ComplexWarning and the imaginary part dropped
    _raises(path, "complex-valued")


def test_validate_volume_rules():
  ok = _ct_like().astype(np.float32)
  nifti.validate_volume(ok, (1.0, 1.0, 5.0), "x.nii")
  for spacing in [(0.0, 1, 1), (-1.0, 1, 1), (1, np.nan, 1), (1, 1, 20.5)]:
    with pytest.raises(nifti.ScanError, match=r"^x\.nii: implausible voxel spacing"):
      nifti.validate_volume(ok, spacing, "x.nii")
  # A crop of lung with no soft tissue (max -400; before: refused, "needs max > -200") and one of
  # soft tissue with fat (min -100; before: refused, "needs min < -500") are CT.
  nifti.validate_volume(np.where(ok > 0, -400.0, -950.0), (1, 1, 1), "x.nii")
  nifti.validate_volume(np.where(ok > 0, 40.0, -100.0), (1, 1, 1), "x.nii")
  # No negative voxel, or every voxel within +-20: not HU.
  with pytest.raises(nifti.ScanError, match="no voxel below 0"):
    nifti.validate_volume(np.where(ok > 0, 1100.0, 24.0), (1, 1, 1), "x.nii")
  with pytest.raises(nifti.ScanError, match=r"within \+-20"):
    nifti.validate_volume(np.where(ok > 0, 1.0, -1.0), (1, 1, 1), "x.nii")


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
