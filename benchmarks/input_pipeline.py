"""Input pipeline throughput: the lungct loader vs the Keras tutorial's per-volume scipy pipeline.

Both read the same N phantom NIfTI scans:
  lungct    preprocessed once into TFDS ArrayRecord (`lung_ct.prepare`, source=folder), read by the
            grain loader (`pipeline.make_dataset` + `iterate`) as the training loop reads it (the image as
            stored, float16), cast to float32 and augmented on device by the jitted `augment.augment_batch`
            (rotation, flip, intensity), as `train.train_step` does.
  tutorial  every volume, every epoch: nibabel load of the .nii.gz, HU window, scipy.ndimage.zoom
            to the model shape, scipy.ndimage.rotate by a random angle (as in the Keras example).
The two are timed in alternation (one lungct batch, one tutorial volume, ...; the lungct loader synchronous so
that no reader thread works while the tutorial is timed): their ratio is the comparison. The loader as
configured (reader threads, prefetch) is then timed alone, and its rate is compared with the train step's
consumption rate (--train-vps, or a quick
measurement of the tutorial CNN's lungct step): the target is a ratio >= 5.

    python benchmarks/input_pipeline.py --num 24 --train-vps 0.3
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402


def tutorial_volume(path: str, shape_dhw, rng: np.random.Generator) -> np.ndarray:
  """The Keras example's `process_scan` + `rotate` augmentation, for one file (returns (D, H, W))."""
  import nibabel as nib
  from scipy import ndimage
  vol = nib.load(path).get_fdata()  # (x, y, z) float64, as in the tutorial
  vol = np.clip(vol, -1000, 400)
  vol = ((vol + 1000) / 1400).astype("float32")
  target = (shape_dhw[2], shape_dhw[1], shape_dhw[0])  # tutorial resizes (x, y, z)
  vol = ndimage.rotate(vol, 90, reshape=False)
  vol = ndimage.zoom(vol, [t / s for t, s in zip(target, vol.shape)], order=1)
  angle = rng.choice([-20, -10, -5, 5, 10, 20])
  vol = ndimage.rotate(vol, angle, reshape=False)
  return np.clip(vol, 0, 1).transpose(2, 1, 0)


def time_lungct(builder, config, batch: int, num_batches: int) -> float:
  """Volumes/s of grain batches + on-device jitted augmentation (first batch = warm-up/compile)."""
  import jax
  import jax.numpy as jnp
  from lungct.data import augment, pipeline
  source = builder.as_data_source("train")
  ds = pipeline.make_dataset(source, global_batch_size=batch, seed=0, shuffle=True, num_epochs=None,
                             drop_remainder=True, process_index=0, process_count=1, cast=False)
  it = pipeline.iterate(ds, loader=config.loader)
  aug = jax.jit(lambda k, x: augment.augment_batch(k, x.astype(jnp.float32), config.augment))
  key = jax.random.PRNGKey(0)
  jax.block_until_ready(aug(key, next(it)["image"]))
  t = time.perf_counter()
  for i in range(num_batches):
    jax.block_until_ready(aug(jax.random.fold_in(key, i), next(it)["image"]))
  return num_batches * batch / (time.perf_counter() - t)


def time_alternating(builder, config, batch: int, num_batches: int, paths, shape_dhw, num_tutorial: int
                     ) -> tuple[float, float]:
  """(lungct volumes/s, tutorial volumes/s) measured in alternation (one lungct batch, one tutorial volume, ...),
  so that a shared machine's load slows both alike. The lungct loader reads synchronously here (grain
  num_threads=0, no prefetch): background reader threads would otherwise read ahead while the tutorial side is
  being timed, so each side's time is only its own work."""
  import jax
  import jax.numpy as jnp
  from lungct.data import augment, pipeline
  source = builder.as_data_source("train")
  ds = pipeline.make_dataset(source, global_batch_size=batch, seed=0, shuffle=True, num_epochs=None,
                             drop_remainder=True, process_index=0, process_count=1, cast=False)
  it = pipeline.iterate(ds, num_threads=0, prefetch=0)
  aug = jax.jit(lambda k, x: augment.augment_batch(k, x.astype(jnp.float32), config.augment))
  key = jax.random.PRNGKey(0)
  jax.block_until_ready(aug(key, next(it)["image"]))   # compile
  rng = np.random.default_rng(0)
  spent = {"lungct": 0.0, "tutorial": 0.0}
  for i in range(max(num_batches, num_tutorial)):
    if i < num_batches:
      t = time.perf_counter()
      jax.block_until_ready(aug(jax.random.fold_in(key, i), next(it)["image"]))
      spent["lungct"] += time.perf_counter() - t
    if i < num_tutorial:
      t = time.perf_counter()
      tutorial_volume(paths[i % len(paths)], shape_dhw, rng)
      spent["tutorial"] += time.perf_counter() - t
  return num_batches * batch / spent["lungct"], num_tutorial / spent["tutorial"]


