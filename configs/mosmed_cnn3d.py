"""The Keras tutorial's setup on MosMedData (CT-0 vs CT-1..CT-4), from a manual dir.

Download MosMedData yourself and point manual_dir at the folder holding CT-0 ... CT-4:

    python -m lungct.main --config configs/mosmed_cnn3d.py --workdir runs/mosmed \
        --config.data.manual_dir=/path/to/MosMedData
"""
from configs import default
from lungct import models


def get_config():
  c = default.get_config()
  c.data.source = "mosmeddata"
  c.data.manual_dir = ""                  # required: the folder holding CT-0 ... CT-4 (and masks/)
  c.data.shape = (64, 128, 128)           # the tutorial's 128x128x64 volumes, as (depth, height, width)
  c.data.hu_window = (-1000.0, 400.0)
  c.augment.max_rotate_deg = 20.0    # the tutorial rotates by one of (-20, -10, -5, 5, 10, 20) degrees
  c.augment.flip_lr = False
  c.augment.intensity_shift = 0.0
  c.augment.intensity_scale = 0.0
  # The tutorial's net: every option at its default (64-64-128-256, dense 512, dropout 0.3, Keras BN momentum
  # 0.99); the oneDNN convolution only changes the speed on CPU (XLA elsewhere).
  c.model = models.model_config("cnn3d", conv_impl="onednn")
  c.train.precise_bn_batches = 0          # the tutorial evaluates with Keras' moving averages
  c.train.batch_size = 2
  c.train.num_epochs = 100
  c.train.optimizer = "adam"
  c.train.learning_rate = 1e-4            # ExponentialDecay(1e-4, decay_steps=100000, decay_rate=0.96, staircase=True)
  c.train.schedule = "exponential"
  c.train.decay_steps = 100000
  c.train.decay_rate = 0.96
  c.train.staircase = True
  c.train.early_stopping_patience = 15    # the tutorial's EarlyStopping(monitor="val_acc", patience=15)
  c.train.log_every_steps = 20
  return c
