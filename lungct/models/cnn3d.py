"""The 3D CNN of the Keras tutorial "3D image classification from CT scans".

Four blocks of Conv3D(3, relu, VALID) -> MaxPool3D(2) -> BatchNorm, global
average pooling, Dense(relu), Dropout, Dense(logits). Keras defaults are kept:
glorot-uniform kernels, zero biases, BatchNorm momentum 0.99 and epsilon 1e-3.
Input is channels-last (B, D, H, W, C).
"""
from collections.abc import Sequence
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from lungct import sharding
from lungct.models import common

_KERNEL_INIT = common.kernel_init(nnx.initializers.glorot_uniform())  # Keras default


def min_input_size(num_blocks: int, padding: str) -> int:
  """Smallest spatial size that survives `num_blocks` conv+pool blocks."""
  if padding == "SAME":
    return 2 ** num_blocks
  size = 1  # at least one voxel after the last pool
  for _ in range(num_blocks):
    size = 2 * size + 2  # undo the pool (floor), then the VALID 3x3x3 conv
  return size


class ConvBlock(nnx.Module):
  """Conv3D(3x3x3) + relu -> MaxPool3D(2) -> BatchNorm: the tutorial's block (computed as conv, pool, bias,
  relu: the same values)."""

  def __init__(self, in_features: int, out_features: int, *, padding: str,
               dtype: Any, rngs: nnx.Rngs, bn_momentum: float = 0.99):
    self.conv = nnx.Conv(in_features, out_features, (3, 3, 3), padding=padding,
                         kernel_init=_KERNEL_INIT, dtype=dtype,
                         param_dtype=common.PARAM_DTYPE, rngs=rngs)
    self.bn = nnx.BatchNorm(out_features, momentum=bn_momentum, epsilon=1e-3,
                            dtype=dtype, param_dtype=common.PARAM_DTYPE,
                            rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    # relu(max_pool(.)) == max_pool(relu(.)) exactly (relu is monotonic), and so are the gradients (both reach
    # the window's first maximum where it is > 0, nothing otherwise); pooling first applies the relu to 1/8 of the
    # voxels and keeps no relu output of the full-size convolution for the backward pass (the pool keeps only an
    # int8 index per output): with it, the step's temporary memory at batch 2 of 64x128x128 went from 1292 to
    # 1141 MiB (benchmarks/README.md, round 4).
    # The bias is added after the pool, too: max(a + b) == max(a) + b exactly (rounding is monotonic), and its
    # gradient is then a sum over 1/8 of the voxels. Added before, XLA:CPU kept the pool's full-size input gradient
    # twice (once for the bias gradient) and, in bfloat16, reduced it by a slow reduce-window tree (545 + 143 ms
    # of a 1.61 s step at batch 2 of 64x128x128; benchmarks/README.md, round 7).
    conv = self.conv
    x, kernel, bias = conv.promote_dtype((x, conv.kernel[...], conv.bias[...]), dtype=conv.dtype)
    x = conv.conv_general_dilated(x, kernel, (1, 1, 1), conv.padding, lhs_dilation=(1, 1, 1),
                                  rhs_dilation=(1, 1, 1), dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    x = common.max_pool(x, (2, 2, 2), strides=(2, 2, 2), padding="VALID") + bias
    return self.bn(nnx.relu(x), use_running_average=not train)


class CNN3D(nnx.Module):
  """The Keras tutorial 3D CNN (features 64, 64, 128, 256; dense 512; dropout 0.3)."""

  def __init__(self, *, num_outputs: int, features: Sequence[int] = (64, 64, 128, 256),
               dense: int = 512, dropout: float = 0.3, in_channels: int = 1,
               padding: str = "VALID", remat: bool = False, bn_momentum: float = 0.99,
               conv_impl: str = "xla",
               dtype: Any = jnp.float32, rngs: nnx.Rngs):
    if padding not in ("VALID", "SAME"):
      raise ValueError(f"CNN3D padding must be 'VALID' or 'SAME', got {padding!r}")
    dtype = common.as_dtype(dtype)
    self.padding = padding
    self.remat = remat
    self.min_size = min_input_size(len(features), padding)
    widths = (in_channels, *features)
    self.blocks = nnx.List([
        ConvBlock(widths[i], widths[i + 1], padding=padding, dtype=dtype, rngs=rngs,
                  bn_momentum=bn_momentum)
        for i in range(len(features))
    ])
    self.dense = nnx.Linear(features[-1], dense, kernel_init=_KERNEL_INIT,
                            dtype=dtype, param_dtype=common.PARAM_DTYPE, rngs=rngs)
    self.dropout = nnx.Dropout(dropout)  # the key comes with each call
    self.head = nnx.Linear(dense, num_outputs, kernel_init=_KERNEL_INIT,
                           dtype=dtype, param_dtype=common.PARAM_DTYPE, rngs=rngs)
    common.set_conv_impl(self, conv_impl)  # "xla" | "im2col": same parameters and outputs

  def __call__(self, x: jax.Array, *, train: bool,
               dropout_key: jax.Array | None = None) -> jax.Array:
    """(B, D, H, W, C) -> float32 logits (B, num_outputs).

    Dropout is active only when `train` is True and `dropout_key` is given.
    """
    if x.ndim != 5 or min(x.shape[1:4]) < self.min_size:
      raise ValueError(
          f"CNN3D expects (B, D, H, W, C) with D, H, W >= {self.min_size} for "
          f"{len(self.blocks)} blocks with padding={self.padding!r}; got shape "
          f"{tuple(x.shape)}. Use a larger config.data.shape or config.model.padding='SAME'.")
    x = sharding.constrain_spatial(x)  # depth split over the mesh's "space" axis, if it has one
    for block in self.blocks:
      x = sharding.constrain_spatial(common.apply_block(block, x, train=train, remat=self.remat))
    x = jnp.mean(x, axis=(1, 2, 3))  # GlobalAveragePooling3D (a reduction: XLA all-reduces a split depth)
    x = nnx.relu(self.dense(x))
    x = self.dropout(x, deterministic=not train or dropout_key is None,
                     rngs=dropout_key)
    return self.head(x).astype(jnp.float32)
