"""Training-step throughput and MFU: lungct (jit of `lungct.train.train_step`) vs PyTorch.

A full step is forward + backward + Adam update on a batch of (B, D, H, W, 1) volumes,
augmentation off. FLOPs come from XLA's cost analysis of the compiled lungct step and
the same count is used for both sides; the peak is a float32 matmul measured in the
same run (numpy on CPU, jnp on an accelerator), so MFU = achieved / that peak.

    python benchmarks/train_step.py                       # both models, both frameworks
    python benchmarks/train_step.py --model cnn3d --steps 5 --json out.json
    python benchmarks/train_step.py --dtype bfloat16 --side lungct
    python benchmarks/train_step.py --model cnn3d --conv-impl onednn,im2col   # several lungct variants, one run

With several --conv-impl values, each is a side of its own ("lungct[onednn]", ...) and all sides alternate.
The FLOP count always comes from the XLA-convolution compile of the same step: XLA's cost analysis does not
count custom calls (oneDNN on CPU, cuDNN on GPU), so those compiles would under-count.

PyTorch is optional: without it only the lungct side runs. Nothing here needs the
input pipeline (tensorflow_datasets, grain), which may be absent on an accelerator host.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
import types
from typing import Any, Callable

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from _common import (add_json_arg, cpu_name, have_torch, jax_matmul_peak, numpy_matmul_peak,  # noqa: E402
                     peak_rss_mb, time_interleaved, write_json)

MODELS = ("cnn3d", "resnet18")


# ----------------------------------------------------------------------------- helpers

def import_train():
  """`lungct.train`, stubbing its input-pipeline modules when their dependencies are not installed.

  The train step never touches `lungct.data.pipeline` / `lungct.data.lung_ct` (they import grain,
  tensorflow_datasets and nibabel), so on a host without them empty placeholders are enough.
  """
  try:
    from lungct import train
    return train
  except ModuleNotFoundError as e:
    missing = (e.name or "").split(".")[0]
    if missing not in ("grain", "tensorflow_datasets", "nibabel", "array_record", "tensorboardX"):
      raise
    print(f"[train_step] {missing} is not installed: stubbing lungct's input-pipeline modules", file=sys.stderr)
  for name in ("lungct.data.pipeline", "lungct.data.lung_ct"):
    sys.modules.setdefault(name, types.ModuleType(name))
  from lungct import train
  return train


def lungct_config(model: str, batch: int, shape: tuple[int, int, int], dtype: str, remat: bool | str,
                  conv_impl: str | None = None):
  """The default config set to the benchmark: the tutorial CNN or ResNet-18, Adam, augmentation off."""
  from configs import default
  from lungct import models
  config = default.get_config()
  config.dtype = dtype
  config.data.shape = tuple(shape)
  config.augment.enabled = False
  config.train.batch_size = batch
  config.train.optimizer = "adam"
  config.train.learning_rate = 1e-3
  config.train.schedule = "constant"
  impl = conv_impl or config.model.get("conv_impl", "xla")
  if model == "cnn3d":
    config.model = models.model_config("cnn3d", features=(64, 64, 128, 256), dense=512, dropout=0.3,
                                       remat=remat, conv_impl=impl)
  elif model == "resnet18":
    config.model = models.model_config("resnet3d", depth=18, width=64, dropout=0.0, remat=remat, conv_impl=impl)
  else:
    raise ValueError(f"unknown model {model!r}; known: {MODELS}")
  return config


def _compiled_step(config, batch: int, shape, devices):
  """(compiled train step, state, batch dict, key) of `config` on a 1-device mesh."""
  import jax
  from lungct import runtime, tasks
  train = import_train()
  graphdef, state, tx = train.create_state(config, total_steps=1000)
  mesh = runtime.make_mesh(config, devices)
  state = jax.device_put(state, runtime.replicated(mesh))
  step_fn, _ = train.compile_steps(graphdef, tx, tasks.get(config), config, mesh)
  rng = np.random.default_rng(0)
  data = {"image": runtime.to_global(mesh, rng.random((batch, *shape, 1), np.float32)),
          "target": runtime.to_global(mesh, (np.arange(batch) % 2).astype(np.int32))}
  return step_fn, state, data, jax.random.PRNGKey(0)


def cost_flops(compiled) -> float:
  """FLOPs of a compiled XLA executable (cost_analysis is a dict or, in older JAX, a list of dicts)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get("flops", float("nan"))) if cost else float("nan")


# ----------------------------------------------------------------------------- the two sides

