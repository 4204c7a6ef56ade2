"""Peak resident memory of a training run, lungct vs PyTorch, same model and batch.

Each side runs `benchmarks/train_step.py --side <side>` (N steps) in its own subprocess; the
child's `ru_maxrss` (read by the child itself at exit) is the peak. PyTorch is skipped when absent.

    python benchmarks/memory.py --model cnn3d --steps 2
    python benchmarks/memory.py --model cnn3d --steps 1 --lungct onednn onednn+full onednn+conv_outputs

`--lungct` lists lungct variants, each `conv_impl[:variant][+remat_policy]` (see train_step.py). The train step
donates its state (params, optimizer state, batch statistics) in every variant.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _common  # noqa: E402


def peak_rss(side: str, model: str, batch: int, shape, steps: int, dtype: str, extra=()) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "r.json")
    cmd = [sys.executable, os.path.join(HERE, "train_step.py"), "--side", side, "--model", model,
           "--batch", str(batch), "--shape", *map(str, shape), "--steps", str(steps), "--warmup", "0",
           "--dtype", dtype, "--no-peak", "--no-flops", "--json", out, *extra]
    subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=os.path.dirname(HERE))
    with open(out) as f:
      r = json.load(f)
  return {"peak_rss_mb": r["peak_rss_mb"], "volumes_per_s": r["results"][model][side]["volumes_per_s"]}


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", choices=("cnn3d", "resnet18"), default="cnn3d")
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--shape", type=int, nargs=3, default=(64, 128, 128))
  p.add_argument("--steps", type=int, default=2)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--conv-impl", default="", help="also measure lungct with this conv_impl (e.g. im2col)")
  p.add_argument("--lungct", nargs="*", default=None,
                 help="lungct variants instead of the default config: conv_impl[+remat_policy] each")
  _common.add_json_arg(p)
  args = p.parse_args(argv)
  runs = {"lungct": ("lungct", ())}
  if args.lungct:
    runs = {}
    for spec in args.lungct:
      impl, _, policy = spec.partition("+")
      runs[f"lungct[{spec}]"] = ("lungct", ("--conv-impl", impl, *(("--remat-policy", policy) if policy else ())))
  if args.conv_impl:
    runs[f"lungct[{args.conv_impl}]"] = ("lungct", ("--conv-impl", args.conv_impl))
  if _common.have_torch():
    runs["pytorch"] = ("pytorch", ())
  out = {"model": args.model, "batch": args.batch, "shape": list(args.shape), "steps": args.steps, "results": {}}
  for name, (side, extra) in runs.items():
    out["results"][name] = peak_rss(side, args.model, args.batch, args.shape, args.steps, args.dtype, extra)
  print(f"Peak RSS of {args.steps} training steps, {args.model}, batch {args.batch}, input {tuple(args.shape)}:")
  for name, r in out["results"].items():
    print(f"  {name:<32} {r['peak_rss_mb']:8.0f} MiB  {r['volumes_per_s']:.3f} vol/s")
  if "pytorch" in out["results"]:
    torch_mb = out["results"]["pytorch"]["peak_rss_mb"]
    for name, r in out["results"].items():
      if name.startswith("lungct"):
        r["ratio_over_pytorch"] = r["peak_rss_mb"] / torch_mb
        print(f"  {name} / pytorch: {r['ratio_over_pytorch']:.2f}")
    if "lungct" in out["results"]:
      out["ratio_lungct_over_pytorch"] = out["results"]["lungct"]["ratio_over_pytorch"]
  _common.write_json(args.json, out)
  return out


if __name__ == "__main__":
  main()
