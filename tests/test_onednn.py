"""The oneDNN convolution path (lungct.ops.onednn_conv) gives XLA's outputs and gradients.

The equivalence tests skip when the extension cannot be built here (no C++ compiler or no oneDNN package);
the fallback test runs everywhere.
"""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lungct.models import common
from lungct.models.cnn3d import CNN3D
from lungct.ops import onednn_conv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DN = ("NDHWC", "DHWIO", "NDHWC")
needs_ext = pytest.mark.skipif(not onednn_conv.available(),
                               reason=f"oneDNN extension not built: {onednn_conv.unavailable_reason()}")


def _conv_and_grads(fn, x, w, strides, padding, seed=2):
  conv = lambda a, b: fn(a, b, strides, padding, dimension_numbers=DN)
  y = jax.jit(conv)(x, w)
  g = jax.random.normal(jax.random.PRNGKey(seed), y.shape, jnp.float32).astype(y.dtype)
  grads = jax.jit(jax.grad(lambda a, b: jnp.sum((conv(a, b) * g).astype(jnp.float32)), argnums=(0, 1)))(x, w)
  return y, grads


@needs_ext
def test_hand_computed_value():
  # A 3x3x3 input of ones and a kernel of 1..27: the single VALID output is 1 + ... + 27 = 378, and the input
  # gradient of that output is the kernel itself.
  x = jnp.ones((1, 3, 3, 3, 1))
  w = jnp.arange(1.0, 28.0).reshape(3, 3, 3, 1, 1)
  y, (gx, gw) = _conv_and_grads(onednn_conv.conv_general_dilated, x, w, (1, 1, 1), "VALID")
  assert float(y[0, 0, 0, 0, 0]) == 378.0
  g = float(jax.random.normal(jax.random.PRNGKey(2), (1, 1, 1, 1, 1))[0, 0, 0, 0, 0])
  np.testing.assert_allclose(gx[0, ..., 0], np.arange(1.0, 28.0).reshape(3, 3, 3) * g, rtol=1e-6)
  np.testing.assert_allclose(gw[..., 0, 0], np.full((3, 3, 3), g), rtol=1e-6)


@needs_ext
@pytest.mark.parametrize("spatial,kernel,strides,padding,cin,cout", [
    ((7, 8, 9), 3, (1, 1, 1), "VALID", 1, 4),
    ((7, 8, 9), 3, (1, 1, 1), "SAME", 3, 5),
    ((5, 6, 7), 3, (2, 1, 2), [(1, 0), (2, 1), (0, 2)], 4, 6),   # explicit, asymmetric
    ((8, 9, 10), 3, (2, 2, 2), "VALID", 2, 3),                   # strided VALID drops trailing voxels
    ((9, 9, 9), 7, (1, 2, 2), [(3, 3)] * 3, 1, 8),               # a ResNet stem
    ((4, 4, 4), 1, (2, 2, 2), "VALID", 16, 32),                  # a ResNet projection shortcut
    ((9, 8, 10), 1, (3, 3, 3), "VALID", 2, 3),                   # unreached trailing voxels: 2, 1, 0
    ((2, 3, 3), 3, (1, 1, 1), "SAME", 256, 256),
])
def test_outputs_and_gradients_match_xla(spatial, kernel, strides, padding, cin, cout):
  kx, kw = jax.random.split(jax.random.PRNGKey(0))
  x = jax.random.normal(kx, (2, *spatial, cin))
  w = jax.random.normal(kw, (kernel,) * 3 + (cin, cout)) / np.sqrt(kernel ** 3 * cin)
  y_ref, (gx_ref, gw_ref) = _conv_and_grads(jax.lax.conv_general_dilated, x, w, strides, padding)
  y, (gx, gw) = _conv_and_grads(onednn_conv.conv_general_dilated, x, w, strides, padding)
  assert y.shape == y_ref.shape and gx.shape == x.shape and gw.shape == w.shape
  for a, b in ((y, y_ref), (gx, gx_ref), (gw, gw_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.max(np.abs(b))))
  # The custom calls are really in the program (not a silent fallback).
  hlo = jax.jit(lambda a, b: onednn_conv.conv_general_dilated(a, b, strides, padding, dimension_numbers=DN)
                ).lower(x, w).as_text()
  assert "lungct_onednn_conv_fwd" in hlo


