"""Dataset build: volumes/s to preprocess NIfTI scans into the TFDS ArrayRecord dataset, and peak RSS.

Writes N phantom NIfTI files and a labels CSV (a `source=folder` dataset), then builds the dataset
with `lungct.data.lung_ct.prepare` in a child process and reads the child's peak resident memory
(`ru_maxrss`) back, so the number is the build's alone.

    python benchmarks/dataset_build.py --num 24 --workdir /tmp/lungct_bench
    # also on Apache Beam (pip install 'lungct[beam]'), same scans, printed as a ratio to the thread pool:
    python benchmarks/dataset_build.py --num 24 --beam \
        "--runner=DirectRunner --direct_num_workers=2 --direct_running_mode=multi_processing"
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import _common  # noqa: E402


def write_phantom_folder(root: str, num: int, shape_xyz=(256, 256, 64), spacing=(1.25, 1.25, 5.0)) -> tuple[str, str]:
  """N phantom scans `root/scans/study_XXXX.nii.gz` and `root/labels.csv`; returns (scan dir, CSV). Reuses files."""
  from lungct.data import phantom
  scans = os.path.join(root, "scans")
  os.makedirs(scans, exist_ok=True)
  csv_path = os.path.join(root, "labels.csv")
  rows = []
  for study_id, patient_id, grade, seed in phantom.phantom_set(num, seed=0):
    name = f"{study_id}.nii.gz"
    path = os.path.join(scans, name)
    if not os.path.exists(path):
      phantom.write_phantom_nifti(phantom.make_phantom(seed, grade, shape_xyz=shape_xyz, spacing=spacing), path)
    rows.append((name, int(grade > 0), patient_id, grade))
  with open(csv_path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(("filename", "label", "patient_id", "grade"))
    w.writerows(rows)
  return scans, csv_path


def data_config(scans: str, csv_path: str, data_dir: str, shape=(64, 128, 128), beam_options: str = ""):
  from configs import default
  d = default.get_data_config()
  d.source, d.manual_dir, d.labels_csv, d.data_dir = "folder", scans, csv_path, data_dir
  d.shape = tuple(shape)
  d.beam_options = beam_options
  return d


def _child(args) -> None:
  """Builds the dataset in this (fresh) process and prints one JSON line."""
  from lungct.data import lung_ct
  cfg = data_config(args.scans, args.csv, args.data_dir, args.shape, args.beam)
  t = time.perf_counter()
  builder = lung_ct.prepare(cfg)
  dt = time.perf_counter() - t
  n = sum(len(builder.as_data_source(s)) for s in lung_ct.SPLITS)
  print(json.dumps({"seconds": dt, "volumes": n, "ru_maxrss_mb": _common.peak_rss_mb()}))


def build_in_child(scans: str, csv_path: str, data_dir: str, shape, beam_options: str = "") -> dict:
  """Runs the build in a subprocess; returns its seconds, volume count and peak RSS (MiB)."""
  cmd = [sys.executable, os.path.abspath(__file__), "--child", "--scans", scans, "--csv", csv_path,
         "--data-dir", data_dir, "--shape", *map(str, shape), "--beam", beam_options]
  out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--num", type=int, default=24, help="phantom scans")
  p.add_argument("--phantom-shape", type=int, nargs=3, default=(256, 256, 64), metavar=("X", "Y", "Z"))
  p.add_argument("--shape", type=int, nargs=3, default=(64, 128, 128), metavar=("D", "H", "W"))
  p.add_argument("--workdir", default="/tmp/lungct_bench")
  _common.add_json_arg(p)
  p.add_argument("--beam", default="", help="also build on Apache Beam with these pipeline options")
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--scans", help=argparse.SUPPRESS)
  p.add_argument("--csv", help=argparse.SUPPRESS)
  p.add_argument("--data-dir", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    _child(args)
    return {}
  t = time.perf_counter()
  scans, csv_path = write_phantom_folder(args.workdir, args.num, tuple(args.phantom_shape))
  gen_s = time.perf_counter() - t
  data_dir = os.path.join(args.workdir, f"tfds_build_{int(time.time())}")  # a fresh build every run
  r = build_in_child(scans, csv_path, data_dir, tuple(args.shape))
  out = {"num_scans": args.num, "phantom_shape_xyz": list(args.phantom_shape), "shape_dhw": list(args.shape),
         "phantom_write_s": gen_s, "build_s": r["seconds"], "volumes": r["volumes"],
         "volumes_per_s": r["volumes"] / r["seconds"], "peak_rss_mb": r["ru_maxrss_mb"], "cpus": os.cpu_count()}
  print(f"Dataset build: {r['volumes']} NIfTI scans {tuple(args.phantom_shape)} -> {tuple(args.shape)} "
        f"in {r['seconds']:.1f} s = {out['volumes_per_s']:.2f} volumes/s; peak RSS {r['ru_maxrss_mb']:.0f} MiB")
  if args.beam:
    b = build_in_child(scans, csv_path, data_dir + "_beam", tuple(args.shape), args.beam)
    out.update({"beam_options": args.beam, "beam_build_s": b["seconds"], "beam_volumes": b["volumes"],
                "beam_over_threads": b["seconds"] / r["seconds"]})
    print(f"Beam build ({args.beam}): {b['volumes']} volumes in {b['seconds']:.1f} s; "
          f"Beam / thread pool time = {b['seconds'] / r['seconds']:.2f}")
  _common.write_json(args.json, out)
  return out


if __name__ == "__main__":
  main()
