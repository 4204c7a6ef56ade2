"""Kill -9 at a random moment (aimed at a checkpoint save) or SIGTERM, rerun the same command: same parameters."""
from __future__ import annotations

import os
import random
import re
import signal
import time

import numpy as np
import pytest

from tests.reliability import _cli

# Five tiny training runs (each ~35 s of start-up, compile and final evaluation): ~200 s on 2 shared cores.
pytestmark = pytest.mark.slow

RUN = ("--config.train.num_epochs=0", "--config.train.num_steps=12", "--config.train.checkpoint_every_steps=1",
       "--config.train.eval_every_steps=100", "--config.data.augment.enabled=True")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("tfds")
  _cli.build_dataset(d)
  return d


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
  w = tmp_path_factory.mktemp("reference")
  r = _cli.run(w, data_dir, *RUN)
  assert r.returncode == 0, r.stderr[-3000:]
  return _cli.params(w)


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


def test_sigkill_during_save_then_rerun_is_exact(data_dir, reference, tmp_path):
  rng = random.Random(os.getpid())
  kill_after = rng.randint(3, 7)
  proc = _cli.popen(tmp_path, data_dir, *RUN)
  try:  # kill the moment a save of a step after `kill_after` is in flight (or it has finished)
    steps, saving = _wait_for(proc, tmp_path, lambda s, saving: s and max(s) >= kill_after and saving
                              or (s and max(s) >= kill_after + 2))
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == -signal.SIGKILL
  print(f"killed with finished steps {sorted(steps)}, save in flight: {saving}")
  r = _cli.run(tmp_path, data_dir, *RUN)
  assert r.returncode == 0, r.stderr[-3000:]
  resumed = int(re.search(r"Resumed from .* at step (\d+)", r.stdout).group(1))
  assert kill_after <= resumed < 12
  _assert_same(_cli.params(tmp_path), reference)


def test_sigterm_saves_exits_0_and_rerun_is_exact(data_dir, reference, tmp_path):
  proc = _cli.popen(tmp_path, data_dir, *RUN)
  try:
    _wait_for(proc, tmp_path, lambda s, saving: s and max(s) >= 3)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, out[-3000:]
  stopped = int(re.search(r"Stopped at step (\d+): preempted \(SIGTERM\); checkpoint saved", out).group(1))
  assert 3 <= stopped < 12 and max(_steps(tmp_path)[0]) == stopped
  r = _cli.run(tmp_path, data_dir, *RUN)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"at step {stopped}." in r.stdout
  _assert_same(_cli.params(tmp_path), reference)
