"""Checkpoint integrity: half-written steps are never restored, unwritable workdirs fail plainly, no pickle."""
from __future__ import annotations

import os
import pickle

import jax.numpy as jnp
import numpy as np
import pytest

from tests import helpers  # noqa: F401
from lungct import checkpoint


def _state(v: float) -> dict:
  return {"step": jnp.asarray(int(v), jnp.int32), "params": {"w": jnp.full((64, 32), v, jnp.float32)}}


@pytest.fixture
def three_steps(tmp_path):
  latest, _ = checkpoint.managers(str(tmp_path), keep=5)
  for s in (1, 2, 3):
    checkpoint.save(latest, s, _state(s), {"config": {"seed": 0}, "bookkeeping": {"at": s}})
  latest.wait_until_finished()
  return tmp_path, latest


def test_killed_save_and_truncated_step_are_not_restored(three_steps, capsys):
  workdir, latest = three_steps
  ckpts = workdir / checkpoint.LATEST_DIR
  # A save killed midway: Orbax's temporary folder for step 4, never renamed.
  tmp = ckpts / "4.orbax-checkpoint-tmp-1700000000"
  (tmp / "state").mkdir(parents=True)
  (tmp / "state" / "_METADATA").write_text("{")
  # Step 3 finished but one of its array files was later truncated (disk trouble, a partial copy).
  for folder, _, files in os.walk(ckpts / "3" / "state"):
    for name in files if os.path.basename(folder) == "d" else ():  # OCDBT data files
      with open(os.path.join(folder, name), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(folder, name)) // 3)
  mngr, _ = checkpoint.managers(str(workdir), keep=5)
  assert mngr.latest_step() == 3  # the tmp folder is not a step
  state, meta = checkpoint.restore(mngr, _state(0))
  assert int(state["step"]) == 2 and meta["bookkeeping"] == {"at": 2}
  np.testing.assert_array_equal(state["params"]["w"], np.full((64, 32), 2.0, np.float32))
  assert f"{ckpts}/3 is unreadable" in capsys.readouterr().err
  with pytest.raises(checkpoint.CheckpointError, match=f"{ckpts}/3 is unreadable"):
    checkpoint.restore(mngr, _state(0), step=3)


def test_check_meta_runs_before_arrays_are_read(three_steps):
  _, latest = three_steps
  def refuse(meta):
    raise ValueError(f"different run {meta['bookkeeping']}")
  with pytest.raises(ValueError, match="different run {'at': 3}"):
    checkpoint.restore(latest, _state(0), check_meta=refuse)


def test_unwritable_checkpoint_dir_is_a_checkpoint_error(tmp_path):
  # As root, chmod does not stop writes; a path through a regular file fails for everyone (ENOTDIR/EEXIST).
  (tmp_path / "checkpoints").write_text("not a folder")
  with pytest.raises(checkpoint.CheckpointError, match=f"cannot write checkpoints to {tmp_path}/checkpoints"):
    checkpoint.managers(str(tmp_path))
  with pytest.raises(checkpoint.CheckpointError, match="cannot write checkpoints to .*checkpoints/run: Not a directory"):
    checkpoint.check_writable(str(tmp_path / "checkpoints" / "run"))


def test_restore_and_data_reads_never_unpickle(three_steps, tmp_path_factory, monkeypatch):
  from lungct.data import lung_ct
  from tests.helpers import tiny_config
  d = tiny_config(tmp_path_factory.mktemp("tfds")).data
  d.num_scans, d.shape, d.phantom_shape = 6, (8, 16, 16), (32, 32, 16)
  d.split_fractions = (0.5, 0.25, 0.25)
  builder = lung_ct.prepare(d)
  _, latest = three_steps

  def no_pickle(*a, **k):
    raise AssertionError("pickle used")
  for name in ("load", "loads"):
    monkeypatch.setattr(pickle, name, no_pickle)
  monkeypatch.setattr(pickle, "Unpickler", no_pickle)
  state, meta = checkpoint.restore(latest, _state(0))
  assert int(state["step"]) == 3 and meta["config"] == {"seed": 0}
  src = builder.as_data_source("train")
  ex = src[0]
  assert ex["image"].shape == (8, 16, 16, 1) and ex["image"].dtype == np.float16
  assert checkpoint.read_meta(str(three_steps[0]))["bookkeeping"] == {"at": 3}
