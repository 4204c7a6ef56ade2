"""3D convolutions on CPU through oneDNN, as XLA FFI custom calls with a custom VJP.

    from lungct.ops import onednn_conv
    y = onednn_conv.conv_general_dilated(x, w, (1, 1, 1), "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))

`conv_general_dilated` has `jax.lax.conv_general_dilated`'s signature (what `nnx.Conv` calls). It handles 3D,
channels-last (N, D, H, W, C) x (KD, KH, KW, I, O) convolutions with any strides and padding (VALID, SAME or
explicit, non-negative), no dilation, one group, in float32, bfloat16 or float16 on the CPU backend. The forward
pass, the input gradient and the weight gradient are each one oneDNN primitive (no patch matrices), so the
training step stays one jitted function. Anything else runs `lax.conv_general_dilated`; so does a machine where
the extension cannot be built (no C++ compiler, no oneDNN package), after one warning line, and a convolution
oneDNN has no kernel for on this CPU (e.g. bfloat16 without AVX-512): each one is tried when it is traced
(`supported`) and falls back with one warning line per element type.
"""
from __future__ import annotations

import ctypes
import functools
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np

from lungct.ops import partition

_TARGETS = {"fwd": "lungct_onednn_conv_fwd", "bwd_data": "lungct_onednn_conv_bwd_data",
            "bwd_weights": "lungct_onednn_conv_bwd_weights"}
_SYMBOLS = {"fwd": "LungctOnednnConvFwd", "bwd_data": "LungctOnednnConvBwdData",
            "bwd_weights": "LungctOnednnConvBwdWeights"}
_KIND_ID = {"fwd": 0, "bwd_data": 1, "bwd_weights": 2}
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_LOCK = threading.Lock()
_STATE: dict = {"lib": None, "error": None, "warned": False, "warned_dtypes": set()}
_DTYPE_CODE = {jnp.dtype(jnp.float32): 0, jnp.dtype(jnp.bfloat16): 1, jnp.dtype(jnp.float16): 2}


def load() -> ctypes.CDLL | None:
  """Builds (once, cached on disk) and registers the extension; None if that is impossible here."""
  with _LOCK:
    if _STATE["lib"] is not None or _STATE["error"] is not None:
      return _STATE["lib"]
    try:
      from lungct.ops import build
      lib = ctypes.CDLL(build.library_path())
      lib.lungct_onednn_isa.restype = ctypes.c_char_p
      lib.lungct_onednn_check.restype = ctypes.c_int
      lib.lungct_onednn_impl.restype = ctypes.c_int
      for kind, name in _TARGETS.items():
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, _SYMBOLS[kind])), platform="cpu")
      _STATE["lib"] = lib
    except Exception as e:  # no compiler, no oneDNN, a compile or load error: XLA's convolution instead
      _STATE["error"] = f"{type(e).__name__}: {e}".replace("\n", " ")
    return _STATE["lib"]


def available() -> bool:
  """True if the oneDNN extension is built and registered (building it now if needed)."""
  return load() is not None


def unavailable_reason() -> str | None:
  load()
  return _STATE["error"]


def _warn_fallback() -> None:
  if not _STATE["warned"]:
    _STATE["warned"] = True
    print(f"lungct: conv_impl='onednn' is unavailable, using XLA's convolution ({_STATE['error']})",
          file=sys.stderr)


def isa() -> str | None:
  """The instruction set oneDNN runs here (after `ONEDNN_MAX_CPU_ISA`), e.g. 'avx2'; None without the extension."""
  lib = load()
  return None if lib is None else lib.lungct_onednn_isa().decode()


def _arr(v):
  return (ctypes.c_int64 * len(v))(*[int(i) for i in v])


@functools.lru_cache(maxsize=None)
def supported(x_shape, w_shape, strides, pads, dtype) -> str | None:
  """None if oneDNN can run this convolution and both its gradients here (creating their primitives, which
  are cached for the run), else oneDNN's reason. `pads` are the trimmed explicit ones, shapes in JAX order."""
  lib = load()
  if lib is None:
    return _STATE["error"]
  dtype = jnp.dtype(dtype)
  y_shape = _out_shape(x_shape, w_shape, strides, pads)
  t, f32 = _DTYPE_CODE[dtype], _DTYPE_CODE[jnp.dtype(jnp.float32)]
  # The buffers' element types of the three calls, as _conv and _conv_bwd make them.
  calls = (("fwd", t, t, t), ("bwd_data", t, t, t), ("bwd_weights", t, f32, t))
  buf = ctypes.create_string_buffer(512)
  for kind, tx, tw, ty in calls:
    if lib.lungct_onednn_check(_KIND_ID[kind], _arr(x_shape), _arr(w_shape), _arr(y_shape), _arr(strides),
                               _arr([p[0] for p in pads]), _arr([p[1] for p in pads]), tx, tw, ty, buf, 512):
      return f"{kind}: {buf.value.decode()}"
  return None


