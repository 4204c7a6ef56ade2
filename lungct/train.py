"""Training: optax optimizer from the config, a sharded jit train step, the loop, checkpoints, metrics.

The model is split once into a static ``graphdef`` and plain pytrees (params, batch_stats); the train
state is the dict ``{"step", "params", "batch_stats", "opt_state"}``, replicated over a 1-D ``Mesh``
with axis ``data`` while every batch is sharded along it. XLA inserts the gradient all-reduce, and
BatchNorm statistics are computed over the global batch, so N devices give the same numbers as one.
Randomness (dropout, augmentation) is ``fold_in(seed, step)`` and the data order is a function of
(seed, step), so a resumed run continues exactly where the interrupted one stopped.
"""
from __future__ import annotations

import json
import math
import os
import signal
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lungct import checkpoint, config_check, metrics
from lungct import models
from lungct.data import augment
# The input pipeline (grain, tensorflow_datasets) is imported where data is read, so the model and the jitted
# steps import with JAX/Flax/Optax/Orbax alone (e.g. for benchmarks on a bare accelerator machine).

State = dict[str, Any]


# ----------------------------------------------------------------------------- setup

def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh over every device (all hosts) with the single axis ``data``."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), ("data",))


def num_outputs(config: ml_collections.ConfigDict) -> int:
  """1 logit for binary classification and for lesion segmentation (per voxel), else one per class."""
  if config.get("task", "classify") == "segment" or config.data.label == "binary":
    return 1
  return int(config.data.num_classes)


def label_key(config: ml_collections.ConfigDict) -> str:
  return "label" if config.data.label == "binary" else "grade"


def learning_rate_schedule(tc: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  if tc.schedule == "constant":
    return optax.constant_schedule(tc.learning_rate)
  if tc.schedule == "exponential":  # the tutorial: ExponentialDecay(1e-4, 100000, 0.96, staircase=True)
    return optax.exponential_decay(tc.learning_rate, tc.decay_steps, tc.decay_rate,
                                   staircase=tc.staircase)
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
  """'frozen' for every parameter whose path ("block_0/conv/kernel") matches one of ``patterns``, else 'trainable'."""
  import re
  regexes = [re.compile(p) for p in patterns]
  def label(path, _):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    return "frozen" if any(r.fullmatch(name) or r.match(name) for r in regexes) else "trainable"
  return jax.tree_util.tree_map_with_path(label, params)


def create_state(config: ml_collections.ConfigDict, total_steps: int
                 ) -> tuple[nnx.GraphDef, State, optax.GradientTransformation]:
  """Initialises the model; returns (graphdef, state, optimizer). Frozen parameters get zero updates."""
  model = models.create_model(config.model, num_outputs=num_outputs(config),
                              dtype=jnp.dtype(config.dtype), rngs=nnx.Rngs(params=config.seed))
  graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  params, batch_stats = nnx.to_pure_dict(params), nnx.to_pure_dict(batch_stats)
  tx = make_optimizer(config.train, total_steps)
  if config.freeze:
    labels = freeze_labels(params, tuple(config.freeze))
    if "frozen" not in jax.tree.leaves(labels):
      raise ValueError(f"config.freeze={tuple(config.freeze)} matches no parameter path")
    tx = optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, labels)
  return graphdef, {"step": jnp.zeros((), jnp.int32), "params": params, "batch_stats": batch_stats,
                    "opt_state": tx.init(params)}, tx


# ----------------------------------------------------------------------------- steps

def loss_fn(logits: jax.Array, labels: jax.Array, class_weights: tuple = ()) -> jax.Array:
  """Mean (optionally class-weighted) binary or softmax cross-entropy."""
  if logits.shape[-1] == 1:
    per_example = optax.sigmoid_binary_cross_entropy(logits[:, 0], labels.astype(jnp.float32))
  else:
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  if class_weights:
    w = jnp.asarray(class_weights, jnp.float32)[labels]
    return jnp.sum(w * per_example) / jnp.sum(w)
  return jnp.mean(per_example)


