"""Spatial partitioning: a (data=2, space=4) mesh of 8 virtual CPU devices gives the 1-device numbers.

Each model is run through a small jitted SGD step (not train.py's) once on one device and once under
`jax.set_mesh` of a (2, 4) mesh with the images sharded P("data", "space"): loss, gradient norm, updated
parameters and BatchNorm statistics must be as close to the float64 one-device step as the float32 one-device
step is, within a factor 16 (tests/float_noise.py derives the bound; the float32 noise is measured in the same
run, so the bound follows the CPU's kernels and ISA: the test passes natively, with ONEDNN_MAX_CPU_ISA=AVX2 and
with XLA_FLAGS=--xla_cpu_max_isa=AVX2, and a halo or shard defect exceeds it by orders of magnitude), the
compiled step must exchange halos with collective-permute, and the activations must be split (below). The U-Net
also runs sliding-window inference with a spatially sharded predictor. Runs in a subprocess because the device
count is fixed when JAX starts and the other tests use one device.

The memory bound. A step's temporary memory (XLA `memory_analysis().temp_size_in_bytes`, per device) is a fixed
part that does not grow with the input (the gradients of the replicated parameters, their all-reduce buffers, the
halo slices: one to three slices per convolution whatever the depth) plus the activations, which grow in
proportion to the input. The step is therefore also compiled (not run) for an input of three times the depth, and
only the growth is compared: the growth on one device, d1, is activation memory alone (the parameters are the
same), and on the (2, 4) mesh each device holds half the batch and a quarter of the depth, so its growth d8 is
ideally d1 / 8 = d1 / (data * space); if the depth stopped being split (the batch alone split over "data") it
would be d1 / 2 = space x the ideal. The partitioned step may hold more than the ideal per device (XLA keeps
halo-extended copies: for the ResNet's stem pool, three copies of each device's padded pre-pool shard where the
one-device step keeps three of the depth-pooled output), so the bound allows (space - 1) x the ideal:
d8 < 3 d1 / 8. Measured (jax 0.10.2 CPU): d8 / d1 = 0.125 CNN, 0.204 ResNet (0.126 with the stem pooled by
nnx.max_pool), 0.136 U-Net; 0.50, 0.56, 0.50 with `constrain_spatial` a no-op and the input split over "data"
only, which fails it (a partial split passes: with `constrain_spatial` a no-op but the input still split, XLA's
propagation alone gives the CNN 0.295). The growth is taken over three times the depth, not two, because XLA's buffer assignment
makes the temporary size a step function of the input: from 32 to 64 slices the ResNet read 0.265, from 64 to 96
0.146. A ratio of the total temporary memories instead mixes in the fixed part: for this small ResNet (231 kB of
parameters) it reads 0.42 split against 0.60 not split, and it moved from 0.27 to 0.40 when the stem's max-pool
got cheaper (the one-device step lost select_and_scatter's workspace, the fixed part stayed).
"""
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import functools, sys, traceback
    import jax
    jax.config.update("jax_enable_x64", True)   # for the float64 reference; the float32 runs stay float32 (checked)
    import jax.numpy as jnp, numpy as np, optax
    from flax import nnx
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from lungct import sharding
    from lungct.models import CNN3D, ResNet3D, UNet3D, numpy_variables
    from tests import float_noise
    assert jax.device_count() == 8, jax.devices()
    LR = 0.1
    SEED = int(sys.argv[1])
    to64 = lambda t: jax.tree.map(lambda a: np.asarray(a, np.float64), t)

    def no_f64_math(compiled):   # float32 all through despite x64 being on
      wide = [l for l in compiled.as_text().splitlines() if ("convolution(" in l or " dot(" in l) and "f64" in l]
      assert not wide, wide[:3]

    def check(name):
      # CNN: VALID convs, depths 40 -> 38 -> 19 -> 17 -> 8 -> 6 -> 3 (uneven splits included).
      shape = {"cnn3d": (4, 40, 24, 24, 1)}.get(name, (4, 32, 16, 16, 1))
      def build(dtype=jnp.float32):
        if name == "cnn3d":
          return CNN3D(num_outputs=1, features=(4, 8, 8), dense=8, dropout=0.3, dtype=dtype, rngs=nnx.Rngs(0))
        if name == "resnet3d":
          return ResNet3D(num_outputs=1, depth=10, width=4, dtype=dtype, rngs=nnx.Rngs(0))
        return UNet3D(num_outputs=1, features=(4, 8, 16), dtype=dtype, rngs=nnx.Rngs(0))

      # Shapes only, values from numpy (He-normal kernels, BN scale/var 1, the rest 0): compiling the models' own
      # random initialisers takes ~30 s of CPU per model here, for nothing this test needs.
      rng = np.random.default_rng(SEED)
      graphdef, params, stats = numpy_variables(build, rng)
      graphdef64 = numpy_variables(lambda: build(jnp.float64), np.random.default_rng(0))[0]
      images = rng.standard_normal(shape, dtype=np.float32)
      if name == "unet3d":
        labels = (images[..., 0] > 0.5).astype(np.float32)[..., None]
      else:
        labels = np.array([0, 1, 1, 0], np.float32)[:, None]

      def step(params, stats, x, y, key, graphdef=graphdef):
        def loss_fn(p):
          m = nnx.merge(graphdef, p, stats)
          logits = m(x, train=True, dropout_key=key)
          return (jnp.mean(optax.sigmoid_binary_cross_entropy(logits, y)),
                  nnx.to_pure_dict(nnx.state(m, nnx.BatchStat)))
        (loss, new_stats), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        new = jax.tree.map(lambda p, d: p - LR * d, params, g)   # SGD: linear in the gradient
        return loss, optax.global_norm(g), new, new_stats

      key = jax.random.PRNGKey(1 + SEED)
      one = jax.jit(step)
      one = one.lower(params, stats, images, labels, key).compile()   # compiled once, called once
      no_f64_math(one)
      l1, g1, p1, s1 = one(params, stats, images, labels, key)
      mem1 = one.memory_analysis().temp_size_in_bytes
      # The reference: the same step on one device in float64 (same draws: dropout keys do not depend on dtype).
      step64 = jax.jit(functools.partial(step, graphdef=graphdef64))
      l64, g64, p64, s64 = step64(to64(params), to64(stats), images.astype(np.float64), labels.astype(np.float64), key)

      mesh = Mesh(np.asarray(jax.devices()).reshape(2, 4), ("data", "space"))
      repl = NamedSharding(mesh, P())
      img_sh = NamedSharding(mesh, P("data", "space"))
      with jax.set_mesh(mesh):
        assert sharding.space_size() == 4
        spatial = jax.jit(step, in_shardings=(repl, repl, img_sh,
                                              img_sh if name == "unet3d" else NamedSharding(mesh, P("data")), repl),
                          out_shardings=(repl, repl, repl, repl))
        x = jax.device_put(images, img_sh)
        assert len(x.addressable_shards) == 8 and x.addressable_shards[0].data.shape == (2, shape[1] // 4, *shape[2:])
        compiled = spatial.lower(params, stats, x, labels, key).compile()
        no_f64_math(compiled)
        l8, g8, p8, s8 = compiled(params, stats, x, labels, key)
      hlo = compiled.as_text()
      mem8 = compiled.memory_analysis().temp_size_in_bytes
      print(name, "loss", float(l1), float(l8), "grad norm", float(g1), float(g8))
      print(name, "temp bytes per device: 1 device", mem1, "(2, 4) mesh", mem8, "ratio", mem8 / mem1)
      # Each float32 result against the float64 reference, within 16x the one-device float32 error
      # (tests/float_noise.py derives the bound).
      worst = float_noise.check_trees(name + " loss, grad norm", [l1, g1], [l8, g8], [l64, g64])
      paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(p1)]
      worst = max(worst, float_noise.check_trees(name + " params", jax.tree.leaves(p1), jax.tree.leaves(p8),
                                                 jax.tree.leaves(p64), paths))
      worst = max(worst, float_noise.check_trees(name + " batch stats", jax.tree.leaves(s1), jax.tree.leaves(s8),
                                                 jax.tree.leaves(s64)))
      moved = [float(np.abs(np.asarray(r) - p0).max() / (np.abs(np.asarray(r)).max() + 1e-30))
               for r, p0 in zip(jax.tree.leaves(p64), jax.tree.leaves(params))]
      assert min(moved) > 100 * float_noise.U32, "a parameter did not move: the check would see nothing there"
      # Halo exchange between depth neighbours, and the activations really are split (not gathered).
      assert "collective-permute" in hlo, "no halo exchange in the partitioned step"
      # The activations are split over space: the growth of the per-device temporary memory for an input of three
      # times the depth (compiled only) is below (space - 1) / (data * space) of the one-device growth (see the
      # module docstring).
      deep = lambda a: jax.ShapeDtypeStruct((a.shape[0], 3 * a.shape[1], *a.shape[2:]), a.dtype)
      deep_labels = deep(labels) if name == "unet3d" else labels
      mem1_deep = jax.jit(step).lower(params, stats, deep(images), deep_labels, key).compile()
      mem1_deep = mem1_deep.memory_analysis().temp_size_in_bytes
      with jax.set_mesh(mesh):
        mem8_deep = spatial.lower(params, stats, deep(images), deep_labels, key).compile()
      mem8_deep = mem8_deep.memory_analysis().temp_size_in_bytes
      d1, d8 = mem1_deep - mem1, mem8_deep - mem8
      n_data, n_space = mesh.shape["data"], mesh.shape["space"]
      print(name, "temp bytes growth for 3x the depth: 1 device", d1, "(2, 4) mesh", d8, f"ratio {d8 / d1:.3f}",
            f"(ideal 1/{n_data * n_space}, 1/{n_data} without the depth split, bound {n_space - 1}/{n_data * n_space})")
      assert d1 > mem1, (d1, mem1)   # activations dominate the one-device step: the growth measures them
      assert d8 < (n_space - 1) / (n_data * n_space) * d1, (d8, d1)

      if name == "unet3d":   # sliding-window inference with a depth-split predictor equals the 1-device one
        from lungct.inferers import sliding_window_inference
        def predict(p, s, x):
          return jax.nn.sigmoid(nnx.merge(graphdef, p, s)(x, train=False))
        volume = rng.standard_normal((1, 40, 20, 20, 1), dtype=np.float32)
        roi, windows = (16, 16, 16), jax.ShapeDtypeStruct((2, 16, 16, 16, 1), jnp.float32)
        pred1 = jax.jit(predict).lower(p1, s1, windows).compile()
        ref = sliding_window_inference(lambda w: pred1(p1, s1, w), volume, roi, 0.25, sw_batch_size=2)
        with jax.set_mesh(mesh):
          pred8 = jax.jit(predict, in_shardings=(repl, repl, img_sh), out_shardings=img_sh).lower(
              p1, s1, windows).compile()
          assert "collective-permute" in pred8.as_text()
          out = sliding_window_inference(lambda w: pred8(p1, s1, jax.device_put(w, img_sh)), volume, roi, 0.25,
                                         sw_batch_size=2)
        g64_, p64_, s64_ = graphdef64, to64(p1), to64(s1)
        pred64 = jax.jit(lambda p, s, x: jax.nn.sigmoid(nnx.merge(g64_, p, s)(x, train=False)))
        ref64 = sliding_window_inference(lambda w: pred64(p64_, s64_, np.asarray(w, np.float64)), volume, roi, 0.25,
                                         sw_batch_size=2)
        print(name, "sliding window max |diff|", float(np.abs(out - ref).max()))
        assert out.shape == (1, 40, 20, 20, 1)
        worst = max(worst, float_noise.check_trees(name + " sliding window", [ref], [out], [ref64]))
      print(name, f"WORST {worst:.4f}")
    for name in sys.argv[2:]:
      try:
        check(name)
        print("OK", name)
      except Exception:
        print("FAILED", name, traceback.format_exc())
