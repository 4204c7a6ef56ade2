"""Whole-lung classification at 1.5 mm isotropic: 3D ResNet-18 (width 32), remat, bfloat16, depth split.

    python -m lungct.main --config configs/fullres_resnet.py --workdir runs/fullres_resnet \
        --config.data.source=mosmeddata --config.data.manual_dir=/data/MosMedData

One volume of 192 x 256 x 256 voxels (288 x 384 x 384 mm) is split along its depth over `mesh.space` = 2
devices, the batch over the rest (8 accelerators -> data = 4, batch 8: 2 volumes per data shard). Memory,
measured with `benchmarks/spatial.py` at 1/8 of the volume on CPU and scaled linearly in voxels
(docs/scaling.md): ~2.0 GiB per volume per device at space = 2, ~3.0 GiB at space = 1 - this model fits one
device without spatial splitting; space = 2 buys a larger batch per device. At 1.0 mm (shape (288, 384, 384),
3.4x the voxels) use mesh.space = 4 for large per-device batches. Not yet run on an accelerator.
"""
import ml_collections

from configs import default
from lungct import models


def get_config() -> ml_collections.ConfigDict:
  c = default.get_config()
  c.dtype = "bfloat16"                      # compute dtype; params and optimizer state stay float32
  c.model = models.model_config("resnet3d", depth=18, width=32, dropout=0.2, stem_stride=(2, 2, 2), remat=True)
  c.data.target_spacing = (1.5, 1.5, 1.5)   # mm (z, y, x), isotropic
  c.data.fit = "crop_or_pad"                # keep millimetres: pad with air / crop around the centre
  c.data.shape = (192, 256, 256)            # 288 x 384 x 384 mm: the whole lung field
  c.mesh.space = 2                          # devices per volume (depth split); must divide the device count
  c.train.batch_size = 8                    # global; divisible by (device count / mesh.space)
  c.train.optimizer = "adamw"
  c.train.schedule = "warmup_cosine"
  c.train.learning_rate = 1e-3
  c.train.warmup_steps = 100
  c.train.weight_decay = 1e-4
  c.train.num_epochs = 50
  c.loader.num_threads = 8
  c.loader.prefetch = 2
  return c
