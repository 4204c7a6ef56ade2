"""SIGTERM, then kill -9 at a random moment aimed at a checkpoint save, then the same command again: the same
parameters as an uninterrupted run. For every task (the loop and its guarantees are shared)."""
from __future__ import annotations

import os
import random
import re
import signal
import time

import numpy as np
import pytest

from tests.reliability import _cli

# Per task four tiny runs (reference, SIGTERM, SIGKILL, final rerun), each ~20-30 s of start-up and compile.
RUN = ("--config.train.num_epochs=0", "--config.train.num_steps=12", "--config.train.checkpoint_every_steps=1",
       "--config.train.eval_every_steps=100", "--config.augment.enabled=True")


@pytest.fixture(scope="module", params=sorted(_cli.TASKS))
def task_data(request, tmp_path_factory):
  d = tmp_path_factory.mktemp(f"tfds_{request.param}")
  _cli.build_dataset(request.param, d)
  w = tmp_path_factory.mktemp(f"reference_{request.param}")
  r = _cli.run(request.param, w, d, *RUN)
  assert r.returncode == 0, r.stderr[-3000:]
  return request.param, d, _cli.params(w)


def _steps(workdir) -> tuple[list[int], bool]:
  """(finished steps, whether a save is in progress) from the checkpoint folder's listing."""
  try:
    names = os.listdir(os.path.join(workdir, "checkpoints"))
  except FileNotFoundError:
    return [], False
  return [int(n) for n in names if n.isdigit()], any("orbax-checkpoint-tmp" in n for n in names)


def _wait_for(proc, workdir, done, timeout=120.0):
  t0 = time.time()
  while time.time() - t0 < timeout and proc.poll() is None:
    steps, saving = _steps(workdir)
    if done(steps, saving):
      return steps, saving
    time.sleep(0.002)
  raise AssertionError(f"run ended or timed out first: {proc.poll()} {_steps(workdir)}")


def _assert_same(params_a, params_b):
  (step_a, a), (step_b, b) = params_a, params_b
  assert step_a == step_b == 12
  assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_sigterm_then_sigkill_mid_save_then_rerun_is_exact(task_data, tmp_path):
  task, data_dir, reference = task_data
  # 1. SIGTERM (preemption): the current step finishes, a checkpoint is saved, exit 0.
  proc = _cli.popen(task, tmp_path, data_dir, *RUN)
  try:
    _wait_for(proc, tmp_path, lambda s, saving: s and max(s) >= 2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, out[-3000:]
  stopped = int(re.search(r"Stopped at step (\d+): preempted \(SIGTERM\); checkpoint saved", out).group(1))
  assert 2 <= stopped < 12 and max(_steps(tmp_path)[0]) == stopped

  # 2. The same command resumes there; kill -9 it the moment a later save is in flight (or has finished).
  kill_after = stopped + random.Random(os.getpid()).randint(1, 3)
  proc = _cli.popen(task, tmp_path, data_dir, *RUN)
  try:
    steps, saving = _wait_for(proc, tmp_path, lambda s, saving: s and max(s) >= kill_after and saving
                              or (s and max(s) >= kill_after + 2))
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=30)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == -signal.SIGKILL
  assert f"Resumed from {tmp_path}/checkpoints at step {stopped}." in out
  print(f"{task}: SIGTERM at step {stopped}; SIGKILL with finished steps {sorted(steps)}, save in flight: {saving}")

  # 3. The same command again: resumes from the last complete checkpoint and ends bit-identical.
  r = _cli.run(task, tmp_path, data_dir, *RUN)
  assert r.returncode == 0, r.stderr[-3000:]
  resumed = int(re.search(r"Resumed from .* at step (\d+)", r.stdout).group(1))
  assert kill_after - 1 <= resumed < 12
  _assert_same(_cli.params(tmp_path), reference)