""")


SEED = os.environ.get("LUNGCT_TEST_SEED", "0")   # another seed: LUNGCT_TEST_SEED=1 python -m pytest ...


def _run(*args):
  """XLA_FLAGS from the environment are kept (e.g. --xla_cpu_max_isa=AVX2 runs the test on AVX2 code)."""
  env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"),
             JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, "-c", SCRIPT, SEED, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)


MODELS = ("cnn3d", "resnet3d", "unet3d")


@pytest.fixture(scope="module")
def spatial_run():
  """One subprocess (one JAX start) checks every model; each test reads its model's lines."""
  return _run(*MODELS)


@pytest.mark.parametrize("name", MODELS)
def test_space_split_matches_one_device(spatial_run, name):
  out = spatial_run
  lines = [l for l in out.stdout.splitlines() if l.split(" ")[:1] == [name] or l.startswith(("OK " + name,
                                                                                              "FAILED " + name))]
  assert f"OK {name}" in out.stdout, out.stdout[-6000:] + out.stderr[-3000:]
  print("\n".join(lines))


def test_constrain_spatial_is_a_noop_without_a_space_axis():
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh
  from lungct import sharding
  x = jnp.ones((2, 8, 4, 4, 1))
  assert sharding.space_size() == 1 and sharding.constrain_spatial(x) is x
  mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "space"))
  with jax.set_mesh(mesh):
    assert sharding.space_size() == 1 and sharding.spatial_spec(x) is None
    assert sharding.constrain_spatial(x) is x
  data_only = Mesh(np.asarray(jax.devices()[:1]), ("data",))
  with jax.set_mesh(data_only):
    assert sharding.spatial_spec(x) is None


