"""Command line entry point.

    python -m lungct.main --config configs/default.py --workdir runs/demo [--mode=train] [--config.key=value ...]

Modes: train (default) trains and evaluates; eval restores the best checkpoint and evaluates a split with
confidence intervals at operating thresholds chosen on validation; cv runs patient-level k-fold cross-validation.
"""
from __future__ import annotations

import os

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file (get_config()).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, metrics and reports.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "cv", "predict", "report"], "What to do.")
flags.DEFINE_string("split", "test", "Split for --mode=eval.")
flags.DEFINE_string("checkpoint", "", "--mode=eval/predict: a checkpoint folder or step; default the workdir's best.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from absl import logging
  logging.set_verbosity(logging.WARNING)  # Orbax and TFDS log every file they touch at INFO
  import jax
  if os.environ.get("LUNGCT_DISTRIBUTED"):  # multi-host: one process per host, coordinator from the environment
    jax.distributed.initialize()
  config, workdir = FLAGS.config, FLAGS.workdir
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
  app.run(main)
