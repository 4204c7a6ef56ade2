"""Small configs and datasets shared by the tests (the tests make their own data; nothing is downloaded)."""
from __future__ import annotations

import os
import sys

import ml_collections

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs import default  # noqa: E402


def tiny_config(data_dir: str, **overrides) -> ml_collections.ConfigDict:
  """A seconds-long config: 24 phantoms at 48^3, a narrow tutorial CNN, no progress bar."""
  c = default.get_config()
  c.data.data_dir = str(data_dir)
  c.data.num_scans = 24
  c.data.shape = (48, 48, 48)
  c.data.num_threads = 1
  c.model.features = (4, 8, 8, 16)
  c.model.dense = 16
  c.train.batch_size = 4
  c.train.num_epochs = 1
  c.train.log_every_steps = 2
  c.train.progress_bar = False
  c.eval.n_boot = 50
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c
