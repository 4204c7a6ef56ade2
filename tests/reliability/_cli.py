"""Runs `python -m lungct.main` as a subprocess with the tiny test config (tests/helpers.py tiny_config)."""
from __future__ import annotations

import os
import subprocess
import sys

from tests.helpers import ROOT, tiny_config

# tiny_config as command-line overrides: 24 phantoms at 48^3, a narrow CNN, batch 4.
TINY_FLAGS = (
    "--config.data.num_scans=24",
    "--config.data.shape=(48,48,48)",
    "--config.data.num_threads=1",
    "--config.model.features=(4,8,8,16)",
    "--config.model.dense=16",
    "--config.train.batch_size=4",
    "--config.train.num_epochs=1",
    "--config.train.log_every_steps=2",
    "--config.train.progress_bar=False",
    "--config.eval.n_boot=50",
)


def env() -> dict[str, str]:
  e = dict(os.environ)
  e.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="3",
           XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
  e.pop("PYTEST_CURRENT_TEST", None)
  return e


def argv(workdir, data_dir, *extra: str) -> list[str]:
  return [sys.executable, "-m", "lungct.main", "--config", os.path.join(ROOT, "configs/default.py"),
          "--workdir", str(workdir), f"--config.data.data_dir={data_dir}", *TINY_FLAGS, *extra]


def run(workdir, data_dir, *extra: str, timeout: float = 120) -> subprocess.CompletedProcess:
  return subprocess.run(argv(workdir, data_dir, *extra), cwd=ROOT, env=env(), capture_output=True,
                        text=True, timeout=timeout)


def popen(workdir, data_dir, *extra: str) -> subprocess.Popen:
  return subprocess.Popen(argv(workdir, data_dir, *extra), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def build_dataset(data_dir) -> None:
  """Builds the tiny synthetic dataset once, so subprocesses only read it."""
  from lungct.data import lung_ct
  lung_ct.prepare(tiny_config(data_dir).data)


def params(workdir, step: int | None = None) -> tuple[int, list]:
  """(step, parameter leaves as numpy) of the latest (or given) complete checkpoint in workdir/checkpoints."""
  import jax
  import numpy as np
  import orbax.checkpoint as ocp
  mngr = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                               item_names=("state", "meta"))
  step = mngr.latest_step() if step is None else step
  state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  return step, [np.asarray(x) for x in jax.tree.leaves(state["params"])]
