"""Nodule malignancy (benign vs malignant crops), LIDC-IDRI style, at native millimetres.

    python -m lungct.main --config configs/nodule.py --workdir runs/nodule
    # your own crops (NIfTI + labels CSV with patient_id and a mask column), see docs/data.md:
    python -m lungct.main --config configs/nodule.py --workdir runs/my_nodules \
        --config.data.source=folder --config.data.manual_dir=/data/crops --config.data.labels_csv=labels.csv

    # predict on crops of a model trained with this config: each scan's mask or lesion centre
    python -m lungct.main --config configs/nodule.py --workdir runs/my_nodules --mode=predict \
        --config.predict.input=/data/new_crops --config.predict.lesions=lesions.csv

Geometry: every crop is resampled to 1 mm isotropic voxels and cut / padded with air to
32^3 around the nodule (the centre of its mask's bounding box, or the crop's centre when
it has no mask), so nodule size, the strongest malignancy cue, survives (the default
"resize" would stretch a 4 mm and a 30 mm nodule to the same size). A 32 mm field of
view holds LIDC's 3-30 mm nodules; thin crops (2-6 slices) are padded, not dropped.

Model: a 3D ResNet-10 with a stride-1, 3x3x3 stem and no stem max-pool (as MedMNIST's 3D
ResNets at 28^3 / 64^3), so the first stage sees every 1 mm voxel.
Augmentation: nodules have no preferred orientation: random flips on every axis and the
24 rotations of the cube (exact, no interpolation), small scale jitter (+-10%, which also
blurs the size cue slightly) and intensity jitter. AdamW + warmup-cosine, class weights
for the ~40% malignant minority.
"""
import ml_collections

from configs import default
from lungct import models


def get_data_config() -> ml_collections.ConfigDict:
  """The nodule recipe's data config (also usable on its own, e.g. to build the dataset)."""
  d = default.get_data_config()
  d.source = "nodules"             # the embedded synthetic nodule crops (lungct/data/nodules.py)
  d.num_scans = 320                # nodules (from ~160 patients, 1-4 nodules each)
  d.phantom_seed = 0
  d.shape = (32, 32, 32)           # 32 mm at 1 mm: holds a 30 mm nodule
  d.target_spacing = (1.0, 1.0, 1.0)
  d.fit = "crop_or_pad"            # keep millimetres; pad with air (-1000 HU)
  d.crop_center = "mask"           # centre on the nodule when a mask is given
  d.hu_window = (-1000.0, 400.0)   # lung window: ground glass, solid and calcified parts all visible
  d.class_names = ("benign", "malignant")
  d.split_fractions = (0.7, 0.15, 0.15)  # by patient
  return d


def get_config() -> ml_collections.ConfigDict:
  c = default.get_config()
  c.data = get_data_config()
  if "augment" not in c:  # configs/default.py before config.augment moved to the top level
    c.augment = default.get_augment_config()
    c.loader = default.get_loader_config()

  # conv_impl="onednn": oneDNN's convolutions on the CPU (XLA's elsewhere, and where oneDNN lacks a kernel
  # for the CPU/dtype); correct on AVX-512/AMX, AVX2 and SSE4.1 (docs/onednn.md).
  # XLA's own 3D convolution made this recipe's step ~50x slower on CPU (benchmarks/README.md, round 3).
  c.model = models.model_config("resnet3d", depth=10, width=8, dropout=0.2, stem_stride=(1, 1, 1),
                                stem_pool=False, stem_kernel=3, conv_impl="onednn")

  a = c.augment
  a.enabled = True
  a.max_rotate_deg = 0.0           # arbitrary angles need interpolation; rot90 + flips cover orientation
  a.flip_lr = True
  a.flip_axes = (0, 1, 2)          # flips on every axis
  a.rot90 = "all"                  # the 24 rotations of the cube (needs a cubic data.shape)
  a.scale_jitter = 0.1             # zoom 0.9..1.1 about the centre
  a.intensity_shift = 0.03
  a.intensity_scale = 0.03

  t = c.train
  t.batch_size = 16
  t.num_epochs = 12               # seed 0: best validation AUC at epoch 6; ~1 minute on a 2-core CPU
  t.optimizer = "adamw"
  t.learning_rate = 2e-3
  t.schedule = "warmup_cosine"
  t.warmup_steps = 20
  t.weight_decay = 1e-4
  t.class_weights = (1.0, 1.5)     # ~60% benign / 40% malignant
  t.precise_bn_batches = 4
  t.log_every_steps = 10
  c.eval.gradcam_layer = ""
  return c
