"""Ablations as data: one small base config plus, per ablation, a list of (variant name, overrides).

Overrides are {"dotted.config.key": value}. ``init_from="@<name>"`` names a prerequisite run of the ablation
(``requires``), which the runner trains once (seed 0) and replaces by that run's workdir.
Every variant keeps the data and its split fixed (data.split_seed); seeds change init, data order,
dropout and augmentation (config.seed).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import ml_collections

from configs import default

Overrides = dict[str, Any]


def base_config() -> ml_collections.ConfigDict:
  """The shared small size: 60 phantoms at 48^3, a narrow tutorial CNN, a few epochs (< ~1 min on 2 CPU cores)."""
  c = default.get_config()
  c.data.data_dir = "data/tfds"
  c.data.num_scans = 60                 # 42 train / ~9 validation / ~9 test volumes
  c.data.shape = (48, 48, 48)
  c.data.num_threads = 1
  c.model.features = (8, 8, 16, 32)
  c.model.dense = 32
  c.model.width = 8                     # resnet3d variant
  c.train.batch_size = 4
  c.train.num_epochs = 4
  c.train.learning_rate = 3e-3
  c.train.log_every_steps = 10
  c.train.progress_bar = False
  c.eval.n_boot = 0
  return c


class Ablation(NamedTuple):
  description: str
  variants: list[tuple[str, Overrides]]
  common: Overrides = {}                # applied to every variant (and prerequisite) after base_config()
  requires: dict[str, Overrides] = {}   # prerequisite runs (one seed), referenced as "@<name>"


# Pretraining: the 5-way grade task on a separate, larger phantom set (phantom_seed=1: no test scan seen).
PRETRAIN: Overrides = {"data.label": "grade", "data.num_classes": 5, "data.phantom_seed": 1,
                       "data.num_scans": 120, "data.split_fractions": (0.8, 0.1, 0.1), "train.num_epochs": 4}

ABLATIONS: dict[str, Ablation] = {
    "augment": Ablation(
        "on-device 3D augmentation (rotation, left-right flip, intensity) on vs off",
        [("off", {"data.augment.enabled": False}), ("on", {"data.augment.enabled": True})]),
    "model": Ablation(
        "tutorial CNN (features 8,8,16,32) vs 3D ResNet-18 of width 8",
        [("cnn3d", {"model.name": "cnn3d"}),
         ("resnet18", {"model.name": "resnet3d", "model.depth": 18, "model.width": 8, "model.dropout": 0.2})]),
    "resolution": Ablation(
        "input volume (depth, height, width)",
        [("48x48x48", {"data.shape": (48, 48, 48)}), ("48x64x64", {"data.shape": (48, 64, 64)})]),
    "dropout": Ablation(
        "dropout before the head",
        [("0.0", {"model.dropout": 0.0}), ("0.3", {"model.dropout": 0.3}), ("0.5", {"model.dropout": 0.5})]),
    "pretraining": Ablation(
        "scratch vs fine-tuned from the grade-pretrained CNN, on a small labelled set (12 training volumes)",
        [("scratch", {}), ("finetuned", {"init_from": "@pretrain", "train.learning_rate": 1e-3})],
        common={"data.split_fractions": (0.2, 0.4, 0.4), "train.num_epochs": 8},
        requires={"pretrain": PRETRAIN}),
}


def apply(config: ml_collections.ConfigDict, overrides: Overrides) -> ml_collections.ConfigDict:
  """``config`` with each "a.b.c" key set to its value (in place; returns it)."""
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    if leaf not in node:
      raise KeyError(f"override {key!r}: no such config key")
    node[leaf] = value
  return config