def test_spatial_spec_rules():
  """Batch over data when it divides; depth over space only with >= 2 slices per device (see lungct/sharding.py)."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P
  from lungct import sharding
  vol = lambda b, d: jax.ShapeDtypeStruct((b, d, 8, 8, 1), jnp.float32)
  auto = AbstractMesh((2, 4), ("data", "space"))
  assert sharding.space_size(auto) == 4
  assert sharding.spatial_spec(vol(4, 32), auto) == P("data", "space", None, None, None)
  assert sharding.spatial_spec(vol(4, 9), auto) == P("data", "space", None, None, None)   # uneven: XLA pads
  assert sharding.spatial_spec(vol(4, 4), auto) == P("data", None, None, None, None)     # 1 slice per device
  assert sharding.spatial_spec(vol(3, 32), auto) == P(None, "space", None, None, None)   # odd batch
  explicit = AbstractMesh((2, 4), ("data", "space"), axis_types=(AxisType.Explicit,) * 2)
  assert sharding.spatial_spec(vol(4, 32), explicit) == P("data", "space", None, None, None)
  assert sharding.spatial_spec(vol(4, 34), explicit) == P("data", None, None, None, None)  # reshard needs even


@pytest.mark.parametrize("name", ["fullres_unet", "fullres_resnet"])
def test_fullres_configs_are_valid_and_split_depth(name):
  """The full-resolution configs pass the config checks on 8 devices and their input is split over space."""
  import importlib
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from jax.sharding import AbstractMesh
  from lungct import config_check, models, sharding, tasks
  c = importlib.import_module(f"configs.{name}").get_config()
  assert c.dtype == "bfloat16" and c.model.remat and c.mesh.space > 1
  spacing = c.data.target_spacing
  assert all(1.0 <= s <= 1.5 for s in spacing) and len(set(spacing)) == 1   # isotropic 1.0-1.5 mm
  devices = 8
  task = tasks.get(c)
  config_check.validate(c, num_devices=devices // c.mesh.space, task_errors=task.check(c),
                        input_shape=task.input_shape(c))
  abstract = nnx.eval_shape(lambda: models.create_model(c.model, num_outputs=1, dtype=jnp.bfloat16,
                                                        rngs=nnx.Rngs(0)))
  params = nnx.state(abstract, nnx.Param)
  assert sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)) > 1e6
  mesh = AbstractMesh((devices // c.mesh.space, c.mesh.space), ("data", "space"))
  x = jax.ShapeDtypeStruct((c.train.batch_size, *c.data.shape, 1), jnp.bfloat16)
  assert sharding.spatial_spec(x, mesh)[1] == "space"
