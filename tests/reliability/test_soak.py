"""Soak: many steps with a save every 10; memory stays flat and every kept checkpoint restores.

The default run (60 steps, in the README's test command) checks memory between steps 20 and 60;
`-m slow` runs the 200-step version (steps 50 and 200)."""
from __future__ import annotations

import os
import time

import numpy as np
import psutil
import pytest

from tests.reliability import _cli

RSS_GROWTH_BOUND = 0.15  # measured on 2 CPU cores: 930 MiB at step 50, 709 MiB at step 200 (-24%)


@pytest.mark.parametrize("first, last", [(20, 60), pytest.param(50, 200, marks=pytest.mark.slow)])
def test_memory_flat_and_checkpoints_restore(first, last, tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  _cli.build_dataset("classify", data_dir)
  w = tmp_path_factory.mktemp("soak")
  proc = _cli.popen("classify", w, data_dir, "--config.train.num_epochs=0", f"--config.train.num_steps={last}",
                    "--config.train.checkpoint_every_steps=10", f"--config.train.eval_every_steps={first}",
                    "--config.train.log_every_steps=10", "--config.train.keep_checkpoints=3")
  rss, ps = {}, psutil.Process(proc.pid)
  try:
    while proc.poll() is None and len(rss) < 2:
      names = os.listdir(w / "checkpoints") if (w / "checkpoints").exists() else []
      for s in (first, last):
        if str(s) in names and s not in rss:
          rss[s] = ps.memory_info().rss
      time.sleep(0.01)
    out, _ = proc.communicate(timeout=300)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, out[-3000:]
  growth = rss[last] / rss[first] - 1
  print(f"RSS after step {first}: {rss[first] / 2**20:.0f} MiB, after step {last}: {rss[last] / 2**20:.0f} MiB "
        f"({growth:+.1%})")
  assert growth < RSS_GROWTH_BOUND
  kept = [last - 20, last - 10, last]
  assert sorted(os.listdir(w / "checkpoints"), key=int) == [str(k) for k in kept]
  for step in kept:
    s, leaves = _cli.params(w, step)
    assert s == step and all(np.isfinite(x).all() for x in leaves)
  import orbax.checkpoint as ocp
  best = ocp.CheckpointManager(str(w / "best"), item_names=("state", "meta"))
  (b,) = best.all_steps()
  assert b % first == 0 and b <= last
  assert best.restore(b, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]["step"] == b
