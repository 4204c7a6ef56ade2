"""Tasks: what is learned from a batch, and how a split is evaluated. The loop (`lungct.train`) is shared.

A task is a module that satisfies `Task` below (checked for every entry of `TASKS` by tests/test_tasks.py);
tasks offering --mode=predict also satisfy `Predicts`, tasks offering --mode=report also `Reports`. What the
task declares is read from here by the rest of the code: the task names (`config.task`'s choices), its config
group and execution keys (`config_check`, inference), its best and headline metrics (`train`).

Optional: ``unsupported_modes(config) -> {mode: why}``: modes of MODES that this config of the task cannot run
(classification: predict and report of a multi-class classifier), each with the config value that rules it out;
`check_mode` refuses them at start. ``pool_out_of_fold(oof, config, workdir) -> dict`` pools --mode=cv's held-out cases (one `evaluate`
result per fold) into one estimate when `lungct.evaluate.pool_out_of_fold` cannot from their shape (attributes).

Adding a task is one new module here, one entry in TASKS, and a config that sets `config.task`.
"""
from __future__ import annotations

import inspect
import types
from typing import Any, Callable, Protocol, runtime_checkable

from lungct.tasks import attributes, classify, segment


@runtime_checkable
class Task(Protocol):
  """The functions and constants the loop (train.py) and the modes (evaluate.py) use, with their signatures."""

  NAME: str                        # config.task
  MODES: tuple[str, ...]           # the --mode values it supports (train, eval, cv, predict, report)
  BEST_METRIC: str                 # key of `evaluate`'s summary that picks the best checkpoint (higher is better)
  HEADLINE_METRICS: tuple[str, ...]  # the validation metrics printed at every evaluation (after loss, best)
  CONFIG: str                      # its reference config file (relative to the repo), with a `:tiny` variant
  CONFIG_GROUP: str                # its own config group ("" = none): taken from the checkpoint by inference
  EXECUTION_KEYS: tuple[str, ...]  # dotted keys (in its group) that change evaluation, never what is learned

  def check(self, config) -> list[str]:
    """Config errors of this task, each naming its key."""

  def input_shape(self, config) -> tuple[int, int, int]:
    """What one training example fed to the model looks like (D, H, W)."""

  def num_outputs(self, config) -> int:
    """Model outputs (per example or per voxel)."""

  def prepare_batch(self, batch: dict, config, step: int) -> dict:
    """Host side: a loader batch -> {"image": ..., <targets>} (a function of (seed, step) only)."""

  def augment(self, key, batch: dict, config) -> dict:
    """On device, inside the jitted train step."""

  def loss(self, logits, batch: dict, config) -> tuple[Any, dict]:
    """On device: scalar loss and scalar step metrics."""

  def make_apply(self, graphdef, mesh, config) -> Callable:
    """jit of (params, batch_stats, images) -> the task's outputs, used by `evaluate` and the modes."""

  def evaluate(self, apply, variables, mesh, source, config) -> tuple[dict[str, float], Any]:
    """Host: (scalar metrics of a split, including BEST_METRIC and "loss" where defined; per-case results)."""

  def run_eval(self, predictor, sources: dict, workdir: str, split: str) -> dict:
    """--mode=eval: writes eval_<split>.json (and per-case files) in the workdir; returns the result."""


@runtime_checkable
class Predicts(Protocol):
  """--mode=predict: `lungct.predict` reads every scan; the task turns one into a row of predictions.csv."""

  def scan_predictor(self, predictor, workdir: str, out_dir: str) -> Callable[..., dict]:
    """(scan: nifti.Scan, image: (1, D, H, W, 1) model input, name: unique file stem, crop_start: where the model's
    window lies in the resampled scan, `preprocess.to_scan_grid`'s argument) -> {column: value}."""


@runtime_checkable
class Reports(Protocol):
  """--mode=report: `lungct.report` writes the page; the task gives its title, sections and figures."""

  def report_sections(self, predictor, sources: dict, workdir: str, out_dir: str, split: str) -> dict:
    """The task's part of the page about ``split`` ("test", or "external": the external set, already evaluated
    into eval_external.json): {"title", "test_line" (the evaluated set in one line), "sections": [(heading,
    [blocks])], "figures": {caption: png in out_dir}, "limitations": [html], optional "curves": extra
    metrics.jsonl series for the training curves}; `lungct.report` lays out the page around it."""


