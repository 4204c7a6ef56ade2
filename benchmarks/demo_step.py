"""Train step of the default (demo) config: im2col vs onednn vs onednn with common.max_pool, alternating.

    python benchmarks/demo_step.py --steps 5
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import _common  # noqa: E402

SPECS = ("im2col", "onednn", "onednn:rpool")


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--steps", type=int, default=5, help="timed steps per side (the median is reported)")
  p.add_argument("--warmup", type=int, default=1)
  _common.add_json_arg(p)
  args = p.parse_args(argv)
  import jax
  import train_step as ts
  from configs import default
  sides = {}
  for spec in SPECS:
    impl, _, var = spec.partition(":")
    c = default.get_config()
    c.augment.enabled = False
    c.model.conv_impl = impl
    step, state, data, key = ts._compiled_step(c, c.train.batch_size, tuple(c.data.shape), jax.devices()[:1])
    with (ts._reshape_pool() if var else contextlib.nullcontext()):
      comp = step.lower(state, data, key).compile()
    h = {"s": state}

    def one(comp=comp, h=h, data=data, key=key):
      h["s"], m = comp(h["s"], data, key)
      jax.block_until_ready(m["loss"])
    sides[spec] = one
  times = _common.time_interleaved(sides, args.steps, args.warmup)
  for k, v in times.items():
    print(k, "median s/step", round(statistics.median(v), 3), [round(t, 2) for t in v])
  out = {"cpu": _common.cpu_name(), "step_times_s": times,
         "median_step_s": {k: statistics.median(v) for k, v in times.items()}}
  _common.write_json(args.json, out)
  return out


if __name__ == "__main__":
  main()
