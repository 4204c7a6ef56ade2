"""Why does the tutorial CNN slow down per volume from batch 2 to 16 on a GPU? Profile both batches.

For each batch size and lungct variant ("xla": max-pool by reduce_window / select_and_scatter, as in
cnn3d.py today; "xla:rpool": max-pool by reshape + max, the proposed change) this compiles the train step,
writes its optimized HLO (layouts, cuDNN custom calls, transposes), traces 3 steps with `jax.profiler`
(a Perfetto trace) and prints the device time per kernel, largest first, so one run shows where the
time goes.

    OUT=/tmp/out python benchmarks/gpu_profile.py --batches 2 16
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _common  # noqa: E402
import train_step  # noqa: E402


def kernel_times(trace_dir: str) -> tuple[dict[str, float], float]:
  """{kernel name: total device microseconds} over the GPU rows of the Perfetto trace, and their sum."""
  files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True) + \
      glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
  if not files:
    return {}, 0.0
  with gzip.open(sorted(files)[-1], "rt") as f:
    events = json.load(f)
  events = events.get("traceEvents", events) if isinstance(events, dict) else events
  names = {e.get("pid"): e.get("args", {}).get("name", "") for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  gpu = {pid for pid, n in names.items() if "GPU" in n or "gpu" in n or "/device:" in n and "CPU" not in n}
  gpu = gpu or set(names)  # no device rows (a CPU run): the host's rows
  totals: dict[str, float] = collections.defaultdict(float)
  for e in events:
    if e.get("ph") == "X" and e.get("pid") in gpu:
      totals[e.get("name", "?")] += float(e.get("dur", 0.0))
  return dict(totals), sum(totals.values())


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batches", type=int, nargs="+", default=(2, 16))
  p.add_argument("--variants", nargs="+", default=("xla", "xla:rpool"))
  p.add_argument("--dtype", default="float32")
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--shape", type=int, nargs=3, default=(64, 128, 128))
  p.add_argument("--top", type=int, default=12)
  p.add_argument("--out", default=os.environ.get("OUT", "/tmp/lungct_profile"))
  args = p.parse_args(argv)
  import jax
  summary = {}
  for batch in args.batches:
    for variant in args.variants:
      tag = f"b{batch}_{variant.replace(':', '_')}_{args.dtype}"
      one, info = train_step.setup_lungct("cnn3d", batch, tuple(args.shape), args.dtype, False, variant)
      os.makedirs(os.path.join(args.out, "profile"), exist_ok=True)
      with open(os.path.join(args.out, "profile", f"hlo_{tag}.txt"), "w") as f:
        f.write(info["_holder"]["compiled"].as_text())
      for _ in range(3):
        one()
      t = time.perf_counter()
      for _ in range(args.steps):
        one()
      step_s = (time.perf_counter() - t) / args.steps
      trace_dir = os.path.join(args.out, "profile", tag)
      with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(args.steps):
          one()
      totals, total = kernel_times(trace_dir)
      print(f"\n== cnn3d {tag}: {step_s * 1e3:.2f} ms/step, {batch / step_s:.1f} vol/s; "
            f"device kernels {total / args.steps / 1e3:.2f} ms/step (compile {info['compile_s']:.1f} s)")
      for name, us in sorted(totals.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"  {us / args.steps / 1e3:9.3f} ms  {100 * us / max(total, 1e-9):5.1f}%  {name[:110]}")
      summary[tag] = {"step_s": step_s, "volumes_per_s": batch / step_s, "kernel_ms_per_step": total / args.steps / 1e3,
                      "top": sorted(((n, us / args.steps / 1e3) for n, us in totals.items()), key=lambda kv: -kv[1])[:40]}
  _common.write_json(os.path.join(args.out, "gpu_profile.json"), summary, indent=1)


if __name__ == "__main__":
  main()
