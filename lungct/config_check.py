"""The config contract: which keys define an experiment, overrides, and validation at start-up.

Every problem is reported with the key that causes it. Two facts about keys live here and nowhere else:

* `EXECUTION_KEYS`: keys that change how a run executes, logs or is evaluated, never what it learns. A resumed
  run may change them, and inference (eval/predict/report) takes them from the current config. Every other key
  defines the experiment: resuming with another value is refused. A task adds its own (`task.EXECUTION_KEYS`,
  keys of its config group), passed in as ``extra`` by the callers that know the task.
* `INFERENCE_FROM_CHECKPOINT`: the groups inference takes from the checkpoint's saved config (less the
  execution keys), so a model always sees data prepared as in training; plus the task's `CONFIG_GROUP`.
The task names are `lungct.tasks.TASKS`'s keys: an unknown `config.task` is refused there (`tasks.get`).
(Which data keys change the *built dataset* is the data builder's business: `lungct.data.lung_ct`.)
"""
from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any, Iterable, Mapping

import ml_collections

EXECUTION_KEYS = (
    "train.num_epochs", "train.num_steps", "train.log_every_steps", "train.eval_every_steps",
    "train.checkpoint_every_steps", "train.keep_checkpoints", "train.progress_bar",
    "train.early_stopping_patience", "train.on_nan", "resume", "init_from", "loader", "mesh",
    "data.data_dir", "data.build_workers", "data.beam_options",
    "data.on_bad_scan",
    "eval", "predict", "cv", "report",
    # Same numbers, different execution, or evaluation-only settings:
    "model.conv_impl", "model.remat")
INFERENCE_FROM_CHECKPOINT = ("task", "dtype", "model.", "data.")
# Where the data lives. Not compared as strings on resume: the dataset's identity is (`same_dataset`: the
# settings and the content of the files these name, `lungct.data.lung_ct.config_name`), so data moved
# elsewhere resumes and edited or other data is refused. Inference reads them from the current config.
DATA_LOCATION_KEYS = ("data.manual_dir", "data.labels_csv")

_CHOICES = {
    "data.on_bad_scan": ("skip", "fail"),
    "data.label": ("binary", "grade"),
    "dtype": ("float32", "bfloat16", "float16"),
    "train.optimizer": ("adam", "adamw", "sgd"),
    "train.schedule": ("exponential", "warmup_cosine", "constant"),
    "train.on_nan": ("stop", "skip"),
}


class ConfigError(ValueError):
  pass


def is_execution_key(dotted: str, extra: Iterable[str] = ()) -> bool:
  """Whether ``dotted`` is one of `EXECUTION_KEYS` or ``extra`` (a task's), or lies inside one of those groups."""
  return any(dotted == k or dotted.startswith(k + ".") for k in (*EXECUTION_KEYS, *extra))


def is_data_location_key(dotted: str) -> bool:
  return dotted in DATA_LOCATION_KEYS


def get(config: Any, dotted: str) -> Any:
  for part in dotted.split("."):
    config = config[part]
  return config


# ----------------------------------------------------------------------------- config files

def load_config_file(path: str):
  """``configs/x.py[:arg]`` -> its get_config([arg]); SystemExit with one line if the file does not exist."""
  file, _, arg = path.partition(":")
  spec = importlib.util.spec_from_file_location("_lungct_config", file)
  if spec is None or not os.path.exists(file):
    sys.exit(f"error: --config={path}: no such config file")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()



# ----------------------------------------------------------------------------- overrides

def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """Sets dotted keys (``{"train.batch_size": 4}``) in place; an unknown key is a ConfigError naming it and the
  known keys of its parent. The one override walker: used by main (before flags are parsed), experiments, tests."""
  for key, value in overrides.items():
    node = config
    parts = key.split(".")
    for i, part in enumerate(parts):
      if not hasattr(node, "keys") or part not in node.keys():
        parent = "config." + ".".join(parts[:i]) if i else "config"
        known = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "(not a group)"
        raise ConfigError(f"unknown config key config.{key}: {parent} has no {part!r}. Known: {known}")
      if i < len(parts) - 1:
        node = node[part]
    if value is not _CHECK_ONLY:
      if isinstance(node[parts[-1]], tuple) and isinstance(value, list):
        value = tuple(value)
      node[parts[-1]] = value
  return config


_CHECK_ONLY = object()


def override_keys(argv: Iterable[str]) -> list[str]:
  """The dotted keys of ``--config.a.b=v`` / ``--config.a.b v`` flags, in order."""
  return [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]


def check_keys(config: ml_collections.ConfigDict, keys: Iterable[str]) -> None:
  """ConfigError for the first key ``config`` does not define (values untouched)."""
  apply_overrides(config, {k: _CHECK_ONLY for k in keys})


# ----------------------------------------------------------------------------- validation

