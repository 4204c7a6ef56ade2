"""The nodule recipe (configs/nodule.py) against PyTorch and MONAI: its train step, then a whole run on real crops.

    python benchmarks/nodule_step.py                      # both parts, 3-epoch runs (26 min on the loaded 2 cores)
    python benchmarks/nodule_step.py --part step --steps 20
    python benchmarks/nodule_step.py --part run --epochs 12 --json out.json   # the recipe's whole 12-epoch run

Part 1, the train step (batch 16 of 32^3 crops, augmentation on, steps of the sides alternating A B C A B C so a
busy machine slows all alike; median step time):
  lungct    the jitted `lungct.train.train_step` of configs/nodule.py (flips, 24 cube rotations, zoom and intensity
            jitter on device, ResNet-10 width 8, class-weighted BCE, AdamW + warmup-cosine), the batch copied
            from host memory every step as in the training loop;
  twin      its PyTorch twin (benchmarks/torch_models.py "nodule": same layers, dropout and loss; AdamW with
            the same schedule), the same augmentation as batched torch ops (flip/permute per example,
            `grid_sample` zoom);
  monai     the pipeline a MONAI user writes (benchmarks/monai_nodule.py): MONAI `resnet10` (widen_factor 1/8,
            3^3 stride-1 stem, no max-pool), RandFlipd/RandRotate90d/RandZoomd/intensity per example, collated.
FLOPs: XLA's cost analysis of the lungct step compiled with XLA's convolutions and augmentation off (the model
and optimizer; XLA does not count custom calls such as oneDNN's), the same count for every side; the peak is
the best float32 numpy matmul (4096^2) measured before and after in the same run; MFU = GFLOP/s / peak. The
process first re-executes itself as `lungct.main` does (`exec_with_huge_pages`: glibc's malloc with transparent
huge pages), so the lungct side runs as it does for users, and the PyTorch and MONAI sides get the same allocator.

Part 2, a whole run on the real LIDC-IDRI crops (`../shared/data/lidc_indeterminate`, which carry no
malignancy label: the label here is "diameter >= the median diameter", only to have something to learn and an
AUC to show that both sides learned it), each side in a fresh process, timed from outside:
  lungct    `python -m lungct.main --config configs/nodule.py` with source=folder (the dataset build timed
            separately: it happens once, a rerun reuses it);
  monai     `python benchmarks/monai_nodule.py` on the same train/validation/test split (read from lungct's
            built dataset): preprocessing cached in memory (every run), train, validation AUC each epoch, best
            epoch on validation and test.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import _common  # noqa: E402  (--json, peak, timing and CPU helpers)
import train_step as ts  # noqa: E402  (the FLOP count of a compiled step)

BATCH = 16
SHAPE = (32, 32, 32)
DATA = os.path.join(ROOT, "..", "shared", "data", "lidc_indeterminate")


def nodule_config(conv_impl: str | None = None):
  from configs import nodule
  config = nodule.get_config()
  if conv_impl:
    config.model.conv_impl = conv_impl
  return config


def host_batch(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """A batch of 16 smooth random "crops" in [0, 1] (B, 32, 32, 32, 1) and alternating labels."""
  rng = np.random.default_rng(seed)
  x = rng.random((BATCH, *SHAPE, 1), np.float32)
  return x, (np.arange(BATCH) % 2).astype(np.int32)


# ----------------------------------------------------------------------------- part 1: the sides

def setup_lungct(conv_impl: str | None, total_steps: int = 180) -> tuple[Callable[[], None], dict]:
  import jax
  from lungct import runtime, tasks, train
  config = nodule_config(conv_impl)
  graphdef, state, tx = train.create_state(config, total_steps)
  mesh = runtime.make_mesh(config, jax.devices()[:1])
  state = jax.device_put(state, runtime.replicated(mesh))
  step_fn, _ = train.compile_steps(graphdef, tx, tasks.get(config), config, mesh)
  images, labels = host_batch()
  to_device = lambda: {"image": runtime.to_global(mesh, images), "target": runtime.to_global(mesh, labels)}  # noqa: E731
  key = jax.random.PRNGKey(0)
  t = time.perf_counter()
  compiled = step_fn.lower(state, to_device(), key).compile()
  compile_s = time.perf_counter() - t
  holder = {"state": state}

  def one():
    holder["state"], m = compiled(holder["state"], to_device(), key)
    holder["loss"] = float(m["loss"])  # blocks
  return one, {"compile_s": compile_s, "conv_impl": config.model.conv_impl, "_holder": holder}


def lungct_flops() -> float:
  """XLA's FLOP count of configs/nodule.py's step with XLA convolutions, augmentation off, at batch 2 x 8."""
  import jax
  from lungct import runtime, tasks, train
  config = nodule_config("xla")
  config.augment.enabled = False
  config.train.batch_size = 2
  graphdef, state, tx = train.create_state(config, 180)
  mesh = runtime.make_mesh(config, jax.devices("cpu")[:1])
  step_fn, _ = train.compile_steps(graphdef, tx, tasks.get(config), config, mesh)
  images, labels = host_batch()
  data = {"image": runtime.to_global(mesh, images[:2]), "target": runtime.to_global(mesh, labels[:2])}
  return ts.cost_flops(step_fn.lower(state, data, jax.random.PRNGKey(0)).compile()) * BATCH / 2


def torch_augment(x, gen):
  """configs/nodule.py's augmentation as batched torch ops on (B, 1, D, H, W). Its flips of every axis and of W,
  then a uniform rotation of the cube, make each example's orientation uniform over the cube's 48 symmetries:
  here a uniform axis order and a flip of each axis with probability 1/2. Then a zoom 0.9-1.1 (trilinear,
  zeros outside) and intensity scale and shift 0.03; each example draws its own."""
  import torch
  import torch.nn.functional as F
  b = x.shape[0]
  perms = ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))
  out = []
  for i in range(b):
    p = perms[int(torch.randint(6, (1,), generator=gen))]
    dims = [1 + a for a in range(3) if bool(torch.rand(1, generator=gen) < 0.5)]
    v = x[i].permute(0, *(1 + q for q in p))
    out.append(v.flip(dims) if dims else v)
  x = torch.stack(out)
  s = 0.9 + 0.2 * torch.rand(b, generator=gen)
  theta = torch.zeros(b, 3, 4)
  theta[:, 0, 0] = theta[:, 1, 1] = theta[:, 2, 2] = 1.0 / s
  grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=True)
  x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
  scale = 1 + (torch.rand(b, 1, 1, 1, 1, generator=gen) * 0.06 - 0.03)
  shift = torch.rand(b, 1, 1, 1, 1, generator=gen) * 0.06 - 0.03
  return x * scale.to(x.device) + shift.to(x.device)


def setup_twin(total_steps: int = 180) -> tuple[Callable[[], None], dict]:
  import torch
  import monai_nodule
  import torch_models
  torch.manual_seed(0)
  dev = torch_device()
  net = torch_models.create("nodule").to(dev).train()
  opt, sched = monai_nodule.make_optimizer(net, total_steps)
  images, labels = host_batch()
  gen = torch.Generator().manual_seed(0)
  holder = {}

  def one():
    x = torch.from_numpy(images).permute(0, 4, 1, 2, 3).to(dev)  # NDHWC -> NCDHW
    holder["loss"] = monai_nodule.train_step(net, opt, sched, torch_augment(x, gen),
                                             torch.from_numpy(labels).float().to(dev))  # float() synchronises
  return one, {"threads": torch.get_num_threads(), "torch": torch.__version__, "device": str(dev),
               "_holder": holder}


def torch_device():
  import torch
  return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def setup_monai(total_steps: int = 180) -> tuple[Callable[[], None], dict]:
  import monai
  import torch
  from monai.transforms import Compose
  import monai_nodule
  monai.utils.set_determinism(0)
  dev = torch_device()
  net = monai_nodule.make_model().to(dev).train()
  opt, sched = monai_nodule.make_optimizer(net, total_steps)
  images, labels = host_batch()
  cached = [{"image": torch.from_numpy(images[i]).permute(3, 0, 1, 2).contiguous(), "label": float(labels[i])}
            for i in range(BATCH)]
  rand = Compose(monai_nodule.random_transforms())
  holder = {}

  def one():
    items = [rand(dict(c)) for c in cached]
    x = torch.stack([monai_nodule.plain(it["image"]) for it in items]).to(dev)  # transforms on the CPU
    y = torch.tensor([it["label"] for it in items], dtype=torch.float32).to(dev)
    holder["loss"] = monai_nodule.train_step(net, opt, sched, x, y)
  return one, {"monai": monai.__version__, "_holder": holder}


def matmul_peak() -> float:
  """The numpy float32 matmul on CPU; a jnp float32 matmul on an accelerator."""
  import jax
  return _common.numpy_matmul_peak() if jax.default_backend() == "cpu" else _common.jax_matmul_peak("float32")


def part_step(args) -> dict[str, Any]:
  import jax
  peak0 = matmul_peak()
  fns, info = {}, {}
  for impl in args.lungct:
    name = "lungct" if len(args.lungct) == 1 else f"lungct[{impl}]"
    fns[name], info[name] = setup_lungct(impl)
  if _common.have_torch():
    fns["twin"], info["twin"] = setup_twin()
    fns["monai"], info["monai"] = setup_monai()
  else:
    print("[nodule_step] torch is not installed: lungct only", file=sys.stderr)
  flops = lungct_flops()
  times = _common.time_interleaved(fns, args.steps, args.warmup)
  peak = max(peak0, matmul_peak())
  out = {"peak_gflops": peak, "flops_per_step": flops, "backend": jax.default_backend(),
         "device": str(jax.devices()[0].device_kind), "sides": {}}
  for name, t in times.items():
    med = statistics.median(t)
    r = {k: v for k, v in info[name].items() if not k.startswith("_")}
    r.update(step_times_s=t, median_step_s=med, volumes_per_s=BATCH / med, gflops_per_s=flops / med / 1e9,
             mfu=flops / med / 1e9 / peak, final_loss=info[name]["_holder"]["loss"])
    out["sides"][name] = r
  first = next(iter(out["sides"]))
  for name, r in out["sides"].items():
    r["lungct_speedup"] = r["median_step_s"] / out["sides"][first]["median_step_s"]
  return out


def print_step(out: dict) -> None:
  print(f"\nPart 1 ({out['backend']}, {out['device']}): configs/nodule.py train step, batch {BATCH}, {SHAPE}x1, "
        f"float32, augmentation on; "
        f"{out['flops_per_step'] / 1e9:.1f} GFLOP/step (XLA count); matmul peak {out['peak_gflops']:.1f} GFLOP/s")
  print(f"{'side':<16} {'s/step':>7} {'vol/s':>7} {'GFLOP/s':>8} {'MFU':>6} {'lungct is':>10}")
  for name, r in out["sides"].items():
    print(f"{name:<16} {r['median_step_s']:>7.3f} {r['volumes_per_s']:>7.1f} {r['gflops_per_s']:>8.1f} "
          f"{100 * r['mfu']:>5.1f}% {r['lungct_speedup']:>9.2f}x  steps {[round(t, 3) for t in r['step_times_s']]}")


# ----------------------------------------------------------------------------- part 2: whole runs

def write_labels(path: str) -> None:
  """filename,label,patient_id from the crops' nodules.csv: label = diameter >= the median diameter."""
  with open(os.path.join(DATA, "nodules.csv"), newline="") as f:
    rows = list(csv.DictReader(f))
  median = float(np.median([float(r["diameter_mm"]) for r in rows]))
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["filename", "label", "patient_id"])
    for r in rows:
      w.writerow([r["filename"], int(float(r["diameter_mm"]) >= median), r["patient_id"]])