@needs_ext
def test_bfloat16_matches_xla():
  kx, kw = jax.random.split(jax.random.PRNGKey(0))
  x = jax.random.normal(kx, (2, 6, 7, 8, 16)).astype(jnp.bfloat16)
  w = (jax.random.normal(kw, (3, 3, 3, 16, 32)) / 20).astype(jnp.bfloat16)
  y_ref, (gx_ref, gw_ref) = _conv_and_grads(jax.lax.conv_general_dilated, x, w, (1, 1, 1), "SAME")
  y, (gx, gw) = _conv_and_grads(onednn_conv.conv_general_dilated, x, w, (1, 1, 1), "SAME")
  assert y.dtype == gx.dtype == gw.dtype == jnp.bfloat16
  for a, b in ((y, y_ref), (gx, gx_ref), (gw, gw_ref)):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.max(np.abs(a - b)) <= 2e-2 * np.max(np.abs(b))  # bf16 has 8 bits of mantissa


def test_unsupported_convolutions_use_xla():
  # Dilated and grouped convolutions are not routed to oneDNN: the result is XLA's, bit for bit.
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 7, 7, 7, 4))
  w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 3, 2, 4))
  y = onednn_conv.conv_general_dilated(x, w, (1, 1, 1), "SAME", rhs_dilation=(2, 2, 2), dimension_numbers=DN,
                                       feature_group_count=2)
  y_ref = jax.lax.conv_general_dilated(x, w, (1, 1, 1), "SAME", rhs_dilation=(2, 2, 2), dimension_numbers=DN,
                                       feature_group_count=2)
  np.testing.assert_array_equal(y, y_ref)


FALLBACK = textwrap.dedent("""
    import jax, numpy as np
    from lungct.models import common
    fn = common.conv_fn("onednn")
    x = np.ones((1, 3, 3, 3, 1), np.float32); w = np.arange(1.0, 28.0, dtype=np.float32).reshape(3, 3, 3, 1, 1)
    dn = ("NDHWC", "DHWIO", "NDHWC")
    for _ in range(3):
      y = jax.jit(lambda a, b: fn(a, b, (1, 1, 1), "VALID", dimension_numbers=dn))(x, w)
    hlo = jax.jit(lambda a, b: fn(a, b, (1, 1, 1), "SAME", dimension_numbers=dn)).lower(x, w).as_text()
    print("value", float(y[0, 0, 0, 0, 0]), "custom_call" in hlo)
""")


def test_missing_compiler_falls_back_with_one_warning(tmp_path):
  env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), LUNGCT_CACHE_DIR=str(tmp_path / "cache"),
             JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  out = subprocess.run([sys.executable, "-c", FALLBACK], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "value 378.0 False" in out.stdout
  warnings = [l for l in out.stderr.splitlines() if "onednn" in l]
  assert len(warnings) == 1 and "using XLA's convolution" in warnings[0] and "no C++ compiler" in warnings[0], \
      out.stderr[-2000:]


# Whole models (CNN3D, ResNet-10) against XLA: tests/test_conv_impl.py::test_models_same_outputs_and_gradients.


SHARDED = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from lungct.ops import onednn_conv
    assert jax.device_count() == 8
    dn = ("NDHWC", "DHWIO", "NDHWC")
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 6, 6, 6, 3))
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 3, 3, 4)) * 0.1
    mesh = Mesh(np.array(jax.devices()), ("data",))
    def run(fn, shard):
      loss = lambda a, b: jnp.sum(fn(a, b, (1, 1, 1), "SAME", dimension_numbers=dn) ** 2)
      kw = dict(in_shardings=(NamedSharding(mesh, P("data")), NamedSharding(mesh, P()))) if shard else {}
      f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), **kw)
      return f, [np.asarray(a) for a in jax.tree.leaves(f(x, w))]
    _, ref = run(jax.lax.conv_general_dilated, False)
    f, got = run(onednn_conv.conv_general_dilated, True)
    for a, b in zip(got, ref):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())
    hlo = f.lower(x, w).compile().as_text()
    assert "all-gather" not in hlo, "activations were gathered"
    assert "f32[1,6,6,6,3]" in hlo  # each device convolves its shard
    # and computes its shard's weight gradient: oneDNN's call, or (below AVX-512, where oneDNN would use GEMM) the
    # swapped forward over the shard's padded input, its batch of 1 as the channels: (C, 8, 8, 8, 1).
    pads = onednn_conv._conv_geometry(x.shape, (3, 3, 3), (1, 1, 1), "SAME")
    if onednn_conv.forward_for_weights(x.shape, w.shape, (1, 1, 1), pads, jnp.float32):
      assert "f32[3,8,8,8,1]" in hlo and "lungct_onednn_conv_bwd_weights" not in hlo
    else:
      assert "lungct_onednn_conv_bwd_weights" in hlo
    print("OK")
