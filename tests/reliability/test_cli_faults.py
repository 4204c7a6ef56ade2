"""Faults seen through the command line: NaN loss, bad config flags, unwritable or foreign workdirs.

The NaN stop and the foreign-workdir refusal run for every task (they are guarantees of the shared loop)."""
from __future__ import annotations

import os

import numpy as np
import pytest

from tests.reliability import _cli

SHORT = ("--config.train.num_epochs=0", "--config.train.num_steps=8", "--config.train.checkpoint_every_steps=1")
# A constant schedule whatever the task's own (warmup_cosine starts at learning rate 0, so its first update would
# come a step later): the NaN run's first update uses learning_rate=1e30.
CONSTANT = (*SHORT, "--config.train.schedule=constant")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("tfds")
  _cli.build_dataset("classify", d)
  return d


@pytest.fixture(scope="module", params=sorted(_cli.TASKS))
def nan_run(request, tmp_path_factory):
  """learning_rate=1e30: step 1 is finite (its gradients come from the initial weights), step 2 is not."""
  task = request.param
  d = tmp_path_factory.mktemp(f"tfds_{task}")
  _cli.build_dataset(task, d)
  w = tmp_path_factory.mktemp(f"nan_{task}")
  return task, d, w, _cli.run(task, w, d, *CONSTANT, "--config.train.learning_rate=1e30")


def test_nan_loss_stops_naming_step_and_last_good_checkpoint(nan_run):
  _, _, w, r = nan_run
  assert r.returncode == 1
  assert (f"error: non-finite loss, gradients or parameters at step 2 (loss nan); stopped without "
          f"saving them. Last good checkpoint: {w}/checkpoints/1.") in r.stderr
  assert sorted(os.listdir(w / "checkpoints")) == ["1"]
  step, leaves = _cli.params(w)
  assert step == 1 and all(np.isfinite(x).all() for x in leaves)


def test_workdir_of_another_config_is_refused(nan_run, tmp_path):
  task, data_dir, w, _ = nan_run
  default_lr = _cli.config(task).train.learning_rate
  r = _cli.run(task, w, data_dir, *CONSTANT)  # the task's own learning rate: a different experiment
  assert r.returncode == 1
  assert "error: " in r.stderr and "Traceback" not in r.stderr and f"holds a run with a different config (train.learning_rate: 1e+30 -> {default_lr})" in r.stderr
  r = _cli.run(task, w, data_dir, *CONSTANT, "--config.resume=false")
  assert r.returncode == 1
  assert f"error: {w} already holds checkpoints and config.resume=False: use a new --workdir." in r.stderr
  assert sorted(os.listdir(w / "checkpoints")) == ["1"]  # untouched


@pytest.mark.parametrize("flag, message", [
    ("--config.train.nope=1", "error: unknown config key config.train.nope: config.train has no 'nope'. "
                              "Known: batch_size,"),
    ("--config.model.depth=18", "error: unknown config key config.model.depth: config.model has no 'depth'. "
                                "Known: bn_momentum, conv_impl, dense,"),
    ("--config.train.batch_size=four", "flag --config.train.batch_size=four: invalid literal for int()"),
    ("--config.train.on_nan=ignore", "config.train.on_nan='ignore': must be one of ('stop', 'skip')"),
])
def test_bad_config_flags_fail_at_start(flag, message, data_dir, tmp_path):
  r = _cli.run("classify", tmp_path / "w", data_dir, flag, timeout=60)
  assert r.returncode == 1 and message in r.stderr, r.stderr[-2000:]
  assert not (tmp_path / "w").exists()


def test_unwritable_workdir_is_a_checkpoint_error(data_dir, tmp_path):
  # Root ignores chmod 0o555, so make the workdir a path below a regular file: fails for every user.
  (tmp_path / "file").write_text("x")
  r = _cli.run("classify", tmp_path / "file" / "run", data_dir, *SHORT, timeout=60)
  assert r.returncode == 1
  assert f"error: cannot write checkpoints to {tmp_path}/file/run: Not a directory" in r.stderr
  assert "Traceback" not in r.stderr


def test_mode_a_task_does_not_support_fails_at_start(data_dir, tmp_path):
  """Every shipped task offers every mode, so the command line runs with a task that lacks one (segmentation
  without report, set before main parses the flags): the refusal is one line, before any work."""
  import subprocess
  code = ("import sys; from absl import app; from lungct import main; from lungct.tasks import segment; "
          "segment.MODES = ('train', 'eval', 'cv', 'predict'); main.check_override_keys(sys.argv); "
          "app.run(main.main)")
  argv = _cli.argv("segment", tmp_path / "w", data_dir, "--mode=report")
  assert argv[1:3] == ["-m", "lungct.main"]
  r = subprocess.run([argv[0], "-c", code, *argv[3:]], cwd=_cli.ROOT, env=_cli.env(), capture_output=True,
                     text=True, timeout=60)
  assert r.returncode == 1 and "Traceback" not in r.stderr
  assert r.stderr.strip().splitlines()[-1] == ("error: --mode=report is not supported by config.task='segment' "
                                               "(it supports: train, eval, cv, predict)")
  assert not (tmp_path / "w").exists()
