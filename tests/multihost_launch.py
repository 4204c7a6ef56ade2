"""Starts `python -m lungct.main` as N processes on this machine (loopback coordinator, CPU collectives).

    python tests/multihost_launch.py --processes 2 --devices_per_process 2 -- \
        --config tiny.py --workdir runs/mh [--mode=eval ...]

Each process gets LUNGCT_DISTRIBUTED=1, JAX_COORDINATOR_ADDRESS=127.0.0.1:<free port>, JAX_NUM_PROCESSES,
JAX_PROCESS_ID and XLA_FLAGS=--xla_force_host_platform_device_count=<devices_per_process>, and runs
`tests/multihost_launch.py --child`: lungct.main with the training split's data source wrapped so that every
example index a process reads is recorded (``$LUNGCT_READS_DIR/reads_<process>.json``, for the test).
With --processes 1 it runs one ordinary process (no jax.distributed) with that many devices: the reference.
The launcher's own exit code is the worst of the children's; their output goes to <log_prefix>.<i>.log.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start(main_args: list[str], *, processes: int, devices_per_process: int, log_prefix: str,
          reads_dir: str = "", ready_prefix: str = "") -> list[subprocess.Popen]:
  """Starts the processes; returns their Popen objects (stdout+stderr in <log_prefix>.<i>.log)."""
  port = free_port()
  procs = []
  for i in range(processes):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")
    if processes > 1:
      env.pop("JAX_COMPILATION_CACHE_DIR", None)  # Its writes take no lock: never two writers at once.
      env.update(LUNGCT_DISTRIBUTED="1", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                 JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(i))
    if reads_dir:
      env["LUNGCT_READS_DIR"] = reads_dir
    if ready_prefix:
      env["LUNGCT_READY_FILE"] = f"{ready_prefix}.{i}"
    log = open(f"{log_prefix}.{i}.log", "w")
    procs.append(subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--child", *main_args],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
  return procs


def wait(procs: list[subprocess.Popen], timeout: float = 600) -> list[int]:
  """Exit codes; processes still running after ``timeout`` seconds (e.g. one hung in a collective) are killed."""
  deadline = time.time() + timeout
  codes = []
  for p in procs:
    try:
      codes.append(p.wait(max(deadline - time.time(), 1)))
    except subprocess.TimeoutExpired:
      p.kill()
      codes.append(p.wait())
  return codes


class CountingSource:
  """A random-access data source that records every index read."""

  def __init__(self, source, reads: list[int]):
    self._source, self._reads = source, reads

  def __len__(self):
    return len(self._source)

  def __getitem__(self, i):
    self._reads.append(int(i))
    return self._source[i]


def child(main_args: list[str]) -> None:
  reads_dir = os.environ.get("LUNGCT_READS_DIR")
  if reads_dir:
    from lungct import runtime
    reads: list[int] = []
    original = runtime.data_sources

    def counting_sources(config):
      sources = original(config)
      return {**sources, "train": CountingSource(sources["train"], reads)}

    runtime.data_sources = counting_sources

    def dump():
      pid = os.environ.get("JAX_PROCESS_ID", "0")
      with open(os.path.join(reads_dir, f"reads_{pid}.json"), "w") as f:
        json.dump(reads, f)
    atexit.register(dump)
  ready = os.environ.get("LUNGCT_READY_FILE")
  if ready:  # written once this process handles SIGTERM (the loop is about to start): tests signal after it
    from lungct import train
    init = train._Preempted.__init__

    def init_and_announce(self):
      init(self)
      with open(ready, "w") as f:
        f.write(str(os.getpid()))
    train._Preempted.__init__ = init_and_announce
  from absl import app
  from lungct import main as lungct_main
  sys.argv = ["lungct.main", *main_args]
  lungct_main.check_override_keys(sys.argv)
  app.run(lungct_main.main)


def cli(argv: list[str]) -> int:
  if argv[:1] == ["--child"]:
    child(argv[1:])
    return 0
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--processes", type=int, default=2)
  p.add_argument("--devices_per_process", type=int, default=2)
  p.add_argument("--log_prefix", default="multihost")
  p.add_argument("--timeout", type=float, default=600)
  p.add_argument("main_args", nargs=argparse.REMAINDER)
  a = p.parse_args(argv)
  main_args = a.main_args[1:] if a.main_args[:1] == ["--"] else a.main_args
  procs = start(main_args, processes=a.processes, devices_per_process=a.devices_per_process,
                log_prefix=a.log_prefix)
  try:
    codes = wait(procs, a.timeout)
  except KeyboardInterrupt:
    for proc in procs:
      proc.send_signal(signal.SIGTERM)
    codes = wait(procs)
  for i, c in enumerate(codes):
    print(f"process {i}: exit {c} (log {a.log_prefix}.{i}.log)")
  return max(codes, key=abs)


if __name__ == "__main__":
  sys.exit(cli(sys.argv[1:]))