""")


def _eight_devices(script, *args):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
             PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)


@needs_ext
def test_batch_sharded_convolution_runs_per_shard():
  out = _eight_devices(SHARDED)
  assert out.returncode == 0 and "OK" in out.stdout, out.stdout[-2000:] + out.stderr[-4000:]


@needs_ext
def test_eight_devices_train_step_matches_one():
  from tests.test_parallel import SCRIPT  # the data-parallel train-step check used for the other formulations
  out = _eight_devices(SCRIPT, "onednn")
  assert out.returncode == 0 and "OK" in out.stdout, out.stdout[-3000:] + out.stderr[-5000:]


ISA_SCRIPT = textwrap.dedent('''
import sys
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from lungct.models.resnet3d import ResNet3D
from lungct.ops import onednn_conv
expect_isa = sys.argv[1]
assert jax.device_count() == 8
assert expect_isa in ("native", onednn_conv.isa()), (onednn_conv.isa(), expect_isa)
has_bf16 = onednn_conv.isa().startswith("avx512_core")  # AVX-512 (bf16 emulated), AVX512_BF16, AMX
dn = ("NDHWC", "DHWIO", "NDHWC")
mesh = Mesh(np.array(jax.devices()), ("data",))
batch, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())

def close(a, b, tol):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  assert a.shape == b.shape and np.max(np.abs(a - b)) <= tol * np.max(np.abs(b)), (np.max(np.abs(a - b)), np.max(np.abs(b)))

# Single convolutions of ResNet shapes (stem, strided 3^3, 1^3 projection), outputs and both gradients, the
# batch sharded over the 8 devices (2 per device), against XLA on one device. One program for all three.
shapes = [((9, 10, 11), 7, (1, 2, 2), [(3, 3)] * 3, 1, 4), ((6, 7, 8), 3, (2, 2, 2), "SAME", 4, 8),
          ((6, 6, 6), 1, (2, 2, 2), "VALID", 4, 8)]
keys = iter(jax.random.split(jax.random.PRNGKey(0), 6))
xs = [jax.random.normal(next(keys), (16, *sp, ci)) for sp, k, s, pad, ci, co in shapes]
ws = [jax.random.normal(next(keys), (k, k, k, ci, co)) / np.sqrt(k ** 3 * ci) for sp, k, s, pad, ci, co in shapes]
def convs(fn, **kw):
  loss = lambda xs, ws: sum(jnp.sum(jnp.sin(fn(x, w, sh[2], sh[3], dimension_numbers=dn)))
                            for x, w, sh in zip(xs, ws, shapes))
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), **kw).lower(xs, ws).compile()
ref = jax.tree.leaves(convs(jax.lax.conv_general_dilated)(xs, ws))
f = convs(onednn_conv.conv_general_dilated, in_shardings=([batch] * 3, [rep] * 3))
# each weight gradient: oneDNN's call, or where oneDNN would use GEMM (below AVX-512) the swapped forward
swapped = sum(onednn_conv.forward_for_weights(x.shape, w.shape, sh[2], onednn_conv._conv_geometry(
    x.shape, w.shape[:3], sh[2], sh[3]), jnp.float32) for x, w, sh in zip(xs, ws, shapes))
calls = lambda kind: f.as_text().count(f'custom_call_target="lungct_onednn_conv_{kind}"')
assert (calls("bwd_weights"), calls("fwd")) == (3 - swapped, 3 + swapped), (calls("bwd_weights"), calls("fwd"))
for a, b in zip(jax.tree.leaves(f(xs, ws)), ref):
  close(a, b, 1e-5)

# bfloat16: oneDNN's result where the ISA has bf16 kernels, else XLA's (the fallback, warned once).
xb = jax.random.normal(jax.random.PRNGKey(2), (2, 5, 6, 7, 8)).astype(jnp.bfloat16)
wb = (jax.random.normal(jax.random.PRNGKey(3), (3, 3, 3, 8, 8)) / 15).astype(jnp.bfloat16)
conv = lambda fn: jax.jit(jax.value_and_grad(
    lambda a, b: jnp.sum(fn(a, b, (1, 1, 1), "SAME", dimension_numbers=dn).astype(jnp.float32) ** 2),
    argnums=(0, 1))).lower(xb, wb).compile()
f = conv(onednn_conv.conv_general_dilated)
assert ("lungct_onednn_conv_fwd" in f.as_text()) == has_bf16
for a, b in zip(jax.tree.leaves(f(xb, wb)), jax.tree.leaves(conv(jax.lax.conv_general_dilated)(xb, wb))):
  close(a, b, 2e-2 if has_bf16 else 0.0)

# A ResNet-10 train-mode step (parallel branches: the projection shortcuts), batch-sharded over 8 devices,
# repeated. The yardstick is float32 itself: the same step computed in float64 (XLA, one device) is the
# reference, and oneDNN on 8 devices must be no further from it than a small multiple of XLA's own float32
# step on one device (both differ from it only by float32 rounding and summation order; a wrong kernel, a
# clobbered scratchpad or a missed gradient shard is off by the size of the values, ~1e-1 relative or more).
def step_fn(impl, dtype=jnp.float32):
  model = ResNet3D(num_outputs=2, depth=10, width=4, conv_impl=impl, dtype=dtype, rngs=nnx.Rngs(0))
  graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  def loss(p, st, x):
    m = nnx.merge(graphdef, p, st)
    return jnp.mean(m(x.astype(dtype), train=True).astype(dtype) ** 2), nnx.to_pure_dict(nnx.state(m, nnx.BatchStat))
  return jax.value_and_grad(loss, has_aux=True), nnx.to_pure_dict(params), nnx.to_pure_dict(stats)
x = jax.random.normal(jax.random.PRNGKey(4), (8, 12, 16, 16, 1))
f_ref, p, st = step_fn("xla")
ref32 = [np.asarray(a, np.float64) for a in jax.tree.leaves(jax.jit(f_ref)(p, st, x))]
with jax.enable_x64(True):
  f64, p64, st64 = step_fn("xla", jnp.float64)
  ref64 = [np.asarray(a, np.float64) for a in jax.tree.leaves(jax.jit(f64)(p64, st64, x))]
err = lambda a, r: float(np.abs(np.asarray(a, np.float64) - r).max() / np.abs(r).max())
f, p, st = step_fn("onednn")
f = jax.jit(f, in_shardings=(rep, rep, batch)).lower(p, st, x).compile()
assert "lungct_onednn_conv_bwd_weights" in f.as_text()
for _ in range(3):  # each run on the devices' threads, primitives created once
  for a, b, r in zip(jax.tree.leaves(f(p, st, x)), ref32, ref64):
    assert err(a, r) <= 10 * err(b, r) + 1e-5, (err(a, r), err(b, r))
print("worst float32 error of the step vs float64: xla", max(map(err, ref32, ref64)))
print("OK", onednn_conv.isa())
''')


# oneDNN's kernels differ by instruction set: every machine runs the paths of lesser CPUs too (the lowest
# ONEDNN_MAX_CPU_ISA of oneDNN 3.x is SSE41). XLA's own code is left at the CPU's ISA here, so the three runs
# share the session's compilation cache; tests/test_parallel.py limits XLA's ISA.
ISA_LIMITS = [(None, "native"), ("AVX2", "avx2"), ("SSE41", "sse41")]


@needs_ext
@pytest.mark.parametrize("onednn_isa,expect", ISA_LIMITS, ids=["native", "avx2", "sse41"])
def test_convolutions_and_sharded_resnet_step_on_each_isa(onednn_isa, expect):
  """Outputs and gradients vs XLA (float32, bfloat16 or its fallback), one device and batch-sharded over 8,
  and a ResNet-10 train-mode step (projection shortcuts: branches XLA runs on several threads) on 8 devices,
  repeated. Before the user scratchpad this step crashed (SIGSEGV) or hung at every ISA here."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  if onednn_isa:
    env["ONEDNN_MAX_CPU_ISA"] = onednn_isa
  out = subprocess.run([sys.executable, "-c", ISA_SCRIPT, expect], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=900)
  assert out.returncode == 0 and "OK" in out.stdout, out.stdout[-2000:] + out.stderr[-4000:]
  isa = out.stdout.split("OK")[-1].strip()
  warnings = [l for l in out.stderr.splitlines() if "oneDNN cannot run" in l]
  if isa.startswith("avx512_core"):
    assert warnings == [], warnings
  else:  # no bf16 kernels: one line for bfloat16, naming the ISA
    assert len(warnings) == 1 and "bfloat16" in warnings[0] and f"ISA {isa}" in warnings[0], out.stderr[-2000:]


