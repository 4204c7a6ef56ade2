"""Spatial partitioning helpers the models call at block boundaries.

A volume too big for one device is split along its depth axis over the mesh axis ``space`` (the batch over
``data``). The models call :func:`constrain_spatial` on the activations between blocks; under a mesh that has a
``space`` axis of size > 1 this pins them to ``P("data", "space", None, None, None)`` and XLA's SPMD partitioner
splits every convolution along depth, exchanging the halo slices between neighbouring devices with
``collective-permute`` (no hand-written halo code). BatchNorm statistics and the global average pool are
reductions over the sharded axes, which XLA turns into all-reduces, so the numbers equal the unsplit model's.
Without such a mesh (the default single-device path, or a data-only mesh) every helper here returns its input
unchanged.

The mesh is the one made current with ``jax.set_mesh(mesh)`` (JAX >= 0.7; 0.10 and 0.11 tested), read while
tracing with ``jax.sharding.get_abstract_mesh()``. Jit (or trace) the step inside ``with jax.set_mesh(mesh):``.
Both axis types work: ``Auto`` axes (``jax.sharding.Mesh(devices, names)``) get ``with_sharding_constraint``,
``Explicit`` axes (``jax.make_mesh``'s default) get ``jax.sharding.reshard``.
"""
from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"
SPACE_AXIS = "space"
MIN_SLICES_PER_DEVICE = 2


def current_mesh():
  """The abstract mesh set by ``jax.set_mesh`` (an empty one when none is set)."""
  return jax.sharding.get_abstract_mesh()


def space_size(mesh=None) -> int:
  """Number of devices the depth axis is split over under ``mesh`` (default: the current mesh); 1 = no split."""
  mesh = current_mesh() if mesh is None else mesh
  if mesh is None or mesh.empty:
    return 1
  return int(dict(mesh.shape).get(SPACE_AXIS, 1))


def _explicit(mesh, axes) -> bool:
  types = dict(zip(mesh.axis_names, mesh.axis_types))
  return any(types[a] == jax.sharding.AxisType.Explicit for a in axes)


def spatial_spec(x: jax.Array, mesh=None) -> P | None:
  """``P("data", "space", None, ...)`` for a (B, D, ...) activation under ``mesh``, or None for no constraint.

  The batch axis is split over ``data`` when the mesh has it and it divides B (sliding-window inference may feed
  odd batches). Depth is split over ``space`` only when every device gets at least two slices, else it is kept
  whole (replicated over ``space``); with Explicit axes ``space`` must also divide D evenly (Auto axes let XLA pad
  an uneven split).
  """
  mesh = current_mesh() if mesh is None else mesh
  k = space_size(mesh)
  if k <= 1 or x.ndim < 3:
    return None
  shape = dict(mesh.shape)
  explicit = _explicit(mesh, [a for a in (DATA_AXIS, SPACE_AXIS) if a in shape])
  depth = x.shape[1]
  n_data = shape.get(DATA_AXIS, 1)
  batch = DATA_AXIS if DATA_AXIS in shape and x.shape[0] % n_data == 0 else None
  # Fewer than 2 slices per device (deep, downsampled layers, a few KB): keep depth whole on each device.
  # XLA (jax 0.10.2) partitions a stride-2 convolution of a tensor holding ONE slice per device into a wrong
  # gradient (measured: ResNet BasicBlock, depth 4 over space=4, conv1/bn1 gradients off by 100%); with two or
  # more slices per device it is exact.
  split = depth >= MIN_SLICES_PER_DEVICE * k and not (explicit and depth % k)
  return P(batch, SPACE_AXIS if split else None, *([None] * (x.ndim - 2)))


def constrain_spatial(x: jax.Array) -> jax.Array:
  """Shards ``x`` (B, D, H, W, C) as ``P("data", "space", None, None, None)`` under a spatial mesh, else returns it.

  Call it at block boundaries (after a block, before a pool or an upsampling) so the partitioner keeps
  activations split along depth instead of gathering them.
  """
  mesh = current_mesh()
  spec = spatial_spec(x, mesh)
  if spec is None:
    return x
  if _explicit(mesh, [a for a in spec if a is not None]):
    return jax.sharding.reshard(x, spec)
  return jax.lax.with_sharding_constraint(x, spec)
