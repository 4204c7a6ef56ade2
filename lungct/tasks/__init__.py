"""Tasks: what is learned from a batch, and how a split is evaluated. The loop (`lungct.train`) is shared.

A task is a module with:

    NAME: str                       # config.task
    MODES: tuple[str, ...]          # the --mode values it supports (train, eval, cv, predict, report)
    BEST_METRIC: str                # key of `evaluate`'s result that picks the best checkpoint (higher is better)
    check(config) -> list[str]                       # config errors of this task, each naming its key
    input_shape(config) -> (D, H, W)                 # what one training example fed to the model looks like
    num_outputs(config) -> int                       # model outputs (per example or per voxel)
    prepare_batch(batch, config, step) -> dict       # host side: loader batch -> {"image": ..., <targets>}
    augment(key, batch, config) -> dict              # on device, inside the jitted step
    loss(logits, batch, config) -> (loss, metrics)   # on device: scalar loss and scalar step metrics
    evaluate(predictor, source, config) -> (summary, cases)  # host: scalar metrics of a split, per-case rows
    run_eval(predictor, config, workdir, split)      # --mode=eval: write eval_<split>.json and per-case files

Adding a task is one new module here, one entry in TASKS, and a config that sets `config.task`.
"""
from __future__ import annotations

import types

from lungct.tasks import classify, segment

TASKS: dict[str, types.ModuleType] = {classify.NAME: classify, segment.NAME: segment}


class TaskError(ValueError):
  """An unknown task, or a mode the task does not support (one line, names both)."""


def get(config) -> types.ModuleType:
  name = config.get("task", "classify")
  if name not in TASKS:
    raise TaskError(f"config.task={name!r} is not a task; known: {sorted(TASKS)}")
  return TASKS[name]


def check_mode(config, mode: str) -> types.ModuleType:
  """The task of ``config`` if it supports ``mode``; else TaskError naming both (before any work)."""
  task = get(config)
  if mode not in task.MODES:
    raise TaskError(f"--mode={mode} is not supported by config.task={task.NAME!r} "
                    f"(it supports: {', '.join(task.MODES)})")
  return task


def num_outputs(config) -> int:
  """The model outputs ``config``'s task needs (for `runtime.restore_for_inference`)."""
  return get(config).num_outputs(config)
