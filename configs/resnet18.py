"""3D ResNet-18 on the synthetic phantoms (or any source via --config.data.source=...).

    python -m lungct.main --config configs/resnet18.py --workdir runs/resnet18
"""
from configs import default
from lungct import models


def get_config():
  c = default.get_config()
  # MedicalNet/torchvision use width 64; 16 keeps CPU runs short
  c.model = models.model_config("resnet3d", depth=18, width=16, dropout=0.2, conv_impl="onednn")
  c.data.shape = (48, 64, 64)
  c.train.optimizer = "adamw"
  c.train.schedule = "warmup_cosine"
  c.train.learning_rate = 1e-3
  c.train.warmup_steps = 20
  c.train.weight_decay = 1e-4
  return c