class _reshape_pool:
  """Within the block: the tutorial CNN and ResNet pool with `common.max_pool` (reshape / strided slices +
  max) instead of `nnx.max_pool` -- what the cnn3d.py/resnet3d.py change did (benchmarks/README.md, rounds 2 and 4).
  Both models now pool with `common.max_pool`, so on current code this is a no-op (kept so the recorded commands
  still run)."""

  def __enter__(self):
    from flax import nnx
    from lungct.models import cnn3d, common, resnet3d
    self.saved = [(m, m.nnx) for m in (cnn3d, resnet3d)]
    patched = types.ModuleType("nnx_with_common_max_pool")
    patched.__dict__.update(vars(nnx))
    patched.max_pool = common.max_pool
    for m, _ in self.saved:
      m.nnx = patched

  def __exit__(self, *exc):
    for m, saved in self.saved:
      m.nnx = saved


def setup_lungct(model: str, batch: int, shape, dtype: str, remat: bool,
                 conv_impl: str | None = None) -> tuple[Callable[[], None], dict[str, Any]]:
  """lungct's train step jitted on a 1-device mesh and compiled: (one blocking step, info with the XLA FLOP count).

  `conv_impl` may carry the suffix ":rpool" (tutorial CNN pooled by reshape + max, see `_reshape_pool`).
  """
  import contextlib
  import jax
  train = import_train()
  conv_impl, _, variant = (conv_impl or "").partition(":")
  pool = _reshape_pool() if variant == "rpool" else contextlib.nullcontext()
  config = lungct_config(model, batch, shape, dtype, remat, conv_impl or None)
  step_fn, state, data, key = _compiled_step(config, batch, shape, jax.devices()[:1])
  t = time.perf_counter()
  with pool:
    compiled = step_fn.lower(state, data, key).compile()
  compile_s = time.perf_counter() - t
  flops = cost_flops(compiled)
  holder = {"state": state, "compiled": compiled}

  def one():
    holder["state"], m = compiled(holder["state"], data, key)
    jax.block_until_ready(m["loss"])
    holder["loss"] = float(m["loss"])

  return one, {"framework": "lungct", "compile_s": compile_s, "flops_per_step": flops, "_holder": holder,
               "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
               "jax": jax.__version__}


