"""Nodule attributes (LIDC-IDRI radiologist ratings and diameter) at the nodule recipe's native millimetres.

    python -m lungct.main --config configs/nodule_attributes.py --workdir runs/attributes \
        --config.data.manual_dir=../shared/data/lidc_indeterminate
    python -m lungct.main --config configs/nodule_attributes.py --workdir runs/attributes --mode=eval
    # then malignancy from this backbone (a fresh head; the restore prints what it loaded):
    python -m lungct.main --config configs/nodule.py --workdir runs/nodule_ft --config.init_from=runs/attributes

Data: a folder of crops listed by a CSV (filename, mask, patient_id and one column per target; `label` may be
absent): LIDC-IDRI's eight semantic ratings (max-voted over the readers) and the diameter in mm, as in
`../shared/data/lidc_indeterminate/nodules.csv`. The geometry, model, augmentation and optimizer are
configs/nodule.py's (1 mm voxels, crop_or_pad 32^3 around the mask, ResNet-10 with a stride-1 stem), so the
backbone transfers to the malignancy recipe unchanged. Ratings are ordinal 1..K (`attributes.levels`); the
diameter is continuous (Huber loss on (d - 10 mm) / 5 mm: a fixed prior scale, not fitted to the data).
"""
import ml_collections

import configs
from configs import nodule

LIDC_RATINGS = {"subtlety": 5, "internalstructure": 4, "calcification": 6, "sphericity": 5, "margin": 5,
                "lobulation": 5, "spiculation": 5, "texture": 5, "malignancy": 5}

# `--config configs/nodule_attributes.py:tiny`: seconds long on the embedded nodule crops, which provide the
# diameter and a 1-5 malignancy rating (the reliability tests run the attributes task so).
TINY = {"data.source": "nodules", "data.manual_dir": "", "data.labels_csv": "", "data.num_scans": 16,
        "data.targets": ("diameter_mm", "malignancy"), "data.shape": (16, 16, 16), "model.width": 4,
        "augment.scale_jitter": 0.0}


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = nodule.get_config()
  c.task = "attributes"
  d = c.data
  d.source = "folder"
  d.manual_dir = ""                 # required: the folder holding the crops (and, by default, nodules.csv)
  d.labels_csv = "nodules.csv"
  d.targets = ("diameter_mm", "subtlety", "internalstructure", "calcification", "sphericity", "margin",
               "lobulation", "spiculation", "texture")

  a = c.attributes = ml_collections.ConfigDict()
  a.levels = ml_collections.ConfigDict(LIDC_RATINGS)  # ratings 1..K; targets not listed are continuous
  a.location = ml_collections.ConfigDict({"diameter_mm": 10.0})  # continuous: prediction = location + spread * z
  a.spread = ml_collections.ConfigDict({"diameter_mm": 5.0})
  a.huber_delta = 1.0               # in spreads (5 mm for the diameter)

  t = c.train
  t.class_weights = ()              # no classes here
  t.num_epochs = 12
  return configs.variant(c, variant, TINY)
