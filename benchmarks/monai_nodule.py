"""The nodule recipe as a MONAI user would write it: the peer of `configs/nodule.py` in benchmarks/nodule_step.py.

MONAI 1.6 `resnet10` (widen_factor 1/8: widths 8-16-32-64, 3^3 stride-1 stem, no stem max-pool), the crops
preprocessed once and cached (LoadImaged, Orientationd RAS, Spacingd 1 mm, ScaleIntensityRanged -1000..400 HU
-> 0..1, CropForegroundd + ResizeWithPadOrCropd to 32^3, in a CacheDataset), then per example RandFlipd on
every axis, RandRotate90d in two planes (together: every rotation of the cube), RandZoomd 0.9-1.1,
RandScaleIntensityd / RandShiftIntensityd 0.03; batch 16, AdamW (lr 2e-3, weight decay 1e-4) with 20 warmup
steps and a cosine decay, class-weighted BCE (1.0 / 1.5 as configs/nodule.py), validation AUC every epoch, the
best epoch's weights evaluated on validation and test.

    python benchmarks/monai_nodule.py --csv split.csv --root ../shared/data/lidc_indeterminate --epochs 12

`split.csv`: `filename,label,split` (split = train | validation | test), paths relative to --root.
Needs torch and monai (`pip install -e ".[bench]"`).
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import time

import numpy as np
import torch

import _common

SHAPE = (32, 32, 32)
BATCH = 16


def make_model() -> torch.nn.Module:
  from monai.networks.nets import resnet10
  return resnet10(spatial_dims=3, n_input_channels=1, num_classes=1, widen_factor=0.125, conv1_t_size=3,
                  conv1_t_stride=1, no_max_pool=True)


def preprocess_transforms():
  from monai import transforms as T
  return [T.LoadImaged(keys="image", ensure_channel_first=True, image_only=True),
          T.Orientationd(keys="image", axcodes="RAS"),
          T.Spacingd(keys="image", pixdim=(1.0, 1.0, 1.0), mode="bilinear"),
          T.ScaleIntensityRanged(keys="image", a_min=-1000.0, a_max=400.0, b_min=0.0, b_max=1.0, clip=True),
          T.CropForegroundd(keys="image", source_key="image", allow_smaller=True),
          T.ResizeWithPadOrCropd(keys="image", spatial_size=SHAPE, mode="constant"),
          T.EnsureTyped(keys="image", dtype=torch.float32, track_meta=False)]


def random_transforms():
  from monai import transforms as T
  return [T.RandFlipd(keys="image", prob=0.5, spatial_axis=0),
          T.RandFlipd(keys="image", prob=0.5, spatial_axis=1),
          T.RandFlipd(keys="image", prob=0.5, spatial_axis=2),
          T.RandRotate90d(keys="image", prob=1.0, max_k=3, spatial_axes=(0, 1)),
          T.RandRotate90d(keys="image", prob=1.0, max_k=3, spatial_axes=(1, 2)),
          T.RandZoomd(keys="image", prob=1.0, min_zoom=0.9, max_zoom=1.1, mode="trilinear",
                      padding_mode="constant", keep_size=True),
          T.RandScaleIntensityd(keys="image", factors=0.03, prob=1.0),
          T.RandShiftIntensityd(keys="image", offsets=0.03, prob=1.0)]


def make_optimizer(model: torch.nn.Module, total_steps: int, lr: float = 2e-3, warmup: int = 20):
  opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)

  def factor(step: int) -> float:  # optax.warmup_cosine_decay_schedule(0, lr, warmup, total)
    if step < warmup:
      return step / warmup
    t = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return 0.5 * (1 + math.cos(math.pi * t))
  return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def weighted_bce(logits: torch.Tensor, y: torch.Tensor, weights=(1.0, 1.5)) -> torch.Tensor:
  w = torch.where(y > 0.5, weights[1], weights[0])
  per = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")
  return (w * per).sum() / w.sum()


def train_step(model, opt, sched, images: torch.Tensor, labels: torch.Tensor) -> float:
  model.train()
  opt.zero_grad(set_to_none=True)
  loss = weighted_bce(model(images)[:, 0], labels)
  loss.backward()
  opt.step()
  sched.step()
  return float(loss.detach())


def plain(x) -> torch.Tensor:
  """A collated MetaTensor as a plain tensor: every op on a MetaTensor goes through its __torch_function__
  (here ~1.5-2x the step time), and the model needs no metadata."""
  return x.as_tensor() if hasattr(x, "as_tensor") else x


@torch.no_grad()
def predict(model, loader) -> tuple[np.ndarray, np.ndarray]:
  model.eval()
  probs, labels = [], []
  for batch in loader:
    probs.append(torch.sigmoid(model(plain(batch["image"]))[:, 0]).numpy())
    labels.append(batch["label"].numpy())
  return np.concatenate(probs), np.concatenate(labels)


def auc(prob: np.ndarray, label: np.ndarray) -> float:
  from monai.metrics import compute_roc_auc
  if len(set(label.tolist())) < 2:
    return float("nan")
  return float(compute_roc_auc(torch.as_tensor(prob), torch.as_tensor(label)))


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--csv", required=True)
  p.add_argument("--root", required=True)
  p.add_argument("--epochs", type=int, default=12)
  p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
  p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
  p.add_argument("--seed", type=int, default=0)
  _common.add_json_arg(p)
  args = p.parse_args(argv)
  t0 = time.perf_counter()
  from monai.data import CacheDataset, DataLoader
  from monai.transforms import Compose
  from monai.utils import set_determinism
  if args.threads:
    torch.set_num_threads(args.threads)
  set_determinism(args.seed)
  with open(args.csv, newline="") as f:
    rows = list(csv.DictReader(f))
  files = {s: [{"image": os.path.join(args.root, r["filename"]), "label": np.float32(r["label"])}
               for r in rows if r["split"] == s] for s in ("train", "validation", "test")}
  pre = preprocess_transforms()
  train_ds = CacheDataset(files["train"], Compose(pre + random_transforms()), cache_rate=1.0, num_workers=None,
                          progress=False)
  eval_ds = {s: CacheDataset(files[s], Compose(pre), cache_rate=1.0, num_workers=None, progress=False)
             for s in ("validation", "test")}
  t_cache = time.perf_counter() - t0
  train_loader = DataLoader(train_ds, batch_size=BATCH, shuffle=True, drop_last=True, num_workers=args.workers)
  eval_loader = {s: DataLoader(d, batch_size=BATCH, num_workers=0) for s, d in eval_ds.items()}
  model = make_model()
  total = args.epochs * (len(train_ds) // BATCH)
  opt, sched = make_optimizer(model, total)
  best, best_state, history = -1.0, None, []
  t_train = time.perf_counter()
  steps = 0
  for epoch in range(args.epochs):
    for batch in train_loader:
      train_step(model, opt, sched, plain(batch["image"]), batch["label"].float())
      steps += 1
    val = auc(*predict(model, eval_loader["validation"]))
    history.append(val)
    if val > best:
      best, best_state = val, copy.deepcopy(model.state_dict())
  t_train = time.perf_counter() - t_train
  if best_state is not None:
    model.load_state_dict(best_state)
  out = {"cache_s": t_cache, "train_eval_s": t_train, "steps": steps, "val_auc_per_epoch": history,
         "best_epoch": int(np.argmax(history)) + 1 if history else 0,
         "validation_auc": auc(*predict(model, eval_loader["validation"])),
         "test_auc": auc(*predict(model, eval_loader["test"])),
         "n": {s: len(v) for s, v in files.items()}, "torch_threads": torch.get_num_threads(),
         "workers": args.workers}
  out["total_s"] = time.perf_counter() - t0
  print(json.dumps(out))
  _common.write_json(args.json, out)
  return out


if __name__ == "__main__":
  main()
