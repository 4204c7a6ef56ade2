"""Default config: the embedded synthetic lung-CT phantoms, CPU-friendly.

    python -m lungct.main --config configs/default.py --workdir runs/demo
    python -m lungct.main --config configs/default.py --workdir runs/x --config.train.num_epochs=2
"""
import ml_collections

import configs
from lungct import models


def get_data_config() -> ml_collections.ConfigDict:
  """Dataset and preprocessing. Everything that changes the built dataset lives here.

  Geometry (docs/data.md): resample to target_spacing (mm), then fit to shape by
  "resize" (stretch: millimetres lost) or "crop_or_pad" (cut / pad with air: millimetres
  kept), the crop centred on the scan or on the lesion mask.
  """
  d = ml_collections.ConfigDict()
  d.source = "synthetic"          # synthetic | nodules | folder | dicom | mosmeddata | medmnist
  d.data_dir = "data/tfds"        # where TFDS writes the ArrayRecord dataset
  d.manual_dir = ""               # folder / dicom / mosmeddata: folder of scans; medmnist: the .npz or its folder
  d.labels_csv = ""               # folder / dicom: CSV of filename,label[,patient_id][,grade][,mask]
  d.num_scans = 160               # synthetic / nodules: how many to generate
  d.phantom_seed = 0              # synthetic / nodules: the set's seed
  d.medmnist_flag = "nodulemnist3d"  # medmnist: <flag>.npz (28^3) or <flag>_64.npz
  d.medmnist_size = 28            # medmnist: 28 | 64
  d.shape = (48, 64, 64)          # preprocessed volume (depth, height, width); the tutorial CNN needs >= 46
  d.hu_window = (-1000.0, 400.0)  # lung window, mapped to [0, 1]
  d.target_spacing = ()           # mm per voxel: one number (isotropic) or (z, y, x); empty = keep the scan's
  d.fit = "resize"                # resize (stretch to shape) | crop_or_pad (keep mm; pad with air, -1000 HU)
  d.crop_center = "center"        # crop_or_pad: center | mask (centre of the lesion mask's bounding box)
  d.min_extent_mm = 0.0           # optional floor: skip scans spanning less (mm, any axis); 0 = none
  d.split_fractions = (0.7, 0.15, 0.15)  # train / validation / test, by patient (medmnist keeps its own)
  d.split_seed = 0
  d.on_bad_scan = "skip"          # skip | fail
  d.build_workers = 0             # threads preprocessing scans during a build (0: one per CPU)
  d.beam_options = ""             # build on Apache Beam instead: pipeline args, e.g. "--runner=DirectRunner"
  d.label = "binary"              # binary (normal vs abnormal) | grade (severity CT-0..CT-4)
  d.num_classes = 5               # label=grade: number of severity grades
  d.targets = ()                  # numeric per-study targets stored with each example (NaN = missing): folder /
                                  # dicom: labels-CSV columns (e.g. ("diameter_mm", "texture")); nodules:
                                  # "diameter_mm"; synthetic: "lesion_ml" (the attributes task reads them)
  d.class_names = ("normal", "abnormal")  # label=binary: names of label 0 and 1 (predict, tables, report, figures)
  return d


def get_loader_config() -> ml_collections.ConfigDict:
  """config.loader: how batches are read (does not change the dataset)."""
  c = ml_collections.ConfigDict()
  c.num_threads = 2               # grain reader threads
  c.prefetch = 4                  # batches read ahead
  return c


def get_augment_config() -> ml_collections.ConfigDict:
  """config.augment: on-device 3D augmentation, training only (lungct.data.augment)."""
  a = ml_collections.ConfigDict()
  a.enabled = True
  a.max_rotate_deg = 10.0         # rotation in the axial plane, uniform in +-max
  a.flip_lr = True                # left-right (W) flip
  a.flip_axes = ()                # more random flips: axes of (D, H, W), e.g. (0, 1, 2)
  a.rot90 = "none"                # none | axial (k * 90 deg in H, W; needs H == W) | all (24 cube rotations; needs D == H == W)
  a.scale_jitter = 0.0            # zoom by a factor uniform in [1 - s, 1 + s] (about the centre)
  a.intensity_shift = 0.05
  a.intensity_scale = 0.05
  return a


