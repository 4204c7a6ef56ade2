"""On-device 3D augmentation: pure, jit-able JAX functions on batches (B, D, H, W, C).

MONAI names: RandRotate (axial plane), RandFlip (left-right, or any axis), RandRotate90
(axial plane, or the 24 rotations of a cube), RandZoom (scale jitter about the centre),
RandScaleIntensity, RandShiftIntensity. Each example draws its own parameters from `key`.
`cfg` is config.augment (see configs/default.py get_augment_config); keys missing from
it are off, so older configs keep working.

Geometry: a rotation by angle t moves the content at (h, w) to
c + R(t) ((h, w) - c), R(t) = [[cos t, -sin t], [sin t, cos t]], c the plane's centre;
so for t = 90 degrees a voxel at (c_h + k, c_w) lands at (c_h, c_w + k).
Outside the volume reads 0 (air after the lung window).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def rotate_axial(volume: jax.Array, angle: jax.Array, order: int = 1) -> jax.Array:
  """Rotates one (D, H, W, C) volume by `angle` radians in the (H, W) plane."""
  d, h, w, _ = volume.shape
  zz, hh, ww = jnp.meshgrid(jnp.arange(d, dtype=jnp.float32), jnp.arange(h, dtype=jnp.float32),
                            jnp.arange(w, dtype=jnp.float32), indexing="ij")
  ch, cw = (h - 1) / 2.0, (w - 1) / 2.0
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  # Output q samples the input at c + R^T (q - c).
  src_h = ch + cos * (hh - ch) + sin * (ww - cw)
  src_w = cw - sin * (hh - ch) + cos * (ww - cw)
  coords = [zz, src_h, src_w]

  def one_channel(x):
    return jax.scipy.ndimage.map_coordinates(x, coords, order=order, mode="constant", cval=0.0)

  out = jax.vmap(one_channel, in_axes=-1, out_axes=-1)(volume.astype(jnp.float32))
  return out.astype(volume.dtype)


def flip_lr(volume: jax.Array, flip: jax.Array) -> jax.Array:
  """Flips one (D, H, W, C) volume along W where `flip` (bool scalar) is True."""
  return jnp.where(flip, volume[:, :, ::-1, :], volume)


def scale_about_center(volume: jax.Array, scale: jax.Array, order: int = 1) -> jax.Array:
  """Zooms one (D, H, W, C) volume by `scale` about its centre (> 1 enlarges); outside reads 0."""
  shape = volume.shape[:3]
  grids = jnp.meshgrid(*[jnp.arange(n, dtype=jnp.float32) for n in shape], indexing="ij")
  coords = [(n - 1) / 2.0 + (g - (n - 1) / 2.0) / scale for g, n in zip(grids, shape)]

  def one_channel(x):
    return jax.scipy.ndimage.map_coordinates(x, coords, order=order, mode="constant", cval=0.0)

  out = jax.vmap(one_channel, in_axes=-1, out_axes=-1)(volume.astype(jnp.float32))
  return out.astype(volume.dtype)


def flip_axis(volume: jax.Array, flip: jax.Array, axis: int) -> jax.Array:
  """Flips one (D, H, W, C) volume along spatial `axis` (0 = D, 1 = H, 2 = W) where `flip`."""
  return jnp.where(flip, jnp.flip(volume, axis=axis), volume)


# The 6 orders of the spatial axes; with a flip of every axis they give all 48 symmetries
# of a cube, among them its 24 rotations.
_PERMS = ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))


def rot90_axial(volume: jax.Array, k: jax.Array) -> jax.Array:
  """Rotates one (D, H, W, C) volume by k * 90 degrees in the (H, W) plane (H == W)."""
  return jax.lax.switch(k % 4, [lambda v, i=i: jnp.rot90(v, i, axes=(1, 2)) for i in range(4)], volume)


def permute_axes(volume: jax.Array, p: jax.Array) -> jax.Array:
  """Reorders the spatial axes of one (D, D, D, C) volume by `_PERMS[p]`."""
  return jax.lax.switch(p, [lambda v, q=q: jnp.transpose(v, q + (3,)) for q in _PERMS], volume)


def _rot90_cube(volume: jax.Array, p: jax.Array, flips: jax.Array) -> jax.Array:
  """A random rotation of the cube: an axis order times flips whose parity makes it proper."""
  v = permute_axes(volume, p)
  for a in range(3):
    v = flip_axis(v, flips[a], a)
  return v


def augment_batch(key: jax.Array, images: jax.Array, cfg: Any,
                  masks: jax.Array | None = None) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Random axial rotation, left-right flip and intensity scale/shift per example.

  Args:
    key: PRNG key.
    images: (B, D, H, W, C) volumes.
    cfg: config.augment: enabled, max_rotate_deg, flip_lr, flip_axes, rot90,
      scale_jitter, intensity_shift, intensity_scale (read at trace time; bind it with
      functools.partial under jit).
    masks: optional (B, D, H, W, C') label masks, given the same rotation (nearest
      neighbour) and flip, no intensity change.

  Returns:
    images (same shape and dtype), or (images, masks) when masks are given.
  """
  if not cfg.enabled:
    return images if masks is None else (images, masks)
  b = images.shape[0]
  k_rot, k_flip, k_scale, k_shift, k_axes, k_r90, k_zoom = jax.random.split(key, 7)
  dtype = images.dtype
  x = images.astype(jnp.float32)
  max_deg = float(cfg.get("max_rotate_deg", 0.0) or 0.0)
  max_rad = jnp.deg2rad(max_deg)
  if max_deg > 0:
    angles = jax.random.uniform(k_rot, (b,), minval=-max_rad, maxval=max_rad)
    x = jax.vmap(rotate_axial)(x, angles)
    if masks is not None:
      masks = jax.vmap(lambda m, a: rotate_axial(m, a, order=0))(masks, angles)
  if cfg.get("flip_lr", False):
    flips = jax.random.bernoulli(k_flip, 0.5, (b,))
    x = jax.vmap(flip_lr)(x, flips)
    if masks is not None:
      masks = jax.vmap(flip_lr)(masks, flips)
  flip_axes = tuple(int(a) for a in (cfg.get("flip_axes", ()) or ()))
  if flip_axes:
    flips = jax.random.bernoulli(k_axes, 0.5, (b, len(flip_axes)))
    for j, a in enumerate(flip_axes):
      x = jax.vmap(lambda v, f, a=a: flip_axis(v, f, a))(x, flips[:, j])
      if masks is not None:
        masks = jax.vmap(lambda v, f, a=a: flip_axis(v, f, a))(masks, flips[:, j])
  rot90 = cfg.get("rot90", "none") or "none"
  if rot90 == "axial":
    if x.shape[2] != x.shape[3]:
      raise ValueError(f"augment.rot90='axial' needs H == W, got {x.shape[1:4]}")
    ks = jax.random.randint(k_r90, (b,), 0, 4)
    x = jax.vmap(rot90_axial)(x, ks)
    if masks is not None:
      masks = jax.vmap(rot90_axial)(masks, ks)
  elif rot90 == "all":
    if not x.shape[1] == x.shape[2] == x.shape[3]:
      raise ValueError(f"augment.rot90='all' needs D == H == W, got {x.shape[1:4]}")
    k_p, k_f = jax.random.split(k_r90)
    perms = jax.random.randint(k_p, (b,), 0, len(_PERMS))
    flips = jax.random.bernoulli(k_f, 0.5, (b, 3))
    # An odd axis order is a reflection; flipping an odd number of axes undoes it.
    odd = jnp.asarray([0, 1, 1, 0, 0, 1])[perms].astype(bool)
    parity = jnp.logical_xor(jnp.logical_xor(flips[:, 0], flips[:, 1]), flips[:, 2])
    flips = flips.at[:, 2].set(jnp.where(parity != odd, ~flips[:, 2], flips[:, 2]))
    x = jax.vmap(_rot90_cube)(x, perms, flips)
    if masks is not None:
      masks = jax.vmap(_rot90_cube)(masks, perms, flips)
  elif rot90 != "none":
    raise ValueError(f"augment.rot90 must be none | axial | all, got {rot90!r}")
  jitter = float(cfg.get("scale_jitter", 0.0) or 0.0)
  if jitter > 0:
    scales = jax.random.uniform(k_zoom, (b,), minval=1.0 - jitter, maxval=1.0 + jitter)
    x = jax.vmap(scale_about_center)(x, scales)
    if masks is not None:
      masks = jax.vmap(lambda m, s: scale_about_center(m, s, order=0))(masks, scales)
  bcast = (b,) + (1,) * (x.ndim - 1)
  if float(cfg.get("intensity_scale", 0.0) or 0.0) > 0:
    s = float(cfg.intensity_scale)
    x = x * (1.0 + jax.random.uniform(k_scale, bcast, minval=-s, maxval=s))
  if float(cfg.get("intensity_shift", 0.0) or 0.0) > 0:
    s = float(cfg.intensity_shift)
    x = x + jax.random.uniform(k_shift, bcast, minval=-s, maxval=s)
  x = x.astype(dtype)
  return x if masks is None else (x, masks)
