"""Large host allocations on transparent huge pages: one re-exec of the command with glibc told to use them.

XLA:CPU allocates the temporary buffer of every execution (all of a train step's intermediates, ~190 MiB for
configs/nodule.py) anew and frees it when the step ends. glibc serves a block that large with mmap and unmaps it
at free, so every step faults the block in again page by page: 48,500 page faults of 4 KiB per step of
configs/nodule.py, 0.07 s of kernel time per ~0.2 s step on a 2-core CPU, and the convolutions writing into fresh
pages ran ~1.4x slower than on warm ones. With `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (glibc >= 2.35) glibc
asks the kernel for transparent huge pages for those blocks (`madvise(MADV_HUGEPAGE)`): ~400 faults of 2 MiB per
step instead, and no more memory (benchmarks/README.md, round 6). Keeping freed blocks instead (mallopt: one
arena, no mmap) removed the faults too but grew the resident size 1.5x by fragmentation, so it is not used.

The tunable is read when a process starts, so `lungct.main` re-executes itself once with it set
(`reexec_with_huge_pages`), before anything else runs. Nothing happens where it cannot help: not glibc >= 2.35,
transparent huge pages "never", or already set; LUNGCT_HUGE_PAGES=0 turns it off.
"""
from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"


def huge_pages_possible() -> bool:
  """glibc >= 2.35 (the `glibc.malloc.hugetlb` tunable) and a kernel whose transparent huge pages are not off."""
  libc, version = platform.libc_ver()
  try:
    if libc != "glibc" or tuple(int(v) for v in version.split(".")[:2]) < (2, 35):
      return False
    with open(_THP) as f:
      return "[never]" not in f.read()
  except (OSError, ValueError):
    return False


def tuned(env: dict | None = None) -> bool:
  """Whether `env` (default: this process's environment) already asks glibc for huge pages."""
  env = os.environ if env is None else env
  return TUNABLE in env.get("GLIBC_TUNABLES", "").split(":")


def environment(env: dict | None = None) -> dict:
  """A copy of `env` (default: this process's) with the tunable added to GLIBC_TUNABLES (other tunables kept)."""
  env = dict(os.environ if env is None else env)
  if not tuned(env):
    env["GLIBC_TUNABLES"] = ":".join(t for t in (env.get("GLIBC_TUNABLES", ""), TUNABLE) if t)
  return env


def reexec_with_huge_pages() -> None:
  """Replaces this process by the same command (`sys.orig_argv`) with the tunable set; returns only when that
  is not needed or not possible (see the module docstring)."""
  if os.environ.get("LUNGCT_HUGE_PAGES") == "0" or tuned() or not huge_pages_possible():
    return
  argv = list(getattr(sys, "orig_argv", []))
  if not argv:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *argv[1:]], environment())
