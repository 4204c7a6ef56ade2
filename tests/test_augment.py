"""On-device 3D augmentation: identities, exact flips, a 90-degree rotation, jit."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lungct.data import augment


def cfg(**kw):
  c = ml_collections.ConfigDict(dict(enabled=True, max_rotate_deg=0.0, flip_lr=False,
                                     intensity_shift=0.0, intensity_scale=0.0))
  c.update(kw)
  return c


def volumes(b=2, shape=(4, 9, 9)):
  rng = np.random.default_rng(0)
  return jnp.asarray(rng.uniform(size=(b,) + shape + (1,)), jnp.float32)


def test_no_op_config_is_identity():
  x = volumes()
  out = augment.augment_batch(jax.random.key(0), x, cfg())
  np.testing.assert_array_equal(out, x)
  out = augment.augment_batch(jax.random.key(0), x, cfg(enabled=False, max_rotate_deg=30.0,
                                                         flip_lr=True, intensity_shift=0.5))
  np.testing.assert_array_equal(out, x)


def test_flip_twice_is_identity_and_flip_reverses_w():
  x = volumes(b=1)[0]
  once = augment.flip_lr(x, jnp.array(True))
  np.testing.assert_array_equal(once[:, :, 0], x[:, :, -1])
  np.testing.assert_array_equal(augment.flip_lr(once, jnp.array(True)), x)
  np.testing.assert_array_equal(augment.flip_lr(x, jnp.array(False)), x)


def test_random_flip_flips_some_examples_exactly():
  x = volumes(b=16)
  out = np.asarray(augment.augment_batch(jax.random.key(1), x, cfg(flip_lr=True)))
  flipped = [np.array_equal(out[i], np.asarray(x)[i, :, :, ::-1]) for i in range(16)]
  same = [np.array_equal(out[i], np.asarray(x)[i]) for i in range(16)]
  assert all(f or s for f, s in zip(flipped, same))
  assert 0 < sum(flipped) < 16


def test_rotation_90_moves_marker():
  x = np.zeros((1, 3, 9, 9, 1), np.float32)
  x[0, 1, 4 + 3, 4, 0] = 1.0  # 3 voxels below the centre (4, 4) along H.
  out = np.asarray(augment.rotate_axial(jnp.asarray(x[0]), jnp.deg2rad(90.0)))
  d, h, w, _ = np.unravel_index(np.argmax(out), out.shape)
  assert (d, h, w) == (1, 4, 7)  # (c_h + 3, c_w) -> (c_h, c_w + 3)
  assert abs(out.max() - 1.0) < 1e-4 and abs(out.sum() - 1.0) < 1e-4
  # Through augment_batch: max 90 deg draws an angle in [-90, 90]; the marker stays at radius 3.
  out = np.asarray(augment.augment_batch(jax.random.key(3), jnp.asarray(x), cfg(max_rotate_deg=90.0)))
  ys, xs = np.nonzero(out[0, 1, :, :, 0] > 0.05)
  r = np.hypot(ys - 4, xs - 4)
  assert np.all(np.abs(r - 3.0) <= 1.0)
  np.testing.assert_allclose(out.sum(), 1.0, atol=0.05)


def test_intensity_range_shape_dtype_and_jit():
  x = jnp.full((4, 2, 6, 6, 1), 0.5, jnp.bfloat16)
  c = cfg(max_rotate_deg=10.0, flip_lr=True, intensity_shift=0.1, intensity_scale=0.2)
  fn = jax.jit(functools.partial(augment.augment_batch, cfg=c))
  out = fn(jax.random.key(0), x)
  assert out.shape == x.shape and out.dtype == jnp.bfloat16
  centre = np.asarray(out[:, 1, 3, 3, 0], np.float32)
  # 0.5 * (1 +- 0.2) +- 0.1 lies in [0.3, 0.7]; examples differ.
  assert np.all((centre >= 0.29) & (centre <= 0.71)) and len(set(centre.tolist())) > 1
  np.testing.assert_array_equal(fn(jax.random.key(0), x), out)


def test_masks_follow_geometry_not_intensity():
  m = np.zeros((2, 2, 9, 9, 1), np.uint8)
  m[:, :, 2:5, 1:3] = 1
  x = jnp.asarray(m, jnp.float32)
  c = cfg(max_rotate_deg=45.0, flip_lr=True, intensity_scale=0.3)
  _, mask = augment.augment_batch(jax.random.key(2), x, c, masks=jnp.asarray(m))
  assert mask.dtype == jnp.uint8 and mask.shape == m.shape
  assert set(np.unique(np.asarray(mask)).tolist()) == {0, 1}
  # Same key, no intensity change: the same angles and flips on the image, linearly
  # interpolated. The nearest-neighbour mask agrees wherever the image is clearly in or out.
  ref = np.asarray(augment.augment_batch(jax.random.key(2), x, cfg(max_rotate_deg=45.0, flip_lr=True)))
  mask = np.asarray(mask)
  assert np.all(mask[ref > 0.75] == 1) and np.all(mask[ref < 0.25] == 0)
  assert not np.array_equal(mask, m)  # it did move


def _rotations_24(v):
  """The 24 proper rotations of a cube-shaped (D, H, W) array, by numpy."""
  out = []
  for axes in ((0, 1, 2), (1, 2, 0), (2, 0, 1)):  # Which axis points "up".
    u = np.transpose(v, axes)
    for up in (u, np.rot90(u, 2, axes=(0, 1))):
      for k in range(4):
        out.append(np.rot90(up, k, axes=(1, 2)))
  return out


def test_flip_axes_flip_exactly_along_each_axis():
  x = volumes(b=16, shape=(4, 5, 6))
  out = np.asarray(augment.augment_batch(jax.random.key(4), x, cfg(flip_axes=(0,))))
  xs = np.asarray(x)
  flipped = [np.array_equal(out[i], xs[i, ::-1]) for i in range(16)]
  assert all(f or np.array_equal(out[i], xs[i]) for i, f in enumerate(flipped))
  assert 0 < sum(flipped) < 16


def test_rot90_axial_and_all_are_exact_rotations():
  x = volumes(b=12, shape=(5, 5, 5))
  xs = np.asarray(x)[..., 0]
  axial = np.asarray(augment.augment_batch(jax.random.key(5), x, cfg(rot90="axial")))[..., 0]
  for i in range(12):
    assert any(np.array_equal(axial[i], np.rot90(xs[i], k, axes=(1, 2))) for k in range(4))
  full = np.asarray(augment.augment_batch(jax.random.key(6), x, cfg(rot90="all")))[..., 0]
  seen = set()
  for i in range(12):
    matches = [j for j, r in enumerate(_rotations_24(xs[i])) if np.array_equal(full[i], r)]
    assert matches, "not a proper rotation (a reflection or a resampled volume)"
    seen.add(matches[0])
  assert len(seen) > 3  # Different examples draw different rotations.
  import pytest  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="D == H == W"):
    augment.augment_batch(jax.random.key(0), volumes(b=1, shape=(4, 5, 5)), cfg(rot90="all"))


def test_scale_jitter_moves_a_marker_radially():
  x = np.zeros((9, 9, 9, 1), np.float32)
  x[4, 4, 6, 0] = 1.0  # 2 voxels right of the centre (4, 4, 4).
  out = np.asarray(augment.scale_about_center(jnp.asarray(x), jnp.float32(1.5), order=0))
  # Zoom 1.5: output (4, 4, 7) samples input 4 + 3 / 1.5 = 6 -> the marker lands 3 voxels out.
  assert out[4, 4, 7, 0] == 1.0 and out[4, 4, 6, 0] == 0.0
  c = cfg(scale_jitter=0.2)
  outs = np.asarray(augment.augment_batch(jax.random.key(7), jnp.asarray(np.stack([x] * 8)), c))
  for o in outs:  # linear interpolation: the mass centre sits at 2 * s, s in [0.8, 1.2]
    w = np.arange(9)
    com = (o[..., 0].sum((0, 1)) * w).sum() / o.sum()
    assert 4 + 2 * 0.8 - 0.05 <= com <= 4 + 2 * 1.2 + 0.05


# The implementation before flips/rotations became one gather and the zoom three matrix products: per-example
# jnp.flip/transpose selected by jnp.where / lax.switch, the zoom by map_coordinates. Kept as the reference.

def _reference_augment(key, images, c, masks):
  b = images.shape[0]
  _, k_flip, _, _, k_axes, k_r90, k_zoom = jax.random.split(key, 7)
  x = images.astype(jnp.float32)
  flip = lambda v, f, a: jnp.where(f, jnp.flip(v, axis=a), v)  # noqa: E731
  both = lambda fn, *args: (jax.vmap(fn)(x, *args), jax.vmap(fn)(masks, *args))  # noqa: E731
  if c.flip_lr:
    x, masks = both(lambda v, f: flip(v, f, 2), jax.random.bernoulli(k_flip, 0.5, (b,)))
  flips = jax.random.bernoulli(k_axes, 0.5, (b, len(c.flip_axes)))
  for j, a in enumerate(c.flip_axes):
    x, masks = both(lambda v, f, a=a: flip(v, f, a), flips[:, j])
  if c.rot90 == "axial":
    ks = jax.random.randint(k_r90, (b,), 0, 4)
    x, masks = both(lambda v, k: jax.lax.switch(k, [lambda v, i=i: jnp.rot90(v, i, axes=(1, 2))
                                                    for i in range(4)], v), ks)
  elif c.rot90 == "all":
    k_p, k_f = jax.random.split(k_r90)
    perms = jax.random.randint(k_p, (b,), 0, 6)
    fl = jax.random.bernoulli(k_f, 0.5, (b, 3))
    odd = jnp.asarray([0, 1, 1, 0, 0, 1])[perms].astype(bool)
    parity = fl[:, 0] ^ fl[:, 1] ^ fl[:, 2]
    fl = fl.at[:, 2].set(jnp.where(parity != odd, ~fl[:, 2], fl[:, 2]))

    def cube(v, p, f):
      v = jax.lax.switch(p, [lambda v, q=q: jnp.transpose(v, q + (3,)) for q in augment._PERMS], v)
      for a in range(3):
        v = flip(v, f[a], a)
      return v
    x, masks = both(cube, perms, fl)
  scales = jax.random.uniform(k_zoom, (b,), minval=1.0 - c.scale_jitter, maxval=1.0 + c.scale_jitter)

  def zoom(v, s, order):
    grids = jnp.meshgrid(*[jnp.arange(n, dtype=jnp.float32) for n in v.shape[:3]], indexing="ij")
    coords = [(n - 1) / 2.0 + (g - (n - 1) / 2.0) / s for g, n in zip(grids, v.shape[:3])]
    one = lambda u: jax.scipy.ndimage.map_coordinates(u, coords, order=order, mode="constant")  # noqa: E731
    return jax.vmap(one, in_axes=-1, out_axes=-1)(v.astype(jnp.float32)).astype(v.dtype)
  return jax.vmap(lambda v, s: zoom(v, s, 1))(x, scales), jax.vmap(lambda v, s: zoom(v, s, 0))(masks, scales)


def test_flips_rotations_and_zoom_equal_the_per_voxel_reference():
  """One gather + separable zoom give the reference's volumes (float rounding) and masks (exactly), same key."""
  rng = np.random.default_rng(0)
  for shape, kw in [((6, 6, 6), dict(flip_lr=True, flip_axes=(0, 1, 2), rot90="all", scale_jitter=0.2)),
                    ((5, 7, 7), dict(flip_lr=True, flip_axes=(1,), rot90="axial", scale_jitter=0.4)),
                    ((4, 5, 6), dict(flip_lr=False, flip_axes=(2, 0), rot90="none", scale_jitter=0.5))]:
    x = jnp.asarray(rng.uniform(size=(12,) + shape + (1,)), jnp.float32)
    m = jnp.asarray(rng.uniform(size=(12,) + shape + (1,)) > 0.5, jnp.uint8)
    c = cfg(**kw)
    for seed in (0, 1):
      out, mask = augment.augment_batch(jax.random.key(seed), x, c, masks=m)
      ref, ref_mask = _reference_augment(jax.random.key(seed), x, c, m)
      np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6)
      np.testing.assert_array_equal(mask, ref_mask)
      assert not np.allclose(out, x)  # it did move


