"""Tests for lungct.data.preprocess against hand-computed values."""
import ml_collections
import numpy as np
import pytest

from lungct.data import nifti
from lungct.data import preprocess as pp


def _cfg(shape=(4, 6, 8), hu_window=(-1000.0, 400.0), target_spacing=()):
  c = ml_collections.ConfigDict()
  c.shape = shape
  c.hu_window = hu_window
  c.target_spacing = target_spacing
  return c


def test_to_dhw():
  vol = np.arange(2 * 3 * 4).reshape(2, 3, 4)  # (x, y, z)
  out = pp.to_dhw(vol)
  assert out.shape == (4, 3, 2)
  assert out[3, 2, 1] == vol[1, 2, 3]


def test_scale_intensity_range_lung_window():
  out = pp.scale_intensity_range(np.array([-1000, -300, 400, 1000]), -1000, 400)
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, [0.0, 0.5, 1.0, 1.0], atol=1e-7)


def test_scale_intensity_range_no_clip_and_custom_range():
  out = pp.scale_intensity_range(np.array([-1000.0, -300.0, 1100.0]), -1000, 400, -1.0, 1.0, clip=False)
  # (x + 1000) / 1400 * 2 - 1: -1, 0, 2.
  np.testing.assert_allclose(out, [-1.0, 0.0, 2.0], atol=1e-6)
  with pytest.raises(ValueError):
    pp.scale_intensity_range(np.zeros(3), 5, 5)


def test_center_crop_or_pad():
  vol = np.arange(5)[:, None] * 10 + np.arange(4)[None, :]  # (5, 4)
  out = pp.center_crop_or_pad(vol, (3, 6), pad_value=-1)
  expected = np.array([[-1, 10, 11, 12, 13, -1],
                       [-1, 20, 21, 22, 23, -1],
                       [-1, 30, 31, 32, 33, -1]])
  np.testing.assert_array_equal(out, expected)
  # Odd differences: the extra voxel is cropped from / padded at the end.
  np.testing.assert_array_equal(pp.center_crop_or_pad(np.arange(4), (1,)), [1])
  np.testing.assert_array_equal(pp.center_crop_or_pad(np.arange(2), (5,), 9), [9, 0, 1, 9, 9])


def test_resize_known_values_linear():
  # Corner-aligned linear: [0, 3] -> 4 samples 0, 1, 2, 3; [0, 1, 2, 3] -> 7 samples in steps of 0.5.
  np.testing.assert_allclose(pp.resize(np.array([0.0, 3.0]), (4,)), [0, 1, 2, 3], atol=1e-6)
  np.testing.assert_allclose(pp.resize(np.arange(4.0), (7,)), np.arange(7) / 2.0, atol=1e-6)
  vol = np.arange(4.0)[:, None] + 10 * np.arange(3.0)[None, :]   # (4, 3), linear in both axes
  out = pp.resize(vol, (7, 5))
  expected = np.arange(7)[:, None] / 2.0 + 10 * np.arange(5)[None, :] / 2.0
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, expected, atol=1e-5)


def test_resize_exact_shape_for_awkward_ratios():
  rng = np.random.default_rng(0)
  for src, dst in [((37, 41, 23), (32, 64, 64)), ((7, 9, 11), (13, 5, 3)), ((100, 3, 33), (1, 17, 64))]:
    out = pp.resize(rng.normal(size=src).astype(np.float32), dst)
    assert out.shape == dst


def test_resize_nearest_keeps_labels_and_dtype():
  mask = np.zeros((4, 4, 4), np.uint8)
  mask[2:, 2:, 2:] = 3
  out = pp.resize(mask, (8, 8, 8), order=0)
  assert out.dtype == np.uint8
  assert set(np.unique(out)) == {0, 3}
  assert out[-1, -1, -1] == 3 and out[0, 0, 0] == 0
  # 2 of 4 voxels per axis -> 4 of 8 after doubling: 4^3 voxels labelled.
  assert np.count_nonzero(out) == 64