# `--config configs/default.py:tiny`: seconds long (the reliability tests run the classification task so).
TINY = {"data.num_scans": 24, "data.shape": (48, 48, 48), "model.features": (4, 8, 8, 16), "model.dense": 16}


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.task = "classify"             # a key of lungct.tasks.TASKS: classify | segment (configs/unet_seg.py) |
                                  # attributes (configs/nodule_attributes.py)
  c.dtype = "float32"             # compute dtype: float32 | bfloat16 (params stay float32)
  c.data = get_data_config()

  c.loader = get_loader_config()
  c.augment = get_augment_config()

  # The model: its name plus every constructor option (defaults come from the constructor, lungct/models/).
  # The tutorial CNN is (64, 64, 128, 256) filters with dense 512; narrower here for CPU. BN momentum 0.9:
  # Keras' 0.99 needs far more steps than a CPU demo runs. onednn: oneDNN convolutions inside the jitted step
  # (5.1x the previous im2col default on this config's train step, benchmarks/README.md; XLA's convolution, with
  # one warning line, where the extension cannot be built, and on GPU/TPU).
  c.model = models.model_config("cnn3d", features=(16, 16, 32, 64), dense=128, dropout=0.3, bn_momentum=0.9,
                                conv_impl="onednn")

  c.mesh = ml_collections.ConfigDict()
  c.mesh.space = 1                # devices that split each volume's depth (spatial partitioning); the rest split
                                  # the batch

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 8          # global batch, split over all devices
  c.train.num_epochs = 12
  c.train.num_steps = -1          # > 0 overrides num_epochs
  c.train.optimizer = "adam"      # adam | adamw | sgd
  c.train.learning_rate = 1e-3
  c.train.schedule = "exponential"  # exponential | warmup_cosine | constant
  c.train.decay_steps = 100000    # exponential decay like the tutorial: lr * 0.96^(step/decay_steps)
  c.train.decay_rate = 0.96
  c.train.staircase = True
  c.train.warmup_steps = 0
  c.train.weight_decay = 0.0
  c.train.grad_clip = 0.0         # global-norm clip; 0 = off
  c.train.class_weights = ()      # e.g. (1.0, 2.0); empty = unweighted
  c.train.log_every_steps = 10
  c.train.eval_every_steps = 0    # 0 = once per epoch
  c.train.checkpoint_every_steps = 0  # 0 = at every evaluation
  c.train.keep_checkpoints = 2
  c.train.precise_bn_batches = 8  # before each evaluation, BN running stats <- mean over this many train batches; 0 = off
  c.train.early_stopping_patience = 0  # evaluations without improvement of the task's metric; 0 = off
  c.train.progress_bar = True
  c.train.on_nan = "stop"         # non-finite loss/gradients/params: stop (naming the step and the last good
                                  # checkpoint) | skip (keep the state unchanged, count it as train/skipped_steps)
  c.eval = ml_collections.ConfigDict()
  c.eval.n_boot = 1000            # bootstrap resamples (by patient) for confidence intervals
  c.eval.sensitivity_targets = (0.9, 0.95)  # extra operating points: threshold reaching this sensitivity on validation
  c.eval.calibration = "none"     # none | temperature (fitted on validation by --mode=eval, applied by eval/predict/report)
  c.eval.gradcam_layer = "blocks.1"  # Grad-CAM layer for predict/report ("" = the last block with > 1 voxel)
  c.eval.external_dir = ""        # --mode=eval/report on an external test set: the folder of its scans (NIfTI or DICOM
  c.eval.external_csv = ""        # series) and its labels CSV (filename,label[,patient_id][,grade][,mask]); every scan
  c.eval.external_source = ""     # prepared as the checkpoint's training data; source folder | dicom ("" = folder,
                                  # or dicom for a model trained on DICOM)

  c.predict = ml_collections.ConfigDict()
  c.predict.input = ""            # --mode=predict: a .nii/.nii.gz file or a folder of them
  c.predict.threshold = -1.0      # < 0: Youden threshold from --mode=eval if present, else 0.5
  c.predict.lesions = ""          # CSV filename,mask or filename,x,y,z[,coords]: each scan's lesion, needed by
                                  # models trained on crops centred on the mask (data.crop_center="mask")
  c.predict.without_lesion = "skip"  # such a model, a scan without an entry in predict.lesions: skip | center (crop
                                  # centred on the scan: a volume of interest already centred on its lesion)

  c.cv = ml_collections.ConfigDict()
  c.cv.folds = 5                  # --mode=cv: k, over train+validation, grouped by patient, stratified by label
  c.cv.seed = 0
  c.cv.selection = "inner"        # inner: checkpoint, early stopping and thresholds chosen on an inner validation split
                                  # of each fold's training patients, the held-out fold scored once (honest);
                                  # heldout: chosen on the held-out fold itself (optimistic; kept to compare)
  c.cv.inner_fraction = 0.2       # selection=inner: share of each fold's training patients held for validation

  c.resume = True                 # resume from the latest checkpoint in the workdir
  c.init_from = ""                # transfer learning: a workdir or checkpoint step folder to load matching params from
  c.freeze = ()                   # regexes of parameter paths kept fixed (e.g. "blocks/0/.*": nnx.split path names)
  return configs.variant(c, variant, TINY)
