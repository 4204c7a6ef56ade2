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
  # 9 -> round(4.5) = 4 samples exactly 2 mm apart, centred on the ramp's centre (4 mm):
  # 4 + (i - 1.5) * 2 = 1, 3, 5, 7 mm (before the fix: corner aligned, 0, 8/3, 16/3, 8 = 2.67 mm apart).
  assert out.shape == (4, 4, 4)
  np.testing.assert_allclose(out[:, 0, 0], [1, 3, 5, 7], atol=1e-5)


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
  # 0 HU in the lung window: 1000 / 1400, as stored (float16: 0.71435547).
  np.testing.assert_array_equal(out, np.float32(np.float16(1000.0 / 1400.0)))


def test_preprocess_mask_geometry_matches_volume():
  mask = np.zeros((8, 12, 16), np.uint8)
  mask[4:, 6:, 8:] = 1
  cfg = _cfg(shape=(4, 6, 8), target_spacing=(10.0, 5.0, 5.0))
  out = pp.preprocess_mask(mask, (5.0, 2.5, 2.5), cfg)
  assert out.shape == (4, 6, 8) and out.dtype == np.uint8
  assert np.count_nonzero(out) == 2 * 3 * 4
  assert out[-1, -1, -1] == 1 and out[0, 0, 0] == 0


def test_resample_nearest_keeps_labels_and_exact_spacing():
  mask = np.zeros((10, 1, 1), np.uint8)
  mask[4:6] = 2                                       # voxels 4, 5 at 0.5 mm: 2.0..3.0 mm
  out = pp.resample_to_spacing(mask, (0.5, 1, 1), (1.0, 1, 1), order=0)
  # 5 outputs at 1 mm centred on 2.25 mm: 0.25, 1.25, 2.25, 3.25, 4.25 mm -> input voxels
  # round(0.5 + 2 i - 0.5) = 0, 2, 4, 6, 8.
  assert out.dtype == np.uint8 and out[:, 0, 0].tolist() == [0, 0, 2, 0, 0]


def test_preprocess_scan_from_file(tmp_path):
  vol_xyz = np.full((16, 12, 8), -1000.0, np.float32)   # (x, y, z)
  vol_xyz[:, :, 4:] = 400.0                              # upper half in z
  path = nifti.save_scan(vol_xyz, (2.5, 2.0, 5.0), tmp_path / "s.nii.gz")
  out = pp.preprocess_scan(nifti.load_scan(path), _cfg(shape=(4, 6, 8)))
  assert set(out) == {"image", "mask", "voxel_spacing", "spacing", "orig_shape", "crop_start"}
  # resize: 8 x 12 x 16 voxels of 5 x 2 x 2.5 mm stretched to 4 x 6 x 8 -> voxels of 10 x 4 x 5 mm.
  np.testing.assert_allclose(out["voxel_spacing"], [10.0, 4.0, 5.0])
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


# ----------------------------------------------------------------------------- geometry in mm


def _geo_cfg(shape=(32, 32, 32), **kw):
  c = _cfg(shape=shape, target_spacing=(1.0, 1.0, 1.0))
  c.fit = "crop_or_pad"
  c.crop_center = "center"
  c.update(kw)
  return c


def _sphere_xyz(d_mm, spacing_xyz, shape_xyz, centre_mm=(0.0, 0.0, 0.0), sub=5):
  """Partial-volume sphere (+40 HU in -1000 HU air): each voxel supersampled sub^3 times."""
  ax = [(np.arange(n * sub) - (n * sub - 1) / 2) * s / sub - c
        for n, s, c in zip(shape_xyz, spacing_xyz, centre_mm)]
  x, y, z = np.meshgrid(*ax, indexing="ij")
  inside = (x ** 2 + y ** 2 + z ** 2 <= (d_mm / 2) ** 2).astype(np.float32)
  occ = inside.reshape(shape_xyz[0], sub, shape_xyz[1], sub, shape_xyz[2], sub).mean((1, 3, 5))
  return (-1000.0 + 1040.0 * occ).astype(np.float32)


def _diameter_mm(image, voxel_spacing):
  """Volume-equivalent diameter from the windowed intensity: soft tissue (+40 HU) = 1040/1400."""
  vol_mm3 = (image / (1040.0 / 1400.0)).sum() * np.prod(voxel_spacing)
  return (6.0 * vol_mm3 / np.pi) ** (1.0 / 3.0)


