"""Pieces shared by the 3D classifiers: activation checkpointing, dtypes, the convolution formulation."""
from collections.abc import Callable
import functools
import itertools
import math
from typing import Any

from flax import nnx
import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
import numpy as np

# Parameters always live in float32; only the compute dtype changes.
PARAM_DTYPE = jnp.float32


def kernel_init(init: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
  """``init`` drawn on a convolution kernel's (receptive field, in, out) view, then reshaped.

  The same values (JAX's partitionable threefry numbers elements in row-major order, whatever the shape) and the
  same fans (variance scaling reads in = shape[-2], out = shape[-1], receptive field = the rest); but XLA:CPU
  compiles the random bits of a 5-D shape ~6x slower than of a 3-D one, which made a ResNet-10's initialisation
  take longer than its first epoch.
  """
  def draw(key: jax.Array, shape: tuple[int, ...], dtype: Any = PARAM_DTYPE) -> jax.Array:
    shape = tuple(shape)
    if len(shape) <= 3:
      return init(key, shape, dtype)
    return init(key, (math.prod(shape[:-2]), *shape[-2:]), dtype).reshape(shape)
  return draw


# Named rematerialisation policies for `remat` (True = "full"): what a block keeps for the backward pass.
REMAT_POLICIES = ("full", "conv_outputs", "dots")


def _remat_policy(name: str):
  if name == "full":
    return None  # keep nothing but the block's input: recompute the whole block
  if name == "conv_outputs":
    return jax.checkpoint_policies.save_only_these_names("conv_out")  # see set_conv_impl
  if name == "dots":
    return jax.checkpoint_policies.dots_saveable
  raise ValueError(f"config.model.remat must be a bool or one of {REMAT_POLICIES}, got {name!r}")


def apply_block(block: Callable[..., jax.Array], x: jax.Array, *, train: bool,
                remat: bool | str) -> jax.Array:
  """Calls `block(x, train=train)`, optionally under `nnx.remat`.

  With `remat=True` (or "full") the block's activations are not stored for the backward pass but
  recomputed from its input: less memory, one extra forward pass. "conv_outputs" keeps the convolution
  outputs and recomputes the cheap elementwise/pooling/normalisation work; "dots" keeps what
  `jax.checkpoint_policies.dots_saveable` keeps. The result (values, gradients and BatchNorm updates) is the same.
  """
  if not remat:
    return block(x, train=train)
  policy = _remat_policy("full" if remat is True else remat)
  # `train` is a Python bool closed over, so it stays static under checkpoint.
  return nnx.remat(lambda b, y: b(y, train=train), policy=policy)(block, x)


def max_pool(x: jax.Array, window: tuple[int, ...], strides: tuple[int, ...] | None = None,
             padding: str | Any = "VALID") -> jax.Array:
  """`nnx.max_pool` on channels-last (B, spatial..., C) input, without `reduce_window`/`select_and_scatter`.

  XLA computes a max-pool as `reduce_window` and its gradient as `select_and_scatter`, which is slow on CPU
  (2x2x2 pooling of a (2, 62, 126, 126, 64) activation: 14.5 s forward + backward vs 3.7 s as below, same
  loaded machine). Here a pool whose windows tile the input (window == strides, VALID) is a reshape and a
  max over the window axes, whose gradient (a custom VJP) sends each window's gradient to its first maximum
  exactly like `select_and_scatter`: values and gradients equal `nnx.max_pool`'s. Any other pool (e.g.
  ResNet's 3x3x3 stride 2, padding 1) is separable: per spatial axis, the max of `window` strided slices of the
  (-inf padded) input; values are identical, but where a window holds several equal maxima the gradient is
  split between them instead of going to the first one (after a ReLU such ties are zeros, whose gradient the
  ReLU discards).
  """
  nd = x.ndim - 2
  window = tuple(window)
  strides = window if strides is None else tuple(strides)
  spatial = x.shape[1:-1]
  if isinstance(padding, str):
    pads = jax.lax.padtype_to_pads(spatial, window, strides, padding)
  else:
    pads = [tuple(p) for p in padding]
  if window == strides and all(p == (0, 0) for p in pads):
    x = x[(slice(None), *[slice(0, n // k * k) for n, k in zip(spatial, window)])]
    shape = [x.shape[0]]
    for n, k in zip(spatial, window):
      shape += [n // k, k]
    y = _tiled_max(x.reshape(*shape, x.shape[-1]), window)
    return y
  dtype = x.dtype
  if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32:
    # bfloat16 / float16 pooled in float32: the same values (a max is exact, and so is casting it back), and
    # XLA:CPU fuses the backward pass's compares, tie splits and pads without rounding every intermediate to
    # 16 bits, which made ResNet-18's stem pool backward 3x slower than in float32 (benchmarks/README.md, round 7).
    x = x.astype(jnp.float32)
  if any(p != (0, 0) for p in pads):
    x = jnp.pad(x, [(0, 0), *pads, (0, 0)], constant_values=-jnp.inf)
  for axis in range(nd):
    n, k, s = x.shape[1 + axis], window[axis], strides[axis]
    out = (n - k) // s + 1
    y = None
    for offset in range(k):
      part = jax.lax.slice_in_dim(x, offset, offset + s * (out - 1) + 1, s, axis=1 + axis)
      y = part if y is None else jnp.maximum(y, part)
    x = y
  return x.astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _tiled_max(x: jax.Array, window: tuple[int, ...]) -> jax.Array:
  """Max of (B, n1, k1, n2, k2, ..., C) over the window axes k1, k2, ... (`window` = (k1, k2, ...)); the gradient
  goes to the first maximum of each window in row-major order, as XLA's select_and_scatter (and so
  nnx.max_pool) does."""
  return jnp.max(x, axis=tuple(2 + 2 * i for i in range(len(window))))


def _window_position(window: tuple[int, ...]) -> jax.Array:
  """int32 array broadcastable to (B, n1, k1, n2, k2, ..., C): each voxel's row-major position in its window."""
  rank = 2 * len(window) + 2
  pos = jnp.zeros((1,) * rank, jnp.int32)
  for i, k in enumerate(window):
    axis = 2 + 2 * i
    pos = pos * k + jax.lax.broadcasted_iota(jnp.int32, [k if a == axis else 1 for a in range(rank)], axis)
  return pos


def _max_and_first(a, b):
  """Reducer of (value, position) pairs: the larger value (NaN wins), on a tie the smaller position."""
  (va, ia), (vb, ib) = a, b
  take_a = (va > vb) | ((va == vb) & (ia < ib)) | (va != va)
  return jnp.where(take_a, va, vb), jnp.where(take_a, ia, ib)


def _tiled_max_fwd(x, window):
  # One variadic reduce computes each window's max and the position of its first maximum in a single pass over
  # x; XLA:CPU fuses it with x's producer (a convolution's bias add), where a plain max-reduce (YNNPACK) made it
  # materialise x + bias next to the convolution's output: 0.5 GB more at the tutorial CNN's first block.
  # Saved for the backward pass: that position (one int8 per output; windows here have at most 127 voxels),
  # not x: 1/(4 k^nd) of the input's memory (1/32 for float32 2x2x2 pools).
  axes = tuple(2 + 2 * i for i in range(len(window)))
  size = int(np.prod(window))
  pos = jnp.broadcast_to(_window_position(window), x.shape)
  y, first = jax.lax.reduce((x, pos), (jnp.array(-jnp.inf, x.dtype), jnp.array(size, jnp.int32)),
                            _max_and_first, axes)
  return y, first.astype(jnp.int8 if size <= 127 else jnp.int32)


def _tiled_max_bwd(window, first, g):
  axes = tuple(2 + 2 * i for i in range(len(window)))
  hit = _window_position(window) == jnp.expand_dims(first.astype(jnp.int32), axes)
  return (jnp.where(hit, jnp.expand_dims(g, axes), jnp.zeros((), g.dtype)),)


_tiled_max.defvjp(_tiled_max_fwd, _tiled_max_bwd)


def as_dtype(dtype: Any) -> jnp.dtype:
  """Accepts a dtype or its name ('float32', 'bfloat16')."""
  return jnp.dtype(dtype)


# ----------------------------------------------------------------------------- convolution formulation

CONV_IMPLS = ("xla", "im2col", "onednn")


def _channels_last(dimension_numbers: Any, lhs_shape, rhs_shape) -> bool:
  """True if the convolution is (N, spatial..., C) x (spatial..., I, O) -> (N, spatial..., O)."""
  nd = len(lhs_shape) - 2
  dn = jax.lax.conv_dimension_numbers(lhs_shape, rhs_shape, dimension_numbers)
  last = (0, nd + 1, *range(1, nd + 1))
  return (tuple(dn.lhs_spec) == last and tuple(dn.out_spec) == last
          and tuple(dn.rhs_spec) == (nd + 1, nd, *range(nd)))


def im2col_conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides, padding,
                                lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
                                feature_group_count: int = 1, precision=None,
                                preferred_element_type=None, **unused_kwargs) -> jax.Array:
  """`lax.conv_general_dilated` as shifted slices concatenated on channels, then one matmul.

  The patches matrix (N * out voxels, prod(kernel) * C_in) multiplies the kernel reshaped to
  (prod(kernel) * C_in, C_out). Its gradients are matmuls plus slice/pad adds, which XLA:CPU
  runs much faster than its own backward 3D convolutions (see benchmarks/README.md); it costs
  the memory of the patches matrix. Channels-last, undilated, ungrouped convolutions only;
  anything else falls back to `lax.conv_general_dilated`.
  """
  nd = lhs.ndim - 2
  dilated = any(d != 1 for d in (lhs_dilation or ())) or any(d != 1 for d in (rhs_dilation or ()))
  if dilated or feature_group_count != 1 or not _channels_last(dimension_numbers, lhs.shape, rhs.shape):
    return jax.lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, precision=precision, preferred_element_type=preferred_element_type)
  kernel, strides = rhs.shape[:nd], tuple(window_strides)
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(lhs.shape[1:-1], kernel, strides, padding)
  x = jnp.pad(lhs, [(0, 0), *[tuple(p) for p in padding], (0, 0)])
  out = [(x.shape[1 + i] - kernel[i]) // strides[i] + 1 for i in range(nd)]
  cols = []
  for offset in itertools.product(*(range(k) for k in kernel)):  # same order as rhs.reshape
    start = (0, *offset, 0)
    limit = (x.shape[0], *(o + s * (n - 1) + 1 for o, s, n in zip(offset, strides, out)), x.shape[-1])
    cols.append(jax.lax.slice(x, start, limit, (1, *strides, 1)))
  patches = cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)
  return jax.lax.dot_general(patches, rhs.reshape(-1, rhs.shape[-1]), (((nd + 1,), (0,)), ((), ())),
                             precision=precision, preferred_element_type=preferred_element_type)


def conv_fn(impl: str) -> Callable[..., jax.Array]:
  """The `conv_general_dilated` of a formulation: 'xla' (XLA's convolution), 'im2col', or 'onednn'.

  'onednn' (lungct.ops.onednn_conv) runs 3D channels-last convolutions and both their gradients as oneDNN
  custom calls on the CPU backend; elsewhere (GPU, dilated or grouped convolutions, no compiler to build the
  extension) it is XLA's convolution.
  """
  if impl == "xla":
    return jax.lax.conv_general_dilated
  if impl == "im2col":
    return im2col_conv_general_dilated
  if impl == "onednn":
    from lungct.ops import onednn_conv  # builds the extension lazily, at the first convolution traced
    return onednn_conv.conv_general_dilated
  raise ValueError(f"config.model.conv_impl must be one of {CONV_IMPLS}, got {impl!r}")


def _named(fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
  """`fn` with its output named "conv_out" for the remat policy "conv_outputs" (no effect otherwise)."""
  def conv(*args, **kwargs):
    return checkpoint_name(fn(*args, **kwargs), "conv_out")
  conv.impl = fn
  return conv


_NAMED = {}


def set_conv_impl(model: nnx.Module, impl: str) -> nnx.Module:
  """Makes every `nnx.Conv` inside `model` use the `impl` formulation, and every `ConvTranspose` its matmul form
  unless impl is "xla" (parameters are unchanged)."""
  if impl not in _NAMED:
    _NAMED[impl] = _named(conv_fn(impl))
  fn = _NAMED[impl]
  for _, module in nnx.iter_modules(model):
    if isinstance(module, nnx.Conv):
      module.conv_general_dilated = fn
    if isinstance(module, ConvTranspose):
      module.as_matmul = impl != "xla"
  return model


class ConvTranspose(nnx.ConvTranspose):
  """`nnx.ConvTranspose` (the same parameters and outputs) that runs the up-convolution of a U-Net, kernel ==
  stride, as one matmul and a reshape when ``as_matmul`` is set (`set_conv_impl` with "im2col" or "onednn").

  With kernel == stride the windows do not overlap: output voxel s*i + a is x[i] @ K[k - 1 - a] (+ bias)
  (`lax.conv_transpose` without transpose_kernel correlates the stride-dilated input, padded by k - 1, with K,
  so each output offset a meets kernel tap k - 1 - a), for SAME and VALID padding alike. Its gradients are
  matmuls too, where XLA:CPU runs the transposed 3D convolution and its gradients with its slow generic
  convolution. Any other geometry runs `lax.conv_transpose`.
  """
  as_matmul: bool = False

  def _matmul_ok(self, inputs) -> bool:
    k = tuple(self.kernel_size)
    strides = tuple(self.strides) if not isinstance(self.strides, int) else (self.strides,) * len(k)
    dil = self.kernel_dilation
    dil = (1,) * len(k) if dil is None else ((dil,) * len(k) if isinstance(dil, int) else tuple(dil))
    return (self.as_matmul and len(k) == 3 and inputs.ndim == 5 and k == strides and all(d == 1 for d in dil)
            and not self.transpose_kernel and self.mask is None and self.padding in ("SAME", "VALID"))

  def __call__(self, inputs: jax.Array) -> jax.Array:
    if not self._matmul_ok(inputs):
      return super().__call__(inputs)
    bias = self.bias[...] if self.bias is not None else None
    x, kernel, bias = self.promote_dtype((inputs, self.kernel[...], bias), dtype=self.dtype)
    b, d, h, w, _ = x.shape
    s0, s1, s2 = self.kernel_size
    y = jnp.einsum("bdhwc,xyzco->bdxhywzo", x, kernel[::-1, ::-1, ::-1], precision=self.precision,
                   preferred_element_type=self.preferred_element_type)
    y = y.reshape(b, d * s0, h * s1, w * s2, kernel.shape[-1])
    return y if bias is None else y + bias


def set_bn_momentum(model: nnx.Module, momentum: float) -> nnx.Module:
  """Sets the running-statistics momentum of every `nnx.BatchNorm` inside `model`."""
  for _, module in nnx.iter_modules(model):
    if isinstance(module, nnx.BatchNorm):
      module.momentum = momentum
  return model


# ----------------------------------------------------------------------------- batch normalisation

def _bn_stats(xf: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """Per-feature mean and (biased) variance, E[x^2] - E[x]^2 clipped at 0 as flax's fast variance."""
  mean = jnp.mean(xf, axes)
  var = jnp.maximum(0.0, jnp.mean(jnp.square(xf), axes) - jnp.square(mean))
  return mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, dtype: Any
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Training-mode batch norm over every axis but the last: (y in `dtype`, batch mean, batch variance).

  The same values as `nnx.BatchNorm` (statistics and arithmetic in float32), with the gradient written out:
  dx = scale / sigma * (dy - mean(dy) - x_hat * mean(dy * x_hat)), so the backward pass is one reduction and
  one elementwise pass over the activation, and only x is kept for it (XLA's own derivative of the
  normalisation kept x - mean as well and made more passes: ~1/3 of the nodule recipe's step on CPU).
  """
  return _bn_fwd(x, scale, bias, epsilon, dtype)[0]


def _bn_fwd(x, scale, bias, epsilon, dtype):
  axes = tuple(range(x.ndim - 1))
  xf = x.astype(jnp.float32)
  mean, var = _bn_stats(xf, axes)
  inv = jax.lax.rsqrt(var + epsilon)
  mul = inv * scale.astype(jnp.float32)
  y = ((xf - mean) * mul + bias.astype(jnp.float32)).astype(dtype)
  return (y, mean, var), (x, mean, inv, scale)


def _bn_bwd(epsilon, dtype, res, cotangents):
  x, mean, inv, scale = res
  g, g_mean, g_var = cotangents
  axes = tuple(range(x.ndim - 1))
  n = x.size // x.shape[-1]
  xf = x.astype(jnp.float32)
  g = g.astype(jnp.float32)
  # Per-feature sums of g and g * x, then dx = a * g + b * x + c with per-feature a, b, c: each pass reads the
  # activation and writes nothing of its size but dx. (Written with x_hat = (x - mean) * inv, XLA stored x_hat
  # or x - mean, one more activation-sized write and read per BatchNorm.) d_scale = sum(g * x_hat) =
  # inv * (sum(g * x) - mean * sum(g)).
  d_bias = jnp.sum(g, axes)
  d_scale = (jnp.sum(g * xf, axes) - mean * d_bias) * inv
  a = scale.astype(jnp.float32) * inv
  # dx = a * (g - d_bias / n - x_hat * d_scale / n), plus the batch statistics' own cotangents (zero when they
  # only feed the running averages): g_mean / n + g_var * 2 (x - mean) / n.
  b = g_var * (2.0 / n) - a * inv * d_scale / n
  c = g_mean / n - a * d_bias / n - b * mean
  dx = a * g + b * xf + c
  return dx.astype(x.dtype), d_scale.astype(scale.dtype), d_bias.astype(scale.dtype)


batch_norm_train.defvjp(_bn_fwd, _bn_bwd)


class BatchNorm(nnx.BatchNorm):
  """`nnx.BatchNorm` (same parameters, statistics, momentum and outputs) whose training-mode normalisation over
  every axis but the last is `batch_norm_train`, with its gradient written out. Any other use (running
  averages, masks, a named axis, other feature axes, no scale or bias) is `nnx.BatchNorm`'s own."""

  def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
    ura = self.use_running_average if use_running_average is None else use_running_average
    axes = tuple(self.axis) if isinstance(self.axis, (tuple, list)) else (self.axis,)
    plain = (ura is None or ura or mask is not None or self.axis_name is not None or self.scale is None
             or self.bias is None or tuple(a % x.ndim for a in axes) != (x.ndim - 1,) or not self.use_fast_variance)
    if plain:
      return super().__call__(x, use_running_average, mask=mask)
    dtype = self.dtype or jnp.result_type(x, self.scale[...], self.bias[...])
    y, mean, var = batch_norm_train(x, self.scale[...], self.bias[...], self.epsilon, jnp.dtype(dtype))
    mean, var = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)
    self.mean[...] = self.momentum * self.mean[...] + (1 - self.momentum) * mean
    self.var[...] = self.momentum * self.var[...] + (1 - self.momentum) * var
    return y
