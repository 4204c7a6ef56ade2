"""Soak: 200 steps with a save every 10; memory stays flat and every kept checkpoint restores."""
from __future__ import annotations

import os
import time

import numpy as np
import psutil
import pytest

from tests.reliability import _cli

RSS_GROWTH_BOUND = 0.15  # measured on 2 CPU cores: 930 MiB at step 50, 709 MiB at step 200 (-24%)


@pytest.mark.slow  # about 2-3 minutes on 2 cores
def test_200_steps_memory_flat_and_checkpoints_restore(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  _cli.build_dataset(data_dir)
  w = tmp_path_factory.mktemp("soak")
  proc = _cli.popen(w, data_dir, "--config.train.num_epochs=0", "--config.train.num_steps=200",
                    "--config.train.checkpoint_every_steps=10", "--config.train.eval_every_steps=50",
                    "--config.train.log_every_steps=10", "--config.train.keep_checkpoints=3")
  rss, ps = {}, psutil.Process(proc.pid)
  try:
    while proc.poll() is None and len(rss) < 2:
      names = os.listdir(w / "checkpoints") if (w / "checkpoints").exists() else []
      for s in (50, 200):
        if str(s) in names and s not in rss:
          rss[s] = ps.memory_info().rss
      time.sleep(0.01)
    out, _ = proc.communicate(timeout=300)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, out[-3000:]
  growth = rss[200] / rss[50] - 1
  print(f"RSS after step 50: {rss[50] / 2**20:.0f} MiB, after step 200: {rss[200] / 2**20:.0f} MiB "
        f"({growth:+.1%})")
  assert growth < RSS_GROWTH_BOUND
  assert sorted(os.listdir(w / "checkpoints")) == ["180", "190", "200"]
  for step in (180, 190, 200):
    s, leaves = _cli.params(w, step)
    assert s == step and all(np.isfinite(x).all() for x in leaves)
  import orbax.checkpoint as ocp
  best = ocp.CheckpointManager(str(w / "best"), item_names=("state", "meta"))
  (b,) = best.all_steps()
  assert b in (50, 100, 150, 200)
  assert best.restore(b, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]["step"] == b