TASKS: dict[str, types.ModuleType] = {m.NAME: m for m in (classify, segment, attributes)}


class TaskError(ValueError):
  """An unknown task, or a mode the task does not support (one line, names both)."""


def get(config) -> types.ModuleType:
  name = config.get("task", "classify")
  if name not in TASKS:
    raise TaskError(f"config.task={name!r} is not a task; known: {sorted(TASKS)}")
  return TASKS[name]


def _ruled_out(task, config) -> dict[str, str]:
  """{mode: why} of the modes of task.MODES that this config of the task cannot run (its `unsupported_modes`)."""
  return task.unsupported_modes(config) if hasattr(task, "unsupported_modes") else {}


def supported_modes(config) -> tuple[str, ...]:
  """The --mode values ``config``'s task supports for this config: its MODES less its `unsupported_modes`."""
  task = get(config)
  ruled_out = _ruled_out(task, config)
  return tuple(m for m in task.MODES if m not in ruled_out)


def check_mode(config, mode: str) -> types.ModuleType:
  """The task of ``config`` if it supports ``mode`` for this config; else TaskError naming both, and the config
  value that rules the mode out where the task gives one (before any work)."""
  task = get(config)
  why = _ruled_out(task, config).get(mode, "")
  if mode not in task.MODES or why:
    raise TaskError(f"--mode={mode} is not supported by config.task={task.NAME!r}" + (f" with {why}" if why else "")
                    + f" (it supports: {', '.join(supported_modes(config))})")
  return task


def num_outputs(config) -> int:
  """The model outputs ``config``'s task needs (for `runtime.restore_for_inference`)."""
  return get(config).num_outputs(config)


def restore(config, workdir: str, checkpoint_path: str, explicit, mode: str):
  """(predictor, task) for an inference mode: the checkpoint restored with the settings it was trained with
  (its task's config group included), the task checked to support ``mode`` from the checkpoint's settings
  before its arrays are read."""
  from lungct import runtime
  predictor = runtime.restore_for_inference(config, workdir, checkpoint_path, explicit, task_of=get,
                                            check=lambda c: check_mode(c, mode))
  return predictor, get(predictor.config)


def contract_errors(module) -> list[str]:
  """What ``module`` lacks or gets wrong of `Task` (and `Predicts` / `Reports` for the modes it offers)."""
  protocols = [Task] + [p for mode, p in (("predict", Predicts), ("report", Reports))
                        if mode in getattr(module, "MODES", ())]
  errors = []
  for proto in protocols:
    for name, kind in _members(proto).items():
      if not hasattr(module, name):
        errors.append(f"{module.__name__}: no {name} ({proto.__name__})")
      elif kind is not None and not isinstance(getattr(module, name), kind):
        errors.append(f"{module.__name__}.{name} must be a {kind.__name__}")
      elif kind is None:
        want = [p for p in inspect.signature(getattr(proto, name)).parameters if p != "self"]
        fn = getattr(module, name)
        have = [p.name for p in inspect.signature(fn).parameters.values()
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
        if have != want:
          errors.append(f"{module.__name__}.{name}({', '.join(have)}) does not match the contract "
                        f"{name}({', '.join(want)}) ({proto.__name__})")
  if not set(getattr(module, "MODES", ())) <= {"train", "eval", "cv", "predict", "report"}:
    errors.append(f"{module.__name__}.MODES has unknown modes: {module.MODES}")
  return errors


def _members(proto) -> dict[str, type | None]:
  """Protocol member -> its type for constants (str, tuple), None for functions."""
  out = {}
  for name, ann in proto.__annotations__.items():
    out[name] = tuple if str(ann).startswith("tuple") else str
  for name, value in vars(proto).items():
    if inspect.isfunction(value) and not name.startswith("_"):
      out[name] = None
  return out


def execution_keys() -> tuple[str, ...]:
  """Every task's execution keys (for readers that do not know the task, e.g. same_run's key filter)."""
  return tuple(k for t in TASKS.values() for k in t.EXECUTION_KEYS)
