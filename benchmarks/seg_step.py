"""The nodule segmentation recipe's train step (configs/nodule_seg.py: 3-level U-Net (16, 32, 64), batch 8 of
32^3 crops, flips + cube rotations on device, Dice + BCE, AdamW) with each convolution formulation, steps of the
variants alternating (A B C A B C ...) so a busy machine slows all alike; median step time and the ratio to XLA.

    python benchmarks/seg_step.py --steps 10

Variants (the same parameters, the same batch):
  xla          XLA's convolutions and `lax.conv_transpose` for the up-convolutions (model.conv_impl="xla");
  onednn       oneDNN's convolutions and the up-convolutions as one matmul (`common.ConvTranspose`, kernel ==
               stride), model.conv_impl="onednn";
  onednn_laxup oneDNN's convolutions, the up-convolutions left to `lax.conv_transpose` (what the U-Net ran before
               the matmul form): how much of the gain the transposed convolutions are.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import _common  # noqa: E402


def setup(variant: str):
  import jax
  from configs import nodule_seg
  from lungct import runtime, tasks, train
  from lungct.models import common
  config = nodule_seg.get_config()
  config.model.conv_impl = "xla" if variant == "xla" else "onednn"
  graphdef, state, tx = train.create_state(config, 640)
  mesh = runtime.make_mesh(config, jax.devices()[:1])
  state = jax.device_put(state, runtime.replicated(mesh))
  step_fn, _ = train.compile_steps(graphdef, tx, tasks.get(config), config, mesh)
  rng = np.random.default_rng(0)
  b, shape = config.train.batch_size, tuple(config.data.shape)
  images = rng.random((b, *shape, 1), np.float32)
  zz, yy, xx = np.meshgrid(*[np.arange(s) - (s - 1) / 2 for s in shape], indexing="ij")
  masks = np.repeat(((zz ** 2 + yy ** 2 + xx ** 2) <= 36)[None, ..., None], b, 0).astype(np.uint8)
  to_device = lambda: {"image": runtime.to_global(mesh, images), "mask": runtime.to_global(mesh, masks)}  # noqa: E731
  key = jax.random.PRNGKey(0)
  saved = common.ConvTranspose._matmul_ok
  if variant == "onednn_laxup":
    common.ConvTranspose._matmul_ok = lambda self, x: False
  try:
    t = time.perf_counter()
    compiled = step_fn.lower(state, to_device(), key).compile()
    compile_s = time.perf_counter() - t
  finally:
    common.ConvTranspose._matmul_ok = saved
  holder = {"state": state}

  def one():
    holder["state"], m = compiled(holder["state"], to_device(), key)
    holder["loss"] = float(m["loss"])  # blocks
  return one, compile_s


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--variants", default="xla,onednn,onednn_laxup")
  _common.add_json_arg(p)
  args = p.parse_args()
  variants = args.variants.split(",")
  fns, out = {}, {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.processor() or
                  platform.machine(), "load_before": os.getloadavg()[0], "variants": {}}
  for v in variants:
    fns[v], c = setup(v)
    fns[v]()   # warm-up
    out["variants"][v] = {"compile_s": c}
  times = {v: [] for v in variants}
  for _ in range(args.steps):
    for v in variants:
      t = time.perf_counter()
      fns[v]()
      times[v].append(time.perf_counter() - t)
  out["load_after"] = os.getloadavg()[0]
  ref = statistics.median(times[variants[0]])
  for v in variants:
    med = statistics.median(times[v])
    out["variants"][v].update(median_s=med, vol_per_s=8 / med, speedup_vs_first=ref / med)
    print(f"{v:14s} median step {med:.3f} s  ({8 / med:.1f} vol/s)  {ref / med:.2f}x {variants[0]}  "
          f"(compile {out['variants'][v]['compile_s']:.0f} s)")
  print(f"load average {out['load_before']:.1f} before, {out['load_after']:.1f} after")
  _common.write_json(args.json, out)


if __name__ == "__main__":
  main()
