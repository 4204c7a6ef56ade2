"""The tolerance of the equivalence tests (8 devices vs 1, spatial split vs whole), from float32 rounding.

A computation split over devices sums the same terms in another order (per-device partial sums, then an
all-reduce), so in float32 it rounds differently from the one-device computation. How much differently is not a
constant to measure once on one machine: it depends on the sizes and signs of the terms and on the CPU's kernels
(XLA emits other code for AVX2 than for AVX-512). So each test measures it in the same run:

  reference  the one-device step in float64 (same inputs, same random draws): the exact result up to ~1e-16;
  noise      max(max |one-device float32 - reference|, floor): how far float32 lands from the exact result for
             this computation, on this machine and ISA; floor = u * max |reference| for a tensor (no float32
             result is closer than its own rounding, u = 2^-24) and 8 u |reference| for a scalar (the loss over a
             batch, the gradient norm over every parameter: the end of a long computation whose rounding is tens
             of u, and one sample of it can land near 0 by chance, as the one-device gradient norm did once under
             --xla_cpu_max_isa=AVX2: 1 u, while the split one was 34 u);
  check      max |split float32 - reference| <= FACTOR * noise.

Why this holds for a correct split: reassociating a sum of n terms changes which roundings happen, not their size:
every order obeys |error| <= ~n u sum|terms| and in practice both errors are random walks of the same scale
(u sqrt(n) |terms|). A split into 8 partial sums plus an 8-term reduction is, if anything, more accurate than one
long sum. FACTOR = 16 covers the spread between two samples of that scale (the max over a tensor's entries, or a
single scalar such as the loss, whose floor is therefore higher).

Why a real defect fails it: a device that convolves the wrong shard, a dropped gradient share or a halo off by a
slice changes the update by a fraction of the update itself, i.e. by ~1e-2..1e-1 of |update|, while float32 noise
is ~1e-7..1e-5 of it: the defect exceeds the bound by orders of magnitude (checked by hand on such variants; see
the commit messages of tests/test_parallel.py and tests/test_spatial.py).
"""
from __future__ import annotations

import numpy as np

U32 = float(np.finfo(np.float32).eps) / 2   # unit roundoff of float32, 2^-24
FACTOR = 16
SCALAR_FLOOR_ULPS = 8


def used_fraction(one, split, reference) -> tuple[float, float, float]:
  """(fraction of the bound used, max |split - reference|, noise) for one tensor or scalar."""
  ref = np.asarray(reference, np.float64)
  one, split = np.asarray(one, np.float64), np.asarray(split, np.float64)
  assert one.shape == split.shape == ref.shape, (one.shape, split.shape, ref.shape)
  floor = (SCALAR_FLOOR_ULPS if ref.size == 1 else 1) * U32 * float(np.abs(ref).max(initial=0.0))
  noise = max(float(np.abs(one - ref).max(initial=0.0)), floor)
  err = float(np.abs(split - ref).max(initial=0.0))
  if noise == 0.0:   # an all-zero tensor computed exactly: the split must be exact too
    return (0.0 if err == 0.0 else np.inf), err, noise
  return err / (FACTOR * noise), err, noise


def check_trees(label: str, one, split, reference, names=None) -> float:
  """used_fraction over matching leaves (lists or scalars); prints each and raises on any above 1. Returns the max."""
  one, split, reference = (list(x) if isinstance(x, (list, tuple)) else [x] for x in (one, split, reference))
  assert len(one) == len(split) == len(reference), (len(one), len(split), len(reference))
  worst, failures = 0.0, []
  for i, (a, b, r) in enumerate(zip(one, split, reference)):
    frac, err, noise = used_fraction(a, b, r)
    name = names[i] if names else str(i)
    worst = max(worst, frac)
    if not frac <= 1.0:
      failures.append(f"{name}: max|split - f64| {err:.3g} > {FACTOR} x float32 noise {noise:.3g}")
  print(f"{label}: worst used fraction of the float32-noise bound {worst:.3f} over {len(one)} tensors")
  assert not failures, f"{label}: " + "; ".join(failures)
  return worst
