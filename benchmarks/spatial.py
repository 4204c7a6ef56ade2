"""Spatial partitioning: per-device peak memory and train-step time versus the number of depth shards.

    # 8 virtual CPU devices (set before JAX starts; the script does it when --cpu_devices > 0):
    python benchmarks/spatial.py --shape 128,256,256 --models unet3d,resnet3d --spaces 1,2,4,8 --steps 0 \
        --out benchmarks/results/cpu/spatial_memory.json          # compile only: memory_analysis per device
    python benchmarks/spatial.py --shape 64,128,128 --spaces 1,2,4,8 --steps 3 \
        --out benchmarks/results/cpu/spatial_time.json            # also time the step

For each model and each `space` = k, one volume (batch 1, or --batch) is split over a (1, k) mesh
("data", "space") made of the first k devices and one jitted SGD train step (forward, backward, update, BN stats;
remat on by default) is compiled with the image sharded P("data", "space") under `jax.set_mesh`. The compiled
step's `memory_analysis()` gives per-device bytes: arguments (params, state, this device's slab of the image),
outputs, and temporaries (activations and their gradients): "peak" = arguments + outputs + temporaries - aliased.
On virtual CPU devices all shards share the same cores, so step time shows the cost of partitioning (halo
exchange, smaller convolutions), not a speed-up; on k real accelerators the work per device drops ~k times.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import _common


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--shape", default="128,256,256", help="D,H,W of one volume")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--models", default="unet3d,resnet3d")
  p.add_argument("--spaces", default="1,2,4,8")
  p.add_argument("--steps", type=int, default=0, help="timed steps after one warm-up (0: compile only)")
  p.add_argument("--dtype", default="float32", help="compute dtype: float32 | bfloat16")
  p.add_argument("--remat", type=int, default=1)
  p.add_argument("--unet_features", default="8,16,32,64")
  p.add_argument("--resnet_depth", type=int, default=18)
  p.add_argument("--resnet_width", type=int, default=16)
  p.add_argument("--resnet_stem_stride", default="1,2,2")
  p.add_argument("--cpu_devices", type=int, default=8, help="virtual CPU devices (0: use the real devices)")
  _common.add_json_arg(p, "--out")
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  if args.cpu_devices and "jax" not in sys.modules:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.cpu_devices}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import nnx
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from lungct.models import ResNet3D, UNet3D, numpy_variables

  shape = tuple(int(s) for s in args.shape.split(","))
  dtype = jnp.dtype(args.dtype)

  def build(name):
    if name == "unet3d":
      feats = tuple(int(f) for f in args.unet_features.split(","))
      return UNet3D(num_outputs=1, features=feats, remat=bool(args.remat), dtype=dtype, rngs=nnx.Rngs(0))
    return ResNet3D(num_outputs=1, depth=args.resnet_depth, width=args.resnet_width, remat=bool(args.remat),
                    stem_stride=tuple(int(s) for s in args.resnet_stem_stride.split(",")), dtype=dtype,
                    rngs=nnx.Rngs(0))

  results = []
  for name in args.models.split(","):
    # Shapes from eval_shape, values from numpy: nothing here depends on the initialiser, and compiling the
    # models' random initialisers costs tens of seconds on a CPU.
    rng = np.random.default_rng(0)
    graphdef, params, stats = numpy_variables(lambda: build(name), rng)
    n_params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))
    images = rng.standard_normal((args.batch, *shape, 1)).astype(np.float32)
    labels = ((images > 1.0).astype(np.float32) if name == "unet3d"
              else np.zeros((args.batch, 1), np.float32))

    def step(params, stats, x, y):
      def loss_fn(p):
        m = nnx.merge(graphdef, p, stats)
        logits = m(x, train=True)
        return (jnp.mean(optax.sigmoid_binary_cross_entropy(logits, y)),
                nnx.to_pure_dict(nnx.state(m, nnx.BatchStat)))
      (loss, new_stats), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
      return loss, jax.tree.map(lambda p, d: p - 0.01 * d, params, g), new_stats

    for k in (int(s) for s in args.spaces.split(",")):
      if k > jax.device_count():
        print(f"skip space={k}: only {jax.device_count()} devices")
        continue
      mesh = Mesh(np.asarray(jax.devices()[:k]).reshape(1, k), ("data", "space"))
      repl, img = NamedSharding(mesh, P()), NamedSharding(mesh, P("data", "space"))
      lab = img if name == "unet3d" else NamedSharding(mesh, P("data"))
      t0 = time.perf_counter()
      with jax.set_mesh(mesh):
        fn = jax.jit(step, in_shardings=(repl, repl, img, lab), out_shardings=(repl, repl, repl),
                     donate_argnums=(0, 1))
        compiled = fn.lower(params, stats,
                            jax.ShapeDtypeStruct(images.shape, jnp.float32),
                            jax.ShapeDtypeStruct(labels.shape, jnp.float32)).compile()
      compile_s = time.perf_counter() - t0
      mem = compiled.memory_analysis()
      hlo = compiled.as_text()
      row = {"model": name, "space": k, "shape": list(shape), "batch": args.batch, "dtype": args.dtype,
             "remat": bool(args.remat), "params": n_params, "compile_s": round(compile_s, 1),
             "argument_bytes": int(mem.argument_size_in_bytes), "output_bytes": int(mem.output_size_in_bytes),
             "temp_bytes": int(mem.temp_size_in_bytes), "alias_bytes": int(mem.alias_size_in_bytes),
             "collective_permutes": hlo.count("collective-permute-start") or hlo.count("collective-permute("),
             "all_gathers": hlo.count("all-gather-start") or hlo.count("all-gather(")}
      row["peak_bytes"] = (row["argument_bytes"] + row["output_bytes"] + row["temp_bytes"] - row["alias_bytes"])
      if args.steps:
        p, s = jax.device_put((params, stats), repl)
        x, y = jax.device_put(images, img), jax.device_put(labels, lab)
        loss, p, s = compiled(p, s, x, y)
        jax.block_until_ready(loss)
        times = []
        for _ in range(args.steps):
          t0 = time.perf_counter()
          loss, p, s = compiled(p, s, x, y)
          jax.block_until_ready(loss)
          times.append(time.perf_counter() - t0)
        row["step_s"] = round(float(np.median(times)), 3)
        row["loss"] = float(loss)
        del p, s, x, y
      print(json.dumps(row), flush=True)
      results.append(row)

  out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv),
         "jax": jax.__version__, "backend": jax.default_backend(), "devices": jax.device_count(),
         "device_kind": jax.devices()[0].device_kind, "cpu": _common.cpu_name(with_count=False), "host_cores": os.cpu_count(),
         "results": results}
  _common.write_json(args.out, out, indent=1)
  print(_table(results))
  return out


def _table(rows) -> str:
  lines = ["| model | space | peak MiB / device | temp MiB / device | step s | collective-permutes |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['model']} | {r['space']} | {r['peak_bytes'] / 2**20:.0f} | {r['temp_bytes'] / 2**20:.0f} | "
                 f"{r.get('step_s', '-')} | {r['collective_permutes']} |")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
