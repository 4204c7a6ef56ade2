"""On-device 3D augmentation: pure, jit-able JAX functions on batches (B, D, H, W, C).

MONAI names: RandRotate (axial plane), RandFlip (left-right), RandScaleIntensity,
RandShiftIntensity. Each example draws its own parameters from `key`.

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


def augment_batch(key: jax.Array, images: jax.Array, cfg: Any,
                  masks: jax.Array | None = None) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Random axial rotation, left-right flip and intensity scale/shift per example.

  Args:
    key: PRNG key.
    images: (B, D, H, W, C) volumes.
    cfg: config.data.augment: enabled, max_rotate_deg, flip_lr, intensity_shift,
      intensity_scale (read at trace time; bind it with functools.partial under jit).
    masks: optional (B, D, H, W, C') label masks, given the same rotation (nearest
      neighbour) and flip, no intensity change.

  Returns:
    images (same shape and dtype), or (images, masks) when masks are given.
  """
  if not cfg.enabled:
    return images if masks is None else (images, masks)
  b = images.shape[0]
  k_rot, k_flip, k_scale, k_shift = jax.random.split(key, 4)
  dtype = images.dtype
  x = images.astype(jnp.float32)
  max_rad = jnp.deg2rad(float(cfg.max_rotate_deg))
  if float(cfg.max_rotate_deg) > 0:
    angles = jax.random.uniform(k_rot, (b,), minval=-max_rad, maxval=max_rad)
    x = jax.vmap(rotate_axial)(x, angles)
    if masks is not None:
      masks = jax.vmap(lambda m, a: rotate_axial(m, a, order=0))(masks, angles)
  if cfg.flip_lr:
    flips = jax.random.bernoulli(k_flip, 0.5, (b,))
    x = jax.vmap(flip_lr)(x, flips)
    if masks is not None:
      masks = jax.vmap(flip_lr)(masks, flips)
  bcast = (b,) + (1,) * (x.ndim - 1)
  if float(cfg.intensity_scale) > 0:
    s = float(cfg.intensity_scale)
    x = x * (1.0 + jax.random.uniform(k_scale, bcast, minval=-s, maxval=s))
  if float(cfg.intensity_shift) > 0:
    s = float(cfg.intensity_shift)
    x = x + jax.random.uniform(k_shift, bcast, minval=-s, maxval=s)
  x = x.astype(dtype)
  return x if masks is None else (x, masks)