def timed(cmd: list[str], log: str, env: dict | None = None) -> float:
  t = time.perf_counter()
  with open(log, "w") as f:
    rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env).returncode
  if rc:
    with open(log) as f:
      tail = f.read()[-3000:]
    raise RuntimeError(f"{' '.join(cmd)} failed ({rc}); the end of {log}:\n{tail}")
  return time.perf_counter() - t


def part_run(args, tmp: str) -> dict[str, Any]:
  labels = os.path.join(tmp, "labels.csv")
  write_labels(labels)
  data_dir = os.path.join(tmp, "tfds")
  flags = ["--config.data.source=folder", f"--config.data.manual_dir={DATA}", f"--config.data.labels_csv={labels}",
           f"--config.data.data_dir={data_dir}"]
  env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
  from lungct.data import lung_ct
  data_cfg = run_data_config(labels, data_dir)
  t = time.perf_counter()
  lung_ct.prepare(data_cfg)
  out: dict[str, Any] = {"build_s": time.perf_counter() - t}
  split_csv = os.path.join(tmp, "split.csv")
  out["split"] = write_split(labels, data_cfg, split_csv)
  runs = []
  from lungct import main as lungct_main
  # MONAI as its users run it: without the malloc tunable this process may have re-executed itself with.
  monai_env = {k: v for k, v in env.items() if not (k == "GLIBC_TUNABLES" and v == lungct_main.HUGE_PAGES)}
  sides = ("lungct", "monai") + (("lungct",) if args.compile_cache else ())
  for r in range(args.repeats):
    # lungct.main keeps JAX's compilation cache (~/.cache/lungct/jax): each repeat starts from an empty one (a
    # user's first run of the recipe), and --compile-cache reruns lungct with the cache that run left (any later run).
    env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(tmp, f"jax_cache{r}")
    for i, side in enumerate(sides):
      if side == "lungct":
        work = os.path.join(tmp, f"run{r}_{i}")
        cmd = [sys.executable, "-m", "lungct.main", "--config=configs/nodule.py", f"--workdir={work}",
               f"--config.train.num_epochs={args.epochs}", "--config.train.progress_bar=False"] + flags
        if args.lungct[0]:
          cmd.append(f"--config.model.conv_impl={args.lungct[0]}")
        wall = timed(cmd, os.path.join(tmp, f"lungct{r}.log"), env)
        with open(os.path.join(work, "metrics.json")) as f:
          m = json.load(f)
        runs.append({"side": "lungct", "wall_s": wall, "validation_auc": m["validation"]["auc"],
                     "test_auc": m["test"]["auc"], "best_step": m["best_step"], "steps": m["steps"],
                     "time_s": m.get("time_s", {}),
                     "compile_cache": "warm" if i else "cold"})
      elif _common.have_torch():
        res = os.path.join(tmp, f"monai{r}.json")
        cmd = [sys.executable, os.path.join(HERE, "monai_nodule.py"), f"--csv={split_csv}", f"--root={DATA}",
               f"--epochs={args.epochs}", f"--workers={args.monai_workers}", f"--json={res}"]
        wall = timed(cmd, os.path.join(tmp, f"monai{r}.log"), monai_env)
        with open(res) as f:
          m = json.load(f)
        runs.append({"side": "monai", "wall_s": wall, "validation_auc": m["validation_auc"],
                     "test_auc": m["test_auc"], "cache_s": m["cache_s"], "steps": m["steps"],
                     "best_epoch": m["best_epoch"]})
  out["runs"] = runs
  return out


