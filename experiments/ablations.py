"""Ablations as data: a base config (by default configs/default.py at 10 epochs, `base_config`; the nodule
ablation's is configs/nodule.py as is, `nodule_base_config`) plus, per ablation, a list of (variant name,
overrides).

Overrides are {"dotted.config.key": value} (applied by `lungct.config_check.apply_overrides`); a whole group
can be replaced, e.g. {"model": models.model_config("resnet3d", ...)}. ``init_from="@<name>"`` names a prerequisite run of the ablation
(``requires``), which the runner trains once (seed 0, only when a variant it runs names it) and replaces by that
run's workdir. A prerequisite is overrides of the ablation's base config, or (base, overrides) on a base config of
its own (another task's, e.g. the nodule attributes); ``common`` applies only to the first kind.
Every variant keeps the data and its split fixed (data.split_seed); seeds change init, data order,
dropout and augmentation (config.seed).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import ml_collections

from configs import default, nodule, nodule_attributes
from lungct import models

Overrides = dict[str, Any]


def base_config() -> ml_collections.ConfigDict:
  """The shared size: configs/default.py (160 phantoms at 48x64x64, the tutorial CNN at features (16, 16, 32, 64)
  and dense 128, dropout 0.3, augmentation on, batch 8, Adam 1e-3) trained for 10 epochs instead of 12, which
  learns the task (val/test AUC ~0.9) in ~2-2.5 min per run on 2 CPU cores."""
  c = default.get_config()
  c.data.data_dir = "data/tfds"
  c.train.num_epochs = 10               # 114 training volumes / batch 8 -> 14 steps per epoch, 140 steps
  c.train.progress_bar = False
  c.eval.n_boot = 0
  return c


def nodule_base_config() -> ml_collections.ConfigDict:
  """configs/nodule.py unchanged (the 320 embedded synthetic nodule crops at 1 mm, crop_or_pad to 32^3, the
  ResNet-10 of width 8 with a stride-1 3^3 stem, augmentation, class weights (1, 1.5), 12 epochs), quiet, and
  without the training summary's bootstrap (the paired comparisons resample the predictions themselves)."""
  c = nodule.get_config()
  c.train.progress_bar = False
  c.eval.n_boot = 0
  return c


class Ablation(NamedTuple):
  description: str
  variants: list[tuple[str, Overrides]]
  common: Overrides = {}                # applied to every variant (and prerequisite) after the base config
  # prerequisite runs (one seed), referenced as "@<name>": overrides, or (base config, overrides)
  requires: dict[str, Overrides | tuple[Callable[[], ml_collections.ConfigDict], Overrides]] = {}
  base: Callable[[], ml_collections.ConfigDict] = base_config

  def config(self) -> ml_collections.ConfigDict:
    """A fresh copy of this ablation's base config."""
    return self.base()


# Pretraining: the 5-way grade task on a separate, larger phantom set (phantom_seed=1: no test scan seen).
PRETRAIN: Overrides = {"data.label": "grade", "data.num_classes": 5, "data.phantom_seed": 1,
                       "data.num_scans": 120, "data.split_fractions": (0.8, 0.1, 0.1), "train.num_epochs": 4}


def nodule_attributes_config() -> ml_collections.ConfigDict:
  """configs/nodule_attributes.py on the real LIDC crops (../shared/data/lidc_indeterminate, relative to the
  working directory: the repository root): the eight radiologist ratings and the diameter, not the malignancy
  rating, and none of the embedded synthetic crops the nodule ablation tests on; quiet, no bootstrap."""
  c = nodule_attributes.get_config()
  c.data.manual_dir = LIDC_DIR
  c.train.progress_bar = False
  c.eval.n_boot = 0
  return c


LIDC_DIR = "../shared/data/lidc_indeterminate"

ABLATIONS: dict[str, Ablation] = {
    "augment": Ablation(
        "on-device 3D augmentation (rotation, left-right flip, intensity) on vs off",
        [("off", {"augment.enabled": False}), ("on", {"augment.enabled": True})]),
    "model": Ablation(
        "tutorial CNN (features 16,16,32,64, dense 128) vs 3D ResNet-18 of width 8 (XLA convolutions: im2col's "
        "7^3 stem made it ~1.6x slower per step on CPU)",
        [("cnn3d", {}),
         ("resnet18", {"model": models.model_config("resnet3d", depth=18, width=8, dropout=0.2)})]),
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
    # The nodule recipe against one change at a time, every variant paired with "recipe" on the same 50 test
    # crops. resize keeps every crop too (its build: read 320, kept 320, skipped 0; none over max_stretch 16).
    # from_attributes: the backbone of the attributes task trained on the 364 real LIDC crops (another data set:
    # no malignancy label, no synthetic test crop seen), fine-tuned with the recipe unchanged (a fresh head).
    "nodule": Ablation(
        "configs/nodule.py (augmentation on, crop_or_pad at 1 mm, class weights (1, 1.5), ResNet-10 of width 8 "
        "with a stride-1 3^3 stem and no max-pool) against one change each: augmentation off; every crop "
        "stretched to 32^3 (data.fit=resize, the size cue lost); unweighted loss; the standard ResNet stem "
        "(7^3, stride (1, 2, 2), max-pool); width 16; initialised from the attributes task (LIDC's eight ratings and "
        "diameter) trained on the 364 real LIDC crops",
        [("recipe", {}),
         ("no_augment", {"augment.enabled": False}),
         ("resize", {"data.fit": "resize"}),
         ("no_class_weights", {"train.class_weights": ()}),
         ("stem_7_pool", {"model.stem_kernel": 7, "model.stem_stride": (1, 2, 2), "model.stem_pool": True}),
         ("width_16", {"model.width": 16}),
         ("from_attributes", {"init_from": "@attributes"})],
        requires={"attributes": (nodule_attributes_config, {})},
        base=nodule_base_config),
}
