"""The command line's process set-up: `lungct.main.exec_with_huge_pages`."""
import os
import platform
import subprocess
import sys

import pytest

from lungct import main
from tests.helpers import ROOT

GLIBC = ("glibc", "2.36")
MADVISE = "always [madvise] never\n"


def test_huge_pages_env_adds_the_tunable_once_and_keeps_the_users():
  env = main.huge_pages_env({"PATH": "/bin"}, GLIBC, MADVISE)
  assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  assert main.huge_pages_env(env, GLIBC, MADVISE) is None  # the re-executed process does not exec again
  mine = main.huge_pages_env({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=100"}, GLIBC, MADVISE)
  assert mine == {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=100:glibc.malloc.hugetlb=1"}
  assert main.huge_pages_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, GLIBC, MADVISE) is None


@pytest.mark.parametrize("environ,libc,thp", [
    ({"LUNGCT_HUGE_PAGES": "0"}, GLIBC, MADVISE),  # the user's opt-out
    ({}, ("glibc", "2.34"), MADVISE),  # no hugetlb tunable before glibc 2.35
    ({}, ("", ""), MADVISE),  # musl, or no libc found
    ({}, GLIBC, "always madvise [never]\n"),  # THP off: nothing to gain
    ({}, GLIBC, "[always] madvise never\n"),  # THP already on every mapping
])
def test_huge_pages_env_declines_where_it_cannot_help(environ, libc, thp):
  assert main.huge_pages_env(environ, libc, thp) is None


PROBE = r"""
import ctypes, os, sys
from lungct import main
main.exec_with_huge_pages()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
n = 64 << 20
p = libc.malloc(n)  # glibc mmaps a block this large; the tunable madvises it MADV_HUGEPAGE
ctypes.memset(p, 1, n)
huge = next(int(l.split()[1]) for l in open("/proc/self/smaps_rollup") if l.startswith("AnonHugePages:"))
print(os.environ.get("GLIBC_TUNABLES", ""), huge // 1024)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or main.huge_pages_env({}, platform.libc_ver(), main.thp_mode())
                    is None, reason="needs Linux, glibc >= 2.35 and transparent huge pages in [madvise] mode")
def test_exec_with_huge_pages_gives_mallocs_blocks_huge_pages():
  base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LUNGCT_HUGE_PAGES")}

  def probe(**env):
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=ROOT, check=True,
                         env={**base, **env}).stdout.split()
    return (out[0] if len(out) > 1 else ""), int(out[-1])
  tunables, huge_mib = probe()
  assert tunables == "glibc.malloc.hugetlb=1"
  assert huge_mib >= 32, huge_mib  # most of the 64 MiB block in 2 MiB pages (the kernel may lack a few)
  tunables, huge_off = probe(LUNGCT_HUGE_PAGES="0")
  assert tunables == "" and huge_off < 8, huge_off  # the peer: in [madvise] mode nothing gets them unasked


def test_compilation_cache_is_per_cpu_under_the_users_cache_folder():
  avx2 = "flags\t\t: fpu sse4_1 avx avx2 fma\n"
  avx512 = "flags\t\t: fpu sse4_1 avx avx2 fma avx512f\n"
  here = main.compilation_cache_dir({"XDG_CACHE_HOME": "/x"}, avx2)
  assert os.path.dirname(here) == "/x/lungct/jax"
  assert main.compilation_cache_dir({"XDG_CACHE_HOME": "/x"}, avx512) != here  # another ISA, another folder
  assert main.compilation_cache_dir({"XDG_CACHE_HOME": "/x"}, avx2) == here  # and the same one next time
  home = main.compilation_cache_dir({}, avx2)
  assert home.startswith(os.path.join(os.path.expanduser("~"), ".cache", "lungct", "jax"))
  assert main.compilation_cache_dir({"JAX_COMPILATION_CACHE_DIR": "/mine", "XDG_CACHE_HOME": "/x"}, avx2) == "/mine"
  assert main.compilation_cache_dir({"LUNGCT_COMPILATION_CACHE": "0", "JAX_COMPILATION_CACHE_DIR": "/mine"},
                                    avx2) is None