def run_data_config(labels: str, data_dir: str):
  """configs/nodule.py's data config on the real crops (what the run's --config.data.* flags say)."""
  d = nodule_config().data
  d.source, d.manual_dir, d.labels_csv, d.data_dir = "folder", DATA, labels, data_dir
  return d


def write_split(labels: str, data_cfg, path: str) -> dict[str, int]:
  """lungct's train/validation/test assignment of every kept crop, as filename,label,split for monai_nodule.py."""
  from lungct.data import lung_ct, sources
  builder = lung_ct.builder_for(data_cfg)
  split_of = {row["study_id"]: s for s in ("train", "validation", "test") for row in lung_ct.split_index(builder, s)}
  with open(labels, newline="") as f:
    rows = list(csv.DictReader(f))
  counts = {"train": 0, "validation": 0, "test": 0, "skipped": 0}
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["filename", "label", "split"])
    for r in rows:
      s = split_of.get(sources.study_id_of(r["filename"]))
      counts[s or "skipped"] += 1
      if s:
        w.writerow([r["filename"], r["label"], s])
  return counts


def print_run(out: dict, epochs: int) -> None:
  s = out["split"]
  print(f"\nPart 2: whole runs on the real crops, {epochs} epochs (train {s['train']} / validation "
        f"{s['validation']} / test {s['test']}, {s['skipped']} skipped by lungct's build and left out of both)")
  print(f"lungct dataset build (once; a rerun reuses it): {out['build_s']:.1f} s")
  print(f"{'side':<8} {'wall s':>8} {'steps':>6} {'val AUC':>8} {'test AUC':>9}  note")
  for r in out["runs"]:
    note = f"of which preprocessing/caching {r['cache_s']:.1f} s" if r["side"] == "monai" else \
        (f"best step {r['best_step']}; with the build: {r['wall_s'] + out['build_s']:.1f} s; compile cache "
         f"{r.get('compile_cache', 'off')}; in-run phases: " +
         ", ".join(f"{k} {v:.1f}" for k, v in r.get("time_s", {}).items()))
    print(f"{r['side']:<8} {r['wall_s']:>8.1f} {r['steps']:>6} {r['validation_auc']:>8.3f} {r['test_auc']:>9.3f}  {note}")
  lw = [r["wall_s"] for r in out["runs"] if r["side"] == "lungct" and r.get("compile_cache") != "warm"]
  mw = [r["wall_s"] for r in out["runs"] if r["side"] == "monai"]
  if lw and mw:
    out["monai_over_lungct"] = statistics.median(mw) / statistics.median(lw)
    out["monai_over_lungct_with_build"] = statistics.median(mw) / (statistics.median(lw) + out["build_s"])
    print(f"whole run: lungct {out['monai_over_lungct']:.2f}x faster than monai "
          f"({out['monai_over_lungct_with_build']:.2f}x counting lungct's one-time build)")
  warm = [r["wall_s"] for r in out["runs"] if r.get("compile_cache") == "warm"]
  if warm and mw:
    out["monai_over_lungct_warm_cache"] = statistics.median(mw) / statistics.median(warm)
    print(f"whole run with a warm compilation cache (lungct.main's default, every run after the first): "
          f"lungct {out['monai_over_lungct_warm_cache']:.2f}x faster than monai")


