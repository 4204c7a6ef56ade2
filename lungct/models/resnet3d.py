"""3D ResNet (MedicalNet / torchvision-video style) for volume classification.

Stem: Conv 7x7x7 (`stem_kernel`, stride `stem_stride`, no bias) -> BN -> relu ->
MaxPool 3x3x3 stride 2 (optional, `stem_pool`), then four stages of widths width * (1, 2, 4, 8) with strides
1, 2, 2, 2, global average pooling, dropout and a Dense head. Projection
shortcuts (1x1x1 conv + BN, MedicalNet "type B") where the shape changes.
BatchNorm follows PyTorch defaults (momentum 0.1 = Flax 0.9, epsilon 1e-5) and
convs use He-normal (fan_out) initialisation like torchvision.

Small inputs (nodule crops, MedMNIST 28^3 / 64^3): `stem_stride=1, stem_pool=False,
stem_kernel=3` keeps full resolution into the first stage, as MedMNIST's 3D ResNets do.
"""
from collections.abc import Sequence
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from lungct import sharding
from lungct.models import common

_CONV_INIT = common.kernel_init(nnx.initializers.variance_scaling(2.0, "fan_out", "normal"))

# depth -> (block type, blocks per stage)
STAGES = {
    10: ("basic", (1, 1, 1, 1)),
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}