def validate(config: ml_collections.ConfigDict, num_devices: int, task_errors: Iterable[str] = (),
             input_shape: tuple[int, int, int] | None = None) -> None:
  """Raises ConfigError naming the key for impossible values; checks the model fits ``input_shape``."""
  errors = list(task_errors)

  def need(ok, key, msg):
    if not ok:
      errors.append(f"config.{key}={get(config, key)!r}: {msg}")

  for key, choices in _CHOICES.items():
    need(get(config, key) in choices, key, f"must be one of {choices}")
  tc = config.train
  need(tc.batch_size > 0 and tc.batch_size % num_devices == 0, "train.batch_size",
       f"must be a positive multiple of the number of batch shards ({num_devices})")
  need(tc.learning_rate > 0, "train.learning_rate", "must be > 0")
  need(tc.weight_decay >= 0, "train.weight_decay", "must be >= 0")
  need(tc.num_steps > 0 or tc.num_epochs > 0, "train.num_epochs", "num_epochs or num_steps must be > 0")
  need(tc.log_every_steps > 0, "train.log_every_steps", "must be > 0")
  if "dropout" in config.model:
    need(0 <= config.model.dropout < 1, "model.dropout", "must be in [0, 1)")
  need(len(config.data.shape) == 3 and all(int(s) > 0 for s in config.data.shape), "data.shape",
       "must be three positive sizes (depth, height, width)")
  if config.data.label == "grade":
    need(int(config.data.num_classes) >= 2, "data.num_classes", "label='grade' needs >= 2 classes")
  need(float(config.data.get("min_extent_mm", 0.0) or 0.0) >= 0, "data.min_extent_mm", "must be >= 0 (0: no floor)")
  lo, hi = config.data.hu_window
  need(lo < hi, "data.hu_window", "low must be below high")
  need(len(config.data.split_fractions) == 3 and abs(sum(config.data.split_fractions) - 1) < 1e-6
       and min(config.data.split_fractions) > 0, "data.split_fractions", "three positive fractions summing to 1")
  need(not tc.class_weights or (len(tc.class_weights) == num_classes(config) and min(tc.class_weights) > 0),
       "train.class_weights", f"empty or {num_classes(config)} positive weights")
  if errors:
    raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
  _check_model_fits(config, tuple(input_shape or config.data.shape))


def num_classes(config) -> int:
  return 2 if config.data.label == "binary" else int(config.data.num_classes)


def _check_model_fits(config, shape: tuple[int, int, int]) -> None:
  """Traces the model on ``shape`` (no FLOPs spent) to catch unknown model options and too-small inputs."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from lungct import models

  # Built and called inside one eval_shape: no parameters are initialised (a full-resolution model's init
  # takes a minute on a CPU), and nnx.remat (model.remat=True) runs in the same trace as the model's variables
  # (a model built outside and called in jax.eval_shape raises TraceContextError under remat).
  make = lambda: models.create_model(config.model, num_outputs=1, dtype=jnp.float32, rngs=nnx.Rngs(0))
  try:
    jax.eval_shape(lambda: nnx.state(make()))
  except (models.ModelConfigError, TypeError) as e:
    raise ConfigError(str(e).splitlines()[0]) from None
  try:
    out = jax.eval_shape(lambda: make()(jnp.zeros((1, *shape, 1)), train=False))
    ok = all(d > 0 for d in out.shape)
  except (ValueError, TypeError, ZeroDivisionError) as e:  # noqa: B014
    ok, detail = False, str(e).splitlines()[0]
  else:
    detail = f"output shape {out.shape}"
  if not ok:
    raise ConfigError(f"input {shape} is too small for config.model.name={config.model.name!r} "
                      f"(its receptive field/downsampling): {detail}")


# ----------------------------------------------------------------------------- same experiment?

def flat(d: Mapping, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(flat(v, key + "."))
    else:
      out[key] = v
  return out


def norm(v):
  return list(v) if isinstance(v, tuple) else v


def same_run(saved: dict, current: dict, workdir: str, execution_keys: Iterable[str] = ()) -> None:
  """Refuses to resume a workdir whose checkpoints come from a different experiment (``execution_keys``: the
  task's own, which may change)."""
  a, b = flat(saved), flat(current)
  extra = tuple(execution_keys)
  differ = sorted(k for k in set(a) | set(b) if not is_execution_key(k, extra) and not is_data_location_key(k)
                  and norm(a.get(k)) != norm(b.get(k)))
  if differ:
    detail = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in differ[:8])
    raise ConfigError(f"{workdir} holds a run with a different config ({detail}). Use a new --workdir, "
                      f"or --config.resume=false to start over in a new workdir.")


def same_dataset(saved_meta: dict, current_dataset: str, current_config: dict, workdir: str) -> None:
  """Refuses to resume a workdir trained on another dataset: its checkpoints' dataset identity (the
  `dataset` of their meta, a `lung_ct` config name covering the settings and the files' content) must be
  the one the current data gives. One line naming both, with where each was read from."""
  old = saved_meta.get("dataset")
  if old is None or old == current_dataset:
    return  # checkpoints written before the identity was stored: the config comparison stands alone
  def where(cfg: dict) -> str:
    data = cfg.get("data", {}) or {}
    parts = [str(data.get(k)) for k in ("manual_dir", "labels_csv") if data.get(k)]
    return f" from {'/'.join(parts) if len(parts) < 2 else parts[0] + ' + ' + parts[1]}" if parts else ""
  raise ConfigError(f"{workdir} was trained on dataset {old}{where(saved_meta.get('config', {}))}, but the "
                    f"data now gives {current_dataset}{where(current_config)} (other files, or the same files "
                    "edited): use a new --workdir, or restore the data the run started on.")