def test_resample_to_spacing_halves_and_doubles_shape():
  vol = np.random.default_rng(0).normal(size=(10, 20, 30)).astype(np.float32)
  assert pp.resample_to_spacing(vol, (1.0, 1.0, 1.0), (2.0, 2.0, 2.0)).shape == (5, 10, 15)
  assert pp.resample_to_spacing(vol, (5.0, 0.5, 1.0), (2.5, 1.0, 1.0)).shape == (20, 10, 30)
  # Identity spacing returns the same values.
  np.testing.assert_allclose(pp.resample_to_spacing(vol, (1, 1, 1), (1, 1, 1)), vol)


def test_resample_preserves_linear_ramp():
  z = np.arange(9, dtype=np.float32)                 # spacing 1 mm, ramp 0..8 mm
  vol = np.broadcast_to(z[:, None, None], (9, 4, 4)).copy()
  out = pp.resample_to_spacing(vol, (1, 1, 1), (2, 1, 1))
  # 9 -> round(4.5) = 4 samples across the same extent (corner aligned): 0, 8/3, 16/3, 8.
  assert out.shape == (4, 4, 4)
  np.testing.assert_allclose(out[:, 0, 0], [0, 8 / 3, 16 / 3, 8], atol=1e-5)


def test_preprocess_volume_window_and_shape():
  vol = np.full((8, 12, 16), -1000.0, np.float32)
  vol[:, 6:, :] = -300.0
  out = pp.preprocess_volume(vol, (5.0, 2.5, 2.5), _cfg(shape=(4, 6, 8)))
  assert out.shape == (4, 6, 8) and out.dtype == np.float32
  assert out.min() >= 0.0 and out.max() <= 1.0
  np.testing.assert_allclose(out[:, 0, :], 0.0, atol=1e-6)
  np.testing.assert_allclose(out[:, -1, :], 0.5, atol=1e-6)


def test_preprocess_volume_with_target_spacing():
  vol = np.zeros((8, 12, 16), np.float32)
  out = pp.preprocess_volume(vol, (5.0, 2.5, 2.5), _cfg(shape=(4, 6, 8), target_spacing=(10.0, 5.0, 5.0)))
  assert out.shape == (4, 6, 8)
  np.testing.assert_allclose(out, 1000.0 / 1400.0, atol=1e-6)


def test_preprocess_mask_geometry_matches_volume():
  mask = np.zeros((8, 12, 16), np.uint8)
  mask[4:, 6:, 8:] = 1
  cfg = _cfg(shape=(4, 6, 8), target_spacing=(10.0, 5.0, 5.0))
  out = pp.preprocess_mask(mask, (5.0, 2.5, 2.5), cfg)
  assert out.shape == (4, 6, 8) and out.dtype == np.uint8
  assert np.count_nonzero(out) == 2 * 3 * 4
  assert out[-1, -1, -1] == 1 and out[0, 0, 0] == 0


def test_preprocess_scan_from_file(tmp_path):
  vol_xyz = np.full((16, 12, 8), -1000.0, np.float32)   # (x, y, z)
  vol_xyz[:, :, 4:] = 400.0                              # upper half in z
  path = nifti.save_scan(vol_xyz, (2.5, 2.0, 5.0), tmp_path / "s.nii.gz")
  out = pp.preprocess_scan(nifti.load_scan(path), _cfg(shape=(4, 6, 8)))
  assert set(out) == {"image", "spacing", "orig_shape"}
  np.testing.assert_allclose(out["spacing"], [5.0, 2.0, 2.5])
  assert out["spacing"].dtype == np.float32
  np.testing.assert_array_equal(out["orig_shape"], [8, 12, 16])
  assert out["orig_shape"].dtype == np.int32
  image = out["image"]
  assert image.shape == (4, 6, 8)
  np.testing.assert_allclose(image[0], 0.0, atol=1e-6)   # D axis is z: bottom slices are air
  np.testing.assert_allclose(image[-1], 1.0, atol=1e-6)


def test_default_config_fields_work():
  from configs import default  # pylint: disable=g-import-not-at-top
  cfg = default.get_data_config()
  vol = np.random.default_rng(0).uniform(-1000, 400, (20, 40, 40)).astype(np.float32)
  out = pp.preprocess_volume(vol, (5.0, 2.5, 2.5), cfg)
  assert out.shape == tuple(cfg.shape)
