"""The im2col convolution formulation gives XLA's outputs and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lungct.models import common
from lungct.ops import onednn_conv
from lungct.models.cnn3d import CNN3D
from lungct.models.resnet3d import ResNet3D
from lungct.models.unet3d import UNet3D

DN = ("NDHWC", "DHWIO", "NDHWC")


def test_im2col_matches_hand_computed_value():
  # 1-channel 3x3x3 input of ones and a kernel of 1..27: the single VALID output is sum(1..27) = 378.
  x = jnp.ones((1, 3, 3, 3, 1))
  w = jnp.arange(1.0, 28.0).reshape(3, 3, 3, 1, 1)
  y = common.im2col_conv_general_dilated(x, w, (1, 1, 1), "VALID", dimension_numbers=DN)
  assert y.shape == (1, 1, 1, 1, 1)
  assert float(y[0, 0, 0, 0, 0]) == 378.0
  # SAME padding: the corner output sees only the 8 kernel taps (i, j, k >= 1) -> their sum.
  y = common.im2col_conv_general_dilated(x, w, (1, 1, 1), "SAME", dimension_numbers=DN)
  corner = float(np.asarray(w)[1:, 1:, 1:].sum())
  assert float(y[0, 0, 0, 0, 0]) == corner == 14 + 15 + 17 + 18 + 23 + 24 + 26 + 27


@pytest.mark.parametrize("kernel,strides,padding,cin,cout", [
    (3, (1, 1, 1), "VALID", 1, 4),
    (3, (1, 1, 1), "SAME", 3, 5),
    (3, (2, 2, 2), [(1, 1)] * 3, 4, 6),
    (7, (1, 2, 2), [(3, 3)] * 3, 1, 4),
    (1, (2, 2, 2), [(0, 0)] * 3, 4, 8),
])
def test_im2col_outputs_and_gradients_match_xla(kernel, strides, padding, cin, cout):
  kx, kw, kg = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(kx, (2, 7, 8, 9, cin))
  w = jax.random.normal(kw, (kernel,) * 3 + (cin, cout)) * 0.1

  def run(fn):
    conv = lambda a, b: fn(a, b, strides, padding, dimension_numbers=DN)
    y = jax.jit(conv)(x, w)
    g = jax.random.normal(kg, y.shape)
    grads = jax.jit(jax.grad(lambda a, b: jnp.sum(conv(a, b) * g), argnums=(0, 1)))(x, w)
    return y, grads

  y_ref, (gx_ref, gw_ref) = run(jax.lax.conv_general_dilated)
  y, (gx, gw) = run(common.im2col_conv_general_dilated)
  assert y.shape == y_ref.shape
  np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(gx, gx_ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(gw, gw_ref, rtol=1e-4, atol=1e-4)


def test_unknown_impl_is_rejected():
  with pytest.raises(ValueError, match="conv_impl"):
    common.conv_fn("fft")


@pytest.mark.parametrize("make", [
    lambda impl: CNN3D(num_outputs=1, features=(4, 4, 8, 8), dense=8, dropout=0.0, padding="SAME",
                       conv_impl=impl, rngs=nnx.Rngs(0)),
    lambda impl: ResNet3D(num_outputs=3, depth=10, width=4, conv_impl=impl, rngs=nnx.Rngs(0)),
    lambda impl: UNet3D(num_outputs=1, features=(4, 8, 8), conv_impl=impl, rngs=nnx.Rngs(0)),
])
@pytest.mark.parametrize("impl", ["im2col", "onednn"])
def test_models_same_outputs_and_gradients(make, impl):
  if impl == "onednn" and not onednn_conv.available():
    pytest.skip(f"oneDNN extension not built: {onednn_conv.unavailable_reason()}")
  x = jax.random.uniform(jax.random.PRNGKey(1), (2, 16, 16, 16, 1))

  def loss_and_grads(impl):
    graphdef, params, stats = nnx.split(make(impl), nnx.Param, nnx.BatchStat)
    params, stats = nnx.to_pure_dict(params), nnx.to_pure_dict(stats)

    def loss(p):
      # Running statistics: batch statistics of 2 volumes would amplify rounding differences.
      return jnp.mean(nnx.merge(graphdef, p, stats)(x, train=False))
    return jax.jit(jax.value_and_grad(loss))(params)

  loss_x, grads_x = loss_and_grads("xla")
  loss_i, grads_i = loss_and_grads(impl)
  np.testing.assert_allclose(loss_i, loss_x, rtol=1e-4, atol=1e-5)
  for a, b in zip(jax.tree.leaves(grads_i), jax.tree.leaves(grads_x)):
    # Summation order differs: 1e-4 relative to the array's scale.
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.max(np.abs(b))) + 1e-6)


@pytest.mark.parametrize("window,strides,padding", [
    ((2, 2, 2), (2, 2, 2), "VALID"),        # the tutorial CNN: a reshape + max
    ((3, 3, 3), (2, 2, 2), [(1, 1)] * 3),   # the ResNet stem: separable strided slices
    ((3, 3, 3), (2, 2, 2), "SAME"),
    ((2, 2, 2), (1, 1, 1), "VALID"),
])
def test_max_pool_matches_flax(window, strides, padding):
  from flax import nnx
  # After a ReLU, as in the models: ties (zeros) get different shares of the pool's gradient, which the
  # ReLU then discards, so gradients with respect to the ReLU's input agree.
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 10, 11, 3))
  ref = lambda a: nnx.max_pool(jax.nn.relu(a), window, strides=strides, padding=padding)
  ours = lambda a: common.max_pool(jax.nn.relu(a), window, strides, padding)
  np.testing.assert_array_equal(ours(x), ref(x))
  g = jax.random.normal(jax.random.PRNGKey(1), ref(x).shape)
  grad = lambda f: jax.grad(lambda a: jnp.sum(f(a) * g))(x)
  np.testing.assert_allclose(grad(ours), grad(ref), atol=1e-6)


def test_separable_max_pool_in_bfloat16_is_the_float32_pool_rounded_once():
  """In bfloat16 the separable pool (the ResNet stem's) runs in float32: its values are nnx.max_pool's, and its
  gradient is the float32 pool's gradient rounded to bfloat16 once (tie shares of 1/2 and 1/3 are not rounded
  at every stage). Inputs on a quarter grid, so windows hold tied maxima."""
  from flax import nnx
  x = (jnp.round(4 * jax.random.normal(jax.random.PRNGKey(0), (2, 9, 10, 11, 3))) / 4).astype(jnp.bfloat16)
  g = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 5, 6, 3)).astype(jnp.bfloat16)
  pool = lambda a: common.max_pool(a, (3, 3, 3), (2, 2, 2), [(1, 1)] * 3)
  y = pool(x)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(
      nnx.max_pool(x, (3, 3, 3), strides=(2, 2, 2), padding=[(1, 1)] * 3), np.float32))
  grad = lambda a, cot: jax.grad(lambda b: jnp.sum((pool(b) * cot).astype(jnp.float32)))(a)
  want = grad(x.astype(jnp.float32), g.astype(jnp.float32)).astype(jnp.bfloat16)
  got = grad(x, g)
  assert got.dtype == jnp.bfloat16
  assert float(jnp.mean((want != 0) & (jnp.abs(want) < jnp.abs(g).max() / 1.5))) > 0.01  # shared ties occur
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_tiled_max_pool_gradient_goes_to_the_first_maximum_like_select_and_scatter():
  """Without a ReLU and with many ties (values on a coarse grid), the 2x2x2 pool's gradient equals XLA's
  select_and_scatter exactly: each window's gradient reaches its first maximum in row-major order, from the int8
  index the forward pass keeps (not from the input)."""
  from flax import nnx
  x = jnp.round(jax.random.normal(jax.random.PRNGKey(2), (2, 9, 10, 11, 3)) * 1.5)   # ~7 distinct values
  ref = lambda a: nnx.max_pool(a, (2, 2, 2), strides=(2, 2, 2))
  ours = lambda a: common.max_pool(a, (2, 2, 2), (2, 2, 2), "VALID")
  np.testing.assert_array_equal(ours(x), ref(x))
  g = jax.random.normal(jax.random.PRNGKey(3), ref(x).shape)
  grad = lambda f: jax.grad(lambda a: jnp.sum(f(a) * g))(x)
  gr, go = np.asarray(grad(ref)), np.asarray(grad(ours))
  assert (gr != 0).sum() == g.size                       # one voxel per window (the trailing odd voxels get none)
  np.testing.assert_array_equal(go, gr)
  # The residual is the int8 index, not the input: no float32 buffer of x's size in the saved values.
  saved = jax.vjp(ours, x)[1]
  leaves = [l for l in jax.tree.leaves(saved) if hasattr(l, "dtype")]
  assert any(l.dtype == jnp.int8 for l in leaves)
  assert not any(l.dtype == jnp.float32 and l.size >= x.size // 2 for l in leaves)


def test_cnn3d_block_pools_before_the_relu_with_equal_values_and_gradients():
  """ConvBlock computes relu(pool(conv without bias) + bias) instead of the tutorial's pool(relu(conv + bias)): the
  same numbers."""
  from flax import nnx
  from lungct.models import cnn3d
  block = cnn3d.ConvBlock(2, 4, padding="VALID", dtype=jnp.float32, rngs=nnx.Rngs(0))
  block.conv.bias.value = jax.random.normal(jax.random.PRNGKey(6), (4,))   # it is added after the pool too
  graphdef, params, stats = nnx.split(block, nnx.Param, nnx.BatchStat)
  x = jax.random.normal(jax.random.PRNGKey(4), (2, 10, 9, 12, 2))

  def run(p, tutorial):
    b = nnx.merge(graphdef, p, stats)
    if tutorial:
      y = nnx.max_pool(nnx.relu(b.conv(x)), (2, 2, 2), strides=(2, 2, 2))
      return b.bn(y, use_running_average=True)
    return b(x, train=False)   # BatchNorm in eval mode (no statistics update under grad); the order is the same
  g = jax.random.normal(jax.random.PRNGKey(5), run(params, True).shape)
  out = {t: run(params, t) for t in (True, False)}
  np.testing.assert_array_equal(out[False], out[True])
  grads = {t: jax.grad(lambda p: jnp.sum(run(p, t) * g))(params) for t in (True, False)}
  for a, b in zip(jax.tree.leaves(grads[False]), jax.tree.leaves(grads[True])):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_resnet3d_stem_pool_equals_nnx_max_pool(monkeypatch):
  """ResNet3D pools its stem (3x3x3, stride 2, padding 1, after the stem's ReLU) with `common.max_pool`; with
  `nnx.max_pool` there instead (the earlier code) the same parameters give the same logits, batch statistics and
  parameter gradients in training mode (float32: distinct positive maxima, so only the ReLU's zeros tie, whose
  gradient the ReLU discards). Odd sizes exercise the -inf padding at both ends of every axis."""
  from lungct.models import resnet3d
  model = ResNet3D(num_outputs=2, depth=10, width=4, stem_pool=True, rngs=nnx.Rngs(0))
  graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  params, stats = nnx.to_pure_dict(params), nnx.to_pure_dict(stats)
  x = jax.random.normal(jax.random.PRNGKey(6), (2, 13, 14, 17, 1))
  g = jax.random.normal(jax.random.PRNGKey(7), (2, 2))
  calls = []

  def loss(p):
    m = nnx.merge(graphdef, p, stats)
    logits = m(x, train=True)
    return jnp.sum(logits * g), (logits, nnx.to_pure_dict(nnx.state(m, nnx.BatchStat)))

  def run():
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

  def counted(pool):
    def f(*args, **kwargs):
      calls.append(pool)
      return pool(*args, **kwargs)
    return f

  monkeypatch.setattr(resnet3d.common, "max_pool", counted(common.max_pool))
  (_, (logits, new_stats)), grads = run()
  monkeypatch.setattr(resnet3d.common, "max_pool",
                      counted(lambda a, w, strides, padding: nnx.max_pool(a, w, strides=strides, padding=padding)))
  (_, (logits_ref, stats_ref)), grads_ref = run()
  assert len(calls) == 2 and calls[0] is not calls[1]   # each path pooled the stem once
  np.testing.assert_array_equal(logits, logits_ref)
  for a, b in zip(jax.tree.leaves(new_stats), jax.tree.leaves(stats_ref)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    assert float(np.max(np.abs(b))) > 0
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(np.max(np.abs(b))))


@pytest.mark.parametrize("k,padding", [(2, "SAME"), (2, "VALID"), (3, "SAME"), ((2, 1, 2), "SAME")])
def test_conv_transpose_as_matmul_matches_lax(k, padding):
  """The U-Net's up-convolution (kernel == stride) as one matmul: lax.conv_transpose's outputs and gradients."""
  k = (k,) * 3 if isinstance(k, int) else k
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 4, 5, 6))
  layer = common.ConvTranspose(6, 5, k, k, padding=padding, rngs=nnx.Rngs(0))
  layer.bias.value = jax.random.normal(jax.random.PRNGKey(2), (5,))

  def run(as_matmul):
    layer.as_matmul = as_matmul
    graphdef, params = nnx.split(layer, nnx.Param)
    f = lambda p, a: nnx.merge(graphdef, p)(a)  # noqa: E731
    y = f(params, x)
    g = jax.random.normal(jax.random.PRNGKey(1), y.shape)
    grads = jax.grad(lambda p, a: jnp.sum(f(p, a) * g), argnums=(0, 1))(params, x)
    return y, grads

  y_ref, g_ref = run(False)
  y, g = run(True)
  assert layer._matmul_ok(x) and y.shape == (2, 3 * k[0], 4 * k[1], 5 * k[2], 5)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
  # A window that overlaps its neighbour (kernel 3, stride 2) is not a matmul: lax.conv_transpose runs.
  overlapping = common.ConvTranspose(6, 5, (3, 3, 3), (2, 2, 2), rngs=nnx.Rngs(0))
  overlapping.as_matmul = True
  assert not overlapping._matmul_ok(x)