@pytest.mark.parametrize("d_mm", [4.0, 20.0])
def test_spheres_keep_their_millimetres(d_mm):
  # Crops 1.5 x the sphere plus 4 voxels, at anisotropic LIDC-like spacing (x, y, z) mm.
  spacing = (0.7, 0.7, 1.25)
  shape = tuple(int(np.ceil(1.5 * d_mm / s)) + 4 for s in spacing)
  scan = nifti.Scan(_sphere_xyz(d_mm, spacing, shape), np.array(spacing), np.eye(4), "s")
  out = pp.preprocess_scan(scan, _geo_cfg())
  np.testing.assert_array_equal(out["voxel_spacing"], [1.0, 1.0, 1.0])
  assert out["image"].shape == (32, 32, 32)
  # Hand value: the volume-equivalent diameter is d (4.00 / 20.00 mm measured, within 0.1 mm).
  assert abs(_diameter_mm(out["image"], out["voxel_spacing"]) - d_mm) < 0.1
  # The old default (resize to shape) stretches both crops to 32 voxels: in model voxels the
  # 4 mm sphere becomes ~15 voxels across, almost the 20 mm one's ~19.
  resized = pp.preprocess_scan(scan, _geo_cfg(fit="resize"))
  d_vox = _diameter_mm(resized["image"], (1.0, 1.0, 1.0))
  assert d_vox > 14.0


def test_crop_or_pad_pads_with_air_before_windowing():
  vol = np.full((4, 4, 4), 40.0, np.float32)         # soft tissue only, 1 mm voxels
  out = pp.preprocess_arrays(vol, (1, 1, 1), _geo_cfg(shape=(6, 4, 8), hu_window=(-500.0, 500.0)))
  img = out["image"]
  # Tissue: (40 + 500) / 1000 = 0.54 (float16: 0.54003906); padding is air -1000 HU -> 0 (clipped), not 0 HU (0.5).
  np.testing.assert_allclose(img[1:5, :, 2:6], np.float16(0.54), rtol=0)
  assert img[0].max() == 0.0 and img[:, :, :2].max() == 0.0 and img[:, :, 6:].max() == 0.0


def test_isotropic_target_spacing_number_and_one_value():
  for value in (1.5, (1.5,), (1.5, 1.5, 1.5)):
    assert pp.target_spacing({"target_spacing": value}) == (1.5, 1.5, 1.5)
  c = _cfg()
  c.target_spacing = (1.5,)  # a ConfigDict keeps the tuple type: one value = isotropic
  assert pp.target_spacing(c) == (1.5, 1.5, 1.5)
  c = _cfg()
  c.target_spacing = ()
  assert pp.target_spacing(c) == ()
  c.target_spacing = (1.0, 2.0)
  with pytest.raises(ValueError, match="target_spacing"):
    pp.target_spacing(c)


def test_mask_centred_crop_contains_the_lesion():
  # A 60 x 60 x 20 mm scan, 1 mm voxels; a 6 mm lesion near a corner (z, y, x) = (4, 50, 8).
  vol = np.full((20, 60, 60), -850.0, np.float32)
  mask = np.zeros(vol.shape, np.uint8)
  mask[2:7, 47:53, 5:11] = 1
  vol[mask > 0] = 40.0
  c = _geo_cfg(shape=(16, 16, 16), crop_center="mask")
  out = pp.preprocess_arrays(vol, (1, 1, 1), c, mask)
  assert out["mask"].sum() == mask.sum() == 5 * 6 * 6   # the whole lesion is in the crop
  # Bounding-box centre (z, y, x) = (4, 49.5, 7.5); window start = floor(c - 7.5 + 0.5) clamped
  # to [0, n - 16]: z floor(-3) -> 0, y floor(42.5) = 42, x floor(0.5) = 0; so the lesion sits at
  # z 2..6, y 47 - 42 = 5..10, x 5..10.
  zs, ys, xs = np.nonzero(out["mask"])
  assert (zs.min(), zs.max(), ys.min(), ys.max(), xs.min(), xs.max()) == (2, 6, 5, 10, 5, 10)
  # Centred on the scan instead, the lesion is cut off entirely.
  centred = pp.preprocess_arrays(vol, (1, 1, 1), _geo_cfg(shape=(16, 16, 16)), mask)
  assert centred["mask"].sum() == 0


def test_crop_starts_and_crop_or_pad():
  assert pp.crop_starts((10,), (4,)) == (3,)
  assert pp.crop_starts((10,), (4,), center=(0.0,)) == (0,)        # clamped inside
  assert pp.crop_starts((10,), (4,), center=(9.0,)) == (6,)
  assert pp.crop_starts((2,), (6,), center=(0.0,)) == (-2,)        # floor(0 - 2.5 + 0.5)
  assert pp.crop_starts((2,), (6,), center=(-9.0,)) == (-4,)       # clamped: volume kept whole (-4..1)
  np.testing.assert_array_equal(pp.crop_or_pad(np.arange(3), (5,), (-1,), 9), [9, 0, 1, 2, 9])
  np.testing.assert_array_equal(pp.crop_or_pad(np.arange(5), (2,), (3,), 9), [3, 4])