def _warn_unsupported(dtype, reason) -> None:
  if dtype not in _STATE["warned_dtypes"]:
    _STATE["warned_dtypes"].add(dtype)
    print(f"lungct: oneDNN cannot run some {dtype} convolutions on this CPU (ISA {isa()}), using XLA's "
          f"convolution for them ({reason})", file=sys.stderr)


# ----------------------------------------------------------------------------- shapes and padding

def _conv_geometry(x_shape, kernel, strides, padding):
  """Explicit (lo, hi) pads, hi trimmed to what the last window reaches. None if a pad is negative (left to XLA).

  The trimmed hi may be negative (down to 1 - stride): trailing input voxels that no window reaches, e.g. the
  last voxel of an even axis under a 1^3 stride-2 convolution. oneDNN's own rule admits that (output size
  (n - k + lo + hi) // s + 1 with hi + s > 0, src/common/convolution.cpp), so the input is passed whole and
  its backward-data writes zeros there, instead of a sliced copy of the input (which XLA fused with, and so
  recomputed, the producer's BatchNorm, residual add and ReLU)."""
  spatial = x_shape[1:4]
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(spatial, kernel, strides, padding)
  pads = []
  for n, k, s, (lo, hi) in zip(spatial, kernel, strides, padding):
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi < 0 or n + lo + hi < k:
      return None
    out = (n + lo + hi - k) // s + 1
    pads.append((lo, (out - 1) * s + k - n - lo))   # the high pad the last window actually reaches
  return tuple(pads)


def _out_shape(x_shape, w_shape, strides, pads, dilation=(0, 0, 0)):
  """`dilation` in oneDNN's convention (0: none): a kernel of k taps spans (k - 1) * (d + 1) + 1 voxels."""
  span = [(w_shape[i] - 1) * (dilation[i] + 1) + 1 for i in range(3)]
  return (x_shape[0], *[(x_shape[1 + i] + pads[i][0] + pads[i][1] - span[i]) // strides[i] + 1
                        for i in range(3)], w_shape[4])


def _channels_last(dimension_numbers, lhs_shape, rhs_shape) -> bool:
  dn = jax.lax.conv_dimension_numbers(lhs_shape, rhs_shape, dimension_numbers)
  return (tuple(dn.lhs_spec) == (0, 4, 1, 2, 3) and tuple(dn.out_spec) == (0, 4, 1, 2, 3)
          and tuple(dn.rhs_spec) == (4, 3, 0, 1, 2))


# ----------------------------------------------------------------------------- the custom calls

def _ffi(kind, a, b, out_shape, out_dtype, strides, pads, dilation=(0, 0, 0)):
  return jax.ffi.ffi_call(_TARGETS[kind], jax.ShapeDtypeStruct(tuple(out_shape), out_dtype),
                          vmap_method="sequential")(
      a, b, strides=np.asarray(strides, np.int64), dilation=np.asarray(dilation, np.int64),
      pad_lo=np.asarray([p[0] for p in pads], np.int64), pad_hi=np.asarray([p[1] for p in pads], np.int64))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, w, strides, pads):
  return partition.call("fwd", _ffi, x, w, _out_shape(x.shape, w.shape, strides, pads), x.dtype, strides, pads)


def _conv_fwd(x, w, strides, pads):
  return _conv(x, w, strides, pads), (x, w)


def _swapped_forward(x_shape, w_shape, strides, pads):
  """The forward convolution `_weights_by_forward` runs for a weight gradient: its input, kernel and output
  shapes (JAX order) and its dilation (oneDNN's convention)."""
  spatial = [n + lo + hi for n, (lo, hi) in zip(x_shape[1:4], pads)]
  out = _out_shape(x_shape, w_shape, strides, pads)
  return ((x_shape[4], *spatial, x_shape[0]), (*out[1:4], x_shape[0], w_shape[4]),
          (x_shape[4], *w_shape[:3], w_shape[4]), tuple(int(s) - 1 for s in strides))


def _weights_by_forward(kind, x, g, w_shape, out_dtype, strides, pads):
  """A weight gradient as oneDNN's forward convolution with batch and channels swapped (the signature of `_ffi`,
  for `partition.call`): dw[z, y, x, c, o] = sum over b and the output positions p of
  x_padded[b, s * p + (z, y, x), c] * g[b, p, o], i.e. the padded input with its channels as the batch and its
  batch as the channels, convolved (VALID, stride 1) with g as a kernel whose input channels are the batch and
  whose taps lie s (the stride) apart: a kernel dilated by s - 1. A trimmed negative high pad crops."""
  del kind
  xs = jax.lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), *[(lo, hi, 0) for lo, hi in pads], (0, 0, 0)))
  xs = xs.transpose(4, 1, 2, 3, 0)                                     # (C, D + pads, H + pads, W + pads, B)
  kernel = g.transpose(1, 2, 3, 0, 4)                                  # (I, J, K, B, O) as DHWIO
  *_, out_shape, dilation = _swapped_forward(x.shape, w_shape, strides, pads)
  out = _ffi("fwd", xs, kernel, out_shape, out_dtype, (1, 1, 1), ((0, 0),) * 3, dilation=dilation)
  return out.transpose(1, 2, 3, 0, 4)                                  # (C, Z, Y, X, O) -> (Z, Y, X, C, O)


