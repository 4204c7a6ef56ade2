"""lungct.models.common.BatchNorm (training-mode normalisation with a written-out gradient) against nnx.BatchNorm."""
from __future__ import annotations

from flax import nnx
import jax.numpy as jnp
import numpy as np
import pytest

from lungct.models import common


def _pair(features, seed):
  rng = np.random.default_rng(seed)
  scale, bias = rng.uniform(0.5, 2.0, features), rng.normal(size=features)
  out = []
  for cls in (nnx.BatchNorm, common.BatchNorm):
    bn = cls(features, momentum=0.9, epsilon=1e-5, rngs=nnx.Rngs(0))
    bn.scale[...], bn.bias[...] = jnp.asarray(scale, jnp.float32), jnp.asarray(bias, jnp.float32)
    out.append(bn)
  return out


@pytest.mark.parametrize("seed", [0, 1])
def test_training_step_values_gradients_and_running_stats_equal_nnx(seed):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(3, 4, 5, 6, 7)) * 2.5 + 1.0, jnp.float32)
  weights = jnp.asarray(rng.normal(size=(3, 4, 5, 6, 7)), jnp.float32)

  def loss(bn, x):
    y = bn(x, use_running_average=False)
    return jnp.sum(jnp.sin(y) * weights), y
  results = []
  for bn in _pair(7, seed):
    (value, y), (g_bn, g_x) = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(bn, x)
    results.append((value, y, g_x, g_bn.scale[...], g_bn.bias[...], bn.mean[...], bn.var[...]))
  ref, new = results
  assert not isinstance(_pair(7, seed)[0], common.BatchNorm)
  for r, n in zip(ref, new):
    np.testing.assert_allclose(n, r, rtol=2e-5, atol=2e-5 * float(jnp.max(jnp.abs(r))))
  # The running statistics moved to 0.9 * (0, 1) + 0.1 * (batch mean, batch variance).
  xf = np.asarray(x, np.float64).reshape(-1, 7)
  np.testing.assert_allclose(new[5], 0.1 * xf.mean(0), rtol=1e-5)
  np.testing.assert_allclose(new[6], 0.9 + 0.1 * xf.var(0), rtol=1e-5)


def test_gradient_by_hand_and_eval_mode_is_nnx():
  """d/dx of sum(w * BN(x)) over one feature: scale / sigma * (w - mean(w) - x_hat * mean(w * x_hat))."""
  x = jnp.asarray([1.0, 2.0, 4.0, 7.0], jnp.float32).reshape(4, 1)
  w = jnp.asarray([1.0, -1.0, 2.0, 0.5], jnp.float32).reshape(4, 1)
  _, bn = _pair(1, 0)
  bn.scale[...] = jnp.asarray([2.0])
  g = nnx.grad(lambda bn, x: jnp.sum(w * bn(x, use_running_average=False)), argnums=1)(bn, x)
  xs, ws = np.array([1.0, 2.0, 4.0, 7.0]), np.array([1.0, -1.0, 2.0, 0.5])
  sigma = np.sqrt(xs.var() + 1e-5)
  x_hat = (xs - xs.mean()) / sigma
  expected = 2.0 / sigma * (ws - ws.mean() - x_hat * np.mean(ws * x_hat))
  np.testing.assert_allclose(np.asarray(g)[:, 0], expected, rtol=1e-5)
  ref, new = _pair(3, 2)
  y = jnp.asarray(np.random.default_rng(3).normal(size=(2, 3, 3)), jnp.float32)
  np.testing.assert_array_equal(new(y, use_running_average=True), ref(y, use_running_average=True))


@pytest.mark.parametrize("offset", [0.0, 30.0, 300.0])
def test_gradient_as_accurate_as_nnx_when_the_mean_dwarfs_the_spread(offset):
  """The backward pass sums g * x and subtracts mean * sum(g) (no x - mean is stored); with a mean `offset` times
  the standard deviation that difference cancels digits. Against the float64 formula its float32 error stays
  within a few times nnx.BatchNorm's own (which autodiff computes through x - mean)."""
  rng = np.random.default_rng(7)
  x64 = rng.normal(size=(8, 8, 8, 8, 4)) + offset
  w64 = rng.normal(size=x64.shape)
  xs, ws = x64.reshape(-1, 4), w64.reshape(-1, 4)
  sigma = np.sqrt(xs.var(0) + 1e-5)
  x_hat = (xs - xs.mean(0)) / sigma
  scale = np.array([0.5, 1.0, 1.5, 2.0])
  expected = (scale / sigma * (ws - ws.mean(0) - x_hat * np.mean(ws * x_hat, 0))).reshape(x64.shape)
  errors = []
  for bn in _pair(4, 0):
    bn.scale[...] = jnp.asarray(scale, jnp.float32)
    g = nnx.grad(lambda bn, x: jnp.sum(jnp.asarray(w64, jnp.float32) * bn(x, use_running_average=False)),
                 argnums=1)(bn, jnp.asarray(x64, jnp.float32))
    errors.append(float(np.max(np.abs(np.asarray(g, np.float64) - expected))) / float(np.max(np.abs(expected))))
  ref, new = errors
  assert new <= 4 * ref + 1e-6, errors
