"""Runs `python -m lungct.main` as a subprocess on a tiny config, for every task (the guarantees are per loop,
and the loop is shared: each reliability test runs for classification and segmentation)."""
from __future__ import annotations

import os
import subprocess
import sys

from tests.helpers import ROOT

# Per task: the config file and flags that shrink it to seconds (tiny data, narrow models, no precise BN).
TASKS = {
    "classify": ("configs/default.py", (
        "--config.data.num_scans=24", "--config.data.shape=(48,48,48)", "--config.model.features=(4,8,8,16)",
        "--config.model.dense=16")),
    "segment": ("configs/unet_seg.py", (
        "--config.data.num_scans=12", "--config.data.shape=(16,32,32)", "--config.model.features=(4,8)",
        "--config.segment.patch=(16,16,16)", "--config.segment.sw_batch_size=2")),
}
COMMON = ("--config.loader.num_threads=1", "--config.train.batch_size=4", "--config.train.num_epochs=1",
          "--config.train.log_every_steps=2", "--config.train.progress_bar=False", "--config.eval.n_boot=50",
          "--config.train.precise_bn_batches=0")


def env() -> dict[str, str]:
  e = dict(os.environ)
  e.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="3",
           XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
  e.pop("PYTEST_CURRENT_TEST", None)
  return e


def argv(task: str, workdir, data_dir, *extra: str) -> list[str]:
  config, flags = TASKS[task]
  return [sys.executable, "-m", "lungct.main", "--config", os.path.join(ROOT, config), "--workdir", str(workdir),
          f"--config.data.data_dir={data_dir}", *flags, *COMMON, *extra]


def run(task: str, workdir, data_dir, *extra: str, timeout: float = 180) -> subprocess.CompletedProcess:
  return subprocess.run(argv(task, workdir, data_dir, *extra), cwd=ROOT, env=env(), capture_output=True,
                        text=True, timeout=timeout)


def popen(task: str, workdir, data_dir, *extra: str) -> subprocess.Popen:
  return subprocess.Popen(argv(task, workdir, data_dir, *extra), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def build_dataset(task: str, data_dir) -> None:
  """Builds the task's tiny dataset once (the config exactly as the command line gives it), so subprocesses only
  read it."""
  from lungct import config_check, main
  from lungct.data import lung_ct
  config, flags = TASKS[task]
  c = main.load_config_file(os.path.join(ROOT, config))
  overrides = {"data.data_dir": str(data_dir)}
  for flag in flags:
    key, _, value = flag[len("--config."):].partition("=")
    overrides[key] = eval(value)  # noqa: S307  (our own literals above)
  lung_ct.prepare(config_check.apply_overrides(c, overrides).data)


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
