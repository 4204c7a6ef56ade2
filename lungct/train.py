"""THE training loop, for every task: optimizer, sharded jit step, resume, checkpoints, logging, guarantees.

    summary = train_and_evaluate(config, workdir)            # the task is config.task (lungct.tasks)

The state is the dict ``{"step", "params", "batch_stats", "opt_state"}``, replicated over the runtime's mesh
while every batch is sharded along it; XLA inserts the gradient all-reduce and BatchNorm statistics are
computed over the global batch, so N devices give the same numbers as one. Randomness (dropout, augmentation,
patch sampling) is a function of (seed, step) and so is the data order, so a resumed run continues exactly.

Every guarantee lives here once, for every task: resume (the config checked before any array is read),
SIGTERM saves and exits, non-finite steps stop (naming the last good checkpoint) or are skipped, precise BN,
early stopping and keep-best on the task's metric, checkpoint_every_steps, init_from and freeze, JSONL and
TensorBoard logging, a progress bar.
"""
from __future__ import annotations

import collections
import json
import math
import os
import re
import signal
import time
import uuid
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lungct import checkpoint, config_check, metrics, runtime, tasks

State = dict[str, Any]


# ----------------------------------------------------------------------------- optimizer and state

def learning_rate_schedule(tc: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  if tc.schedule == "constant":
    return optax.constant_schedule(tc.learning_rate)
  if tc.schedule == "exponential":  # the tutorial: ExponentialDecay(1e-4, 100000, 0.96, staircase=True)
    return optax.exponential_decay(tc.learning_rate, tc.decay_steps, tc.decay_rate, staircase=tc.staircase)
  if tc.schedule == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(0.0, tc.learning_rate, max(tc.warmup_steps, 1),
                                              max(total_steps, tc.warmup_steps + 1))
  raise ValueError(f"config.train.schedule: unknown schedule {tc.schedule!r}")


def make_optimizer(tc: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  lr = learning_rate_schedule(tc, total_steps)
  if tc.optimizer == "adam":
    opt = optax.adam(lr)
    if tc.weight_decay:  # L2 on the loss gradient, like Keras kernel_regularizer
      opt = optax.chain(optax.add_decayed_weights(tc.weight_decay), opt)
  elif tc.optimizer == "adamw":
    opt = optax.adamw(lr, weight_decay=tc.weight_decay)
  elif tc.optimizer == "sgd":
    opt = optax.chain(optax.add_decayed_weights(tc.weight_decay), optax.sgd(lr, momentum=0.9, nesterov=True))
  else:
    raise ValueError(f"config.train.optimizer: unknown optimizer {tc.optimizer!r}")
  if tc.grad_clip:
    opt = optax.chain(optax.clip_by_global_norm(tc.grad_clip), opt)
  return opt


def freeze_labels(params: Any, patterns: tuple[str, ...]) -> Any:
  """'frozen' for every parameter whose path ("blocks/0/conv/kernel") matches one of ``patterns``."""
  regexes = [re.compile(p) for p in patterns]

  def label(path, _):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    return "frozen" if any(r.fullmatch(name) or r.match(name) for r in regexes) else "trainable"
  return jax.tree_util.tree_map_with_path(label, params)


def create_state(config: ml_collections.ConfigDict, total_steps: int
                 ) -> tuple[Any, State, optax.GradientTransformation]:
  """(graphdef, state, optimizer) for ``config``'s task and model. Frozen parameters get zero updates."""
  task = tasks.get(config)
  graphdef, params, batch_stats = runtime.init_variables(config, task.num_outputs(config))
  tx = make_optimizer(config.train, total_steps)
  if config.freeze:
    labels = freeze_labels(params, tuple(config.freeze))
    if "frozen" not in jax.tree.leaves(labels):
      raise config_check.ConfigError(f"config.freeze={tuple(config.freeze)} matches no parameter path")
    tx = optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, labels)
  # tx.init jitted: eagerly, each zeros_like of a distinct parameter shape is a compile of its own (~20 of them)
  return graphdef, {"step": jnp.zeros((), jnp.int32), "params": params, "batch_stats": batch_stats,
                    "opt_state": jax.jit(tx.init)(params)}, tx


# ----------------------------------------------------------------------------- steps (pure, jitted)

def train_step(graphdef, tx: optax.GradientTransformation, task, config: ml_collections.ConfigDict,
               state: State, batch: dict, key: jax.Array) -> tuple[State, dict]:
  """One optimisation step on a global batch: (state, batch, key) -> (new state, scalar metrics).

  The loop's batches carry the image as stored (float16, `pipeline.collate(cast=False)`): it becomes float32
  here, on the device (exact; half the bytes copied, no host-side cast)."""
  batch = {**batch, "image": batch["image"].astype(jnp.float32)}
  aug_key, dropout_key = jax.random.split(jax.random.fold_in(key, state["step"]))
  batch = task.augment(aug_key, batch, config)

  def compute_loss(params):
    model = runtime.merge(graphdef, params, state["batch_stats"])
    logits = model(batch["image"], train=True, dropout_key=dropout_key)
    value, step_metrics = task.loss(logits, batch, config)
    return value, (step_metrics, runtime.pure_batch_stats(model))

  (loss, (step_metrics, new_stats)), grads = jax.value_and_grad(compute_loss, has_aux=True)(state["params"])
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & _all_finite((params, new_stats))
  if config.train.on_nan == "skip":
    # Keep the old params / optimizer state / BN stats on a non-finite step (jnp.where rather than
    # optax.apply_if_finite: it also guards the BN stats and keeps the opt_state layout of "stop").
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
    params, opt_state = keep(params, state["params"]), keep(opt_state, state["opt_state"])
    new_stats = keep(new_stats, state["batch_stats"])
  new_state = {"step": state["step"] + 1, "params": params, "batch_stats": new_stats, "opt_state": opt_state}
  return new_state, {"loss": loss, **step_metrics, "grad_norm": grad_norm,
                     "nonfinite": 1 - finite.astype(jnp.int32)}


def _all_finite(tree: Any) -> jax.Array:
  return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def recalibrate_bn_step(graphdef, state: State, images: jax.Array, k: jax.Array) -> State:
  """Precise BN: after the k-th batch (k = 1, 2, ...), running stats = the mean of the k batches' statistics.

  Training updates running statistics with a slow moving average that lags the weights; evaluating with them
  mis-calibrates the outputs. Setting every BatchNorm's momentum to 1 - 1/k makes the running update an exact
  cumulative mean over a few training batches seen with the current weights (no dropout, no augmentation).
  """
  from flax import nnx
  model = runtime.merge(graphdef, state["params"], state["batch_stats"])
  for _, module in nnx.iter_graph(model):
    if isinstance(module, nnx.BatchNorm):
      module.momentum = 1.0 - 1.0 / k
  model(images, train=True)
  return {**state, "batch_stats": runtime.pure_batch_stats(model)}


def compile_steps(graphdef, tx, task, config, mesh):
  """(train step, precise-BN step), jitted: batches arrive sharded (`runtime.to_global`), the state replicated
  (and kept so, explicitly), the old state's buffers donated."""
  repl = runtime.replicated(mesh)
  step = runtime.jit(lambda s, b, k: train_step(graphdef, tx, task, config, s, b, k), mesh,
                     out_shardings=(repl, repl), donate_argnums=0)
  recal = runtime.jit(lambda s, x, k: recalibrate_bn_step(graphdef, s, x, k), mesh, out_shardings=repl,
                      donate_argnums=0)
  return step, recal


# ----------------------------------------------------------------------------- logging

class MetricWriter:
  """JSON lines in ``<workdir>/metrics.jsonl`` plus TensorBoard events in ``<workdir>/tensorboard``
  (main process only; others write nothing)."""

  def __init__(self, workdir: str, enabled: bool = True, resume_step: int | None = None):
    self.enabled = enabled
    if enabled:
      path = os.path.join(workdir, "metrics.jsonl")
      if resume_step is not None:
        note = truncate_history(path, resume_step)
        if note:
          print(note)
      self._json = open(path, "a")
      self._tb = _summary_writer_class()(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, values: dict[str, float]) -> None:
    if not self.enabled:
      return
    self._json.write(json.dumps({"step": int(step), **metrics.json_safe(values)}, allow_nan=False) + "\n")
    self._json.flush()
    for k, v in values.items():
      if isinstance(v, (int, float)) and math.isfinite(v):
        self._tb.add_scalar(k, v, step)
    self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._json.close()
      self._tb.close()


def truncate_history(path: str, last_step: int) -> str:
  """Keeps the records of ``path`` (metrics.jsonl) up to ``last_step``, the step the run (re)starts from.

  Steps logged after the checkpoint a run resumes from are logged again by the resumed run, and a kill can
  leave a last line cut short: both are dropped here, so the file holds each step once, as complete JSON.
  Returns a line saying what was dropped ("" when nothing was).
  """
  if not os.path.exists(path):
    return ""
  with open(path) as f:
    lines = f.read().splitlines()
  kept, later, broken = [], 0, 0
  for line in lines:
    if not line.strip():
      continue
    try:
      step = int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
      broken += 1
      continue
    if step <= last_step:
      kept.append(line)
    else:
      later += 1
  if not (later or broken):
    return ""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write("".join(line + "\n" for line in kept))
  os.replace(tmp, path)
  return (f"{path}: dropped {later} records logged after step {last_step} (the step this run starts from; "
          f"they are logged again) and {broken} incomplete lines")


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported without PyTorch.

  tensorboardX imports torch whenever it is installed, only so that it can accept torch tensors: 1.5 s and
  ~175 MiB of resident memory in every run of a user who also has PyTorch. lungct logs Python floats, so torch is
  hidden from that one import (`import torch` raises ImportError while ``sys.modules["torch"]`` is None, and
  tensorboardX falls back to numpy); a torch the process imported already is left as it is.
  """
  import sys
  hide = "torch" not in sys.modules and "tensorboardX" not in sys.modules
  if hide:
    sys.modules["torch"] = None
  try:
    from tensorboardX import SummaryWriter
  finally:
    if hide:
      del sys.modules["torch"]
  return SummaryWriter


class _Preempted:
  """SIGTERM (preemption) sets a flag; the loop saves a checkpoint and exits cleanly."""

  def __init__(self):
    self.flag = False
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not in the main thread
      self._old = None

  def _handle(self, signum, frame):
    self.flag = True

  def stop(self, sync_point: bool) -> bool:
    """Whether to save and stop now. With several processes every one must stop at the same step, so the
    flags are gathered at sync points only (steps every process reaches: the logging steps)."""
    if jax.process_count() == 1:
      return self.flag
    if not sync_point:
      return False
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.int32(self.flag))))

  def restore(self):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def _progress(total: int, initial: int, enabled: bool):
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)


# ----------------------------------------------------------------------------- the loop

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, sources: dict | None = None) -> dict:
  """Trains ``config.task`` per ``config``; writes checkpoints, metrics.jsonl, TensorBoard and metrics.json.

  ``sources`` (default: the dataset's train/validation/test splits) lets cross-validation pass its folds; without
  a "test" source the final evaluation scores validation only.
  """
  from lungct.data import pipeline
  task = tasks.get(config)
  mesh = runtime.make_mesh(config)
  config_check.validate(config, num_devices=runtime.data_size(mesh), task_errors=task.check(config),
                        input_shape=task.input_shape(config))
  checkpoint.check_writable(workdir)
  is_main = runtime.is_main_process()
  t_start = time.time()
  tc = config.train
  took: collections.Counter = collections.Counter()  # wall seconds per phase, in metrics.json's "time_s"

  # Resume: the saved config is compared before anything is built or any array is read.
  moved = checkpoint.set_aside_leftover_best(workdir)
  if moved and is_main:
    print(moved)
  latest, best = checkpoint.managers(workdir, keep=tc.keep_checkpoints, best_metric=f"val_{task.BEST_METRIC}")
  config_json = runtime.saved_config_json(config)
  dataset_id = runtime.dataset_identity(config)  # lists the data (no volume read); resume compares it
  if not config.resume and latest.latest_step() is not None:
    raise checkpoint.CheckpointError(
        f"{workdir} already holds checkpoints and config.resume=False: use a new --workdir.")

  sources = sources or runtime.data_sources(config)
  train_src, val_src = sources["train"], sources["validation"]
  spe = pipeline.steps_per_epoch(len(train_src), tc.batch_size)
  total_steps = tc.num_steps if tc.num_steps > 0 else tc.num_epochs * spe
  eval_every = tc.eval_every_steps or spe
  ckpt_every = tc.checkpoint_every_steps or eval_every

  graphdef, state, tx = create_state(config, total_steps)
  state = jax.device_put(state, runtime.replicated(mesh))
  step_fn, recal = compile_steps(graphdef, tx, task, config, mesh)
  apply = task.make_apply(graphdef, mesh, config)

  book = {"best": None, "best_step": -1, "evals_without_improvement": 0}
  restored = None
  if config.resume:
    def check_meta(m):
      config_check.same_run(m.get("config", {}), config_json, workdir, task.EXECUTION_KEYS)
      config_check.same_dataset(m, dataset_id, config_json, workdir)
      check_schedule_horizon(tc, m.get("bookkeeping", {}).get("total_steps"), total_steps, workdir)
    restored = checkpoint.restore(latest, state, check_meta=check_meta)
    if restored is not None:
      state, meta = restored
      book.update(meta.get("bookkeeping", {}))
      if is_main:
        print(f"Resumed from {workdir}/{checkpoint.LATEST_DIR} at step {int(state['step'])}.")
  if restored is None:  # a new run: tied to its best checkpoints by a run id
    book.update(run_id=_new_run_id(), total_steps=total_steps)
  if config.init_from and int(state["step"]) == 0:
    params, stats, report = checkpoint.restore_params(config.init_from, state["params"], state["batch_stats"])
    if is_main:
      print(f"init_from {report['checkpoint']}: loaded {len(report['loaded'])} arrays, "
            f"kept fresh {len(report['skipped'])}: {sorted(report['skipped'])}")
    state = jax.device_put({**state, "params": params, "batch_stats": stats, "opt_state": jax.jit(tx.init)(params)},
                           runtime.replicated(mesh))

  start_step = int(state["step"])
  writer = MetricWriter(workdir, enabled=is_main, resume_step=start_step)
  dataset = runtime.dataset_summary(config)
  if is_main and dataset:  # what was skipped stays in sight at every run, not only during the build
    from lungct.data import lung_ct
    print("\n".join(lung_ct.summary_lines(dataset)))
  if is_main and start_step == 0:
    print(f"Task {task.NAME}: {len(train_src)} train / {len(val_src)} validation volumes of shape "
          f"{tuple(config.data.shape)}; {total_steps} steps of global batch {tc.batch_size} on "
          f"{jax.device_count()} device(s) (mesh {dict(mesh.shape)}).")
  ds = pipeline.make_dataset(train_src, global_batch_size=tc.batch_size, seed=config.seed, shuffle=True,
                             num_epochs=None, drop_remainder=True, cast=False,  # train_step casts the image
                             process_index=jax.process_index(), process_count=jax.process_count())
  batches: Iterator = pipeline.iterate(ds, start_step=start_step, num_threads=config.loader.num_threads,
                                       prefetch=config.loader.prefetch)
  key = jax.random.PRNGKey(config.seed)
  preempted = _Preempted()
  progress = _progress(total_steps, start_step, enabled=is_main and tc.progress_bar)
  lr = jax.jit(learning_rate_schedule(tc, total_steps))  # logged; one compile instead of one per jnp op in it
  last_good_step = latest.latest_step()
  window: list[dict] = []
  stop_reason = "finished"

  def to_device(host_batch: dict) -> dict:
    return {k: runtime.to_global(mesh, v) for k, v in host_batch.items()}

  def evaluate() -> dict[str, float]:
    nonlocal state
    if tc.precise_bn_batches:
      for k, batch in enumerate(pipeline.eval_batches(train_src, tc.batch_size), start=1):
        if k > tc.precise_bn_batches:
          break
        images = task.prepare_batch(batch, config, step=k)["image"]
        state = recal(state, runtime.to_global(mesh, runtime.host_slice(images)), jnp.float32(k))
    variables = runtime.Variables(graphdef, state["params"], state["batch_stats"])
    return task.evaluate(apply, variables, mesh, val_src, config)[0]

  step = start_step
  t_log = time.time()
  took["setup"] = t_log - t_start
  try:
    while step < total_steps:
      t0 = time.perf_counter()
      batch = task.prepare_batch(next(batches), config, step)
      state, m = step_fn(state, to_device(batch), key)
      if step == start_step:  # the train step's compile, timed apart from the steps
        jax.block_until_ready(m)
        took["first_step"] = time.perf_counter() - t0
        t0 = time.perf_counter()
      step += 1
      window.append(m)
      progress.update(1)
      stop_now = preempted.stop(sync_point=step % tc.log_every_steps == 0)
      val = None
      is_eval = step % eval_every == 0 or step == total_steps
      will_save = step % ckpt_every == 0 or step == total_steps or is_eval or stop_now
      if will_save or step % tc.log_every_steps == 0:  # the step's own values, before anything is saved
        _check_finite(window, step, tc.on_nan, workdir, last_good_step)
      took["train_steps"] += time.perf_counter() - t0  # dispatch until a value is read: the steps' own time
      if step % tc.log_every_steps == 0 or step == total_steps:
        logged = _window_metrics(window)
        logged["train/volumes_per_s"] = len(window) * tc.batch_size / max(time.time() - t_log, 1e-9)
        logged["train/learning_rate"] = float(lr(step))
        writer.write(step, logged)
        progress.set_postfix(loss=f"{logged['train/loss']:.3f}")
        window, t_log = [], time.time()
      if is_eval:
        t0 = time.perf_counter()
        val = evaluate()
        took["evaluation"] += time.perf_counter() - t0
        writer.write(step, {f"val/{k}": v for k, v in val.items()})
        score = val.get(task.BEST_METRIC, float("nan"))
        improved = math.isfinite(score) and (book["best"] is None or score > book["best"])
        if improved:
          book.update(best=score, best_step=step, evals_without_improvement=0)
        else:
          book["evals_without_improvement"] += 1
        if is_main:
          progress.write(f"step {step}: " + "  ".join(
              f"val {k} {val[k]:.4f}" for k in _headline(val, task)) + (" *" if improved else ""))
      if will_save:
        t0 = time.perf_counter()
        meta = {"config": config_json, "bookkeeping": book, "dataset": dataset_id}
        checkpoint.save(latest, step, state, meta)
        if val is not None and book["best_step"] == step:  # only an improvement replaces the best
          checkpoint.save(best, step, state, meta, metrics={f"val_{task.BEST_METRIC}": book["best"]})
        last_good_step = step
        took["checkpoints"] += time.perf_counter() - t0
      if stop_now:
        stop_reason = "preempted (SIGTERM)"
        break
      if tc.early_stopping_patience and book["evals_without_improvement"] >= tc.early_stopping_patience:
        stop_reason = (f"early stopping: no val {task.BEST_METRIC} improvement in "
                       f"{tc.early_stopping_patience} evaluations")
        break
  finally:
    progress.close()
    t0 = time.perf_counter()
    latest.wait_until_finished()
    best.wait_until_finished()
    took["checkpoints"] += time.perf_counter() - t0
    preempted.restore()
    writer.close()

  summary = {"task": task.NAME, "stop_reason": stop_reason, "steps": step,
             "wall_time_s": time.time() - t_start, "best_step": book["best_step"],
             f"best_val_{task.BEST_METRIC}": book["best"], "dataset": dataset}
  if stop_reason.startswith("preempted"):
    if is_main:
      print(f"Stopped at step {step}: {stop_reason}; checkpoint saved, rerun the same command to resume.")
    return summary
  # Final evaluation with the best checkpoint (by the task's validation metric) on validation and test.
  t0 = time.perf_counter()
  if best.latest_step() is not None:
    state, _ = checkpoint.restore(best, state, best.latest_step(), check_meta=lambda m: same_run_as_best(
        m, config_json, book, workdir, task.EXECUTION_KEYS))
  variables = runtime.Variables(graphdef, state["params"], state["batch_stats"])
  final = [s for s in ("validation", "test") if s in sources]  # cross-validation scores its held-out fold itself
  for split in final:
    summary[split] = task.evaluate(apply, variables, mesh, sources[split], config)[0]
  took["final_evaluation"] = time.perf_counter() - t0
  summary["wall_time_s"] = time.time() - t_start
  summary["time_s"] = {k: round(v, 2) for k, v in took.items()}
  if is_main:
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
      json.dump({**metrics.json_safe(summary), "note": metrics.JSON_NULL_NOTE}, f, indent=2, allow_nan=False)
    print(f"Done in {summary['wall_time_s']:.0f} s ({stop_reason}). Best step {summary['best_step']}: " +
          ", ".join(f"{s} {task.BEST_METRIC} {summary[s].get(task.BEST_METRIC, float('nan')):.3f}"
                    for s in final) + f". Wrote {workdir}/metrics.json")
    print("Time: " + ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in took.items()) +
          " (the first step includes its compile; evaluation includes precise BN)")
  return summary


def _new_run_id() -> str:
  """A random id for a run that starts from step 0, the same on every process (process 0's)."""
  value = np.frombuffer(uuid.uuid4().bytes, np.uint32).copy()
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    value = np.asarray(multihost_utils.broadcast_one_to_all(value))
  return "".join(f"{int(v):08x}" for v in value)


def check_schedule_horizon(tc: ml_collections.ConfigDict, saved_total: int | None, total_steps: int,
                           workdir: str) -> None:
  """Resuming with another train.num_epochs / num_steps only moves where the run stops, unless the learning-rate
  schedule depends on the run's length (warmup_cosine decays to 0 at the last step): then it is refused."""
  if tc.schedule != "warmup_cosine" or saved_total is None or int(saved_total) == total_steps:
    return
  raise config_check.ConfigError(
      f"config.train.num_epochs/num_steps: {workdir} holds a run of {saved_total} steps and this config asks for "
      f"{total_steps}; its warmup_cosine learning rate decays over the run's length, so the rest of the run "
      f"would follow another schedule. Use a new --workdir (constant and exponential schedules can be resumed "
      f"with another length).")


def same_run_as_best(meta: dict, config_json: dict, book: dict, workdir: str, execution_keys=()) -> None:
  """The best checkpoint about to be evaluated was written by this run (same config and run id)."""
  config_check.same_run(meta.get("config", {}), config_json, workdir, execution_keys)
  theirs = meta.get("bookkeeping", {}).get("run_id")
  if theirs != book.get("run_id"):
    raise checkpoint.CheckpointError(
        f"{workdir}/{checkpoint.BEST_DIR} was written by another run (run id {theirs}, this run {book.get('run_id')}); "
        f"not evaluating it. Use a new --workdir.")


def _headline(val: dict, task) -> list[str]:
  """The validation metrics printed at each evaluation: loss, the best metric, then the task's headline ones."""
  keys = ("loss", task.BEST_METRIC, *task.HEADLINE_METRICS)
  return [k for k in dict.fromkeys(keys) if k in val]


def _check_finite(window: list[dict], step: int, on_nan: str, workdir: str, last_good_step: int | None) -> None:
  """on_nan="stop": FloatingPointError naming the first non-finite step of ``window`` (the steps up to ``step``)."""
  if on_nan != "stop":
    return
  for i, m in enumerate(window):
    if int(m["nonfinite"]):
      bad = step - len(window) + 1 + i
      last = "none" if last_good_step is None else f"{workdir}/{checkpoint.LATEST_DIR}/{last_good_step}"
      raise FloatingPointError(
          f"non-finite loss, gradients or parameters at step {bad} (loss {float(m['loss'])}); stopped without "
          f"saving them. Last good checkpoint: {last}. Lower config.train.learning_rate, check the data, or "
          f"set config.train.on_nan=skip.")


def _window_metrics(window: list[dict]) -> dict[str, float]:
  """Means over the logging window's finite steps, plus the count of non-finite (skipped) steps."""
  ok = [w for w in window if not int(w["nonfinite"])]
  out = {f"train/{k}": float(np.mean([float(w[k]) for w in ok])) if ok else float("nan")
         for k in window[0] if k != "nonfinite"}
  out["train/skipped_steps"] = float(len(window) - len(ok))
  return out
