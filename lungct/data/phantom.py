"""Synthetic chest-CT phantoms with realistic Hounsfield units.

Each phantom is drawn from `np.random.default_rng(seed)`: air outside
(-1000 HU), an elliptical body of soft tissue (~40 HU) under a fat layer
(~-100 HU), spine, sternum and ribs (bone, several hundred HU), a heart, a
table, two lungs (~-850 HU with texture and a gravity gradient) holding
branching vessel trees that thin toward the periphery, and Gaussian noise.
Normal scans also carry look-alikes that are not lesions: vessels seen
end-on, occasional calcified granulomas and dependent (posterior) density.

Grades 1..4 add lesions inside the lungs with a growing burden (fraction of
lung volume): ground-glass opacities (blurry blobs, about -550..-300 HU) and
solid nodules (spheres of 5-15 mm, about +20 HU). `Phantom.mask` marks them.

All sizes are in mm and scale with the field of view (shape * spacing).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np

from lungct.data import nifti

NUM_GRADES = 5
# Lesion burden, fraction of lung volume, drawn uniformly per grade.
BURDEN = {1: (0.004, 0.03), 2: (0.04, 0.10), 3: (0.10, 0.22), 4: (0.22, 0.40)}
# Ground-glass blob radius (mm) per grade.
GGO_RADIUS_MM = {1: (5.0, 12.0), 2: (9.0, 20.0), 3: (13.0, 28.0), 4: (17.0, 36.0)}
# Number of solid nodules per grade (low, high inclusive) and diameter (mm).
NODULES = {1: (0, 2), 2: (0, 3), 3: (1, 5), 4: (2, 8)}
NODULE_DIAMETER_MM = (5.0, 15.0)
AIR_HU = -1000.0


@dataclasses.dataclass(frozen=True, eq=False)
class Phantom:
  """A synthetic CT: hu float32 (x, y, z) HU, mask uint8 (x, y, z) lesions, lung uint8 (x, y, z)."""
  hu: np.ndarray
  mask: np.ndarray
  spacing: np.ndarray
  grade: int
  affine: np.ndarray
  lung: np.ndarray | None = None  # uint8 (x, y, z) lung mask (an extra, for checks).

  @property
  def label(self) -> int:
    return int(self.grade > 0)


def _axes_mm(shape: Sequence[int], spacing: Sequence[float]) -> list[np.ndarray]:
  """Voxel-centre coordinates (mm) per axis, centred on 0."""
  return [((np.arange(n) - (n - 1) / 2.0) * s).astype(np.float32) for n, s in zip(shape, spacing)]


def _affine(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
  aff = np.diag([*map(float, spacing), 1.0])
  aff[:3, 3] = -0.5 * (np.asarray(shape) - 1) * np.asarray(spacing, dtype=np.float64)
  return aff


def _upsample_linear(a: np.ndarray, axis: int, n_out: int) -> np.ndarray:
  """Linear interpolation of `a` along `axis` to n_out samples (corner aligned)."""
  n_in = a.shape[axis]
  pos = np.linspace(0.0, n_in - 1.0, n_out)
  lo = np.minimum(np.floor(pos).astype(np.intp), n_in - 2)
  frac = (pos - lo).astype(np.float32).reshape([-1 if i == axis else 1 for i in range(a.ndim)])
  a0, a1 = np.take(a, lo, axis=axis), np.take(a, lo + 1, axis=axis)
  a1 -= a0
  a1 *= frac
  a0 += a1
  return a0


def _smooth_noise(rng: np.random.Generator, shape: Sequence[int], spacing: Sequence[float],
                  cell_mm: float) -> np.ndarray:
  """Zero-mean, unit-std noise smooth on the scale `cell_mm` (separable linear upsampling)."""
  low = [max(2, int(np.ceil(n * s / cell_mm)) + 1) for n, s in zip(shape, spacing)]
  out = rng.standard_normal(low, dtype=np.float32)
  out = (out - out.mean()) / (out.std() + 1e-6)
  # Upsample the largest output last, so most work happens on small arrays.
  for axis in np.argsort(np.asarray(shape) / np.asarray(low)):
    out = _upsample_linear(out, int(axis), int(shape[axis]))
  # Linear interpolation keeps 2/3 of the variance per axis; back to ~unit std.
  out *= np.float32(1.5 ** 1.5)
  return out


def _bbox(lo_mm, hi_mm, axes) -> tuple[slice, ...] | None:
  """Voxel slices covering [lo_mm, hi_mm] per axis, or None if outside."""
  sl = []
  for lo, hi, ax in zip(lo_mm, hi_mm, axes):
    i0 = int(np.searchsorted(ax, lo, side="left"))
    i1 = int(np.searchsorted(ax, hi, side="right"))
    if i1 <= i0:
      return None
    sl.append(slice(i0, i1))
  return tuple(sl)


def _grid(sl, axes):
  return [ax[s].reshape([-1 if i == j else 1 for j in range(3)]) for i, (ax, s) in enumerate(zip(axes, sl))]


def _render_tube(occ, p, q, r, axes, w):
  """Max-composites a partial-volume tube (segment p->q, radius r mm) into occ."""
  pad = r + w
  sl = _bbox(np.minimum(p, q) - pad, np.maximum(p, q) + pad, axes)
  if sl is None:
    return
  gx, gy, gz = _grid(sl, axes)
  d = q - p
  dd = float(d @ d) + 1e-9
  vx, vy, vz = gx - p[0], gy - p[1], gz - p[2]
  t = np.clip((vx * d[0] + vy * d[1] + vz * d[2]) / dd, 0.0, 1.0)
  dist = np.sqrt((vx - t * d[0]) ** 2 + (vy - t * d[1]) ** 2 + (vz - t * d[2]) ** 2)
  val = np.clip((r - dist) / w + 0.5, 0.0, 1.0) * min(1.0, 2.0 * r / w)
  np.maximum(occ[sl], val, out=occ[sl])


def _random_perp(rng, d):
  v = rng.standard_normal(3)
  v -= (v @ d) * d
  return v / (np.linalg.norm(v) + 1e-9)


def _vessel_tree(rng, hilum_u, center, radii, side, generations):
  """Segments (p_mm, q_mm, radius_mm) of a branching tree in one lung.

  Built in unit-ball lung coordinates u (mm = center + u * radii) so that it
  fills the lung whatever its size; branches turn back toward the centre
  near the pleura.
  """
  segs = []
  root_dirs = [(0.1 * side, 0.0, 1.0), (0.1 * side, 0.0, -1.0), (1.0 * side, 0.3, 0.2),
               (0.6 * side, -0.8, -0.1), (0.6 * side, 0.8, -0.1)]
  stack = []
  r0 = rng.uniform(4.0, 5.5)
  for d in root_dirs:
    d = np.asarray(d) + 0.25 * rng.standard_normal(3)
    stack.append((np.asarray(hilum_u), d / np.linalg.norm(d), rng.uniform(0.35, 0.5), r0, 0))
  while stack:
    p, d, length, r, gen = stack.pop()
    q = p + d * length
    n = np.linalg.norm(q)
    if n > 0.95:  # Stay inside the lung.
      q = q * (0.95 / n)
    segs.append((center + p * radii, center + q * radii, r))
    if gen + 1 >= generations:
      continue
    inward = -q / (np.linalg.norm(q) + 1e-9)
    for sgn in (1.0, -1.0):
      angle = np.deg2rad(rng.uniform(20.0, 45.0))
      nd = np.cos(angle) * d + sgn * np.sin(angle) * _random_perp(rng, d)
      if np.linalg.norm(q) > 0.7:
        nd = nd + 0.8 * inward
      nd /= np.linalg.norm(nd)
      stack.append((q, nd, length * rng.uniform(0.65, 0.8), r * rng.uniform(0.68, 0.8), gen + 1))
  return segs


def make_phantom(seed: int, grade: int, *, shape_xyz: Sequence[int] = (128, 128, 64),
                 spacing: Sequence[float] = (2.5, 2.5, 5.0)) -> Phantom:
  """A synthetic chest CT; deterministic in (seed, grade, shape_xyz, spacing).

  Args:
    seed: anatomy, lesions and noise all come from default_rng(seed).
    grade: 0 normal, 1..4 increasing lesion burden.
    shape_xyz: volume shape (x, y, z), RAS.
    spacing: voxel size (sx, sy, sz) in mm.

  Returns:
    Phantom with hu float32 (x, y, z), mask uint8 (x, y, z) (1 = lesion).
  """
  grade = int(grade)
  if not 0 <= grade < NUM_GRADES:
    raise ValueError(f"grade must be in 0..{NUM_GRADES - 1}, got {grade}")
  shape = tuple(int(n) for n in shape_xyz)
  spacing = np.asarray(spacing, dtype=np.float64)
  if len(shape) != 3 or spacing.shape != (3,):
    raise ValueError(f"shape_xyz {shape} and spacing {spacing.tolist()} must have 3 values")
  rng = np.random.default_rng(seed)
  axes = _axes_mm(shape, spacing)
  fov = np.asarray(shape) * spacing
  x2, y2 = axes[0][:, None], axes[1][None, :]
  z1 = axes[2]

  # --- Body (2D cross-section, constant along z): fat, muscle, bones, table.
  ax_ = fov[0] * rng.uniform(0.38, 0.46)
  ay_ = ax_ * rng.uniform(0.65, 0.78)
  cx, cy = fov[0] * rng.uniform(-0.03, 0.03), -fov[1] * rng.uniform(0.0, 0.05)
  fat = rng.uniform(0.05, 0.12) * ay_
  rho_body = np.sqrt(((x2 - cx) / ax_) ** 2 + ((y2 - cy) / ay_) ** 2)
  rho_inner = np.sqrt(((x2 - cx) / (ax_ - fat)) ** 2 + ((y2 - cy) / (ay_ - fat)) ** 2)
  body2d = rho_body <= 1.0
  base = np.full(body2d.shape, AIR_HU, np.float32)
  base[body2d] = rng.uniform(-110.0, -90.0)
  base[rho_inner <= 1.0] = rng.uniform(35.0, 50.0)
  spine_y = cy - ay_ + fat + 0.28 * ay_
  spine_r = 0.16 * ay_
  spine2d = (x2 - cx) ** 2 + (y2 - spine_y) ** 2 <= spine_r ** 2
  cord2d = (x2 - cx) ** 2 + (y2 - (spine_y - 0.9 * spine_r)) ** 2 <= (0.35 * spine_r) ** 2
  sternum2d = ((x2 - cx) / (0.12 * ax_)) ** 2 + ((y2 - (cy + ay_ - fat - 0.07 * ay_)) / (0.05 * ay_)) ** 2 <= 1
  table_top = cy - ay_ - rng.uniform(3.0, 12.0)
  table2d = (np.abs(x2 - cx) < 1.1 * ax_) & (y2 < table_top) & (y2 > table_top - 10.0)
  base[table2d] = 60.0
  # Ribs: spots on the chest wall, present in slabs of z (label map -> z-profile).
  n_ribs = 8
  rib_label = np.zeros(body2d.shape, np.int16)
  angles = np.deg2rad(np.array([25, 55, 90, 125, 155, 205, 240, 300, 335, 270][:n_ribs]) + rng.uniform(-8, 8, n_ribs))
  rib_r = 0.045 * ay_
  rib_ring = ax_ - fat - 1.5 * rib_r, ay_ - fat - 1.5 * rib_r
  for k, a in enumerate(angles):
    rxk, ryk = cx + rib_ring[0] * np.cos(a), cy + rib_ring[1] * np.sin(a)
    if abs(np.sin(a)) > 0.97:  # Not on the spine or sternum.
      continue
    rib_label[((x2 - rxk) ** 2 + (y2 - ryk) ** 2) <= rib_r ** 2] = k + 1
  rib_period = rng.uniform(28.0, 36.0)
  phases = rng.uniform(0.0, 1.0, n_ribs + 1)
  rib_z = np.sin(2 * np.pi * (z1[None, :] / rib_period + phases[:, None])) > 0.2
  rib_z[0] = False
  disc_z = np.sin(2 * np.pi * (z1 / rng.uniform(24.0, 30.0) + rng.uniform())) > -0.8

  hu = np.repeat(base[:, :, None], shape[2], axis=2)
  hu[spine2d] = np.where(disc_z, rng.uniform(250.0, 400.0), 80.0).astype(np.float32)
  hu[cord2d] = 30.0
  hu[sternum2d] = rng.uniform(300.0, 500.0)
  rib_hu = np.float32(rng.uniform(400.0, 700.0))
  for k in range(1, n_ribs + 1):
    pix = rib_label == k
    if pix.any():
      hu[pix] = np.where(rib_z[k], rib_hu, hu[pix])

  # --- Lungs: two perturbed ellipsoids (computed in their boxes), minus the heart.
  lz = fov[2] * rng.uniform(-0.05, 0.05)
  rz = fov[2] * rng.uniform(0.34, 0.42)
  coarse = _smooth_noise(rng, shape, spacing, cell_mm=40.0)
  lungs = []
  lung = np.zeros(shape, bool)
  rho_lung = np.full(shape, np.inf, np.float32)
  for side in (-1.0, 1.0):
    dx = ax_ * rng.uniform(0.44, 0.50)
    rx = min(ax_ * rng.uniform(0.34, 0.40), ax_ - fat - dx - 0.07 * ax_)
    ry = (ay_ - fat) * rng.uniform(0.70, 0.80)
    center = np.array([cx + side * dx, cy + rng.uniform(0.0, 0.12) * ay_, lz + rng.uniform(-0.03, 0.03) * fov[2]])
    radii = np.array([rx, ry, rz * rng.uniform(0.92, 1.0)])
    lungs.append((center, radii, side))
    sl = _bbox(center - 1.3 * radii, center + 1.3 * radii, axes)
    if sl is None:
      continue
    gx, gy, gz = _grid(sl, axes)
    r2 = ((gx - center[0]) / radii[0]) ** 2 + ((gy - center[1]) / radii[1]) ** 2 + ((gz - center[2]) / radii[2]) ** 2
    rho = np.sqrt(np.maximum(r2 + 0.12 * coarse[sl], 0.0))
    inside = rho < 1.0
    lung[sl] |= inside
    np.minimum(rho_lung[sl], np.where(inside, rho, np.inf), out=rho_lung[sl])
  heart_c = np.array([cx + 0.12 * ax_, cy + 0.25 * ay_, lz - 0.35 * rz])
  heart_r = np.array([0.38 * ax_, 0.45 * ay_, 0.35 * rz])
  sl = _bbox(heart_c - heart_r, heart_c + heart_r, axes)
  if sl is not None:
    gx, gy, gz = _grid(sl, axes)
    lung[sl] &= (((gx - heart_c[0]) / heart_r[0]) ** 2 + ((gy - heart_c[1]) / heart_r[1]) ** 2 +
                 ((gz - heart_c[2]) / heart_r[2]) ** 2) > 1.0

  # Parenchyma: texture plus a gravity gradient (posterior = low y denser).
  texture = _smooth_noise(rng, shape, spacing, cell_mm=8.0)
  prof_y = (rng.uniform(-875.0, -845.0) - rng.uniform(10.0, 30.0) * (axes[1] - cy) / ay_).astype(np.float32)
  if rng.uniform() < 0.35:  # Dependent density: a posterior band, not a lesion.
    y_band = cy - rng.uniform(0.25, 0.45) * ay_
    prof_y += np.clip((y_band - axes[1]) / 12.0, 0.0, 1.0) * np.float32(rng.uniform(80.0, 200.0))
  lung_vox = np.nonzero(lung)
  hu[lung_vox] = prof_y[lung_vox[1]] + np.float32(rng.uniform(15.0, 30.0)) * texture[lung_vox]

  # --- Lesions (grade >= 1): occupancy and target HU, composited by max.
  les_occ = np.zeros(shape, np.float32)
  les_hu = np.zeros(shape, np.float32)
  lung_idx = np.flatnonzero(lung)
  w_pv = float(np.mean(spacing[:2]))  # Partial-volume edge width, mm.

  def _coords(flat):
    return np.array([axes[i][j] for i, j in enumerate(np.unravel_index(flat, shape))])

  def _add(occ_val, sl, target):
    # Returns the change in lesion voxel count (inside the lung).
    old = np.count_nonzero((les_occ[sl] >= 0.5) & lung[sl])
    upd = occ_val > les_occ[sl]
    les_hu[sl] = np.where(upd, target, les_hu[sl])
    np.maximum(les_occ[sl], occ_val, out=les_occ[sl])
    return np.count_nonzero((les_occ[sl] >= 0.5) & lung[sl]) - old

  def _ggo(c, r_mm, target):
    radii = r_mm * rng.uniform(0.7, 1.3, 3)
    radii[2] *= rng.uniform(0.8, 1.2)
    soft = rng.uniform(3.0, 7.0)
    sl = _bbox(c - radii - 2 * soft, c + radii + 2 * soft, axes)
    if sl is None:
      return 0
    gx, gy, gz = _grid(sl, axes)
    rho = np.sqrt(((gx - c[0]) / radii[0]) ** 2 + ((gy - c[1]) / radii[1]) ** 2 + ((gz - c[2]) / radii[2]) ** 2)
    occ = np.clip((1.0 - rho) * (r_mm / soft) + 0.5 + 0.25 * coarse[sl] + 0.3 * texture[sl], 0.0, 1.0)
    # Denser centre: a target field rising toward the middle.
    tgt = target + rng.uniform(0.0, 150.0) * np.clip(1.0 - rho, 0.0, 1.0) + 40.0 * texture[sl]
    return _add(occ, sl, tgt)

  def _nodule(c, d_mm):
    r = d_mm / 2.0
    sl = _bbox(c - r - w_pv, c + r + w_pv, axes)
    if sl is None:
      return 0
    gx, gy, gz = _grid(sl, axes)
    dist = np.sqrt((gx - c[0]) ** 2 + (gy - c[1]) ** 2 + (gz - c[2]) ** 2)
    occ = np.clip((r - dist) / w_pv + 0.5, 0.0, 1.0)
    return _add(occ, sl, np.float32(rng.uniform(-10.0, 50.0)))

  if grade > 0 and lung_idx.size:
    lung_vox = lung_idx.size
    # Peripheral preference (as in viral pneumonia): weight by radius^2.
    wts = rho_lung.ravel()[lung_idx].astype(np.float64) ** 2 + 0.05
    centres = rng.choice(lung_idx, size=64, p=wts / wts.sum())
    style = rng.choice(["ggo", "nodules", "mixed"], p=[0.6, 0.15, 0.25])
    if grade >= 2 and style == "nodules":  # A larger burden needs opacities.
      style = "mixed"
    covered = 0
    n_nod = rng.integers(NODULES[grade][0], NODULES[grade][1] + 1)
    if style == "nodules":
      n_nod = max(n_nod, 1) + grade
    if style != "ggo":
      inner = lung_idx[rho_lung.ravel()[lung_idx] < 0.85]
      d_lo = NODULE_DIAMETER_MM[0] + (3.0 if style == "nodules" else 0.0)
      for flat in rng.choice(inner if inner.size else lung_idx, size=n_nod):
        covered += _nodule(_coords(flat), rng.uniform(d_lo, NODULE_DIAMETER_MM[1]))
    target_vox = rng.uniform(*BURDEN[grade]) * lung_vox
    k = 0
    while (style != "nodules" and covered < target_vox or covered == 0) and k < centres.size:
      covered += _ggo(_coords(centres[k]), rng.uniform(*GGO_RADIUS_MM[grade]), rng.uniform(-550.0, -350.0))
      k += 1
  les_occ *= lung
  mask = (les_occ >= 0.5).astype(np.uint8)
  hu += les_occ * (les_hu - hu)

  # Calcified granulomas (any grade, not lesions): small bright dots.
  gran = np.zeros(shape, np.float32)
  if lung_idx.size and rng.uniform() < 0.3:
    for flat in rng.choice(lung_idx, size=rng.integers(1, 3)):
      c = _coords(flat)
      _render_tube(gran, c, c + 1e-3, rng.uniform(1.5, 2.5), axes, w_pv)
    hu += (gran * lung) * (rng.uniform(300.0, 600.0) - hu)

  # --- Vessels: branching trees from each hilum, thinning to the periphery.
  ves = np.zeros(shape, np.float32)
  for center, radii, side in lungs:
    hilum = np.array([-0.55 * side, 0.05, 0.15])  # Medial, unit-ball coordinates.
    for p, q, r in _vessel_tree(rng, hilum, center, radii, side, generations=6):
      _render_tube(ves, p, q, r, axes, w_pv)
  ves *= lung
  hu += ves * (np.float32(rng.uniform(30.0, 55.0)) - hu)

  # --- Scanner noise.
  hu += rng.uniform(15.0, 25.0) * rng.standard_normal(shape, dtype=np.float32)
  np.clip(hu, -1024.0, 3071.0, out=hu)
  return Phantom(hu=hu.astype(np.float32, copy=False), mask=mask, spacing=spacing, grade=grade,
                 affine=_affine(shape, spacing), lung=lung.astype(np.uint8))


def phantom_set(n: int, seed: int, *, repeat_every: int = 10) -> list[tuple[str, str, int, int]]:
  """A deterministic, balanced list of (study_id, patient_id, grade, phantom_seed).

  Half the studies (n // 2) are normal, the rest cycle over grades 1..4, in a
  shuffled order. Every `repeat_every`-th patient (0 = never) has two studies,
  to exercise splitting by patient.
  """
  if n < 0:
    raise ValueError(f"n must be >= 0, got {n}")
  rng = np.random.default_rng([int(seed), 0x1C7])
  grades = [0] * (n // 2) + [1 + i % 4 for i in range(n - n // 2)]
  grades = [int(g) for g in rng.permutation(np.asarray(grades, dtype=np.int64))]
  seeds = [int(s) for s in rng.choice(2**31 - 1, size=n, replace=False)]
  out = []
  patient = 0
  i = 0
  while i < n:
    n_studies = 2 if repeat_every and patient % repeat_every == repeat_every - 1 else 1
    for _ in range(n_studies):
      if i < n:
        out.append((f"phantom_{i:04d}", f"patient_{patient:04d}", grades[i], seeds[i]))
        i += 1
    patient += 1
  return out


def write_phantom_nifti(ph: Phantom, path: str | os.PathLike, mask_path: str | os.PathLike | None = None) -> str:
  """Writes `ph.hu` (int16 HU) and optionally `ph.mask` as NIfTI; returns path."""
  out = nifti.save_scan(ph.hu, ph.spacing, path, affine=ph.affine)
  if mask_path is not None:
    import nibabel as nib  # pylint: disable=g-import-not-at-top
    img = nib.Nifti1Image(ph.mask.astype(np.uint8), ph.affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(ph.affine, code=1)
    img.set_sform(ph.affine, code=1)
    nib.save(img, os.fspath(mask_path))
  return out