def probabilities(logits: jax.Array) -> jax.Array:
  return jax.nn.sigmoid(logits[:, 0]) if logits.shape[-1] == 1 else jax.nn.softmax(logits, -1)


def train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, config: ml_collections.ConfigDict,
               state: State, images: jax.Array, labels: jax.Array, key: jax.Array) -> tuple[State, dict]:
  """One optimisation step on a global batch. Pure: (state, batch, key) -> (new state, metrics)."""
  aug_key, dropout_key = jax.random.split(jax.random.fold_in(key, state["step"]))
  if config.data.augment.enabled:
    images = augment.augment_batch(aug_key, images, config.data.augment)

  def compute_loss(params):
    model = nnx.merge(graphdef, params, state["batch_stats"])
    logits = model(images, train=True, dropout_key=dropout_key)
    new_stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
    return loss_fn(logits, labels, tuple(config.train.class_weights)), (logits, new_stats)

  (loss, (logits, new_stats)), grads = jax.value_and_grad(compute_loss, has_aux=True)(state["params"])
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & _all_finite((params, new_stats))
  if config.train.get("on_nan", "stop") == "skip":
    # Keep the old params / optimizer state / BN stats on a non-finite step (jnp.where rather than
    # optax.apply_if_finite: it also guards the BN stats and keeps the opt_state layout of "stop").
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    params, opt_state = keep(params, state["params"]), keep(opt_state, state["opt_state"])
    new_stats = keep(new_stats, state["batch_stats"])
  if logits.shape[-1] == 1:
    correct = (logits[:, 0] > 0).astype(jnp.int32) == labels
  else:
    correct = jnp.argmax(logits, -1) == labels
  new_state = {"step": state["step"] + 1, "params": params, "batch_stats": new_stats, "opt_state": opt_state}
  return new_state, {"loss": loss, "accuracy": jnp.mean(correct), "grad_norm": grad_norm,
                     "nonfinite": 1 - finite.astype(jnp.int32)}


def _all_finite(tree: Any) -> jax.Array:
  return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def recalibrate_bn_step(graphdef: nnx.GraphDef, state: State, images: jax.Array, k: jax.Array) -> State:
  """Precise BN: after the k-th batch (k = 1, 2, ...), running stats = the mean of the k batches' statistics.

  Training updates running statistics with a slow moving average that lags the weights; evaluating with them
  mis-calibrates the outputs. Setting every BatchNorm's momentum to 1 - 1/k makes the running update an exact
  cumulative mean over a few training batches seen with the current weights (no dropout, no augmentation).
  """
  model = nnx.merge(graphdef, state["params"], state["batch_stats"])
  for _, module in nnx.iter_graph(model):
    if isinstance(module, nnx.BatchNorm):
      module.momentum = 1.0 - 1.0 / k
  model(images, train=True)
  return {**state, "batch_stats": nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))}


def recalibrate_bn(recal, state: State, mesh: Mesh, source, config) -> State:
  """Runs `recalibrate_bn_step` over the first config.train.precise_bn_batches batches of ``source`` (in order)."""
  from lungct.data import pipeline
  n = config.train.get("precise_bn_batches", 0)
  for k, batch in enumerate(pipeline.eval_batches(source, config.train.batch_size), start=1):
    if k > n:
      break
    state = recal(state, to_global(mesh, host_slice(batch["image"])), jnp.float32(k))
  return state


def eval_step(graphdef: nnx.GraphDef, state: State, images: jax.Array) -> jax.Array:
  model = nnx.merge(graphdef, state["params"], state["batch_stats"])
  return probabilities(model(images, train=False))


