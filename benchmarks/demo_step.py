"""Train step of the default (demo) config: im2col vs onednn vs onednn with common.max_pool, alternating.

    python benchmarks/demo_step.py
"""
import sys, time, contextlib, statistics
import os
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jax, numpy as np
import train_step as ts
from configs import default
sides = {}
for spec in ["im2col", "onednn", "onednn:rpool"]:
  impl, _, var = spec.partition(":")
  c = default.get_config(); c.augment.enabled = False; c.model.conv_impl = impl
  step, state, data, key = ts._compiled_step(c, c.train.batch_size, tuple(c.data.shape), jax.devices()[:1])
  with (ts._reshape_pool() if var else contextlib.nullcontext()):
    comp = step.lower(state, data, key).compile()
  h = {"s": state}
  def one(comp=comp, h=h, data=data, key=key):
    h["s"], m = comp(h["s"], data, key); jax.block_until_ready(m["loss"])
  sides[spec] = one
times = ts.time_interleaved(sides, 5, 1)
for k, v in times.items(): print(k, "median s/step", round(statistics.median(v), 3), [round(t, 2) for t in v])
