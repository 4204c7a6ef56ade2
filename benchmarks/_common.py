"""What the benchmark scripts share: the `--json` flag and its writer, the machine's description (CPU name and
vector flags, peak RSS), step timing and the matmul peak that MFU is measured against.

Each script runs as `python benchmarks/<script>.py`, which puts this folder on `sys.path`: they `import _common`.
"""
from __future__ import annotations

import importlib.util
import json
import os
import platform
import resource
import time
from typing import Any, Callable

import numpy as np


# ----------------------------------------------------------------------------- --json

def add_json_arg(parser, flag: str = "--json") -> None:
  """The results-file flag every script has (empty: print only)."""
  parser.add_argument(flag, default="", help="write the results here as JSON")


def write_json(path: str, out: dict[str, Any], indent: int = 2) -> None:
  """Writes `out` to `path` (its folder made if need be) and says so; nothing when `path` is empty."""
  if not path:
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(out, f, indent=indent)
  print(f"wrote {path}")


# ----------------------------------------------------------------------------- the machine

def cpu_name(with_count: bool = True) -> str:
  """The CPU's model name from /proc/cpuinfo (with " xN", N = os.cpu_count(), unless `with_count` is False)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip() + (f" x{os.cpu_count()}" if with_count else "")
  except OSError:
    pass
  return platform.processor()


def cpu_flags() -> str:
  """The vector ISA extensions of this CPU that matter here (from /proc/cpuinfo)."""
  try:
    with open("/proc/cpuinfo") as f:
      flags = next(line for line in f if line.startswith("flags")).split(":", 1)[1].split()
  except (OSError, StopIteration):
    return "?"
  keep = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni")
  return " ".join(k for k in keep if k in flags)


def have_torch() -> bool:
  """Whether PyTorch is importable (the peers are optional: without it only the lungct side runs)."""
  return importlib.util.find_spec("torch") is not None


def peak_rss_mb() -> float:
  """This process's peak resident set size in MiB (ru_maxrss is KiB on Linux)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ----------------------------------------------------------------------------- timing and the peak

def time_steps(step: Callable[[], Any], steps: int, warmup: int) -> list[float]:
  """Seconds per call of `step` (which must block until its work is done), after `warmup` calls."""
  for _ in range(warmup):
    step()
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    step()
    times.append(time.perf_counter() - t)
  return times


def time_interleaved(fns: dict[str, Callable[[], None]], steps: int, warmup: int) -> dict[str, list[float]]:
  """Step times of each function, calls alternating (A B A B ...) so a busy machine slows both alike."""
  for _ in range(warmup):
    for f in fns.values():
      f()
  times: dict[str, list[float]] = {k: [] for k in fns}
  for _ in range(steps):
    for k, f in fns.items():
      t = time.perf_counter()
      f()
      times[k].append(time.perf_counter() - t)
  return times


def numpy_matmul_peak(n: int = 4096, reps: int = 5) -> float:
  """Best float32 GFLOP/s of an n x n numpy matmul: the practical CPU peak."""
  rng = np.random.default_rng(0)
  a, b = rng.standard_normal((n, n), np.float32), rng.standard_normal((n, n), np.float32)
  a @ b
  best = min(time_steps(lambda: a @ b, reps, 0))
  return 2 * n ** 3 / best / 1e9


def jax_matmul_peak(dtype: str, n: int = 8192, reps: int = 10) -> float:
  """Best GFLOP/s of an n x n jnp matmul on the default device in `dtype`."""
  import jax
  import jax.numpy as jnp
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(k1, (n, n), jnp.dtype(dtype))
  b = jax.random.normal(k2, (n, n), jnp.dtype(dtype))
  f = jax.jit(lambda x, y: x @ y)
  f(a, b).block_until_ready()
  best = min(time_steps(lambda: f(a, b).block_until_ready(), reps, 1))
  return 2 * n ** 3 / best / 1e9