def compile_steps(graphdef, tx, config, mesh: Mesh):
  """jit the steps with explicit shardings: state replicated, batch split over ``data``."""
  repl, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  step = jax.jit(lambda s, x, y, k: train_step(graphdef, tx, config, s, x, y, k),
                 in_shardings=(repl, split, split, repl), out_shardings=(repl, repl), donate_argnums=0)
  predict = jax.jit(lambda s, x: eval_step(graphdef, s, x), in_shardings=(repl, split), out_shardings=repl)
  return step, predict


def compile_recalibration(graphdef, mesh: Mesh):
  repl, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  return jax.jit(lambda s, x, k: recalibrate_bn_step(graphdef, s, x, k),
                 in_shardings=(repl, split, repl), out_shardings=repl, donate_argnums=0)


def to_global(mesh: Mesh, local: np.ndarray) -> jax.Array:
  """This host's slice of a global batch -> one array sharded over the mesh's ``data`` axis."""
  return jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local)


def host_slice(global_batch: np.ndarray) -> np.ndarray:
  """This host's contiguous share of a global batch (every host reads the same evaluation batch)."""
  n = global_batch.shape[0] // jax.process_count()
  return global_batch[jax.process_index() * n:(jax.process_index() + 1) * n]


def predict_source(predict, state: State, mesh: Mesh, source, config) -> dict[str, np.ndarray]:
  """Probabilities for every example of a data source, exactly once (the padded final batch is masked out)."""
  out: dict[str, list] = {k: [] for k in ("prob", "label", "grade", "study_id", "patient_id")}
  from lungct.data import pipeline
  for batch in pipeline.eval_batches(source, config.train.batch_size):
    probs = np.asarray(jax.device_get(predict(state, to_global(mesh, host_slice(batch["image"])))))
    valid = np.asarray(batch["valid"], bool)
    out["prob"].append(probs[valid])
    for k in ("label", "grade", "study_id", "patient_id"):
      out[k].append(np.asarray(batch[k])[valid])
  pred = {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in out.items()}
  for k in ("study_id", "patient_id"):
    pred[k] = np.array([_str(s) for s in pred[k]])
  return pred


def _str(s) -> str:
  return s.decode() if isinstance(s, bytes) else str(s)


def evaluate_predictions(pred: dict, config) -> dict[str, float]:
  """Loss and clinical metrics from per-case predictions (host side, numpy)."""
  y = pred["label"] if config.data.label == "binary" else pred["grade"]
  p = pred["prob"]
  eps = 1e-7
  if p.ndim == 1:
    loss = float(-np.mean(y * np.log(p + eps) + (1 - y) * np.log(1 - p + eps))) if len(y) else float("nan")
    out = metrics.binary_metrics(y, p, threshold=0.5)
  else:
    loss = float(-np.mean(np.log(p[np.arange(len(y)), y] + eps))) if len(y) else float("nan")
    out = metrics.multiclass_metrics(y, p)
  out = {k: v for k, v in out.items() if np.isscalar(v)}
  out["loss"] = loss
  out["auc"] = out.get("roc_auc", out.get("macro_roc_auc", float("nan")))
  return {k: float(v) for k, v in out.items()}


# ----------------------------------------------------------------------------- logging

