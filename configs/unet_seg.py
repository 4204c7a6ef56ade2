"""Lesion segmentation: 3D U-Net, Dice + cross-entropy, on the synthetic phantoms' lesion masks (CPU-friendly).

    python -m lungct.main --config configs/unet_seg.py --workdir runs/unet_seg
    python -m lungct.main --config configs/unet_seg.py --workdir runs/unet_seg --mode=eval --split=test

Works with any source that has masks (synthetic; MosMedData with masks/; folder CSV with a mask column).
"""
import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  c = default.get_config()
  c.task = "segment"
  c.model.name = "unet3d"
  c.model.features = (8, 16, 32)    # channels per level; 3D U-Net paper: (32, 64, 128, 256)
  c.model.dropout = 0.0             # bottleneck dropout
  c.data.shape = (48, 64, 64)       # the whole preprocessed volume (same dataset as the classifier demo)
  c.train.batch_size = 4
  c.train.num_epochs = 10
  c.train.learning_rate = 1e-3
  c.train.schedule = "constant"

  c.seg = ml_collections.ConfigDict()
  c.seg.patch = (32, 48, 48)        # training crop (D, H, W); = data.shape trains on whole volumes
  c.seg.pos_fraction = 0.67         # share of crops centred on a lesion voxel (MONAI RandCropByPosNegLabel pos/(pos+neg))
  c.seg.roi = ()                    # sliding-window size for whole-volume inference; empty = patch
  c.seg.overlap = 0.5               # sliding-window overlap
  c.seg.mode = "gaussian"           # gaussian | constant window weighting
  c.seg.sw_batch_size = 4           # windows per forward pass
  c.seg.threshold = 0.5             # probability -> mask
  c.seg.lambda_dice = 1.0           # DiceCELoss weights
  c.seg.lambda_ce = 1.0
  c.seg.num_overlays = 4            # --mode=eval: mask_comparison PNGs written to <workdir>/seg_overlays/
  return c
