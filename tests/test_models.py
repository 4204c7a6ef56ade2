"""Tests for lungct.models: shapes, parameter counts, modes, remat, dtypes."""
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lungct.models import CNN3D, MODELS, ResNet3D, count_params, create_model
from lungct.models import cnn3d as cnn3d_lib


def _cnn_cfg(**kw) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(dict(
      name="cnn3d", features=(4, 4, 8, 8), dense=16, dropout=0.5, remat=False))
  cfg.update(kw)
  return cfg


def _resnet_cfg(**kw) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(dict(
      name="resnet3d", depth=18, width=16, dropout=0.5, remat=False))
  cfg.update(kw)
  return cfg


def _volume(shape, seed=0) -> jax.Array:
  return jax.random.uniform(jax.random.key(seed), shape, jnp.float32)


def _small_cnn(**kw) -> nnx.Module:
  return create_model(_cnn_cfg(**kw), num_outputs=3, rngs=nnx.Rngs(0))


# ---------------------------------------------------------------- shapes


def test_registry_names_and_unknown_name():
  from lungct.models.unet3d import UNet3D
  assert MODELS == {"cnn3d": CNN3D, "resnet3d": ResNet3D, "unet3d": UNet3D}
  with pytest.raises(ValueError, match="unet9d"):
    create_model(_cnn_cfg(name="unet9d"), num_outputs=1, rngs=nnx.Rngs(0))


def test_cnn3d_output_shape_valid_padding():
  model = _small_cnn()
  # VALID: 46 -> conv 44 -> pool 22 -> 20 -> 10 -> 8 -> 4 -> 2 -> 1 voxel left.
  logits = nnx.jit(lambda m, x: m(x, train=False))(model, _volume((2, 46, 48, 48, 1)))
  assert logits.shape == (2, 3) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))


def test_cnn3d_min_input_size_and_error():
  # Invert one block: after pool n voxels need >= 2n before it, +2 before a VALID conv.
  # 1 -> 4 -> 10 -> 22 -> 46 for four blocks.
  assert cnn3d_lib.min_input_size(4, "VALID") == 46
  assert cnn3d_lib.min_input_size(4, "SAME") == 16
  model = _small_cnn()
  assert model(_volume((1, 46, 46, 46, 1)), train=False).shape == (1, 3)
  with pytest.raises(ValueError, match=r"\(1, 45, 46, 46, 1\).*padding='SAME'"):
    model(_volume((1, 45, 46, 46, 1)), train=False)


def test_cnn3d_same_padding_runs_at_default_data_shape():
  model = _small_cnn(padding="SAME")
  assert model(_volume((2, 32, 64, 64, 1)), train=False).shape == (2, 3)


