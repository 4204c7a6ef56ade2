"""Command line entry point.

    python -m lungct.main --config configs/default.py --workdir runs/demo [--mode=train] [--config.key=value ...]

Modes: train (default) trains and evaluates; eval restores the best checkpoint and evaluates a split with
confidence intervals at operating thresholds chosen on validation; cv runs patient-level k-fold cross-validation.
"""
from __future__ import annotations

import importlib.util
import os
import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file (get_config()).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, metrics and reports.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "cv", "predict", "report"], "What to do.")
flags.DEFINE_string("split", "test", "Split for --mode=eval.")
flags.DEFINE_string("checkpoint", "", "--mode=eval/predict: a checkpoint folder or step; default the workdir's best.")
flags.mark_flags_as_required(["config", "workdir"])


def check_override_keys(argv: list[str]) -> None:
  """Rejects `--config.a.b=v` for keys the config file does not define, naming the key (before any work)."""
  path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if path is None and "--config" in argv[:-1]:
    path = argv[argv.index("--config") + 1]
  if not path:
    return
  file, _, arg = path.partition(":")
  spec = importlib.util.spec_from_file_location("_lungct_config", file)
  if spec is None or not os.path.exists(file):
    sys.exit(f"error: --config={path}: no such config file")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  for a in argv:
    if not a.startswith("--config."):
      continue
    key = a[len("--config."):].split("=", 1)[0]
    node = config
    for i, part in enumerate(key.split(".")):
      if not hasattr(node, "keys") or part not in node.keys():
        parent = "config." + ".".join(key.split(".")[:i]) if i else "config"
        known = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "(not a group)"
        sys.exit(f"error: unknown config key config.{key} in {a!r}: {parent} has no {part!r}. Known: {known}")
      node = node[part]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from absl import logging
  logging.set_verbosity(logging.WARNING)  # Orbax and TFDS log every file they touch at INFO
  import jax
  if os.environ.get("LUNGCT_DISTRIBUTED"):  # multi-host: one process per host, coordinator from the environment
    jax.distributed.initialize()
  from lungct import checkpoint, config_check
  from lungct.data import nifti
  try:
    run(FLAGS.config, FLAGS.workdir)
  except (config_check.ConfigError, checkpoint.CheckpointError, FloatingPointError, nifti.ScanError,
          FileNotFoundError) as e:
    sys.exit(f"error: {e}")


def run(config, workdir: str) -> None:
  if FLAGS.mode in ("train", "eval") and config.get("task", "classify") == "segment":
    from lungct import segment
    if FLAGS.mode == "train":
      segment.train_segmentation(config, workdir)
    else:
      segment.evaluate_segmentation(config, workdir, split=FLAGS.split, checkpoint_path=FLAGS.checkpoint)
  elif FLAGS.mode == "train":
    from lungct import train
    train.train_and_evaluate(config, workdir)
  elif FLAGS.mode == "eval":
    from lungct import evaluate
    evaluate.evaluate_checkpoint(config, workdir, split=FLAGS.split, checkpoint_path=FLAGS.checkpoint)
  elif FLAGS.mode == "cv":
    from lungct import evaluate
    evaluate.cross_validate(config, workdir)
  elif FLAGS.mode == "predict":
    from lungct import predict
    predict.predict_scans(config, workdir, checkpoint_path=FLAGS.checkpoint)
  elif FLAGS.mode == "report":
    from lungct import report
    report.build_report(config, workdir, checkpoint_path=FLAGS.checkpoint)


if __name__ == "__main__":
  check_override_keys(sys.argv)
  app.run(main)