def test_zoom_matrix_by_hand():
  """Zoom 2 of a length-5 axis about its centre 2: output i samples 2 + (i - 2) / 2."""
  m = np.asarray(augment._interpolation_matrix(5, jnp.float32(2.0), 1))
  expected = np.zeros((5, 5))
  expected[0, 1] = 1.0                        # samples 1.0
  expected[1, 1], expected[1, 2] = 0.5, 0.5   # samples 1.5
  expected[2, 2] = 1.0
  expected[3, 2], expected[3, 3] = 0.5, 0.5
  expected[4, 3] = 1.0
  np.testing.assert_allclose(m, expected, atol=1e-7)
  m = np.asarray(augment._interpolation_matrix(5, jnp.float32(0.5), 1))  # shrink: samples -2, 0, 2, 4, 6
  np.testing.assert_array_equal(m, np.eye(5)[[0, 2, 4]][[0, 0, 1, 2, 2]] * [[0], [1], [1], [1], [0]])


def _reference_rotate_axial(volume, angle, order=1):
  """The rotation before it became one 2D gather: map_coordinates over (D, H, W). Kept as the reference."""
  d, h, w, _ = volume.shape
  zz, hh, ww = jnp.meshgrid(jnp.arange(d, dtype=jnp.float32), jnp.arange(h, dtype=jnp.float32),
                            jnp.arange(w, dtype=jnp.float32), indexing="ij")
  ch, cw = (h - 1) / 2.0, (w - 1) / 2.0
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  coords = [zz, ch + cos * (hh - ch) + sin * (ww - cw), cw - sin * (hh - ch) + cos * (ww - cw)]
  one = lambda u: jax.scipy.ndimage.map_coordinates(u, coords, order=order, mode="constant", cval=0.0)  # noqa: E731
  return jax.vmap(one, in_axes=-1, out_axes=-1)(volume.astype(jnp.float32)).astype(volume.dtype)


def test_axial_rotation_equals_map_coordinates():
  """The 2D gather gives map_coordinates' values (order 1, float rounding) and masks (order 0, exactly), for
  angles that put corners outside the volume, non-square planes and two channels."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(size=(3, 7, 9, 2)), jnp.float32)
  m = jnp.asarray(rng.uniform(size=(3, 7, 9, 1)) > 0.5, jnp.uint8)
  for deg in (-37.0, -10.0, 0.0, 4.5, 90.0, 180.0):
    a = jnp.deg2rad(deg)
    np.testing.assert_allclose(augment.rotate_axial(x, a), _reference_rotate_axial(x, a), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(augment.rotate_axial(m, a, order=0), _reference_rotate_axial(m, a, order=0))