WEIGHTS_BY_FORWARD = textwrap.dedent('''
import jax, jax.numpy as jnp, numpy as np
from lungct.ops import onednn_conv
dn = ("NDHWC", "DHWIO", "NDHWC")
CASES = [((2, 7, 8, 9, 4), (3, 3, 3, 4, 6), (1, 1, 1), "SAME"),
         ((2, 7, 8, 9, 1), (3, 3, 3, 1, 8), (1, 1, 1), "SAME"),       # a 1-channel stem
         ((2, 8, 9, 10, 4), (3, 3, 3, 4, 6), (2, 2, 2), "SAME"),      # a stride-2 block entry: taps 2 apart
         ((2, 9, 8, 7, 3), (3, 3, 3, 3, 5), (2, 1, 3), ((1, 1), (0, 2), (1, 0))),
         ((2, 8, 8, 8, 4), (1, 1, 1, 4, 6), (2, 2, 2), "SAME")]       # a downsample: high pad -1 (crops)
for i, (xs, ws, strides, padding) in enumerate(CASES):
  x = jax.random.normal(jax.random.PRNGKey(i), xs)
  w = jax.random.normal(jax.random.PRNGKey(100 + i), ws) / 10
  pads = onednn_conv._conv_geometry(xs, ws[:3], strides, padding)
  gemm = "gemm" in onednn_conv.impl_info("bwd_weights", xs, ws, strides, pads)
  chosen = onednn_conv.forward_for_weights(xs, ws, strides, pads, jnp.float32)
  conv = lambda fn: lambda w: fn(x, w, strides, padding, dimension_numbers=dn)
  grad = lambda fn: jax.jit(jax.grad(lambda w: jnp.sum(jnp.sin(conv(fn)(w)))))
  hlo = grad(onednn_conv.conv_general_dilated).lower(w).as_text()
  a, b = grad(onednn_conv.conv_general_dilated)(w), grad(jax.lax.conv_general_dilated)(w)
  # the swapped forward itself, on every CPU (above AVX2 it is not chosen), against XLA's weight gradient
  y, vjp = jax.vjp(conv(jax.lax.conv_general_dilated), w)
  g = jax.random.normal(jax.random.PRNGKey(200 + i), y.shape)
  direct = jax.jit(lambda x, g: onednn_conv._weights_by_forward("bwd_weights", x, g, ws, jnp.float32, strides,
                                                                pads))(x, g)
  ref = vjp(g)[0]
  print("RESULT", onednn_conv.isa(), gemm, chosen, "lungct_onednn_conv_bwd_weights" in hlo,
        float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))),
        float(jnp.max(jnp.abs(direct - ref)) / jnp.max(jnp.abs(ref))))
''')


