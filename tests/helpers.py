"""Small configs and datasets shared by the tests (the tests make their own data; nothing is downloaded)."""
from __future__ import annotations

import os
import sys

import ml_collections

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs import default  # noqa: E402
from lungct import config_check  # noqa: E402


def tiny_config(data_dir: str, base: ml_collections.ConfigDict | None = None, **overrides
                ) -> ml_collections.ConfigDict:
  """A seconds-long config: 24 phantoms at 48^3, a narrow tutorial CNN, no progress bar.

  ``overrides`` are dotted keys, e.g. ``tiny_config(d, **{"train.num_steps": 4})``; ``base`` (default: the
  default config) lets other configs (segmentation, grades) shrink the same way.
  """
  c = base if base is not None else default.get_config()
  small = {"data.data_dir": str(data_dir), "data.num_scans": 24, "data.shape": (48, 48, 48),
           "loader.num_threads": 1, "train.batch_size": 4, "train.num_epochs": 1, "train.log_every_steps": 2,
           "train.progress_bar": False, "eval.n_boot": 50}
  if c.model.name == "cnn3d":
    small.update({"model.features": (4, 8, 8, 16), "model.dense": 16})
  return config_check.apply_overrides(c, {**small, **overrides})


def tiny_trained(tmp_path_factory, steps: int, eval_every: int) -> tuple[ml_collections.ConfigDict, str]:
  """(config, workdir) of `tiny_config` trained for `steps` steps, evaluated every `eval_every`, in fresh folders."""
  from lungct import train
  c = tiny_config(tmp_path_factory.mktemp("tfds"), **{"train.num_epochs": 0, "train.num_steps": steps,
                                                      "train.eval_every_steps": eval_every})
  workdir = str(tmp_path_factory.mktemp("run"))
  train.train_and_evaluate(c, workdir)
  return c, workdir
