"""Puts the repository root on sys.path so tests import `lungct` and `configs` without installing, and gives the
test session one fresh JAX persistent compilation cache.

Many tests start `python -m lungct.main` several times with the same config (reference, SIGTERM, SIGKILL, rerun)
or jit the same step again; with the cache only the first of them compiles (the resume test: 66 s -> 32 s on
this project's 2-core machine). The cache lives in a temporary folder made for this session and removed at its
end, so every session still compiles everything once; subprocesses inherit it through the environment. Set
JAX_COMPILATION_CACHE_DIR yourself to choose the folder (it is then kept).
"""
import os
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

_SESSION_CACHE = None
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
  _SESSION_CACHE = tempfile.mkdtemp(prefix="lungct_test_jax_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _SESSION_CACHE
  if "jax" in sys.modules:  # Imported before this file (a plugin): set it there too.
    sys.modules["jax"].config.update("jax_compilation_cache_dir", _SESSION_CACHE)


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  if _SESSION_CACHE:
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)