def setup_torch(model: str, batch: int, shape, dtype: str) -> tuple[Callable[[], None], dict[str, Any]]:
  """The PyTorch twin's step (forward, BCE-with-logits, backward, Adam with the same lr/eps) and info."""
  import torch
  import torch_models
  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.manual_seed(0)
  torch.backends.cudnn.benchmark = True
  net = torch_models.create(model).to(device).train()
  opt = torch.optim.Adam(net.parameters(), lr=1e-3, eps=1e-8)
  rng = np.random.default_rng(0)
  x = torch.from_numpy(rng.random((batch, 1, *shape), np.float32)).to(device)  # NCDHW
  y = torch.from_numpy((np.arange(batch) % 2).astype(np.float32)).to(device)
  loss_fn = torch.nn.BCEWithLogitsLoss()
  autocast = dtype == "bfloat16"
  holder = {}

  def one():
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
      logits = net(x)[:, 0]
    loss = loss_fn(logits.float(), y)
    loss.backward()
    opt.step()
    holder["loss"] = float(loss.detach())  # synchronises
    if device == "cuda":
      torch.cuda.synchronize()

  return one, {"framework": "pytorch", "_holder": holder,
               "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
               "torch": torch.__version__, "threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------- main

def summarise(r: dict[str, Any], batch: int, flops: float, peak: float) -> dict[str, Any]:
  med = statistics.median(r["step_times_s"])
  r.update(median_step_s=med, volumes_per_s=batch / med, gflops_per_s=flops / med / 1e9,
           mfu=flops / med / 1e9 / peak if peak else float("nan"))
  return r


def main(argv=None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", choices=(*MODELS, "all"), default="all")
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--shape", type=int, nargs=3, default=(64, 128, 128), metavar=("D", "H", "W"))
  p.add_argument("--steps", type=int, default=3, help="timed steps (the median is reported)")
  p.add_argument("--warmup", type=int, default=1, help="untimed steps after compilation")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--remat", action="store_true", help="rematerialise block activations (lungct)")
  p.add_argument("--conv-impl", default=None,
                 help="lungct config.model.conv_impl (xla | im2col | onednn); comma-separated: one side each")
  p.add_argument("--remat-policy", default=None,
                 help="lungct config.model.remat as a policy name (see lungct.models.common.REMAT_POLICIES)")
  p.add_argument("--side", choices=("both", "lungct", "pytorch"), default="both")
  p.add_argument("--no-peak", action="store_true", help="skip the matmul peak measurement")
  p.add_argument("--no-flops", action="store_true",
                 help="--side pytorch: skip the XLA FLOP count (keeps JAX out of the process, for memory.py)")
  add_json_arg(p)
  args = p.parse_args(argv)

  jax_free = args.side == "pytorch" and args.no_flops and args.no_peak
  if jax_free:
    backend = "cpu"
  else:
    import jax
    backend = jax.default_backend()
  models = MODELS if args.model == "all" else (args.model,)
  sides = ("lungct", "pytorch") if args.side == "both" else (args.side,)
  if "pytorch" in sides and not have_torch():
    print("[train_step] torch is not installed: lungct side only", file=sys.stderr)
    sides = tuple(s for s in sides if s != "pytorch")
    if not sides:
      sides = ("lungct",)
  shape = tuple(args.shape)

  peak = {}
  if not args.no_peak:
    peak["numpy_float32"] = numpy_matmul_peak() if backend == "cpu" else float("nan")
    if backend != "cpu":
      peak["jax_" + args.dtype] = jax_matmul_peak(args.dtype)
  peak_used = peak.get("numpy_float32") if backend == "cpu" else peak.get("jax_" + args.dtype)
  peak_used = peak_used or 0.0

  out = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "host": platform.node(),
         "cpu": cpu_name(), "backend": backend, "args": vars(args), "peak_gflops": peak, "results": {}}
  impls = (args.conv_impl or "").split(",") if args.conv_impl else [None]
  remat = args.remat_policy or args.remat
  for m in models:
    fns, res = {}, {}
    if "lungct" in sides:
      for impl in impls:
        name = "lungct" if len(impls) == 1 else f"lungct[{impl}]"
        fns[name], res[name] = setup_lungct(m, args.batch, shape, args.dtype, remat, impl)
        res[name]["conv_impl"] = impl
      first = res[next(iter(res))]
      flops = first["flops_per_step"]
      if any(i not in (None, "xla", "im2col") for i in impls) or backend != "cpu":  # custom calls
        flops = float("nan") if args.no_flops else _flops_only(m, args.batch, shape, args.dtype, remat)
    elif args.no_flops:
      flops = float("nan")
    else:  # the FLOP count still comes from XLA: compile without running
      flops = _flops_only(m, args.batch, shape, args.dtype, remat)
    if "pytorch" in sides:
      fns["pytorch"], res["pytorch"] = setup_torch(m, args.batch, shape, args.dtype)
    for side, times in time_interleaved(fns, args.steps, args.warmup).items():
      r = res[side]
      r["step_times_s"], r["flops_per_step"] = times, flops
      r["final_loss"] = r.pop("_holder")["loss"]
      summarise(r, args.batch, flops, peak_used)
    if "pytorch" in res:
      for name in [k for k in res if k.startswith("lungct")]:
        key = "ratio_lungct_over_pytorch" + name[len("lungct"):]
        res[key] = res[name]["volumes_per_s"] / res["pytorch"]["volumes_per_s"]
    out["results"][m] = res
  out["peak_rss_mb"] = peak_rss_mb()
  if backend == "cpu" and not args.no_peak:  # the machine may be shared: keep the best of before and after
    peak["numpy_float32"] = max(peak["numpy_float32"], numpy_matmul_peak())
    for res in out["results"].values():
      for side in [k for k in res if not k.startswith("ratio")]:
        res[side]["mfu"] = res[side]["gflops_per_s"] / peak["numpy_float32"]
    peak_used = peak["numpy_float32"]
  print_table(out, peak_used)
  write_json(args.json, out)
  return out


def _flops_only(model, batch, shape, dtype, remat) -> float:
  """XLA's FLOP count of the step with XLA's own convolutions, compiled for the CPU (not run) at batch
  min(batch, 2) and scaled to `batch` (the per-volume work is the same; the optimizer's is negligible)."""
  import jax
  full, batch = batch, min(batch, 2)
  config = lungct_config(model, batch, shape, dtype, remat, "xla")
  step_fn, state, data, key = _compiled_step(config, batch, shape, jax.devices("cpu")[:1])
  return cost_flops(step_fn.lower(state, data, key).compile()) * full / batch


def print_table(out: dict[str, Any], peak: float) -> None:
  a = out["args"]
  print(f"\nTrain step, batch {a['batch']}, input {tuple(a['shape'])}x1, {a['dtype']}, remat={a['remat']}, "
        f"backend {out['backend']} ({out['cpu']})")
  print("peak (matmul): " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in out["peak_gflops"].items()))
  print(f"{'model':<10} {'framework':<9} {'step s':>8} {'vol/s':>8} {'GFLOP/step':>11} {'GFLOP/s':>9} {'MFU':>7}")
  for m, res in out["results"].items():
    for side in [k for k in res if not k.startswith("ratio")]:
      r = res[side]
      print(f"{m:<10} {side:<9} {r['median_step_s']:>8.3f} {r['volumes_per_s']:>8.3f} "
            f"{r['flops_per_step'] / 1e9:>11.1f} "
            f"{r['gflops_per_s']:>9.1f} {100 * r['mfu']:>6.1f}%  steps {[round(t, 2) for t in r['step_times_s']]}")
    for key in [k for k in res if k.startswith("ratio")]:
      print(f"{m:<10} {key.replace('ratio_', '')} throughput ratio: {res[key]:.2f}x")


if __name__ == "__main__":
  main()
