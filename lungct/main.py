"""Command line entry point: flags -> (mode, task) -> one call.

    python -m lungct.main --config configs/default.py --workdir runs/demo [--mode=train] [--config.key=value ...]

Modes: train (default), eval, cv, predict, report; each task (`config.task`, see lungct/tasks) says which it
supports, and an unsupported pair fails at start with one line. Several hosts: `--config`-independent
environment, see `distributed_init`.
"""
from __future__ import annotations

import os
import platform
import sys
from typing import Sequence

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file (get_config()).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, metrics and reports.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "cv", "predict", "report"], "What to do.")
flags.DEFINE_string("split", "test", "Split for --mode=eval.")
flags.DEFINE_string("checkpoint", "", "--mode=eval/predict/report: a checkpoint folder or step; default the "
                    "workdir's best.")
flags.mark_flags_as_required(["config", "workdir"])


def check_override_keys(argv: Sequence[str]) -> None:
  """Rejects `--config.a.b=v` for keys the config file does not define, naming the key (before any work)."""
  from lungct import config_check
  path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if path is None and "--config" in argv[:-1]:
    path = argv[list(argv).index("--config") + 1]
  if not path:
    return
  try:
    config_check.check_keys(config_check.load_config_file(path), config_check.override_keys(argv))
  except config_check.ConfigError as e:
    sys.exit(f"error: {e}")


def distributed_init() -> None:
  """Several processes (hosts): LUNGCT_DISTRIBUTED=1 plus either a cluster JAX detects itself (SLURM, Open MPI,
  Kubernetes, TPU) or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (and optionally
  JAX_LOCAL_DEVICE_IDS) in the environment."""
  if not os.environ.get("LUNGCT_DISTRIBUTED"):
    return
  import jax
  env = os.environ
  kwargs = {}
  if env.get("JAX_COORDINATOR_ADDRESS"):
    missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if not env.get(k)]
    if missing:
      sys.exit(f"error: LUNGCT_DISTRIBUTED=1 with JAX_COORDINATOR_ADDRESS also needs {' and '.join(missing)}")
    kwargs = dict(coordinator_address=env["JAX_COORDINATOR_ADDRESS"], num_processes=int(env["JAX_NUM_PROCESSES"]),
                  process_id=int(env["JAX_PROCESS_ID"]))
  try:
    jax.distributed.initialize(**kwargs)
  except (ValueError, RuntimeError) as e:
    sys.exit(f"error: jax.distributed.initialize failed ({str(e).splitlines()[0]}); outside a cluster JAX "
             f"detects, set JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID")


HUGE_PAGES = "glibc.malloc.hugetlb=1"


def huge_pages_env(environ: dict[str, str], libc: tuple[str, str], thp_mode: str) -> dict[str, str] | None:
  """The environment to re-execute with so that glibc's malloc backs large blocks with transparent huge pages,
  or None where that cannot help or was already done: not glibc >= 2.35, transparent huge pages off ([never]) or
  already given to every mapping ([always]), the tunable already set, or the user said LUNGCT_HUGE_PAGES=0.

  Why: XLA:CPU allocates each execution's temporaries afresh (configs/nodule.py's train step: ~190 MiB) and glibc
  maps a block that large with mmap and unmaps it when freed, so each step faults in ~34,000 zeroed 4 KiB pages.
  With the tunable (glibc >= 2.35) malloc madvises its mappings MADV_HUGEPAGE: ~110 faults, the step ~20% faster
  (benchmarks/README.md, round 8). glibc reads GLIBC_TUNABLES only when a process starts, hence the re-exec."""
  name, version = libc
  if name != "glibc" or environ.get("LUNGCT_HUGE_PAGES") == "0" or "[madvise]" not in thp_mode:
    return None
  try:
    if tuple(int(v) for v in version.split(".")[:2]) < (2, 35):
      return None
  except ValueError:
    return None
  tunables = environ.get("GLIBC_TUNABLES", "")
  if "glibc.malloc.hugetlb" in tunables:
    return None
  return {**environ, "GLIBC_TUNABLES": f"{tunables}:{HUGE_PAGES}" if tunables else HUGE_PAGES}


