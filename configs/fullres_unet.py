"""Whole-lung lesion segmentation at 1.0 mm isotropic: 3D U-Net (paper widths), remat, bfloat16, depth split.

    python -m lungct.main --config configs/fullres_unet.py --workdir runs/fullres_unet \
        --config.data.source=folder --config.data.manual_dir=/data/ct --config.data.labels_csv=/data/ct/labels.csv

One volume of 288 x 384 x 384 voxels (288 x 384 x 384 mm: a whole chest field of view) is split along its depth
over `mesh.space` = 4 devices (72 slices each, halos exchanged by XLA), the batch over the remaining devices
(8 accelerators -> data = 2, batch 2). Memory per device, from `benchmarks/spatial.py` at 1/64 of the volume on
CPU, scaled linearly in voxels (see docs/scaling.md for the measurements and how far to trust them): about
32 GiB per device at space = 4 (one volume per data shard), against ~112 GiB for one volume on one device
(space = 1), which no 80 GB accelerator holds. Not yet run on an accelerator.
Lower `data.target_spacing` to 1.5 mm (shape (192, 256, 256), 3.4x fewer voxels) for 40 GB devices.
"""
import ml_collections

from configs import unet_seg
from lungct import models


def get_config() -> ml_collections.ConfigDict:
  c = unet_seg.get_config()
  c.dtype = "bfloat16"                      # compute dtype; params and optimizer state stay float32
  c.model = models.model_config("unet3d", features=(32, 64, 128, 256), remat=True)  # Cicek et al. 2016 widths
  c.data.target_spacing = (1.0, 1.0, 1.0)   # mm (z, y, x), isotropic
  c.data.fit = "crop_or_pad"                # keep millimetres: pad with air / crop around the centre
  c.data.shape = (288, 384, 384)            # 288 x 384 x 384 mm: the whole lung field
  c.mesh.space = 4                          # devices per volume (depth split); must divide the device count
  c.train.batch_size = 2                    # global; divisible by (device count / mesh.space)
  c.train.num_epochs = 100
  c.train.learning_rate = 1e-3
  c.train.schedule = "warmup_cosine"
  c.train.warmup_steps = 100
  c.loader.num_threads = 8
  c.loader.prefetch = 2                     # a 1 mm volume is 170 MB in float32: keep few in flight
  c.segment.patch = c.data.shape            # whole volumes (the point of spatial partitioning): no crops
  c.segment.roi = c.data.shape              # whole-volume inference, one window
  c.segment.sw_batch_size = 2               # divisible by the data axis
  return c
