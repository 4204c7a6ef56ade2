"""Orbax checkpoints: the latest N for resuming, the best by validation AUC, partial restore.

A checkpoint holds two items: ``state`` (a pytree of arrays: step, params, batch_stats, opt_state)
and ``meta`` (JSON: the config, the trainer's bookkeeping such as the best AUC so far). Orbax writes
each step into a temporary directory and renames it when complete, so a run killed mid-save never
restores a half-written checkpoint. Nothing is unpickled: arrays are read from OCDBT/Zarr, meta
from JSON.
"""
from __future__ import annotations

import os
import re
import sys
import time
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

LATEST_DIR = "checkpoints"
BEST_DIR = "best"
BEST_METRIC = "val_auc"


class CheckpointError(RuntimeError):
  """A checkpoint directory that cannot be written or read, said plainly."""


def check_writable(path: str) -> None:
  """Creates ``path`` if needed and proves it writable; CheckpointError naming it otherwise."""
  try:
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, f".write_probe.{os.getpid()}")  # one per process: hosts may share the workdir
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise CheckpointError(f"cannot write checkpoints to {path}: {e.strerror or e}") from e


def _steps_on_disk(directory: str) -> list[int]:
  """Finished steps of a manager directory (Orbax names them by the step; unfinished saves carry a suffix)."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def set_aside_leftover_best(workdir: str) -> str:
  """Renames ``best/`` to ``best.earlier-<time>/`` when ``checkpoints/`` holds nothing to resume from.

  Such a best checkpoint belongs to an earlier run (or to a first save cut short): a run starting from step
  0 next to it could be outranked by it and evaluate it as its own best. Nothing is deleted. Process 0 moves,
  every process waits. Returns the line to print ("" when nothing was moved).
  """
  latest_dir, best_dir = os.path.join(workdir, LATEST_DIR), os.path.join(workdir, BEST_DIR)
  steps = _steps_on_disk(best_dir)
  message = ""
  if steps and not _steps_on_disk(latest_dir):
    dest = f"{best_dir}.earlier-{time.strftime('%Y%m%d-%H%M%S')}"
    message = (f"{best_dir} held step {steps[-1]} of an earlier run and {latest_dir} nothing to resume: "
               f"moved it to {dest} (never used by this run).")
    if jax.process_index() == 0:
      os.rename(best_dir, dest)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("lungct: leftover best set aside")
  return message


def managers(workdir: str, *, keep: int = 2, best_metric: str = BEST_METRIC
             ) -> tuple[ocp.CheckpointManager, ocp.CheckpointManager]:
  """Returns (latest, best) managers under ``workdir``; ``best`` keeps the single best by ``best_metric``
  (the key of the ``metrics`` dict passed to `save`; higher is better)."""
  latest_path = os.path.abspath(os.path.join(workdir, LATEST_DIR))
  best_path = os.path.abspath(os.path.join(workdir, BEST_DIR))
  for p in (latest_path, best_path):
    check_writable(p)
  # Both save the same step (an improving evaluation): on several processes each async commit ends in a barrier
  # named after the step, so each manager needs its own barrier prefix ("Barrier _async_commit_complete.3 is
  # already ongoing" otherwise, when latest's commit is still running as best's starts).
  sync = lambda name: ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name)
  latest = ocp.CheckpointManager(
      latest_path,
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, multiprocessing_options=sync("latest")),
      item_names=("state", "meta"))
  best = ocp.CheckpointManager(
      best_path,
      options=ocp.CheckpointManagerOptions(
          max_to_keep=1, create=True, best_fn=lambda m: m[best_metric], best_mode="max",
          multiprocessing_options=sync("best")),
      item_names=("state", "meta"))
  return latest, best


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict,
         metrics: dict | None = None) -> None:
  try:
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), metrics=metrics,
        force=True)
  except OSError as e:
    raise CheckpointError(f"saving step {step} to {mngr.directory} failed: {e.strerror or e}") from e


def abstract(state: Any) -> Any:
  """Shape/dtype/sharding skeleton of ``state`` that tells Orbax how to lay out what it restores."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


def restore(mngr: ocp.CheckpointManager, like: Any, step: int | None = None,
            check_meta: Callable[[dict], None] | None = None) -> tuple[Any, dict] | None:
  """Restores (state, meta) at ``step`` into the layout of ``like``; None if there is no checkpoint.

  Orbax only lists finished steps (a save killed midway leaves a ``*.orbax-checkpoint-tmp*`` folder that is
  never read). Without ``step``, a latest step that still cannot be read (a truncated or corrupt file) is
  reported on stderr and the next older step is tried. ``check_meta(meta)`` runs before the arrays are read
  (e.g. to refuse a different experiment); its exceptions propagate.
  """
  steps = sorted(mngr.all_steps(), reverse=True) if step is None else [step]
  errors = []
  for s in steps:
    try:
      meta = dict(mngr.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
    except Exception as e:  # noqa: BLE001  (Orbax / TensorStore raise many types for bad files)
      errors.append(_unreadable(mngr, s, e))
      continue
    if check_meta is not None:
      check_meta(meta)
    try:
      state = mngr.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract(like))))["state"]
    except Exception as e:  # noqa: BLE001
      errors.append(_unreadable(mngr, s, e))
      continue
    return state, meta
  if errors:
    raise CheckpointError("no readable checkpoint: " + "; ".join(errors))
  return None


def _unreadable(mngr: ocp.CheckpointManager, step: int, e: Exception) -> str:
  msg = f"{mngr.directory}/{step} is unreadable (truncated or corrupt?): {type(e).__name__}: {str(e)[:200]}"
  print(f"checkpoint: {msg}; trying an older step if any.", file=sys.stderr)
  return msg


