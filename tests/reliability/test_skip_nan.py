"""config.train.on_nan="skip": a non-finite step leaves params, optimizer state and BN stats untouched."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tests.helpers import tiny_config
from lungct import train
from lungct.tasks import classify


def test_skip_keeps_state_on_a_nan_batch_and_counts_it(tmp_path):
  c = tiny_config(tmp_path, **{"train.on_nan": "skip", "data.shape": (46, 46, 46),
                               "augment.enabled": False})
  graphdef, state, tx = train.create_state(c, 10)
  step = jax.jit(lambda s, x, y, k: train.train_step(graphdef, tx, classify, c, s, {"image": x, "target": y}, k))
  key, labels = jax.random.PRNGKey(0), jnp.asarray([0, 1, 0, 1])
  images = jax.random.uniform(jax.random.PRNGKey(1), (4, 46, 46, 46, 1))
  bad = images.at[2, 5, 5, 5, 0].set(jnp.nan)
  before = jax.tree.map(np.asarray, state)
  s1, m1 = step(state, bad, labels, key)
  assert int(m1["nonfinite"]) == 1 and not np.isfinite(float(m1["loss"]))
  assert int(s1["step"]) == 1
  for name in ("params", "batch_stats", "opt_state"):
    for a, b in zip(jax.tree.leaves(before[name]), jax.tree.leaves(s1[name])):
      assert np.array_equal(a, np.asarray(b)), name
  s2, m2 = step(s1, images, labels, key)
  assert int(m2["nonfinite"]) == 0 and np.isfinite(float(m2["loss"]))
  assert any(not np.array_equal(a, np.asarray(b))
             for a, b in zip(jax.tree.leaves(before["params"]), jax.tree.leaves(s2["params"])))
  logged = train._window_metrics([m1, m2])
  assert logged["train/skipped_steps"] == 1.0 and logged["train/loss"] == float(m2["loss"])
