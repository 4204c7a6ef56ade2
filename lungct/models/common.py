"""Pieces shared by the 3D classifiers: activation checkpointing and defaults."""
from collections.abc import Callable
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

# Parameters always live in float32; only the compute dtype changes.
PARAM_DTYPE = jnp.float32


def apply_block(block: Callable[..., jax.Array], x: jax.Array, *, train: bool,
                remat: bool) -> jax.Array:
  """Calls `block(x, train=train)`, optionally under `nnx.remat`.

  With `remat=True` the block's activations are not stored for the backward
  pass but recomputed from its input: less memory, one extra forward pass.
  The result (values, gradients and BatchNorm updates) is the same.
  """
  if not remat:
    return block(x, train=train)
  # `train` is a Python bool closed over, so it stays static under checkpoint.
  return nnx.remat(lambda b, y: b(y, train=train))(block, x)


def as_dtype(dtype: Any) -> jnp.dtype:
  """Accepts a dtype or its name ('float32', 'bfloat16')."""
  return jnp.dtype(dtype)
