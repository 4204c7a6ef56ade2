"""Lesion segmentation: 3D U-Net, Dice + cross-entropy, on the synthetic phantoms' lesion masks (CPU-friendly).

    python -m lungct.main --config configs/unet_seg.py --workdir runs/unet_seg
    python -m lungct.main --config configs/unet_seg.py --workdir runs/unet_seg --mode=eval --split=test

Works with any source that has masks (synthetic; MosMedData with masks/; folder CSV with a mask column).
"""
import ml_collections

import configs
from configs import default
from lungct import models


# `--config configs/unet_seg.py:tiny`: seconds long (the reliability tests run the segmentation task so).
TINY = {"data.num_scans": 12, "data.shape": (16, 32, 32), "model.features": (4, 8), "segment.patch": (16, 16, 16),
        "segment.sw_batch_size": 2}


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = default.get_config()
  c.task = "segment"
  c.model = models.model_config("unet3d", features=(8, 16, 32))  # 3D U-Net paper: (32, 64, 128, 256)
  c.data.shape = (48, 64, 64)       # the whole preprocessed volume (same dataset as the classifier demo)
  c.train.batch_size = 4
  c.train.num_epochs = 10
  c.train.learning_rate = 1e-3
  c.train.schedule = "constant"
  c.train.precise_bn_batches = 0   # as the README's measured segmentation run (precise BN is available)

  c.segment = ml_collections.ConfigDict()
  c.segment.patch = (32, 48, 48)        # training crop (D, H, W); = data.shape trains on whole volumes
  c.segment.pos_fraction = 0.67         # share of crops centred on a lesion voxel (MONAI RandCropByPosNegLabel pos/(pos+neg))
  c.segment.roi = ()                    # sliding-window size for whole-volume inference; empty = patch
  c.segment.overlap = 0.5               # sliding-window overlap
  c.segment.mode = "gaussian"           # gaussian | constant window weighting
  c.segment.sw_batch_size = 4           # windows per forward pass
  c.segment.threshold = 0.5             # probability -> mask
  c.segment.keep = "all"                # all | center: only the connected component at the crop's centre
  c.segment.tta = "none"                # none | flips: each window's probabilities averaged over its 8 flips
  c.segment.lambda_dice = 1.0           # DiceCELoss weights
  c.segment.lambda_ce = 1.0
  c.segment.num_overlays = 4            # --mode=eval: mask_comparison PNGs written to <workdir>/seg_overlays/
  return configs.variant(c, variant, TINY)
