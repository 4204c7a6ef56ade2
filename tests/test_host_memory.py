"""lungct.host_memory: `python -m lungct.main` re-executes itself once with glibc's huge-page tunable, and with it
XLA:CPU's per-execution temporary buffer is faulted in by 2 MiB pages instead of 4 KiB ones."""
import json
import os
import subprocess
import sys

import pytest

from lungct import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POSSIBLE = host_memory.huge_pages_possible()
WHY_NOT = "needs glibc >= 2.35 and transparent huge pages not 'never' (/sys/kernel/mm/transparent_hugepage)"


def test_environment_adds_the_tunable_once_and_keeps_the_others():
  env = host_memory.environment({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0", "A": "1"})
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.tcache_count=0:glibc.malloc.hugetlb=1" and env["A"] == "1"
  assert host_memory.environment(env) == env and host_memory.tuned(env)
  assert host_memory.environment({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
  assert not host_memory.tuned({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})


def _main_sees(tmp_path, **env_extra) -> str:
  """GLIBC_TUNABLES as the config file of a `python -m lungct.main` run reads it (the run then stops at an
  unknown override key, before any work)."""
  cfg = tmp_path / "probe.py"
  cfg.write_text("import os\nprint('TUNABLES=' + os.environ.get('GLIBC_TUNABLES', ''))\n"
                 "from configs.default import get_config\n")
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  env.update(PYTHONPATH=ROOT, **env_extra)
  out = subprocess.run([sys.executable, "-m", "lungct.main", f"--config={cfg}", f"--workdir={tmp_path}/w",
                        "--config.no_such_key=1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert "no_such_key" in out.stderr, out.stderr[-1500:]
  return next(line for line in out.stdout.splitlines() if line.startswith("TUNABLES=")).split("=", 1)[1]


def test_main_reexecutes_with_the_tunable_unless_told_not_to(tmp_path):
  assert _main_sees(tmp_path, LUNGCT_HUGE_PAGES="0") == ""
  assert _main_sees(tmp_path) == ("glibc.malloc.hugetlb=1" if POSSIBLE else "")


# A jitted computation whose 128 MiB intermediate lives in XLA's temporary buffer, run 10 times after warm-up;
# the process's minor page faults per run, with and without the tunable (each in its own process).
_CHILD = r"""
import json, resource
import jax, jax.numpy as jnp
x = jnp.ones((1 << 24,), jnp.float32)
step = jax.jit(lambda x: jnp.sum(jnp.cumsum(jnp.sin(x) * 2.0))).lower(x).compile()
for _ in range(3):
  step(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
  step(x).block_until_ready()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10
print(json.dumps({"temp": step.memory_analysis().temp_size_in_bytes, "faults": faults}))
"""


def _faults(env: dict) -> dict:
  out = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-1500:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not POSSIBLE, reason=WHY_NOT)
def test_the_temporary_buffer_faults_in_by_huge_pages():
  plain = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  system, huge = _faults(plain), _faults(host_memory.environment(plain))
  pages = system["temp"] / 4096
  assert system["temp"] >= 128 << 20
  # glibc's default: the block is mmapped and unmapped each run, so each run faults every 4 KiB page of it.
  assert system["faults"] >= 0.9 * pages, system
  # With the tunable: 2 MiB pages, up to 512x fewer faults for the block (30x here: small buffers stay on 4 KiB
  # pages); at least 4x fewer wherever the kernel can find free huge pages at all.
  assert huge["faults"] <= 0.25 * system["faults"], (huge, system)
