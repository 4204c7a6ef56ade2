"""Runs the oneDNN convolution custom calls shard by shard when the batch is split over devices.

XLA cannot see inside a custom call, so by default it gathers a batch-sharded operand and runs the whole
convolution on every device. `call` wraps each custom call in `custom_partitioning`: activations keep their
batch sharding (any other sharding, e.g. a spatial split, is gathered), the kernel is replicated, and the
weight gradient of each shard is summed over the batch axes (the data-parallel all-reduce).
"""
from __future__ import annotations

import functools
import math

import jax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P

# Factors of the three calls: b batch; d h w input and i j k output spatial; x y z kernel; c in, o out channels.
_RULES = {
    "fwd": "b d h w c, x y z c o -> b i j k o",
    "bwd_data": "b i j k o, x y z c o -> b d h w c",
    "bwd_weights": "b d h w c, b i j k o -> x y z c o",
}
_LOCAL = ("d", "h", "w", "i", "j", "k", "x", "y", "z", "c", "o")


def _batch_axes(sharding) -> tuple[str, ...]:
  spec = getattr(sharding, "spec", None)
  if not spec:
    return ()
  first = spec[0]
  if first is None:
    return ()
  return tuple(first) if isinstance(first, tuple) else (first,)


@functools.partial(custom_partitioning, static_argnums=(2,))
def _op(a, b, static):
  ffi, kind, out_shape, out_dtype, strides, pads = static
  return ffi(kind, a, b, out_shape, out_dtype, strides, pads)


def _shardings(static, mesh, arg_shapes):
  kind = static[1]
  axes = _batch_axes(arg_shapes[0].sharding)
  if axes and arg_shapes[0].shape[0] % math.prod(mesh.shape[a] for a in axes):
    axes = ()
  act = NamedSharding(mesh, P(axes if axes else None))
  rep = NamedSharding(mesh, P())
  if kind == "bwd_weights":
    return axes, (act, act), rep
  return axes, (act, rep), act


def _partition(static, mesh, arg_shapes, result_shape):
  ffi, kind, out_shape, out_dtype, strides, pads = static
  axes, arg_shardings, out_sharding = _shardings(static, mesh, arg_shapes)

  def lower(a, b):
    if kind == "bwd_weights":
      r = ffi(kind, a, b, out_shape, out_dtype, strides, pads)
      return jax.lax.psum(r, axes) if axes else r
    return ffi(kind, a, b, (a.shape[0], *out_shape[1:]), out_dtype, strides, pads)
  return mesh, lower, out_sharding, arg_shardings


def _infer(static, mesh, arg_shapes, result_shape):
  return _shardings(static, mesh, arg_shapes)[2]


_RULE_OBJECTS = {}


def _rule(static, mesh, value_types, result_types):
  kind = static[1]
  if kind not in _RULE_OBJECTS:
    from jax._src.custom_partitioning_sharding_rule import str_to_sdy_sharding_rule
    order = list(dict.fromkeys(_RULES[kind].replace(",", " ").replace("->", " ").split()))
    local = tuple(f for f in order if f in _LOCAL)  # Shardy wants them in the order of first appearance
    _RULE_OBJECTS[kind] = str_to_sdy_sharding_rule(
        _RULES[kind], reduction_factors=("b",) if kind == "bwd_weights" else (),
        need_replication_factors=local)
  return _RULE_OBJECTS[kind]


_op.def_partition(partition=_partition, infer_sharding_from_operands=_infer, sharding_rule=_rule)


def call(kind, ffi, a, b, out_shape, out_dtype, strides, pads):
  """`ffi(kind, a, b, out_shape, out_dtype, strides, pads)`, partitioned over the batch under jit."""
  static = (ffi, kind, tuple(int(s) for s in out_shape), jax.numpy.dtype(out_dtype), tuple(strides),
            tuple(tuple(p) for p in pads))
  return _op(a, b, static)
