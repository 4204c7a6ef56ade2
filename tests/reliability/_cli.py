"""Runs `python -m lungct.main` as a subprocess on a tiny config, for every task (the guarantees are per loop,
and the loop is shared: each reliability test runs for every task of `lungct.tasks.TASKS`)."""
from __future__ import annotations

import os
import subprocess
import sys

from lungct import tasks
from tests.helpers import ROOT

# Every task of lungct.tasks.TASKS, run through its reference config's seconds-long variant (tiny data, narrow
# models): a task added there is covered by every reliability test without a line here.
TASKS = {name: f"{task.CONFIG}:tiny" for name, task in tasks.TASKS.items()}
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
  return [sys.executable, "-m", "lungct.main", "--config", os.path.join(ROOT, TASKS[task]), "--workdir",
          str(workdir), f"--config.data.data_dir={data_dir}", *COMMON, *extra]


def run(task: str, workdir, data_dir, *extra: str, timeout: float = 180) -> subprocess.CompletedProcess:
  return subprocess.run(argv(task, workdir, data_dir, *extra), cwd=ROOT, env=env(), capture_output=True,
                        text=True, timeout=timeout)


def popen(task: str, workdir, data_dir, *extra: str) -> subprocess.Popen:
  return subprocess.Popen(argv(task, workdir, data_dir, *extra), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def config(task: str):
  """The task's tiny config, as the command line loads it."""
  from lungct import config_check
  return config_check.load_config_file(os.path.join(ROOT, TASKS[task]))


def build_dataset(task: str, data_dir) -> None:
  """Builds the task's tiny dataset once (the config exactly as the command line gives it), so subprocesses only
  read it."""
  from lungct import config_check
  from lungct.data import lung_ct
  lung_ct.prepare(config_check.apply_overrides(config(task), {"data.data_dir": str(data_dir)}).data)


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
