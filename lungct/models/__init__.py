"""Model registry: name -> Flax NNX module; the constructor's keyword defaults are the only defaults.

    config.model = model_config("cnn3d", features=(16, 16, 32, 64))   # name + every constructor option
    model = create_model(config.model, num_outputs=1, dtype=jnp.bfloat16, rngs=nnx.Rngs(config.seed))
    logits = model(x, train=True, dropout_key=key)  # float32 (B, num_outputs)

`model_config` reads the options and their defaults from the constructor's signature, so every option can be
overridden with `--config.model.<option>=...` and no default is written twice. `create_model` passes them as
keyword arguments; a key the chosen model does not take (e.g. after `--config.model.name=resnet3d` on a cnn3d
config) is an error naming the key.
"""
import inspect
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lungct.models.cnn3d import CNN3D
from lungct.models.resnet3d import ResNet3D
from lungct.models.unet3d import UNet3D

MODELS = {"cnn3d": CNN3D, "resnet3d": ResNet3D, "unet3d": UNet3D}
_NOT_OPTIONS = ("self", "num_outputs", "dtype", "rngs")


class ModelConfigError(ValueError):
  """A config.model key or name the registry cannot use (message names the key)."""


def _model_class(name: str):
  if name not in MODELS:
    raise ModelConfigError(f"config.model.name={name!r} is not a model; known: {sorted(MODELS)}")
  return MODELS[name]


def options(name: str) -> dict[str, Any]:
  """{option: default} of model `name`: the constructor's keyword arguments except num_outputs/dtype/rngs."""
  params = inspect.signature(_model_class(name).__init__).parameters
  return {k: p.default for k, p in params.items()
          if k not in _NOT_OPTIONS and p.default is not inspect.Parameter.empty}


def model_config(name: str, **overrides: Any) -> ml_collections.ConfigDict:
  """ConfigDict(name=name, **every option of the model with its default, **overrides)."""
  opts = options(name)
  unknown = sorted(set(overrides) - set(opts))
  if unknown:
    raise ModelConfigError(f"{name} has no option(s) {unknown}; options: {sorted(opts)}")
  opts.update(overrides)
  return ml_collections.ConfigDict({"name": name, **{k: tuple(v) if isinstance(v, list) else v
                                                     for k, v in opts.items()}})


def create_model(model_cfg: Any, *, num_outputs: int, dtype: Any = jnp.float32, rngs: nnx.Rngs) -> nnx.Module:
  """Builds `MODELS[model_cfg.name]` with float32 params computing in `dtype`."""
  cfg = dict(model_cfg.items()) if hasattr(model_cfg, "items") else dict(model_cfg)
  name = cfg.pop("name")
  opts = options(name)
  unknown = sorted(set(cfg) - set(opts))
  if unknown:
    raise ModelConfigError(f"config.model.{unknown[0]} is not an option of {name} (options: {sorted(opts)})")
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
  return MODELS[name](**kwargs, num_outputs=num_outputs, dtype=jnp.dtype(dtype), rngs=rngs)


def count_params(model: nnx.Module, *, include_batch_stats: bool = False) -> int:
  """Number of trainable parameters (plus BatchNorm running stats if asked).

  Keras' "Total params" counts the BatchNorm moving mean/variance too:
  that is `include_batch_stats=True`.
  """
  filt = nnx.Any(nnx.Param, nnx.BatchStat) if include_batch_stats else nnx.Param
  return sum(int(leaf.size) for leaf in jax.tree.leaves(nnx.state(model, filt)))


__all__ = ["MODELS", "CNN3D", "ResNet3D", "UNet3D", "ModelConfigError", "create_model", "model_config",
           "options", "count_params"]


def numpy_variables(build, rng: np.random.Generator) -> tuple[nnx.GraphDef, Any, Any]:
  """(graphdef, params, batch_stats) of the model `build()` makes, without running its initialisers.

  Shapes come from `nnx.eval_shape`; values from `rng`: He-normal kernels, BatchNorm scale and variance 1, every
  other leaf 0. For benchmarks and equivalence tests, where compiling the models' random initialisers costs tens of
  seconds of CPU per model and nothing depends on them.
  """
  graphdef, params, stats = nnx.split(nnx.eval_shape(build), nnx.Param, nnx.BatchStat)

  def init(path, leaf):
    key = str(path[-1])
    if "kernel" in key:
      return (rng.standard_normal(leaf.shape) * np.sqrt(2.0 / np.prod(leaf.shape[:-1]))).astype(np.float32)
    return np.full(leaf.shape, 1.0 if ("scale" in key or "var" in key) else 0.0, np.float32)
  params, stats = (jax.tree_util.tree_map_with_path(init, nnx.to_pure_dict(v)) for v in (params, stats))
  return graphdef, params, stats
