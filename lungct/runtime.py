"""The runtime layer: devices, meshes and shardings, global arrays, model variables, inference restore.

Nothing here knows about a task (classification, segmentation) or an optimizer. The train loop, the tasks and
the inference modes (eval, predict, report) build on it.

* One `Mesh` with axes ("data", "space"): the batch is split over "data", the depth of every volume over
  "space" (`config.mesh.space`, 1 = no spatial split). Model variables are replicated.
* Each host holds its share of a global batch; `to_global` turns it into one sharded `jax.Array`.
* The dataset: built once (by process 0, the others wait) and opened on every host (`data_sources`).
* `Variables` = (graphdef, params, batch_stats): a model split into its static graph and plain pytrees.
* `restore_for_inference` reads params and BatchNorm statistics from a checkpoint (no optimizer state, so a
  changed optimizer, schedule or freeze setting cannot break eval/predict/report), with the model, data and
  task settings the checkpoint was trained with.
"""
from __future__ import annotations

import functools
import json
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lungct import checkpoint, config_check, models

AXES = ("data", "space")


# ----------------------------------------------------------------------------- devices and meshes

def is_main_process() -> bool:
  """True on the process that writes files (logs, metrics, reports); every process takes part in compute."""
  return jax.process_index() == 0


def make_mesh(config: ml_collections.ConfigDict | None = None, devices: Sequence[Any] | None = None) -> Mesh:
  """A (data, space) mesh over ``devices`` (default: every device of every host).

  ``config.mesh.space`` devices split each volume's depth; the rest split the batch.
  """
  devices = list(jax.devices() if devices is None else devices)
  space = int(config.mesh.get("space", 1)) if config is not None and "mesh" in config else 1
  if space < 1 or len(devices) % space:
    raise config_check.ConfigError(
        f"config.mesh.space={space}: must divide the device count ({len(devices)})")
  return Mesh(np.asarray(devices).reshape(len(devices) // space, space), AXES)


def jit(fn: Callable[..., Any], mesh: Mesh, **jit_kwargs) -> Callable[..., Any]:
  """``jax.jit(fn, **jit_kwargs)`` whose calls (so its tracing too) run under ``jax.set_mesh(mesh)``.

  The models read the current mesh while tracing (`lungct.sharding.constrain_spatial`) to keep activations
  split over "space" at block boundaries; without it XLA propagates the input's depth split on its own and
  can partition a strided convolution into a wrong gradient (see lungct/sharding.py). A no-op for space = 1.
  """
  jitted = jax.jit(fn, **jit_kwargs)

  @functools.wraps(fn)
  def call(*args, **kwargs):
    with jax.set_mesh(mesh):
      return jitted(*args, **kwargs)

  def lower(*args, **kwargs):  # AOT use (benchmarks: .lower(...).compile()), also under the mesh
    with jax.set_mesh(mesh):
      return jitted.lower(*args, **kwargs)
  call.lower = lower
  return call


def data_size(mesh: Mesh) -> int:
  """How many ways the batch is split."""
  return mesh.shape["data"]


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Arrays of rank ``ndim`` with a leading batch axis: volumes (B, D, H, W, C) split over (data, space),
  anything else (labels) over data."""
  return NamedSharding(mesh, P("data", "space") if ndim == 5 else P("data"))


def to_global(mesh: Mesh, local: np.ndarray) -> jax.Array:
  """This host's share of a global batch -> one array sharded over the mesh (volumes also over space)."""
  local = np.asarray(local)
  return jax.make_array_from_process_local_data(batch_sharding(mesh, local.ndim), local)


def host_slice(global_batch: np.ndarray) -> np.ndarray:
  """This host's contiguous share of a global batch (every host reads the same evaluation batch)."""
  n = global_batch.shape[0] // jax.process_count()
  return global_batch[jax.process_index() * n:(jax.process_index() + 1) * n]


def fetch(x: jax.Array) -> np.ndarray:
  """A (replicated or fully addressable) device array as numpy on this host."""
  return np.asarray(jax.device_get(x))


# ----------------------------------------------------------------------------- the dataset, on every host

def data_sources(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """{"train", "validation", "test"} random-access sources of the (built on first use) TFDS dataset; for a
  classifier, `lung_ct.check_classes` first (DataError: a grade outside [0, num_classes), a split without a
  label)."""
  builder = prepare_dataset(config.data)
  if config.get("task", "classify") == "classify":  # the classes it learns: checked before any step
    from lungct.data import lung_ct
    for line in lung_ct.check_classes(builder, config.data.label, config.data.num_classes):
      if is_main_process():
        print(line)
  return {split: builder.as_data_source(split) for split in ("train", "validation", "test")}


def dataset_summary(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What the dataset build read, kept and skipped (and why), from its build report; {} if there is none."""
  from lungct.data import lung_ct
  try:
    report = lung_ct.read_build_report(lung_ct.builder_for(config.data))
  except (OSError, ValueError):
    return {}
  return {k: report[k] for k in ("config", "totals", "skip_reasons", "splits") if k in report}


def dataset_identity(config: ml_collections.ConfigDict) -> str:
  """The identity of the dataset ``config.data`` names (settings + the files' content; no volume read): what a
  run's checkpoints record, and what resuming compares (`config_check.same_dataset`)."""
  from lungct.data import lung_ct
  return lung_ct.builder_for(config.data).builder_config.name


def prepare_dataset(data_cfg: ml_collections.ConfigDict):
  """`lung_ct.prepare` on process 0 only, a barrier, then every process opens the built dataset.

  Several processes building one data_dir at once race on TFDS's final rename (FileExistsError on one, the
  others then hang in the next collective). A build error on process 0 is raised on every process.
  """
  from lungct.data import lung_ct
  if jax.process_count() == 1:
    return lung_ct.prepare(data_cfg)
  from jax.experimental import multihost_utils
  error = None
  if jax.process_index() == 0:
    try:
      lung_ct.prepare(data_cfg)
    except Exception as e:  # noqa: BLE001  (raised below, after the others have heard of it)
      error = e
  if int(multihost_utils.broadcast_one_to_all(np.int32(error is not None))):  # also the barrier
    if error is not None:
      raise error
    raise RuntimeError("building the dataset on process 0 failed (see its output)")
  return lung_ct.prepare(data_cfg)


# ----------------------------------------------------------------------------- model variables

class Variables(NamedTuple):
  """A model as its static graph plus plain pytrees: what inference needs and nothing more."""
  graphdef: nnx.GraphDef
  params: Any
  batch_stats: Any


def init_variables(config: ml_collections.ConfigDict, num_outputs: int) -> Variables:
  """A freshly initialised model (seed ``config.seed``), split into (graphdef, params, batch_stats).

  The initialisation is one jitted computation: built eagerly, every layer's initialiser would be a dispatch
  and a compile of its own (a ResNet-10's 36 convolutions: ~20 s of a 2-core CPU before the first step).
  """
  make = lambda: models.create_model(config.model, num_outputs=num_outputs, dtype=jnp.dtype(config.dtype),
                                     rngs=nnx.Rngs(params=config.seed))
  try:
    graphdef = nnx.graphdef(nnx.eval_shape(make))
  except models.ModelConfigError as e:
    raise config_check.ConfigError(str(e)) from None

  def init():
    _, params, batch_stats = nnx.split(make(), nnx.Param, nnx.BatchStat)
    return nnx.to_pure_dict(params), nnx.to_pure_dict(batch_stats)

  params, batch_stats = jax.jit(init, compiler_options=INIT_COMPILER_OPTIONS.get(jax.default_backend()))()
  return Variables(graphdef, params, batch_stats)


# XLA:CPU compiles the initialisation (random bits and inverse-erf polynomials of every kernel) 1.6x faster at
# LLVM -O1 than at its default -O2 (configs/nodule.py 1.8 -> 1.1 s), and it runs once: the same values, bit for
# bit (tests/test_models.py; -O0 would change some by an ulp).
INIT_COMPILER_OPTIONS = {"cpu": {"xla_backend_optimization_level": 1}}


def merge(graphdef: nnx.GraphDef, params: Any, batch_stats: Any) -> nnx.Module:
  return nnx.merge(graphdef, params, batch_stats)


def pure_batch_stats(model: nnx.Module) -> Any:
  """The BatchNorm running statistics of ``model`` as a plain pytree."""
  return nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))


def compile_apply(graphdef: nnx.GraphDef, mesh: Mesh, fn: Callable[[nnx.Module, jax.Array], jax.Array],
                  *, split_batch: bool = True) -> Callable[[Any, Any, jax.Array], jax.Array]:
  """jit of ``(params, batch_stats, images) -> fn(eval-mode model, images)``, output replicated.

  ``split_batch``: images sharded over the mesh (their batch must divide ``data_size(mesh)``); else replicated.
  """
  repl = replicated(mesh)
  images = batch_sharding(mesh, 5) if split_batch else repl
  return jit(lambda p, s, x: fn(merge(graphdef, p, s), x), mesh, in_shardings=(repl, repl, images),
                 out_shardings=repl)


class Predictor(NamedTuple):
  """A restored model ready to run: ``apply(params, batch_stats, images)`` jitted over ``mesh``."""
  variables: Variables
  mesh: Mesh
  config: ml_collections.ConfigDict   # the config the checkpoint was trained with (execution keys current)
  step: int
  checkpoint: str


def fingerprint(predictor: Predictor) -> str:
  """`checkpoint.fingerprint` of the predictor's arrays: which weights an evaluation was computed with."""
  return checkpoint.fingerprint(predictor.variables.params, predictor.variables.batch_stats)


def load_evaluation(workdir: str, split: str, predictor: Predictor) -> tuple[dict | None, str]:
  """(eval_<split>.json, "") when --mode=eval wrote it for ``predictor``'s checkpoint (the same fingerprint of
  the arrays, whatever folder they were read from); else (None, why it cannot be used)."""
  import os
  path = os.path.join(workdir, f"eval_{split}.json")
  if not os.path.exists(path):
    return None, f"no {path}"
  with open(path) as f:
    ev = json.load(f)
  mine = fingerprint(predictor)
  if ev.get("checkpoint_fingerprint") != mine:
    return None, (f"{path} was written for checkpoint {ev.get('checkpoint')} (step {ev.get('checkpoint_step')}, "
                  f"fingerprint {ev.get('checkpoint_fingerprint')}), not for {predictor.checkpoint} "
                  f"(step {predictor.step}, fingerprint {mine})")
  return ev, ""


def current_evaluation(predictor: Predictor, sources: dict, workdir: str, split: str, run_eval: Callable,
                       load: Callable = load_evaluation) -> dict:
  """eval_<split>.json of ``predictor``'s checkpoint (for the report): read when ``load`` accepts it, else the
  task's ``run_eval(predictor, sources, workdir, split)`` writes it afresh (said in one line)."""
  ev, why = load(workdir, split, predictor)
  if ev is None:  # missing, or written for other weights (or settings ``load`` checks): evaluate these
    print(f"report: {why}; running --mode=eval on the {split} split for {predictor.checkpoint}.")
    run_eval(predictor, sources, workdir, split)
    ev, why = load(workdir, split, predictor)
    if ev is None:
      raise RuntimeError(f"report: {why}")
  return ev


# ----------------------------------------------------------------------------- restore for inference

def inference_config(current: ml_collections.ConfigDict, saved: dict, explicit: Sequence[str] = (), *,
                     group: str = "", execution_keys: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """``current`` with every experiment-defining key (task, model, data, dtype, and the task's config ``group``)
  taken from the checkpoint's ``saved`` config; execution keys (paths, loader, eval, predict, mesh..., and the
  task's ``execution_keys``) stay current. Where the data live (``data.manual_dir``, ``data.labels_csv``) stays
  current when given, else comes from the checkpoint: ``--mode=eval`` needs no ``--config.data.manual_dir``.

  A key given explicitly on the command line (``explicit``, dotted, without "config.") that conflicts with
  the checkpoint is a ConfigError: the model cannot see data prepared differently from what it learned on.
  """
  out = ml_collections.ConfigDict(current.to_dict())
  flat_saved = config_check.flat(saved)
  flat_now = config_check.flat(current.to_dict())
  prefixes = config_check.INFERENCE_FROM_CHECKPOINT + ((group + ".",) if group else ())
  for key, value in flat_saved.items():
    if not key.startswith(prefixes) or config_check.is_execution_key(key, execution_keys):
      continue
    if config_check.is_data_location_key(key) and (key in explicit or flat_now.get(key)):
      continue  # the files named now (the dataset's identity says whether they are the checkpoint's data)
    if key in explicit and config_check.norm(flat_now.get(key)) != config_check.norm(value):
      raise config_check.ConfigError(
          f"--config.{key}={flat_now.get(key)!r} conflicts with the checkpoint, trained with {key}={value!r}; "
          f"drop the override (inference uses the checkpoint's settings)")
    _set(out, key, value, flat_now.get(key))
  return out


def _set(config: ml_collections.ConfigDict, dotted: str, value: Any, like: Any) -> None:
  *parents, leaf = dotted.split(".")
  node = config
  for p in parents:
    if p not in node:
      node[p] = ml_collections.ConfigDict()
    node = node[p]
  if isinstance(like, tuple) or (isinstance(value, list) and not isinstance(like, list)):
    value = tuple(value)
  if leaf in node and type(node[leaf]) is not type(value):
    del node[leaf]  # a ConfigDict field keeps its type; the checkpoint's value may have another (e.g. None)
  node[leaf] = value


def restore_for_inference(config: ml_collections.ConfigDict, workdir: str, checkpoint_path: str = "",
                          explicit: Sequence[str] = (), *, task_of: Callable[[Any], Any],
                          check: Callable[[ml_collections.ConfigDict], None] | None = None) -> Predictor:
  """The best (or ``checkpoint_path``) checkpoint's params and BatchNorm statistics, replicated on the mesh.

  No optimizer is built or restored. Model, data and task settings come from the checkpoint
  (`inference_config`), so eval/predict/report see data prepared as in training. ``task_of(config)`` (e.g.
  `lungct.tasks.get`) is the task of a config: its CONFIG_GROUP and EXECUTION_KEYS say what else to take from
  the checkpoint, its ``num_outputs(config)`` sizes the model's head. ``check(config)`` sees the resulting
  config before any array is read or the model built (e.g. `lungct.tasks.check_mode`: a mode the checkpoint's
  task does not support fails at once).
  """
  directory, step = checkpoint.find_checkpoint(checkpoint_path or workdir)
  got = {}

  def settings(meta: dict) -> None:  # the checkpoint's task and settings, from its JSON meta alone
    saved = meta.get("config", {})
    got["task"] = task_of(saved if "task" in saved else config)
    got["config"] = inference_config(config, saved, explicit, group=got["task"].CONFIG_GROUP,
                                     execution_keys=got["task"].EXECUTION_KEYS)
    if check is not None:
      check(got["config"])

  saved_params, saved_stats, _ = checkpoint.restore_variables(directory, step, check_meta=settings)
  task, config = got["task"], got["config"]
  fresh = init_variables(config, task.num_outputs(config))
  params = _same_tree(saved_params, fresh.params, f"{directory}/{step}", "params")
  stats = _same_tree(saved_stats, fresh.batch_stats, f"{directory}/{step}", "batch_stats")
  mesh = make_mesh(config)
  params, stats = jax.device_put((params, stats), replicated(mesh))
  return Predictor(Variables(fresh.graphdef, params, stats), mesh, config, int(step), f"{directory}/{step}")


def _same_tree(saved: Any, like: Any, where: str, name: str) -> Any:
  """``saved`` laid out like ``like`` (same paths and shapes), in ``like``'s dtypes; else CheckpointError."""
  flat_saved, flat_like = checkpoint.flatten(saved), checkpoint.flatten(like)
  missing = sorted(set(flat_like) - set(flat_saved))
  extra = sorted(set(flat_saved) - set(flat_like))
  wrong = sorted(k for k in set(flat_like) & set(flat_saved) if np.shape(flat_saved[k]) != np.shape(flat_like[k]))
  if missing or extra or wrong:
    detail = (f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}" if extra else
              f"shape of {wrong[0]}: {np.shape(flat_saved[wrong[0]])} vs {np.shape(flat_like[wrong[0]])}")
    raise checkpoint.CheckpointError(f"{where}: {name} do not fit the configured model ({detail})")
  return checkpoint.unflatten_like({k: jnp.asarray(v, flat_like[k].dtype) for k, v in flat_saved.items()}, like)


def saved_config_json(config: ml_collections.ConfigDict) -> dict:
  """The config as plain JSON, as stored in every checkpoint's meta."""
  return json.loads(config.to_json_best_effort())