def read_meta(workdir: str) -> dict | None:
  """The meta of the latest complete checkpoint in ``workdir``, or None."""
  path = os.path.join(workdir, LATEST_DIR)
  if not os.path.isdir(path):
    return None
  mngr = _open(os.path.abspath(path))
  step = mngr.latest_step()
  if step is None:
    return None
  return dict(mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])


def flatten(tree: Any) -> dict[str, Any]:
  return {"/".join(str(getattr(k, "key", k)) for k in path): v
          for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def fingerprint(*trees: Any) -> str:
  """16 hex digits of SHA-256 over the arrays of ``trees`` (paths, dtypes, shapes and bytes): which weights an
  evaluation was computed with, whatever folder they were read from."""
  import hashlib
  h = hashlib.sha256()
  for i, tree in enumerate(trees):
    for path, value in sorted(flatten(tree).items()):
      a = np.ascontiguousarray(np.asarray(jax.device_get(value)))
      h.update(f"{i}/{path}:{a.dtype.str}:{a.shape}".encode())
      h.update(a.tobytes())
  return h.hexdigest()[:16]


def unflatten_like(flat: dict[str, Any], like: Any) -> Any:
  paths = jax.tree_util.tree_flatten_with_path(like)[0]
  leaves = [flat["/".join(str(getattr(k, "key", k)) for k in p)] for p, _ in paths]
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like), leaves)


def find_checkpoint(path: str) -> tuple[str, int]:
  """Resolves ``path`` (a workdir, its checkpoints/ or best/ folder, or one step folder) to (manager dir, step)."""
  path = os.path.abspath(path)
  m = re.fullmatch(r"(.*)/(\d+)", path)
  if m and os.path.isdir(os.path.join(path, "state")):
    return m.group(1), int(m.group(2))
  for d in (os.path.join(path, BEST_DIR), os.path.join(path, LATEST_DIR), path):
    if os.path.isdir(d):
      steps = _open(d).all_steps()
      if steps:
        return d, max(steps)
  raise CheckpointError(f"no checkpoint found under {path}")


def _open(directory: str) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(directory, item_names=("state", "meta"))


def _replicated_target(directory: str, step: int) -> Any:
  """The saved state's shapes and dtypes, laid out replicated over this run's devices.

  Orbax restores an array without a target onto the devices it was saved from and refuses ("Topology
  mismatch") when they differ, e.g. a checkpoint written by 2 processes x 2 devices read by one process.
  """
  meta = ocp.StandardCheckpointer().metadata(os.path.join(directory, str(step), "state"))
  tree = getattr(meta, "item_metadata", meta)
  tree = getattr(tree, "tree", tree)
  repl = jax.sharding.NamedSharding(jax.sharding.Mesh(np.asarray(jax.devices()), ("all",)),
                                    jax.sharding.PartitionSpec())
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=repl), tree)


def restore_variables(directory: str, step: int, check_meta: Callable[[dict], None] | None = None
                      ) -> tuple[Any, Any, dict]:
  """(params, batch_stats, meta) of one checkpoint, whatever optimizer trained the model (its state is read
  and dropped) and on however many devices and processes it was saved. ``check_meta(meta)`` runs before the
  arrays are read (e.g. to refuse a mode the checkpoint's task does not support); its exceptions propagate."""
  mngr = _open(directory)
  try:
    meta = dict(mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
  except Exception as e:  # noqa: BLE001  (Orbax / TensorStore raise many types for bad files)
    raise CheckpointError(f"{directory}/{step} is unreadable: {type(e).__name__}: {str(e)[:200]}") from None
  if check_meta is not None:
    check_meta(meta)
  try:
    state = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_replicated_target(directory, step))))["state"]
  except Exception as e:  # noqa: BLE001  (Orbax / TensorStore raise many types for bad files)
    raise CheckpointError(f"{directory}/{step} is unreadable: {type(e).__name__}: {str(e)[:200]}") from None
  return state.get("params", {}), state.get("batch_stats", {}), meta


def restore_params(path: str, params: Any, batch_stats: Any) -> tuple[Any, Any, dict]:
  """Partial restore for transfer learning.

  Loads params/batch_stats from the checkpoint at ``path`` wherever the parameter path and shape match the
  target model, keeps the target's fresh initialisation elsewhere (e.g. a new head). Returns
  (params, batch_stats, report) with report = {"loaded": [...], "skipped": {path: reason}, "unused": [...]}.
  """
  directory, step = find_checkpoint(path)
  saved_params, saved_stats, _ = restore_variables(directory, step)
  saved = {"params": saved_params, "batch_stats": saved_stats}
  report = {"checkpoint": f"{directory}/{step}", "loaded": [], "skipped": {}, "unused": []}
  out = []
  for name, target in (("params", params), ("batch_stats", batch_stats)):
    src = flatten(saved.get(name, {}))
    dst = flatten(target)
    for k, v in dst.items():
      key = f"{name}/{k}"
      if k not in src:
        report["skipped"][key] = "not in checkpoint"
      elif np.shape(src[k]) != np.shape(v):
        report["skipped"][key] = f"shape {np.shape(src[k])} in checkpoint vs {np.shape(v)} in model"
      else:
        dst[k] = jax.numpy.asarray(src[k], dtype=v.dtype)
        report["loaded"].append(key)
    report["unused"] += [f"{name}/{k}" for k in src if k not in dst]
    out.append(unflatten_like(dst, target))
  return out[0], out[1], report