def measure_train_vps(batch: int, shape) -> float:
  import train_step
  one, _ = train_step.setup_lungct("cnn3d", batch, tuple(shape), "float32", False)
  return batch / min(train_step.time_steps(one, 1, 1))


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--num", type=int, default=24, help="phantom NIfTI scans")
  p.add_argument("--phantom-shape", type=int, nargs=3, default=(256, 256, 64), metavar=("X", "Y", "Z"))
  p.add_argument("--shape", type=int, nargs=3, default=(64, 128, 128), metavar=("D", "H", "W"))
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--batches", type=int, default=24, help="timed lungct batches")
  p.add_argument("--tutorial-volumes", type=int, default=12, help="timed tutorial volumes")
  p.add_argument("--train-vps", type=float, default=0.0, help="train step volumes/s (0: measure cnn3d)")
  p.add_argument("--workdir", default="/tmp/lungct_bench")
  _common.add_json_arg(p)
  args = p.parse_args(argv)
  import dataset_build
  from lungct.data import lung_ct
  scans, csv_path = dataset_build.write_phantom_folder(args.workdir, args.num, tuple(args.phantom_shape))
  cfg = dataset_build.data_config(scans, csv_path, os.path.join(args.workdir, "tfds"), tuple(args.shape))
  builder = lung_ct.prepare(cfg)
  paths = sorted(os.path.join(scans, f) for f in os.listdir(scans) if f.endswith(".nii.gz"))
  from configs import default
  sync_vps, tutorial_vps = time_alternating(builder, default.get_config(), args.batch, args.batches, paths,
                                            tuple(args.shape), args.tutorial_volumes)
  lungct_vps = time_lungct(builder, default.get_config(), args.batch, args.batches)
  train_vps = args.train_vps or measure_train_vps(args.batch, args.shape)
  out = {"num_scans": args.num, "phantom_shape_xyz": list(args.phantom_shape), "shape_dhw": list(args.shape),
         "lungct_sync_volumes_per_s": sync_vps, "tutorial_volumes_per_s": tutorial_vps,
         "ratio_lungct_over_tutorial": sync_vps / tutorial_vps, "lungct_volumes_per_s": lungct_vps,
         "train_volumes_per_s": train_vps, "loader_over_train": lungct_vps / train_vps, "cpus": os.cpu_count()}
  print(f"Input pipeline, {args.num} scans {tuple(args.phantom_shape)} -> {tuple(args.shape)}, batch {args.batch}:")
  print(f"  alternating: lungct (ArrayRecord + grain, synchronous, + jitted augment): {sync_vps:8.2f} volumes/s")
  print(f"               tutorial (nibabel + zoom + rotate per volume):             {tutorial_vps:8.2f} volumes/s")
  print(f"  ratio lungct/tutorial: {out['ratio_lungct_over_tutorial']:.1f}x")
  print(f"  lungct loader as configured (grain threads + prefetch), alone: {lungct_vps:8.2f} volumes/s")
  print(f"  train step consumes {train_vps:.2f} volumes/s: loader/train = {out['loader_over_train']:.1f}x "
        f"({'meets' if out['loader_over_train'] >= 5 else 'BELOW'} the 5x target)")
  _common.write_json(args.json, out)
  return out


if __name__ == "__main__":
  main()
