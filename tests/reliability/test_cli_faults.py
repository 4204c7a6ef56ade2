"""Faults seen through the command line: NaN loss, bad config flags, unwritable or foreign workdirs."""
from __future__ import annotations

import os

import numpy as np
import pytest

from tests.reliability import _cli

SHORT = ("--config.train.num_epochs=0", "--config.train.num_steps=8", "--config.train.checkpoint_every_steps=1")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("tfds")
  _cli.build_dataset(d)
  return d


@pytest.fixture(scope="module")
def nan_run(data_dir, tmp_path_factory):
  """learning_rate=1e30: step 1 is finite (its gradients come from the initial weights), step 2 is not."""
  w = tmp_path_factory.mktemp("nan")
  return w, _cli.run(w, data_dir, *SHORT, "--config.train.learning_rate=1e30")


def test_nan_loss_stops_naming_step_and_last_good_checkpoint(nan_run):
  w, r = nan_run
  assert r.returncode == 1
  assert (f"error: non-finite loss, gradients or parameters at step 2 (loss nan); stopped without "
          f"saving them. Last good checkpoint: {w}/checkpoints/1.") in r.stderr
  assert sorted(os.listdir(w / "checkpoints")) == ["1"]
  step, leaves = _cli.params(w)
  assert step == 1 and all(np.isfinite(x).all() for x in leaves)


def test_workdir_of_another_config_is_refused(nan_run, data_dir, tmp_path):
  w, _ = nan_run
  r = _cli.run(w, data_dir, *SHORT)  # default learning rate: a different experiment
  assert r.returncode == 1
  assert "error: " in r.stderr and "Traceback" not in r.stderr and "holds a run with a different config (train.learning_rate: 1e+30 -> 0.001)" in r.stderr
  r = _cli.run(w, data_dir, *SHORT, "--config.resume=false")
  assert r.returncode == 1
  assert f"error: {w} already holds checkpoints and config.resume=False: use a new --workdir." in r.stderr
  assert sorted(os.listdir(w / "checkpoints")) == ["1"]  # untouched


@pytest.mark.parametrize("flag, message", [
    ("--config.train.nope=1", "error: unknown config key config.train.nope in '--config.train.nope=1': "
                              "config.train has no 'nope'. Known: batch_size,"),
    ("--config.train.batch_size=four", "flag --config.train.batch_size=four: invalid literal for int()"),
    ("--config.train.on_nan=ignore", "config.train.on_nan='ignore': must be one of ('stop', 'skip')"),
])
def test_bad_config_flags_fail_at_start(flag, message, data_dir, tmp_path):
  r = _cli.run(tmp_path / "w", data_dir, flag, timeout=60)
  assert r.returncode == 1 and message in r.stderr, r.stderr[-2000:]
  assert not (tmp_path / "w").exists()


def test_unwritable_workdir_is_a_checkpoint_error(data_dir, tmp_path):
  # Root ignores chmod 0o555, so make the workdir a path below a regular file: fails for every user.
  (tmp_path / "file").write_text("x")
  r = _cli.run(tmp_path / "file" / "run", data_dir, *SHORT, timeout=60)
  assert r.returncode == 1
  assert f"error: cannot write checkpoints to {tmp_path}/file/run: Not a directory" in r.stderr
  assert "Traceback" not in r.stderr