def thp_mode() -> str:
  """The kernel's transparent huge page mode line (e.g. "always [madvise] never"), "" where there is none."""
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
      return f.read()
  except OSError:
    return ""


def exec_with_huge_pages() -> None:
  """Re-executes this command (`sys.orig_argv`) once with `huge_pages_env`, on Linux; before any import of
  JAX, so the only cost is a second interpreter start (~50 ms)."""
  if not sys.platform.startswith("linux") or not sys.executable:
    return
  env = huge_pages_env(dict(os.environ), platform.libc_ver(), thp_mode())
  if env is not None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)


def compilation_cache_dir(environ: dict[str, str], cpu_flags: str) -> str | None:
  """Where JAX's persistent compilation cache lives for this command, or None for no cache.

  On by default: a run compiles its train step, initialisation and evaluation functions (configs/nodule.py: ~6 s
  of a ~50 s run on 2 cores), and every later run of the same config (seeds, folds, sweeps, resumes) loads them
  instead. The folder is per CPU (a hash of /proc/cpuinfo's flags): XLA:CPU compiles for the host's ISA, and a
  home directory shared by unlike machines must not hand an AVX-512 executable to an AVX2 one. JAX's own
  JAX_COMPILATION_CACHE_DIR wins; LUNGCT_COMPILATION_CACHE=0 turns it off."""
  if environ.get("LUNGCT_COMPILATION_CACHE") == "0":
    return None
  if environ.get("JAX_COMPILATION_CACHE_DIR"):
    return environ["JAX_COMPILATION_CACHE_DIR"]
  import hashlib
  base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "lungct", "jax", hashlib.sha1(cpu_flags.encode()).hexdigest()[:12])


def _cpu_flags() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next((line for line in f if line.startswith(("flags", "Features"))), "")
  except OSError:
    return platform.processor() + platform.machine()


def enable_compilation_cache() -> None:
  """`compilation_cache_dir` for every compile of at least 0.3 s (the small ones cost less than a file read)."""
  path = compilation_cache_dir(dict(os.environ), _cpu_flags())
  if path:
    import jax
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.3)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from absl import logging
  logging.set_verbosity(logging.WARNING)  # Orbax and TFDS log every file they touch at INFO
  distributed_init()
  enable_compilation_cache()
  from lungct import config_check
  explicit = config_check.override_keys(sys.argv)
  try:
    run(FLAGS.config, FLAGS.workdir, FLAGS.mode, split=FLAGS.split, checkpoint_path=FLAGS.checkpoint,
        explicit=explicit)
  except known_errors() as e:
    sys.exit(f"error: {str(e).strip()}")


def known_errors() -> tuple[type[BaseException], ...]:
  """Errors that are the user's input, said in one line without a traceback."""
  from lungct import checkpoint, config_check, tasks
  from lungct.data import errors
  return (config_check.ConfigError, tasks.TaskError, checkpoint.CheckpointError, FloatingPointError,
          errors.DataError, FileNotFoundError)


def run(config, workdir: str, mode: str = "train", *, split: str = "test", checkpoint_path: str = "",
        explicit: Sequence[str] = ()):
  """(mode, task) -> one call. ``explicit``: dotted config keys given on the command line (inference refuses
  those that conflict with the checkpoint)."""
  from lungct import tasks
  tasks.check_mode(config, mode)
  if mode == "train":
    from lungct import train
    return train.train_and_evaluate(config, workdir)
  if mode == "eval":
    from lungct import evaluate
    return evaluate.evaluate_checkpoint(config, workdir, split=split, checkpoint_path=checkpoint_path,
                                        explicit=explicit)
  if mode == "cv":
    from lungct import evaluate
    return evaluate.cross_validate(config, workdir)
  if mode == "predict":
    from lungct import predict
    return predict.predict_scans(config, workdir, checkpoint_path=checkpoint_path, explicit=explicit)
  if mode == "report":
    from lungct import report
    return report.build_report(config, workdir, checkpoint_path=checkpoint_path, explicit=explicit)
  raise tasks.TaskError(f"unknown --mode={mode}")


if __name__ == "__main__":
  exec_with_huge_pages()
  check_override_keys(sys.argv)
  app.run(main)
