"""Pretraining for transfer learning: the 5-way severity-grade task on a separate, larger phantom set.

    python -m lungct.main --config configs/pretrain_grades.py --workdir runs/pretrain
    python -m lungct.main --config configs/finetune.py:runs/pretrain --workdir runs/finetune

The phantom set has its own seed (data.phantom_seed=1), so none of the default set's (phantom_seed=0)
validation or test scans is seen in pretraining. The model is the default config's, so that everything
but the head (5 outputs here, 1 in the binary fine-tuning) loads into configs/finetune.py.
"""
from configs import default


def get_config():
  c = default.get_config()
  c.data.label = "grade"
  c.data.num_classes = 5
  c.data.phantom_seed = 1         # not the default set's seed 0: no fine-tuning test scan is pretrained on
  c.data.num_scans = 400
  c.train.num_epochs = 10
  return c