def _conv(in_f: int, out_f: int, k: int, stride: int | Sequence[int], *,
          dtype: Any, rngs: nnx.Rngs) -> nnx.Conv:
  stride = (stride,) * 3 if isinstance(stride, int) else tuple(stride)
  return nnx.Conv(in_f, out_f, (k, k, k), strides=stride,
                  padding=[(k // 2, k // 2)] * 3, use_bias=False,
                  kernel_init=_CONV_INIT, dtype=dtype,
                  param_dtype=common.PARAM_DTYPE, rngs=rngs)


def _bn(features: int, *, dtype: Any, rngs: nnx.Rngs) -> nnx.BatchNorm:
  return common.BatchNorm(features, momentum=0.9, epsilon=1e-5, dtype=dtype,
                          param_dtype=common.PARAM_DTYPE, rngs=rngs)


class Shortcut(nnx.Module):
  """Projection shortcut: 1x1x1 conv (strided) + BN."""

  def __init__(self, in_f: int, out_f: int, stride: int, *, dtype: Any,
               rngs: nnx.Rngs):
    self.conv = _conv(in_f, out_f, 1, stride, dtype=dtype, rngs=rngs)
    self.bn = _bn(out_f, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    return self.bn(self.conv(x), use_running_average=not train)


class BasicBlock(nnx.Module):
  """conv3 -> BN -> relu -> conv3 -> BN, + shortcut, relu."""
  expansion = 1

  def __init__(self, in_f: int, planes: int, stride: int, *, dtype: Any,
               rngs: nnx.Rngs):
    out_f = planes * self.expansion
    self.conv1 = _conv(in_f, planes, 3, stride, dtype=dtype, rngs=rngs)
    self.bn1 = _bn(planes, dtype=dtype, rngs=rngs)
    self.conv2 = _conv(planes, out_f, 3, 1, dtype=dtype, rngs=rngs)
    self.bn2 = _bn(out_f, dtype=dtype, rngs=rngs)
    self.shortcut = (Shortcut(in_f, out_f, stride, dtype=dtype, rngs=rngs)
                     if stride != 1 or in_f != out_f else None)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    ura = not train
    y = nnx.relu(self.bn1(self.conv1(x), use_running_average=ura))
    y = self.bn2(self.conv2(y), use_running_average=ura)
    residual = x if self.shortcut is None else self.shortcut(x, train=train)
    return nnx.relu(y + residual)


class Bottleneck(nnx.Module):
  """conv1 -> conv3 (strided) -> conv1 (x4 channels), BN after each, + shortcut."""
  expansion = 4

  def __init__(self, in_f: int, planes: int, stride: int, *, dtype: Any,
               rngs: nnx.Rngs):
    out_f = planes * self.expansion
    self.conv1 = _conv(in_f, planes, 1, 1, dtype=dtype, rngs=rngs)
    self.bn1 = _bn(planes, dtype=dtype, rngs=rngs)
    self.conv2 = _conv(planes, planes, 3, stride, dtype=dtype, rngs=rngs)
    self.bn2 = _bn(planes, dtype=dtype, rngs=rngs)
    self.conv3 = _conv(planes, out_f, 1, 1, dtype=dtype, rngs=rngs)
    self.bn3 = _bn(out_f, dtype=dtype, rngs=rngs)
    self.shortcut = (Shortcut(in_f, out_f, stride, dtype=dtype, rngs=rngs)
                     if stride != 1 or in_f != out_f else None)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    ura = not train
    y = nnx.relu(self.bn1(self.conv1(x), use_running_average=ura))
    y = nnx.relu(self.bn2(self.conv2(y), use_running_average=ura))
    y = self.bn3(self.conv3(y), use_running_average=ura)
    residual = x if self.shortcut is None else self.shortcut(x, train=train)
    return nnx.relu(y + residual)


class ResNet3D(nnx.Module):
  """3D ResNet-10/18/34 (BasicBlock) or -50/101 (Bottleneck) classifier."""

  def __init__(self, *, num_outputs: int, depth: int = 18, width: int = 64,
               dropout: float = 0.0, in_channels: int = 1,
               stem_stride: int | Sequence[int] = (1, 2, 2), stem_pool: bool = True,
               stem_kernel: int = 7, bn_momentum: float = 0.9, remat: bool = False,
               conv_impl: str = "xla", dtype: Any = jnp.float32, rngs: nnx.Rngs):
    if depth not in STAGES:
      raise ValueError(f"ResNet3D depth must be one of {sorted(STAGES)}, got {depth}")
    dtype = common.as_dtype(dtype)
    kind, counts = STAGES[depth]
    block_cls = BasicBlock if kind == "basic" else Bottleneck
    self.remat = remat
    self.stem_pool = stem_pool
    self.stem_conv = _conv(in_channels, width, stem_kernel, stem_stride, dtype=dtype, rngs=rngs)
    self.stem_bn = _bn(width, dtype=dtype, rngs=rngs)
    blocks = []
    in_f = width
    for stage, count in enumerate(counts):
      planes = width * 2 ** stage
      for i in range(count):
        stride = 2 if stage > 0 and i == 0 else 1
        blocks.append(block_cls(in_f, planes, stride, dtype=dtype, rngs=rngs))
        in_f = planes * block_cls.expansion
    self.blocks = nnx.List(blocks)
    self.dropout = nnx.Dropout(dropout)  # the key comes with each call
    self.head = nnx.Linear(in_f, num_outputs, dtype=dtype,
                           param_dtype=common.PARAM_DTYPE, rngs=rngs)
    common.set_conv_impl(self, conv_impl)  # "xla" | "im2col": same parameters and outputs
    common.set_bn_momentum(self, bn_momentum)

  def __call__(self, x: jax.Array, *, train: bool,
               dropout_key: jax.Array | None = None) -> jax.Array:
    """(B, D, H, W, C) -> float32 logits (B, num_outputs).

    Dropout is active only when `train` is True and `dropout_key` is given.
    """
    if x.ndim != 5:
      raise ValueError(f"ResNet3D expects (B, D, H, W, C), got shape {tuple(x.shape)}")
    x = sharding.constrain_spatial(x)  # depth split over the mesh's "space" axis, if it has one
    x = nnx.relu(self.stem_bn(self.stem_conv(x), use_running_average=not train))
    if self.stem_pool:
      # Separable strided-slice maxima, not nnx.max_pool's reduce_window + select_and_scatter (the ResNet-18
      # bfloat16 step 1.25x faster on a shared machine, benchmarks/README.md round 4; not re-measured idle against
      # nnx.max_pool): the same values; after the ReLU above the same gradient (tests/test_conv_impl.py).
      x = common.max_pool(x, (3, 3, 3), strides=(2, 2, 2), padding=[(1, 1)] * 3)
    x = sharding.constrain_spatial(x)
    for block in self.blocks:
      x = sharding.constrain_spatial(common.apply_block(block, x, train=train, remat=self.remat))
    x = jnp.mean(x, axis=(1, 2, 3))  # a reduction: XLA all-reduces a split depth
    x = self.dropout(x, deterministic=not train or dropout_key is None,
                     rngs=dropout_key)
    return self.head(x).astype(jnp.float32)
