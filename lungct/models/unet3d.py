"""3D U-Net (Çiçek et al., 2016) for voxel-wise segmentation, in Flax NNX.

Encoder: per level two Conv3D(3x3x3, SAME) -> BatchNorm -> relu, then MaxPool3D(2) down.
Decoder: ConvTranspose3D(2, stride 2) up, concatenation with the encoder's skip at that
level, two conv-BN-relu. A final 1x1x1 convolution gives `num_outputs` logit channels.
Inputs whose D, H, W are not multiples of 2^(levels - 1) are zero-padded at the end and the
output is cropped back, so the output's spatial shape always equals the input's.
"""
from collections.abc import Sequence
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from lungct import sharding
from lungct.models import common

# nnx.Conv's own default (LeCun normal), drawn on the kernel's 3-D view: common.kernel_init
_KERNEL_INIT = common.kernel_init(nnx.initializers.lecun_normal())


class DoubleConv(nnx.Module):
  """(Conv3D 3x3x3 SAME -> BatchNorm -> relu) x 2."""

  def __init__(self, in_features: int, out_features: int, *, dtype: Any, rngs: nnx.Rngs,
               bn_momentum: float = 0.9):
    kw = dict(dtype=dtype, param_dtype=common.PARAM_DTYPE, rngs=rngs)
    self.conv1 = nnx.Conv(in_features, out_features, (3, 3, 3), padding="SAME", use_bias=False,
                          kernel_init=_KERNEL_INIT, **kw)
    self.bn1 = nnx.BatchNorm(out_features, momentum=bn_momentum, **kw)
    self.conv2 = nnx.Conv(out_features, out_features, (3, 3, 3), padding="SAME", use_bias=False,
                          kernel_init=_KERNEL_INIT, **kw)
    self.bn2 = nnx.BatchNorm(out_features, momentum=bn_momentum, **kw)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = nnx.relu(self.bn1(self.conv1(x), use_running_average=not train))
    return nnx.relu(self.bn2(self.conv2(x), use_running_average=not train))


class UNet3D(nnx.Module):
  """3D U-Net with `len(features)` levels (features[i] channels at level i)."""

  def __init__(self, *, num_outputs: int, features: Sequence[int] = (8, 16, 32, 64),
               dropout: float = 0.0, in_channels: int = 1, bn_momentum: float = 0.9,
               remat: bool = False, conv_impl: str = "xla", dtype: Any = jnp.float32,
               rngs: nnx.Rngs):
    features = tuple(int(f) for f in features)
    if len(features) < 2:
      raise ValueError(f"UNet3D needs at least 2 levels in model.features, got {features}")
    dtype = common.as_dtype(dtype)
    self.remat = remat
    self.factor = 2 ** (len(features) - 1)
    kw = dict(dtype=dtype, rngs=rngs, bn_momentum=bn_momentum)
    widths = (in_channels, *features)
    self.down = nnx.List([DoubleConv(widths[i], widths[i + 1], **kw) for i in range(len(features))])
    self.up = nnx.List([
        common.ConvTranspose(features[i + 1], features[i], (2, 2, 2), (2, 2, 2), padding="SAME",
                             kernel_init=_KERNEL_INIT, dtype=dtype, param_dtype=common.PARAM_DTYPE, rngs=rngs)
        for i in reversed(range(len(features) - 1))])
    self.merge = nnx.List([DoubleConv(2 * features[i], features[i], **kw)
                           for i in reversed(range(len(features) - 1))])
    self.dropout = nnx.Dropout(dropout)  # at the bottleneck; the key comes with each call
    self.head = nnx.Conv(features[0], num_outputs, (1, 1, 1), kernel_init=_KERNEL_INIT, dtype=dtype,
                         param_dtype=common.PARAM_DTYPE, rngs=rngs)
    common.set_conv_impl(self, conv_impl)  # "xla" | "im2col" | "onednn": same parameters and outputs

  def __call__(self, x: jax.Array, *, train: bool,
               dropout_key: jax.Array | None = None) -> jax.Array:
    """(B, D, H, W, C) -> float32 logits (B, D, H, W, num_outputs)."""
    if x.ndim != 5:
      raise ValueError(f"UNet3D expects (B, D, H, W, C), got shape {tuple(x.shape)}")
    spatial = x.shape[1:4]
    pad = [(0, -s % self.factor) for s in spatial]
    if any(p for _, p in pad):
      x = jnp.pad(x, [(0, 0), *pad, (0, 0)])
    x = sharding.constrain_spatial(x)  # depth split over the mesh's "space" axis, if it has one
    skips = []
    for i, block in enumerate(self.down):
      if i:
        x = common.max_pool(x, (2, 2, 2), strides=(2, 2, 2), padding="VALID")
      x = sharding.constrain_spatial(common.apply_block(block, x, train=train, remat=self.remat))
      skips.append(x)
    x = self.dropout(x, deterministic=not train or dropout_key is None, rngs=dropout_key)
    for up, block, skip in zip(self.up, self.merge, reversed(skips[:-1])):
      x = jnp.concatenate([sharding.constrain_spatial(up(x)), skip], axis=-1)
      x = sharding.constrain_spatial(common.apply_block(block, x, train=train, remat=self.remat))
    x = sharding.constrain_spatial(self.head(x))[:, :spatial[0], :spatial[1], :spatial[2]]
    return x.astype(jnp.float32)
