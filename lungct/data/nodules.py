"""Synthetic lung-nodule crops, LIDC-IDRI-like, for a nodule-malignancy task that runs offline.

Each crop is drawn from `np.random.default_rng(seed)` the way real crops arrive:
anisotropic voxels (0.5-1.0 mm in-plane, 0.625-2.5 mm slices), tight and thin (a few
mm of margin, often only 4-12 slices), int16-like HU, a nodule in lung parenchyma
(~-860 HU with texture) crossed by vessels, sometimes touching the chest wall.

  benign (grade 0-1, like LIDC malignancy 1-2): small (median ~5.5 mm, 3-15 mm),
    smooth, round to slightly oval, solid; a third calcified (diffuse, central or
    popcorn, +300..+1000 HU).
  malignant (grade 3-4, like LIDC 4-5): larger (median ~14 mm, 6-30 mm), lobulated
    and/or spiculated, a third part-solid (ground-glass rim around a solid core).
  A minority of each looks like the other (smooth malignant, mildly lobulated benign),
  so the task is learnable but not trivial. About 40% of nodules are malignant.

`Nodule.mask` marks the nodule (body and spicules, ground-glass included). Patients hold
1-4 nodules (`nodule_set`), so splits by patient and per-patient scores (max over
nodules) are exercised.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

from lungct.data import phantom

SLICE_MM = (0.625, 1.0, 1.25, 1.5, 2.0, 2.5)
SLICE_P = (0.1, 0.2, 0.2, 0.1, 0.15, 0.25)
MALIGNANT_FRACTION = 0.4


@dataclasses.dataclass(frozen=True, eq=False)
class Nodule:
  """hu float32 (x, y, z) HU, mask uint8 (x, y, z), spacing (sx, sy, sz) mm."""
  hu: np.ndarray
  mask: np.ndarray
  spacing: np.ndarray
  affine: np.ndarray
  diameter_mm: float
  malignant: bool
  kind: str


class NoduleEntry(NamedTuple):
  study_id: str
  patient_id: str
  label: int
  grade: int
  seed: int


def nodule_set(n: int, seed: int) -> list[NoduleEntry]:
  """n nodules of ~n/2 patients (1-4 nodules each), deterministic in seed.

  label 1 = malignant (grade 3 or 4), 0 = benign (grade 0 or 1).
  """
  if n < 0:
    raise ValueError(f"n must be >= 0, got {n}")
  rng = np.random.default_rng([int(seed), 0x70D])
  out, patient = [], 0
  while len(out) < n:
    k = int(rng.choice([1, 2, 3, 4], p=[0.45, 0.3, 0.15, 0.1]))
    for _ in range(min(k, n - len(out))):
      malignant = rng.uniform() < MALIGNANT_FRACTION
      grade = int(rng.integers(3, 5) if malignant else rng.integers(0, 2))
      out.append(NoduleEntry(f"nodule_{len(out):04d}", f"npatient_{patient:04d}", int(malignant), grade,
                             int(rng.integers(0, 2**31 - 1))))
    patient += 1
  return out


def _unit(v):
  return v / (np.linalg.norm(v) + 1e-9)


def make_nodule(seed: int, grade: int) -> Nodule:
  """One crop; malignant when grade >= 3. Deterministic in (seed, grade)."""
  rng = np.random.default_rng([int(seed), int(grade)])
  malignant = int(grade) >= 3
  s_xy = rng.uniform(0.5, 1.0)
  s_z = float(rng.choice(SLICE_MM, p=SLICE_P))
  spacing = np.array([s_xy, s_xy, s_z])
  if malignant:
    diameter = float(np.clip(rng.lognormal(np.log(14.0), 0.4), 6.0, 30.0))
  else:
    diameter = float(np.clip(rng.lognormal(np.log(5.5), 0.35), 3.0, 15.0))
  r0 = diameter / 2.0
  # Crop extent (mm): tight in-plane margin, thin in z.
  ext_xy = max(20.0, diameter * 1.3 + rng.uniform(6.0, 16.0))
  ext_z = max(6.0, diameter * rng.uniform(0.8, 1.3) + rng.uniform(2.0, 8.0))
  shape = (int(np.ceil(ext_xy / s_xy)), int(np.ceil(ext_xy / s_xy)), max(3, int(np.ceil(ext_z / s_z))))
  axes = phantom._axes_mm(shape, spacing)  # pylint: disable=protected-access
  gx, gy, gz = np.meshgrid(*axes, indexing="ij")
  centre = rng.uniform(-1.5, 1.5, 3) * np.array([1.0, 1.0, 0.5])

  # Background: parenchyma with texture, vessels, sometimes the chest wall.
  texture = phantom._smooth_noise(rng, shape, spacing, cell_mm=6.0)  # pylint: disable=protected-access
  hu = (rng.uniform(-880.0, -830.0) + rng.uniform(15.0, 35.0) * texture).astype(np.float32)
  ves = np.zeros(shape, np.float32)
  for _ in range(int(rng.integers(1, 5))):
    d = _unit(rng.standard_normal(3))
    p = centre + rng.uniform(r0 + 1.0, r0 + 8.0) * _unit(rng.standard_normal(3))
    phantom._render_tube(ves, p - 60 * d, p + 60 * d, rng.uniform(0.4, 1.8), axes, s_xy)  # pylint: disable=protected-access
  hu += ves * (np.float32(rng.uniform(20.0, 60.0)) - hu)
  if rng.uniform() < 0.15:  # Juxtapleural: a chest-wall half-space beside the nodule.
    n_wall = _unit(rng.standard_normal(3) * np.array([1.0, 1.0, 0.2]))
    off = r0 + rng.uniform(-0.5, 2.0)
    wall = np.clip(((gx - centre[0]) * n_wall[0] + (gy - centre[1]) * n_wall[1] + (gz - centre[2]) * n_wall[2]
                    - off) / s_xy + 0.5, 0.0, 1.0)
    hu += wall * (np.float32(rng.uniform(20.0, 60.0)) - hu)

  # Nodule shape: direction-dependent radius (ellipticity + lobulation).
  vx, vy, vz = gx - centre[0], gy - centre[1], gz - centre[2]
  stretch = rng.uniform(0.85, 1.15, 3)
  ex, ey, ez = vx / stretch[0], vy / stretch[1], vz / stretch[2]
  dist = np.sqrt(ex ** 2 + ey ** 2 + ez ** 2) + 1e-6
  ux, uy, uz = ex / dist, ey / dist, ez / dist
  if malignant:
    style = rng.choice(["lobulated", "spiculated", "both", "smooth"], p=[0.35, 0.25, 0.25, 0.15])
  else:
    style = rng.choice(["smooth", "lobulated"], p=[0.9, 0.1])
  lob_amp = {"smooth": 0.03, "lobulated": rng.uniform(0.12, 0.25), "both": rng.uniform(0.1, 0.2),
             "spiculated": 0.05}[style]
  if not malignant and style == "lobulated":
    lob_amp = rng.uniform(0.06, 0.12)
  bump = np.zeros(shape, np.float32)
  for _ in range(4):
    a = _unit(rng.standard_normal(3))
    f = rng.integers(2, 5)
    bump += np.cos(f * np.arccos(np.clip(ux * a[0] + uy * a[1] + uz * a[2], -1, 1)) + rng.uniform(0, 2 * np.pi))
  radius = r0 * (1.0 + lob_amp * bump / 2.0)
  w = float(np.mean(spacing))
  occ = np.clip((radius - dist) / w + 0.5, 0.0, 1.0).astype(np.float32)
  solid_hu = np.float32(rng.uniform(-20.0, 60.0))
  target = np.full(shape, solid_hu, np.float32)
  kind = str(style)
  if malignant and rng.uniform() < 0.33:  # Part-solid: ground-glass rim, solid core.
    core = rng.uniform(0.3, 0.7)
    core_occ = np.clip((core * radius - dist) / w + 0.5, 0.0, 1.0)
    target = np.float32(rng.uniform(-650.0, -400.0)) + core_occ * (solid_hu - np.float32(rng.uniform(-650.0, -400.0)))
    target = target.astype(np.float32)
    kind += "+part-solid"
  if not malignant and rng.uniform() < 0.33:  # Calcified.
    calc_hu = np.float32(rng.uniform(300.0, 1000.0))
    pattern = rng.choice(["diffuse", "central", "popcorn"])
    if pattern == "diffuse":
      calc = occ
    elif pattern == "central":
      calc = np.clip((rng.uniform(0.3, 0.6) * r0 - dist) / w + 0.5, 0.0, 1.0)
    else:
      calc = np.zeros(shape, np.float32)
      for _ in range(int(rng.integers(3, 7))):
        c = centre + rng.uniform(0.0, 0.6) * r0 * _unit(rng.standard_normal(3))
        phantom._render_tube(calc, c, c + 1e-3, rng.uniform(0.4, 0.25 * r0 + 0.5), axes, w)  # pylint: disable=protected-access
    target = target + calc * (calc_hu - target)
    kind += f"+calcified-{pattern}"
  if style in ("spiculated", "both"):  # Thin spikes radiating from the surface.
    spk = np.zeros(shape, np.float32)
    for _ in range(int(rng.integers(6, 16))):
      d = _unit(rng.standard_normal(3))
      p = centre + d * r0 * 0.8
      phantom._render_tube(spk, p, p + d * rng.uniform(3.0, 4.0 + r0), rng.uniform(0.3, 0.7), axes, w)  # pylint: disable=protected-access
    occ = np.maximum(occ, spk)
  hu += occ * (target - hu)
  hu += np.float32(rng.uniform(12.0, 30.0)) * rng.standard_normal(shape, dtype=np.float32)
  hu = np.clip(np.rint(hu), -1024.0, 3071.0).astype(np.float32)
  mask = (occ >= 0.5).astype(np.uint8)
  return Nodule(hu=hu, mask=mask, spacing=spacing, affine=phantom._affine(shape, spacing),  # pylint: disable=protected-access
                diameter_mm=diameter, malignant=malignant, kind=kind)
