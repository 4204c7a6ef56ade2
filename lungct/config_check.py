"""Config validation at start-up: every problem is reported with the key that causes it."""
from __future__ import annotations

import ml_collections

# Keys a resumed run may change without becoming a different experiment.
RESUMABLE_CHANGES = (
    "train.num_epochs", "train.num_steps", "train.log_every_steps", "train.eval_every_steps",
    "train.checkpoint_every_steps", "train.keep_checkpoints", "train.progress_bar",
    "train.early_stopping_patience", "train.on_nan", "resume", "init_from", "data.num_threads", "data.prefetch",
    "data.data_dir", "mode", "eval", "predict", "cv", "report",
    # Same numbers, different execution or evaluation-only settings:
    "model.conv_impl", "model.remat", "seg.num_overlays", "seg.sw_batch_size", "seg.overlap", "seg.mode",
    "seg.threshold", "seg.roi")

_CHOICES = {
    "data.source": ("synthetic", "mosmeddata", "folder"),
    "data.on_bad_scan": ("skip", "fail"),
    "data.label": ("binary", "grade"),
    "dtype": ("float32", "bfloat16", "float16"),
    "train.optimizer": ("adam", "adamw", "sgd"),
    "train.schedule": ("exponential", "warmup_cosine", "constant"),
    "train.on_nan": ("stop", "skip"),
}


class ConfigError(ValueError):
  pass


def _get(config, dotted):
  for part in dotted.split("."):
    config = config[part]
  return config


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Raises ConfigError naming the key for impossible values; checks the model fits the input shape."""
  errors = []

  def need(ok, key, msg):
    if not ok:
      errors.append(f"config.{key}={_get(config, key)!r}: {msg}")

  for key, choices in _CHOICES.items():
    need(_get(config, key) in choices, key, f"must be one of {choices}")
  tc = config.train
  need(tc.batch_size > 0 and tc.batch_size % num_devices == 0, "train.batch_size",
       f"must be a positive multiple of the device count ({num_devices})")
  need(tc.learning_rate > 0, "train.learning_rate", "must be > 0")
  need(tc.weight_decay >= 0, "train.weight_decay", "must be >= 0")
  need(tc.num_steps > 0 or tc.num_epochs > 0, "train.num_epochs", "num_epochs or num_steps must be > 0")
  need(tc.log_every_steps > 0, "train.log_every_steps", "must be > 0")
  need(0 <= config.model.dropout < 1, "model.dropout", "must be in [0, 1)")
  need(len(config.data.shape) == 3 and all(int(s) > 0 for s in config.data.shape), "data.shape",
       "must be three positive sizes (depth, height, width)")
  lo, hi = config.data.hu_window
  need(lo < hi, "data.hu_window", "low must be below high")
  need(len(config.data.split_fractions) == 3 and abs(sum(config.data.split_fractions) - 1) < 1e-6
       and min(config.data.split_fractions) > 0, "data.split_fractions", "three positive fractions summing to 1")
  need(not config.data.target_spacing or (len(config.data.target_spacing) == 3 and min(config.data.target_spacing) > 0),
       "data.target_spacing", "empty or three positive spacings in mm")
  need(not tc.class_weights or (len(tc.class_weights) == _num_classes(config) and min(tc.class_weights) > 0),
       "train.class_weights", f"empty or {_num_classes(config)} positive weights")
  need(config.data.source == "synthetic" or config.data.manual_dir, "data.manual_dir",
       f"data.source={config.data.source!r} reads scans from a manual dir: pass --config.data.manual_dir=<folder>")
  need(config.data.source != "folder" or config.data.labels_csv, "data.labels_csv",
       "data.source='folder' needs a CSV of filename,label[,patient_id]")
  if errors:
    raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
  _check_model_fits(config)


def _num_classes(config) -> int:
  return 2 if config.data.label == "binary" else int(config.data.num_classes)


def _check_model_fits(config) -> None:
  """Traces the model on the configured shape (no FLOPs spent) to catch inputs below its receptive field."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from lungct import models

  def run():
    model = models.create_model(config.model, num_outputs=1, dtype=jnp.float32, rngs=nnx.Rngs(0))
    return model(jnp.zeros((1, *config.data.shape, 1)), train=False)

  try:
    out = jax.eval_shape(run)
    ok = all(d > 0 for d in out.shape)
  except (ValueError, TypeError, ZeroDivisionError) as e:  # noqa: B014
    ok, detail = False, str(e).splitlines()[0]
  else:
    detail = f"output shape {out.shape}"
  if not ok:
    raise ConfigError(f"config.data.shape={tuple(config.data.shape)} is too small for "
                      f"config.model.name={config.model.name!r} (its receptive field/downsampling): {detail}")


def flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(flat(v, key + "."))
    else:
      out[key] = v
  return out


def same_run(saved: dict, current: dict, workdir: str) -> None:
  """Refuses to resume a workdir whose checkpoints come from a different experiment."""
  a, b = flat(saved), flat(current)
  differ = sorted(k for k in set(a) | set(b)
                  if not k.startswith(RESUMABLE_CHANGES) and _norm(a.get(k)) != _norm(b.get(k)))
  if differ:
    detail = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in differ[:8])
    raise ConfigError(f"{workdir} holds a run with a different config ({detail}). Use a new --workdir, "
                      f"or --config.resume=false to start over in a new workdir.")


def _norm(v):
  return list(v) if isinstance(v, tuple) else v