class MetricWriter:
  """JSON lines in ``<workdir>/metrics.jsonl`` plus TensorBoard events in ``<workdir>/tensorboard``."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    if enabled:
      from tensorboardX import SummaryWriter
      self._json = open(os.path.join(workdir, "metrics.jsonl"), "a")
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, values: dict[str, float]) -> None:
    if not self.enabled:
      return
    self._json.write(json.dumps({"step": int(step), **{k: _finite_or_none(v) for k, v in values.items()}}) + "\n")
    self._json.flush()
    for k, v in values.items():
      if isinstance(v, (int, float)) and math.isfinite(v):
        self._tb.add_scalar(k, v, step)
    self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._json.close()
      self._tb.close()


def _finite_or_none(v):
  return v if not isinstance(v, float) or math.isfinite(v) else None


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

  def restore(self):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


# ----------------------------------------------------------------------------- loop

def data_sources(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """{"train", "validation", "test"} random-access sources of the (built on first use) TFDS dataset."""
  from lungct.data import lung_ct
  builder = lung_ct.prepare(config.data)
  return {split: builder.as_data_source(split) for split in ("train", "validation", "test")}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, sources: dict | None = None) -> dict:
  """Trains per ``config``, writing checkpoints, metrics.jsonl, TensorBoard events and metrics.json to ``workdir``.

  ``sources`` (default: the dataset's train/validation/test splits) lets cross-validation pass its folds.
  """
  from lungct.data import pipeline
  config_check.validate(config, num_devices=jax.device_count())
  checkpoint.check_writable(workdir)
  is_main = jax.process_index() == 0
  t_start = time.time()

  sources = sources or data_sources(config)
  train_src, val_src = sources["train"], sources["validation"]
  tc = config.train
  spe = pipeline.steps_per_epoch(len(train_src), tc.batch_size)
  total_steps = tc.num_steps if tc.num_steps > 0 else tc.num_epochs * spe
  eval_every = tc.eval_every_steps or spe
  ckpt_every = tc.checkpoint_every_steps or eval_every

  graphdef, state, tx = create_state(config, total_steps)
  mesh = make_mesh()
  state = jax.device_put(state, NamedSharding(mesh, P()))
  step_fn, predict = compile_steps(graphdef, tx, config, mesh)
  recal = compile_recalibration(graphdef, mesh)

  latest, best = checkpoint.managers(workdir, keep=tc.keep_checkpoints)
  config_json = json.loads(config.to_json_best_effort())
  bookkeeping = {"best_auc": -1.0, "best_step": -1, "evals_without_improvement": 0}
  if config.resume:
    restored = checkpoint.restore(latest, state, check_meta=lambda m: config_check.same_run(
        m.get("config", {}), config_json, workdir))
    if restored is not None:
      state, meta = restored
      bookkeeping.update(meta.get("bookkeeping", {}))
      print(f"Resumed from {workdir}/{checkpoint.LATEST_DIR} at step {int(state['step'])}.")
  elif latest.latest_step() is not None:
    raise checkpoint.CheckpointError(
        f"{workdir} already holds checkpoints and config.resume=False: use a new --workdir.")
  if config.init_from and int(state["step"]) == 0:
    params, stats, report = checkpoint.restore_params(config.init_from, state["params"], state["batch_stats"])
    print(f"init_from {report['checkpoint']}: loaded {len(report['loaded'])} arrays, "
          f"kept fresh {len(report['skipped'])}: {sorted(report['skipped'])}")
    state = jax.device_put({**state, "params": params, "batch_stats": stats,
                            "opt_state": tx.init(params)}, NamedSharding(mesh, P()))

  start_step = int(state["step"])
  writer = MetricWriter(workdir, enabled=is_main)
  if is_main and start_step == 0:
    print(f"Data: {len(train_src)} train / {len(val_src)} validation volumes of shape {tuple(config.data.shape)}; "
          f"{total_steps} steps of global batch {tc.batch_size} on {jax.device_count()} device(s).")
  ds = pipeline.make_dataset(train_src, global_batch_size=tc.batch_size, seed=config.seed, shuffle=True,
                             num_epochs=None, drop_remainder=True,
                             process_index=jax.process_index(), process_count=jax.process_count())
  batches: Iterator = pipeline.iterate(ds, start_step=start_step, num_threads=config.data.num_threads,
                                       prefetch=config.data.prefetch)
  key = jax.random.PRNGKey(config.seed)
  lkey = label_key(config)
  preempted = _Preempted()
  progress = _progress(total_steps, start_step, enabled=is_main and tc.progress_bar)
  last_good_step = latest.latest_step()
  window: list[dict] = []
  stop_reason = "finished"

  def save(step, val=None):  # only reached after the loop's _check_finite for this step
    meta = {"config": config_json, "bookkeeping": bookkeeping}
    checkpoint.save(latest, step, state, meta)
    if val is not None and math.isfinite(val.get("auc", float("nan"))):
      checkpoint.save(best, step, state, meta, metrics={checkpoint.BEST_METRIC: val["auc"]})

  step = start_step
  t_log = time.time()
  try:
    while step < total_steps:
      batch = next(batches)
      state, m = step_fn(state, to_global(mesh, batch["image"]), to_global(mesh, batch[lkey]), key)
      step += 1
      window.append(m)
      progress.update(1)
      will_save = step % ckpt_every == 0 or step == total_steps or step % eval_every == 0 or preempted.flag
      if will_save or step % tc.log_every_steps == 0:  # never save (or log past) a non-finite step unnoticed
        _check_finite(window, step, tc.get("on_nan", "stop"), workdir, last_good_step)
      if step % tc.log_every_steps == 0 or step == total_steps:
        logged = _window_metrics(window)
        dt = time.time() - t_log
        logged["train/volumes_per_s"] = len(window) * tc.batch_size / max(dt, 1e-9)
        logged["train/learning_rate"] = float(learning_rate_schedule(tc, total_steps)(step))
        writer.write(step, logged)
        progress.set_postfix(loss=f"{logged['train/loss']:.3f}")
        window, t_log = [], time.time()
      val = None
      if step % eval_every == 0 or step == total_steps:
        if tc.get("precise_bn_batches", 0):
          state = recalibrate_bn(recal, state, mesh, train_src, config)
        val = evaluate_predictions(predict_source(predict, state, mesh, val_src, config), config)
        writer.write(step, {f"val/{k}": v for k, v in val.items()})
        improved = val["auc"] > bookkeeping["best_auc"]
        if improved:
          bookkeeping.update(best_auc=val["auc"], best_step=step, evals_without_improvement=0)
        else:
          bookkeeping["evals_without_improvement"] += 1
        progress.write(f"step {step}: val loss {val['loss']:.4f} auc {val['auc']:.4f} acc {val['accuracy']:.3f}"
                       f"{' *' if improved else ''}")
      if step % ckpt_every == 0 or step == total_steps or val is not None or preempted.flag:
        save(step, val)
        last_good_step = step
      if preempted.flag:
        stop_reason = "preempted (SIGTERM)"
        break
      if tc.early_stopping_patience and bookkeeping["evals_without_improvement"] >= tc.early_stopping_patience:
        stop_reason = f"early stopping: no val AUC improvement in {tc.early_stopping_patience} evaluations"
        break
  finally:
    progress.close()
    latest.wait_until_finished()
    best.wait_until_finished()
    preempted.restore()
    writer.close()

  summary = {"stop_reason": stop_reason, "steps": step, "wall_time_s": time.time() - t_start,
             "best_step": bookkeeping["best_step"]}
  if stop_reason.startswith("preempted"):
    print(f"Stopped at step {step}: {stop_reason}; checkpoint saved, rerun the same command to resume.")
    return summary
  # Final evaluation with the best checkpoint (by validation AUC) on validation and test.
  if best.latest_step() is not None:
    state, _ = checkpoint.restore(best, state, best.best_step())
  for split in ("validation", "test"):
    summary[split] = evaluate_predictions(
        predict_source(predict, state, mesh, sources[split], config), config)
  if is_main:
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
      json.dump(summary, f, indent=2, default=float)
    print(f"Done in {summary['wall_time_s']:.0f} s ({stop_reason}). Best step {summary['best_step']}: "
          f"val AUC {summary['validation']['auc']:.3f}, test AUC {summary['test']['auc']:.3f}. "
          f"Wrote {workdir}/metrics.json")
  return summary


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


def _progress(total: int, initial: int, enabled: bool):
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)