def test_size_rules_follow_the_fit():
  c = _geo_cfg()
  # crop_or_pad pads any crop: 2 slices of 1.25 mm (LIDC-IDRI-0341_R_4) and one slice are kept
  # (before: "too small", under the 5 mm default of data.min_extent_mm).
  pp.check_geometry((2, 44, 44), (1.25, 0.6, 0.6), c, "thin.nii")
  pp.check_geometry((1, 44, 44), (2.5, 0.7, 0.7), c, "one.nii")
  # An explicit floor is compared with a tolerance: 4 x 1.25 mm (float32, as read from a header)
  # passes 5 mm (before: refused at the limit), 3 x 1.25 does not.
  floor = _geo_cfg(min_extent_mm=5.0)
  pp.check_geometry((4, 43, 43), np.array([1.25, 0.7, 0.7], np.float32) * np.float32(1 - 1e-7), floor, "4.nii")
  with pytest.raises(nifti.ScanError, match=r"^3.nii: too small: 3x43x43 voxels span 3.75 x"):
    pp.check_geometry((3, 43, 43), (1.25, 0.7, 0.7), floor, "3.nii")
  # resize: a 3-slice 2.5 mm crop at 1 mm (8 voxels) stretched to 200 voxels (25x) is refused.
  with pytest.raises(nifti.ScanError, match="stretched 25x"):
    pp.check_geometry((3, 44, 44), (2.5, 0.7, 0.7), _geo_cfg(shape=(200, 32, 32), fit="resize"), "r.nii")


def test_model_input_equals_the_stored_values():
  scan = nifti.Scan(_sphere_xyz(9.0, (0.8, 0.8, 1.5), (20, 20, 10)), np.array([0.8, 0.8, 1.5]), np.eye(4), "s")
  x = pp.model_input(scan, _geo_cfg(shape=(16, 16, 16)))
  assert x.dtype == np.float32 and x.shape == (16, 16, 16, 1)
  # Every value survives the trip through the stored dtype (float16) unchanged.
  np.testing.assert_array_equal(x.astype(np.float16).astype(np.float32), x)
  assert len(np.unique(x)) > 10


def test_to_scan_grid_inverts_the_geometry_of_a_mask():
  """A mask taken to the model's grid and back lands on the scan's own grid where it was: exactly when the
  geometry only crops / pads, closely after resampling to other millimetres or resizing."""
  import ml_collections
  from lungct.data import preprocess as pp
  zz, yy, xx = np.meshgrid(np.arange(12), np.arange(40), np.arange(36), indexing="ij")
  spacing = (2.5, 0.7, 0.7)                                   # (z, y, x) mm, an anisotropic crop
  sphere = (((zz - 6) * 2.5) ** 2 + ((yy - 21) * 0.7) ** 2 + ((xx - 17) * 0.7) ** 2 <= 8.0 ** 2).astype(np.uint8)
  cases = [({"shape": (16, 48, 48), "target_spacing": (), "fit": "crop_or_pad"}, 1.0),       # pad only: exact
           ({"shape": (32, 32, 32), "target_spacing": (1.0,), "fit": "crop_or_pad"}, 0.9),   # the nodule recipe
           ({"shape": (16, 32, 32), "target_spacing": (), "fit": "resize"}, 0.9)]
  for fields, min_dice in cases:
    cfg = ml_collections.ConfigDict({"hu_window": (-1000.0, 400.0), "crop_center": "center", **fields})
    model = pp.preprocess_mask(sphere, spacing, cfg)
    back = pp.to_scan_grid(model, sphere.shape, spacing, cfg)
    assert back.shape == sphere.shape and back.dtype == np.uint8
    dice = 2 * np.sum(back & sphere) / (back.sum() + sphere.sum())
    assert dice >= min_dice, (fields, dice)
    if min_dice == 1.0:
      np.testing.assert_array_equal(back, sphere)
  # A crop smaller than the scan: what lies outside the model's window comes back empty, the rest in place.
  cfg = ml_collections.ConfigDict({"hu_window": (-1000.0, 400.0), "crop_center": "center", "shape": (12, 20, 20),
                                   "target_spacing": (), "fit": "crop_or_pad"})
  full = np.ones_like(sphere)
  back = pp.to_scan_grid(pp.preprocess_mask(full, spacing, cfg), full.shape, spacing, cfg)
  assert back.sum() == 12 * 20 * 20 and back[:, 10:30, 8:28].all()
