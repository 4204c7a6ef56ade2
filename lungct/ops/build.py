"""Builds the oneDNN convolution extension (lungct/ops/csrc/onednn_conv.cc) on first use.

The shared library is compiled once per (source, jaxlib, oneDNN) combination into a cache directory
(``$LUNGCT_CACHE_DIR`` or ``~/.cache/lungct``) with the system C++ compiler (``$CXX`` or ``g++``), the XLA
FFI headers from ``jax.ffi.include_dir()`` and oneDNN's headers and library from the ``onednn-devel-cpu-gomp``
package (or ``$LUNGCT_ONEDNN_ROOT`` with ``include/`` and ``lib/``). Compiling at first use rather than at
``pip install`` time keeps ``pip install -e .`` working without a compiler and builds against the jaxlib that is
actually imported. ``python -m lungct.ops.build`` builds it ahead of time and prints where it is.
"""
from __future__ import annotations

import glob
import hashlib
import importlib.metadata as md
import os
import shutil
import subprocess
import sys
import tempfile

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "onednn_conv.cc")
# oneDNN wheels on the package index; the first ones are CPU-only builds (GNU OpenMP threading, no SYCL).
_DEVEL = ("onednn-devel-cpu-gomp", "onednn-devel-cpu-tbb", "onednn-devel-cpu-iomp", "onednn-devel")
_LIB = ("onednn-cpu-gomp", "onednn-cpu-tbb", "onednn-cpu-iomp", "onednn")


class BuildError(RuntimeError):
  """The extension cannot be built here (no compiler, no oneDNN headers/library, or a compile error)."""


def _dist_file(dists, suffix):
  for name in dists:
    try:
      files = md.distribution(name).files or []
    except md.PackageNotFoundError:
      continue
    for f in files:
      if str(f).replace(os.sep, "/").endswith(suffix):
        path = str(f.locate())
        if os.path.exists(path):
          return path
  return None


def find_onednn() -> tuple[str, str]:
  """(include dir, lib dir) of oneDNN, or BuildError naming what is missing."""
  root = os.environ.get("LUNGCT_ONEDNN_ROOT")
  if root:
    inc, lib = os.path.join(root, "include"), os.path.join(root, "lib")
  else:
    hpp = _dist_file(_DEVEL, "include/oneapi/dnnl/dnnl.hpp")
    so = _dist_file(_LIB, "lib/libdnnl.so.3") or _dist_file(_LIB, "lib/libdnnl.so")
    inc = os.path.dirname(os.path.dirname(os.path.dirname(hpp))) if hpp else os.path.join(sys.prefix, "include")
    lib = os.path.dirname(so) if so else os.path.join(sys.prefix, "lib")
  if not os.path.exists(os.path.join(inc, "oneapi", "dnnl", "dnnl.hpp")):
    raise BuildError(f"oneDNN headers not found (looked in {inc}); pip install onednn-devel-cpu-gomp")
  if not glob.glob(os.path.join(lib, "libdnnl.so*")):
    raise BuildError(f"oneDNN library not found (looked in {lib}); pip install onednn-cpu-gomp")
  return inc, lib


def _compiler() -> str:
  cxx = os.environ.get("CXX") or "g++"
  path = shutil.which(cxx)
  if path is None:
    raise BuildError(f"no C++ compiler ({cxx!r} not on PATH)")
  return path


def library_path() -> str:
  """Path of the built extension, compiling it first if needed (BuildError if that is impossible)."""
  import jax  # imported here: building is the only thing that needs it in this module
  import jaxlib

  inc, lib = find_onednn()
  ffi_inc = jax.ffi.include_dir()
  with open(SOURCE, "rb") as f:
    src = f.read()
  libs = sorted(glob.glob(os.path.join(lib, "libdnnl.so*")))
  tag = hashlib.sha256(b"\0".join([src, jaxlib.__version__.encode(), ffi_inc.encode(), inc.encode(),
                                   os.path.realpath(libs[0]).encode()])).hexdigest()[:16]
  cache = os.environ.get("LUNGCT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "lungct")
  out = os.path.join(cache, "onednn", tag, "liblungct_onednn.so")
  if os.path.exists(out):
    return out
  cxx = _compiler()
  os.makedirs(os.path.dirname(out), exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(out))
  os.close(fd)
  cmd = [cxx, "-std=c++17", "-O2", "-fPIC", "-shared", "-w", "-o", tmp, SOURCE, f"-I{ffi_inc}", f"-I{inc}",
         f"-L{lib}", "-ldnnl", f"-Wl,-rpath,{lib}"]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
  except (OSError, subprocess.TimeoutExpired) as e:
    os.unlink(tmp)
    raise BuildError(f"compiling {SOURCE} failed: {e}") from None
  if proc.returncode != 0:
    os.unlink(tmp)
    first = next((l for l in proc.stderr.splitlines() if "error" in l), proc.stderr.strip()[:300])
    raise BuildError(f"compiling {SOURCE} failed: {first}")
  os.replace(tmp, out)  # atomic: concurrent first uses each build, the last rename wins
  return out


if __name__ == "__main__":
  print(library_path())