# ----------------------------------------------------------------------------- main

def main(argv=None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--part", choices=("step", "run", "both"), default="both")
  p.add_argument("--steps", type=int, default=10, help="timed steps per side (median reported)")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--lungct", default="", help="conv_impl of the lungct side(s), comma-separated "
                 "(default: configs/nodule.py's); e.g. onednn,xla")
  p.add_argument("--epochs", type=int, default=3, help="epochs of each whole run (configs/nodule.py: 12)")
  p.add_argument("--repeats", type=int, default=1, help="whole runs per side (alternating)")
  p.add_argument("--monai-workers", type=int, default=0, help="DataLoader workers of the monai run")
  p.add_argument("--compile-cache", action="store_true", help="also time a lungct rerun with JAX's persistent "
                 "compilation cache warm (the cold lungct run before it, from an empty cache, fills it)")
  p.add_argument("--workdir", default="", help="keep the runs' files here (default: a temporary folder)")
  _common.add_json_arg(p)
  args = p.parse_args(argv)
  args.lungct = args.lungct.split(",") if args.lungct else [""]
  out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "cpu": _common.cpu_name(),
         "cpu_flags": _common.cpu_flags(), "load_average_before": os.getloadavg(), "args": vars(args)}
  if args.part in ("step", "both"):
    out["step"] = part_step(args)
    print_step(out["step"])
  if args.part in ("run", "both"):
    if not os.path.isdir(DATA):
      print(f"[nodule_step] {DATA} is absent: no whole runs", file=sys.stderr)
    else:
      tmp = args.workdir or tempfile.mkdtemp(prefix="lungct_nodule_")
      os.makedirs(tmp, exist_ok=True)
      out["run"] = part_run(args, tmp)
      print_run(out["run"], args.epochs)
  out["load_average_after"] = os.getloadavg()
  print(f"load average before {tuple(round(x, 1) for x in out['load_average_before'])}, "
        f"after {tuple(round(x, 1) for x in out['load_average_after'])}; {out['cpu']}; {out['cpu_flags']}")
  _common.write_json(args.json, out)
  return out


if __name__ == "__main__":
  from lungct import main as lungct_main
  lungct_main.exec_with_huge_pages()
  main()
