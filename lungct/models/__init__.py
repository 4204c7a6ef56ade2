"""Model registry: config.model.name -> Flax NNX module.

    model = create_model(config.model, num_outputs=1, dtype=jnp.bfloat16,
                         rngs=nnx.Rngs(config.seed))
    logits = model(x, train=True, dropout_key=key)  # float32 (B, num_outputs)
"""
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections

from lungct.models.cnn3d import CNN3D
from lungct.models.resnet3d import ResNet3D
from lungct.models.unet3d import UNet3D

MODELS = {"cnn3d": CNN3D, "resnet3d": ResNet3D, "unet3d": UNet3D}


def create_model(model_cfg: ml_collections.ConfigDict, *, num_outputs: int,
                 dtype: Any = jnp.float32, rngs: nnx.Rngs) -> nnx.Module:
  """Builds `MODELS[model_cfg.name]` with float32 params computing in `dtype`."""
  name = model_cfg.name
  if name not in MODELS:
    raise ValueError(f"unknown config.model.name {name!r}; known: {sorted(MODELS)}")
  return MODELS[name].from_config(model_cfg, num_outputs=num_outputs,
                                  dtype=jnp.dtype(dtype), rngs=rngs)


def count_params(model: nnx.Module, *, include_batch_stats: bool = False) -> int:
  """Number of trainable parameters (plus BatchNorm running stats if asked).

  Keras' "Total params" counts the BatchNorm moving mean/variance too:
  that is `include_batch_stats=True`.
  """
  filt = nnx.Any(nnx.Param, nnx.BatchStat) if include_batch_stats else nnx.Param
  return sum(int(leaf.size) for leaf in jax.tree.leaves(nnx.state(model, filt)))


__all__ = ["MODELS", "CNN3D", "ResNet3D", "UNet3D", "create_model", "count_params"]