def test_resnet18_output_shape():
  # Traced only (building and compiling a ResNet-18 costs ~10 s of CPU here);
  # ResNet-10 runs for real in the remat and split/merge tests below.
  # 32^3 -> stem (1,2,2): 32x16x16 -> pool 16x8x8 -> stages 16x8x8, 8x4x4, 4x2x2, 2x1x1.
  abstract = nnx.eval_shape(
      lambda: create_model(_resnet_cfg(), num_outputs=2, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  for train in (False, True):
    logits, _ = jax.eval_shape(
        lambda st, x: (nnx.merge(graphdef, st)(x, train=train), st), state,
        jax.ShapeDtypeStruct((2, 32, 32, 32, 1), jnp.float32))
    assert logits.shape == (2, 2) and logits.dtype == jnp.float32


# ---------------------------------------------------------------- parameter counts


def test_tutorial_cnn_parameter_count():
  # Keras tutorial model, input 128x128x64x1 (ours: 64x128x128x1; the count does not
  # depend on the input size because of the global average pool).
  #   Conv3D 1->64:    3*3*3*1*64   + 64  =   1,792    BatchNorm(64):  4*64  =   256
  #   Conv3D 64->64:   3*3*3*64*64  + 64  = 110,656    BatchNorm(64):          256
  #   Conv3D 64->128:  3*3*3*64*128 + 128 = 221,312    BatchNorm(128): 4*128 =   512
  #   Conv3D 128->256: 3*3*3*128*256+ 256 = 884,992    BatchNorm(256): 4*256 = 1,024
  #   Dense 256->512:  256*512 + 512      = 131,584
  #   Dense 512->1:    512 + 1            =     513
  # Total (Keras "Total params", BN moving mean/var included) = 1,352,897,
  # of which the BN moving statistics 2*(64+64+128+256) = 1,024 are non-trainable:
  # trainable 1,351,873. (The brief quoted 1,334,337; the layer shapes give 1,352,897.)
  model = CNN3D(num_outputs=1, features=(64, 64, 128, 256), dense=512,
                dropout=0.3, rngs=nnx.Rngs(0))
  assert count_params(model) == 1_351_873
  assert count_params(model, include_batch_stats=True) == 1_352_897
  out = jax.eval_shape(lambda x: model(x, train=False),
                       jax.ShapeDtypeStruct((2, 64, 128, 128, 1), jnp.float32))
  assert out.shape == (2, 1)


def _resnet18_hand_count(w: int, cin: int, nout: int) -> int:
  conv = lambda k, i, o: k ** 3 * i * o  # no bias
  bn = lambda c: 2 * c                   # scale + bias (trainable only)
  n = conv(7, cin, w) + bn(w)            # stem
  in_f = w
  for stage in range(4):
    planes = w * 2 ** stage
    for i in range(2):
      n += conv(3, in_f, planes) + bn(planes) + conv(3, planes, planes) + bn(planes)
      if in_f != planes:               # first block of stages 2..4: projection
        n += conv(1, in_f, planes) + bn(planes)
      in_f = planes
  return n + in_f * nout + nout          # Dense head


def test_resnet18_parameter_count():
  # width 16: stem 5,488+32; stage1 4*(6,912+32)=27,776; stage2 42,176+55,424=97,600;
  # stage3 168,320+221,440=389,760; stage4 672,512+885,248=1,557,760; head 129.
  assert _resnet18_hand_count(16, 1, 1) == 2_078_545
  # Abstract (shape-only) models: eager init of a ResNet-18 costs seconds on CPU.
  model = nnx.eval_shape(
      lambda: ResNet3D(num_outputs=1, depth=18, width=16, rngs=nnx.Rngs(0)))
  assert count_params(model) == 2_078_545
  # width 64: torchvision r3d_18 has 33,371,472 params with a (3,7,7) 3-channel stem
  # (28,224) and a 400-way fc (205,200); ours has a 7^3 1-channel stem (21,952) and a
  # 1-way head (513): 33,371,472 - 28,224 - 205,200 + 21,952 + 513 = 33,160,513.
  abstract = nnx.eval_shape(
      lambda: ResNet3D(num_outputs=1, depth=18, width=64, rngs=nnx.Rngs(0)))
  assert count_params(abstract) == _resnet18_hand_count(64, 1, 1) == 33_160_513


# ---------------------------------------------------------------- train vs eval


def test_dropout_only_with_train_and_key():
  model = _small_cnn()
  x = _volume((2, 46, 46, 46, 1))
  ref = model(x, train=False)
  np.testing.assert_array_equal(model(x, train=False), ref)  # eval is deterministic
  k1, k2 = jax.random.key(1), jax.random.key(2)
  graphdef, state = nnx.split(model)

  def train_call(key):  # fresh copy each time: train mode updates BN stats
    return nnx.merge(graphdef, state)(x, train=True, dropout_key=key)

  no_key = train_call(None)
  np.testing.assert_array_equal(train_call(None), no_key)   # no key: no dropout
  np.testing.assert_array_equal(train_call(k1), train_call(k1))
  assert not np.allclose(train_call(k1), no_key)            # dropout changed it
  assert not np.allclose(train_call(k1), train_call(k2))


def test_batchnorm_train_updates_stats_and_eval_uses_them():
  model = _small_cnn()
  x = _volume((2, 46, 46, 46, 1))
  block = model.blocks[0]
  z = nnx.max_pool(nnx.relu(block.conv(x)), (2, 2, 2), strides=(2, 2, 2))
  np.testing.assert_array_equal(block.bn.mean[...], 0.0)
  model(x, train=False)
  np.testing.assert_array_equal(block.bn.mean[...], 0.0)    # eval: stats untouched
  model(x, train=True)
  # Keras momentum 0.99: new = 0.99 * 0 + 0.01 * batch mean; var from 1.
  np.testing.assert_allclose(block.bn.mean[...], 0.01 * z.mean((0, 1, 2, 3)), rtol=1e-5)
  np.testing.assert_allclose(block.bn.var[...], 0.99 + 0.01 * z.var((0, 1, 2, 3)),
                             rtol=1e-5)
  # Eval normalises with the running statistics (epsilon 1e-3), not the batch's.
  block.bn.mean[...] = jnp.full((4,), 0.25)
  block.bn.var[...] = jnp.full((4,), 4.0)
  expected = (z - 0.25) / np.sqrt(4.0 + 1e-3)
  np.testing.assert_allclose(block(x, train=False), expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- remat


def test_remat_same_logits_and_gradients():
  cfg, x = _resnet_cfg(depth=10, width=8), _volume((2, 8, 16, 16, 1))
  results = []
  for remat in (False, True):
    cfg.remat = remat
    model = create_model(cfg, num_outputs=1, rngs=nnx.Rngs(0))
    graphdef, params, bs = nnx.split(model, nnx.Param, nnx.BatchStat)

    def loss_fn(p, bs, graphdef=graphdef):
      # copy=True: fresh Variables at this trace level, so BN may update them.
      m = nnx.merge(graphdef, p, bs, copy=True)
      logits = m(x, train=True, dropout_key=jax.random.key(3))
      return jnp.sum(logits ** 2), (logits, nnx.state(m, nnx.BatchStat))

    grads, (logits, new_bs) = jax.jit(jax.grad(loss_fn, has_aux=True))(params, bs)
    results.append((logits, grads, new_bs))
  (l0, g0, b0), (l1, g1, b1) = results
  np.testing.assert_allclose(l1, l0, rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(g0["stem_conv"]["kernel"][...]).max()) > 0
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  jax.tree.map(close, g1, g0)
  jax.tree.map(close, b1, b0)


def test_cnn3d_remat_same_logits_and_batch_stats():
  # Same code path (common.apply_block) as above; forward only to keep compiles cheap.
  x = _volume((2, 46, 46, 46, 1))
  fwd = nnx.jit(lambda m, x: m(x, train=True))
  plain, remat = _small_cnn(), _small_cnn(remat=True)
  np.testing.assert_allclose(fwd(remat, x), fwd(plain, x), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(remat.blocks[3].bn.var[...], plain.blocks[3].bn.var[...],
                             rtol=1e-5)


# ---------------------------------------------------------------- dtype


def test_bfloat16_compute_float32_params():
  x = _volume((2, 46, 46, 46, 1))
  f32 = create_model(_cnn_cfg(), num_outputs=2, dtype=jnp.float32, rngs=nnx.Rngs(0))
  bf16 = create_model(_cnn_cfg(), num_outputs=2, dtype="bfloat16", rngs=nnx.Rngs(0))
  for leaf in jax.tree.leaves(nnx.state(bf16, nnx.Param)):
    assert leaf.dtype == jnp.float32
  ref, out = f32(x, train=False), bf16(x, train=False)
  assert out.dtype == jnp.float32
  assert not np.array_equal(out, ref)                       # really computed in bf16
  np.testing.assert_allclose(out, ref, rtol=5e-2, atol=5e-2)


# ---------------------------------------------------------------- functional API


def test_split_merge_roundtrip_inside_jit():
  model = create_model(_resnet_cfg(depth=10, width=8), num_outputs=1, rngs=nnx.Rngs(0))
  graphdef, params, bs = nnx.split(model, nnx.Param, nnx.BatchStat)
  x = _volume((2, 16, 32, 32, 1))

  @jax.jit
  def step(params, bs, x):
    m = nnx.merge(graphdef, params, bs)
    logits = m(x, train=True)
    return logits, nnx.state(m, nnx.BatchStat)

  logits, new_bs = step(params, bs, x)
  assert logits.shape == (2, 1)
  assert jax.tree.structure(new_bs) == jax.tree.structure(bs)
  old, new = jax.tree.leaves(bs), jax.tree.leaves(new_bs)
  assert all(o.shape == n.shape for o, n in zip(old, new))
  assert any(not np.allclose(o, n) for o, n in zip(old, new))
  # The stem BN's running mean moved from 0 to 0.1 * batch mean (momentum 0.9).
  z = model.stem_conv(x)
  np.testing.assert_allclose(new_bs["stem_bn"]["mean"][...],
                             0.1 * z.mean((0, 1, 2, 3)), rtol=1e-4, atol=1e-6)
  # The original model object is untouched by the functional call.
  np.testing.assert_array_equal(model.stem_bn.mean[...], 0.0)


@pytest.mark.parametrize("init", [nnx.initializers.variance_scaling(2.0, "fan_out", "normal"),
                                  nnx.initializers.glorot_uniform(), nnx.initializers.lecun_normal()])
def test_kernel_init_draws_the_full_shape_values_on_a_3d_view(init):
  """common.kernel_init (a fast-compiling 3-D draw) gives exactly the values and fans of the 5-D draw."""
  from lungct.models import common
  key = jax.random.key(7)
  for shape in [(3, 3, 3, 8, 16), (1, 1, 1, 16, 32), (7, 7, 7, 1, 64), (2, 2, 2, 32, 16)]:
    want = init(key, shape, jnp.float32)
    got = common.kernel_init(init)(key, shape, jnp.float32)
    assert got.shape == shape
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  other = common.kernel_init(init)(jax.random.key(8), (3, 3, 3, 8, 16), jnp.float32)
  assert float(jnp.abs(other - init(key, (3, 3, 3, 8, 16), jnp.float32)).max()) > 0.1  # the key matters
  assert common.kernel_init(init)(key, (8, 16), jnp.float32).shape == (8, 16)         # 2-D kernels as they are


@pytest.mark.parametrize("model", [
    {"name": "resnet3d", "depth": 10, "width": 8, "stem_kernel": 3, "stem_stride": (1, 1, 1), "stem_pool": False},
    {"name": "cnn3d", "features": (16, 16, 32, 64), "dense": 128},
    {"name": "unet3d", "features": (8, 16, 32)}])
def test_init_variables_compiled_faster_gives_the_same_bits(model, monkeypatch):
  """runtime.init_variables compiles at -O1 on the CPU (INIT_COMPILER_OPTIONS): the values are those of the
  default -O2 compile, bit for bit."""
  from lungct import runtime
  cfg = ml_collections.ConfigDict({"seed": 1, "dtype": "float32", "model": ml_collections.ConfigDict(model)})
  assert runtime.INIT_COMPILER_OPTIONS.get(jax.default_backend()), "the case is for the CPU's -O1 init"
  fast = runtime.init_variables(cfg, 2)
  monkeypatch.setattr(runtime, "INIT_COMPILER_OPTIONS", {})
  default = runtime.init_variables(cfg, 2)
  jax.tree.map(np.testing.assert_array_equal, fast.params, default.params)
  jax.tree.map(np.testing.assert_array_equal, fast.batch_stats, default.batch_stats)


def test_init_variables_is_seeded_and_equals_the_eager_model():
  """runtime.init_variables (one jitted init) equals building the model eagerly with the same seed (within a
  few float32 ulps: jitted, the initialiser's scale multiply may be fused differently)."""
  from lungct import runtime
  cfg = ml_collections.ConfigDict({"seed": 3, "dtype": "float32", "model": ml_collections.ConfigDict(
      {"name": "resnet3d", "depth": 10, "width": 4, "stem_kernel": 3, "stem_stride": (1, 1, 1),
       "stem_pool": False})})
  v = runtime.init_variables(cfg, 2)
  eager = create_model(cfg.model, num_outputs=2, rngs=nnx.Rngs(params=3))
  _, params, stats = nnx.split(eager, nnx.Param, nnx.BatchStat)
  close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=0)
  jax.tree.map(close, v.params, nnx.to_pure_dict(params))
  jax.tree.map(np.testing.assert_array_equal, v.batch_stats, nnx.to_pure_dict(stats))
  assert nnx.graphdef(eager) == v.graphdef
  cfg.seed = 4
  assert not np.array_equal(np.asarray(runtime.init_variables(cfg, 2).params["head"]["kernel"]),
                            np.asarray(v.params["head"]["kernel"]))