@functools.lru_cache(maxsize=None)
def forward_for_weights(x_shape, w_shape, strides, pads, dtype) -> bool:
  """Whether `_conv_bwd` computes this convolution's weight gradient with `_weights_by_forward`: a float32
  convolution whose weight gradient oneDNN would run as im2col + GEMM (its `gemm` implementation: below AVX-512
  it has no JIT kernel for 3D weight gradients), when it has a direct kernel for the swapped forward (dilated
  by the stride - 1). On AVX2 that took an 8-channel 3x3x3 layer's weight gradient at 32^3 (batch 16) from 96
  to 45 ms (benchmarks/README.md, round 8); on AVX-512 oneDNN's own kernel (11 ms) is kept."""
  if jnp.dtype(dtype) != jnp.float32:
    return False
  if "gemm" not in impl_info("bwd_weights", x_shape, w_shape, strides, pads):
    return False
  xs, kernel, _, dilation = _swapped_forward(x_shape, w_shape, strides, pads)
  fwd = impl_info("fwd", xs, kernel, (1, 1, 1), ((0, 0),) * 3, dilation=dilation)
  return fwd not in ("error", "unavailable") and "gemm" not in fwd


def _conv_bwd(strides, pads, res, g):
  x, w = res
  g = g.astype(x.dtype)
  dx = partition.call("bwd_data", _ffi, g, w, x.shape, x.dtype, strides, pads)
  # The weight gradient is accumulated and written in float32 whatever the activations' type: for bf16
  # activations oneDNN's AMX kernel with a float32 result ran 2x faster than with a bf16 one (and is exact).
  weights = _weights_by_forward if forward_for_weights(x.shape, w.shape, strides, pads, x.dtype) else _ffi
  dw = partition.call("bwd_weights", weights, x, g, w.shape, jnp.float32, strides, pads)
  return dx, dw.astype(w.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1,
                         batch_group_count: int = 1, precision=None, preferred_element_type=None,
                         out_sharding=None) -> jax.Array:
  """`jax.lax.conv_general_dilated` computed by oneDNN where it can be (see the module docstring)."""
  extra = {} if out_sharding is None else {"out_sharding": out_sharding}
  fallback = lambda: jax.lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
      batch_group_count, precision=precision, preferred_element_type=preferred_element_type, **extra)
  dtype = jnp.result_type(lhs, rhs)
  if (lhs.ndim != 5 or rhs.ndim != 5 or feature_group_count != 1 or batch_group_count != 1
      or any(d != 1 for d in (lhs_dilation or ())) or any(d != 1 for d in (rhs_dilation or ()))
      or not _channels_last(dimension_numbers, lhs.shape, rhs.shape) or dtype not in _DTYPES
      or (preferred_element_type is not None and jnp.dtype(preferred_element_type) != dtype)
      or out_sharding is not None or jax.default_backend() != "cpu"):
    return fallback()
  strides = tuple(int(s) for s in window_strides)
  geometry = _conv_geometry(lhs.shape, rhs.shape[:3], strides, padding)
  if geometry is None:
    return fallback()
  if load() is None:
    _warn_fallback()
    return fallback()
  pads = geometry
  reason = supported(tuple(int(n) for n in lhs.shape), tuple(int(n) for n in rhs.shape), strides, pads, dtype)
  if reason is not None:
    _warn_unsupported(dtype, reason)
    return fallback()
  return _conv(lhs.astype(dtype), rhs.astype(dtype), strides, pads)


def impl_info(kind: str, x_shape, w_shape, strides, pads, dtype=jnp.float32, dilation=(0, 0, 0)) -> str:
  """The oneDNN implementation chosen for one convolution, e.g. 'brg_conv_fwd:avx512_core (plain)': shapes in
  JAX order, `pads` the trimmed explicit ones (`_conv_geometry`), `dilation` in oneDNN's convention (0: none)."""
  lib = load()
  if lib is None:
    return "unavailable"
  out = _out_shape(x_shape, w_shape, strides, pads, dilation)
  arr = _arr
  buf = ctypes.create_string_buffer(512)
  n = lib.lungct_onednn_impl(_KIND_ID[kind], arr(x_shape), arr(w_shape), arr(out), arr(strides), arr(dilation),
                             arr([p[0] for p in pads]), arr([p[1] for p in pads]),
                             int(jnp.dtype(dtype) == jnp.bfloat16), buf, 512)
  return buf.value.decode() if n >= 0 else "error"