@needs_ext
@pytest.mark.parametrize("onednn_isa", [None, "AVX2"], ids=["native", "avx2"])
def test_weight_gradient_by_the_swapped_forward_where_onednn_would_use_gemm(onednn_isa):
  """Below AVX-512 oneDNN runs 3D weight gradients as im2col + GEMM; a float32 one is then computed as the
  forward convolution with batch and channels swapped, its kernel dilated by the stride - 1
  (`onednn_conv._weights_by_forward`): no weight-gradient call in the program, and XLA's gradient to float32
  rounding, for stride 1, stride 2, mixed strides with uneven pads and a cropping high pad. Where oneDNN has its
  own kernel, it is kept; the swapped forward itself is checked against XLA on every CPU."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  env.pop("ONEDNN_MAX_CPU_ISA", None)
  if onednn_isa:
    env["ONEDNN_MAX_CPU_ISA"] = onednn_isa
  out = subprocess.run([sys.executable, "-c", WEIGHTS_BY_FORWARD], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [line.split()[1:] for line in out.stdout.splitlines() if line.startswith("RESULT")]
  assert len(rows) == 5, out.stdout
  for case, (isa, gemm, chosen, weights_call, err, err_direct) in enumerate(rows):
    assert chosen == gemm and weights_call == str(chosen == "False"), (case, out.stdout)
    if onednn_isa == "AVX2" and case < 4:  # oneDNN 3.x has no AVX2 JIT kernel for these 3x3x3 weight gradients
      assert isa.startswith("avx2") and chosen == "True", (case, out.stdout)
    assert float(err) < 1e-5 and float(err_direct) < 1e-5, (case, out.stdout)


@needs_ext
@pytest.mark.parametrize("remat", ["conv_outputs"])
def test_remat_policies_keep_outputs_and_gradients(remat):
  x = jax.random.uniform(jax.random.PRNGKey(1), (2, 8, 8, 8, 1))

  def loss_and_grads(remat):
    model = CNN3D(num_outputs=1, features=(4, 8), dense=8, dropout=0.0, padding="SAME", conv_impl="onednn",
                  remat=remat, rngs=nnx.Rngs(0))
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    params, stats = nnx.to_pure_dict(params), nnx.to_pure_dict(stats)
    loss = lambda p: jnp.mean(nnx.merge(graphdef, p, stats)(x, train=True))
    return jax.jit(jax.value_and_grad(loss))(params)

  (l0, g0), (l1, g1) = loss_and_grads(False), loss_and_grads(remat)
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
