"""Nodule segmentation at native millimetres: a 3D U-Net on nodule crops (LIDC-style), 1 mm isotropic.

    python -m lungct.main --config configs/nodule_seg.py --workdir runs/nodule_seg
    python -m lungct.main --config configs/nodule_seg.py --workdir runs/nodule_seg --mode=eval   # Dice, HD95 (mm)
    # ... with test-time augmentation (each window averaged over its 8 flips; the headline numbers below):
    python -m lungct.main --config configs/nodule_seg.py --workdir runs/nodule_seg --mode=eval --config.segment.tta=flips
    # your own crops with masks (labels CSV with a mask column, docs/data.md):
    python -m lungct.main --config configs/nodule_seg.py --workdir runs/my_seg \
        --config.data.source=folder --config.data.manual_dir=/data/crops --config.data.labels_csv=labels.csv

The data geometry is configs/nodule.py's (1 mm voxels, crop_or_pad to 32^3 centred on the mask, so a 4 mm and a
30 mm nodule keep their size and HD95 is in true millimetres); the crop is the whole training example (patch =
data.shape), and evaluation runs the sliding window over the same 32^3 crop. Augmentation: flips on every axis
and the 4 axial 90-degree rotations (exact for image and mask; they keep the 2.5 mm-stepped slice axis where it
is, the cube rotations moved it in-plane), no zoom (it would blur the mask's edge). The crop is centred
on one lesion, so the mask keeps only the connected component at its centre (segment.keep="center").

    # the 364 real LIDC-IDRI crops with their masks (docs/data.md: test Dice 0.802 [0.781, 0.821] with
    # --mode=eval --config.segment.tta=flips, 0.797 without); the CSV has a mask column and no label:
    python -m lungct.main --config configs/nodule_seg.py --workdir runs/nodule_seg_lidc \
        --config.data.source=folder --config.data.manual_dir=../shared/data/lidc_indeterminate \
        --config.data.labels_csv=nodules.csv
    # predict on crops: a mask NIfTI on each crop's own grid and the lesion volume in ml
    python -m lungct.main --config configs/nodule_seg.py --workdir runs/nodule_seg_lidc --mode=predict \
        --config.predict.input=/data/new_crops --config.predict.without_lesion=center   # or predict.lesions=<csv>
"""
import ml_collections

from configs import nodule, unet_seg


def get_config() -> ml_collections.ConfigDict:
  c = unet_seg.get_config()
  n = nodule.get_config()
  c.data = n.data
  c.augment = n.augment
  c.augment.scale_jitter = 0.0
  c.augment.rot90 = "axial"        # real LIDC validation Dice 0.812 with 30 epochs vs 0.803 ("all", 20 epochs; docs/data.md)
  c.model.features = (16, 32, 64)   # three levels: 32 -> 16 -> 8 voxels
  # oneDNN convolutions and the up-convolutions as one matmul: the same outputs and gradients as XLA's
  # (tests/test_conv_impl.py); this step 2.2 s vs 24.0 s with XLA's (benchmarks/seg_step.py, 2026-12-02).
  c.model.conv_impl = "onednn"
  c.segment.patch = tuple(c.data.shape)
  c.segment.pos_fraction = 1.0
  c.segment.sw_batch_size = 4
  c.segment.keep = "center"        # real LIDC validation: Dice 0.8026 -> 0.8030, HD95 1.53 -> 1.48 mm (docs/data.md)
  # segment.tta stays "none" here: training's per-epoch validation (and checkpoint selection) without it, as
  # measured; --mode=eval/predict --config.segment.tta=flips: validation Dice 0.812 -> 0.814 (docs/data.md).
  c.train.batch_size = 8
  c.train.num_epochs = 30          # validation Dice still rose at epoch 20 (best step 899 of 930)
  c.train.learning_rate = 2e-3
  c.train.optimizer = "adamw"
  c.train.schedule = "warmup_cosine"
  c.train.warmup_steps = 20
  c.train.weight_decay = 1e-4
  c.train.precise_bn_batches = 4
  return c
