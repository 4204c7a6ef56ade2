"""Training: the loss goes down, resume is exact, checkpoints and metrics files appear, configs are checked."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from lungct import config_check, runtime, tasks, train
from tests.helpers import tiny_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


def _params(workdir, config):
  m = runtime.restore_for_inference(config, workdir, os.path.join(workdir, "checkpoints"),
                                    task_of=tasks.get)
  return m.step, jax.tree.map(np.asarray, m.variables.params)


def test_loss_goes_down_and_files_written(data_dir, tmp_path):
  c = tiny_config(data_dir)
  c.augment.enabled = False
  c.model.dropout = 0.0
  c.train.num_epochs = 0
  c.train.num_steps = 30
  c.train.eval_every_steps = 15
  c.train.log_every_steps = 5
  c.train.learning_rate = 3e-3
  summary = train.train_and_evaluate(c, str(tmp_path))
  records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  losses = [r["train/loss"] for r in records if "train/loss" in r]
  assert len(losses) == 6
  assert np.mean(losses[-2:]) < 0.8 * np.mean(losses[:2]), losses
  assert summary["steps"] == 30
  text = open(tmp_path / "metrics.json").read()
  assert "NaN" not in text and "Infinity" not in text  # strict JSON: undefined values are null, and it says so
  m = json.loads(text, parse_constant=lambda const: pytest.fail(f"non-strict JSON constant {const}"))
  assert "null" in m["note"]
  for key in ("accuracy", "sensitivity", "specificity", "roc_auc", "tp", "fp", "tn", "fn"):
    assert key in m["validation"] and key in m["test"]
  assert os.listdir(tmp_path / "tensorboard")
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["15", "30"]
  assert len(os.listdir(tmp_path / "best")) == 1
  took = m["time_s"]  # where the wall time went, by phase: together they are the run, each counted once
  assert set(took) == {"setup", "first_step", "train_steps", "evaluation", "checkpoints", "final_evaluation"}
  assert all(v > 0 for v in took.values()), took
  assert 0.8 * m["wall_time_s"] <= sum(took.values()) <= m["wall_time_s"] + 0.05, (took, m["wall_time_s"])


def test_resume_gives_identical_parameters(data_dir, tmp_path):
  base = dict(**{"train.num_epochs": 0, "train.checkpoint_every_steps": 4, "train.eval_every_steps": 100})
  c_full = tiny_config(data_dir, **base, **{"train.num_steps": 8})
  train.train_and_evaluate(c_full, str(tmp_path / "full"))
  c_half = tiny_config(data_dir, **base, **{"train.num_steps": 4})
  train.train_and_evaluate(c_half, str(tmp_path / "resumed"))
  train.train_and_evaluate(c_full, str(tmp_path / "resumed"))  # same command, longer: resumes at step 4
  step_a, pa = _params(str(tmp_path / "full"), c_full)
  step_b, pb = _params(str(tmp_path / "resumed"), c_full)
  assert step_a == step_b == 8
  for a, b in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    np.testing.assert_array_equal(a, b)


def test_resume_refuses_a_different_config(data_dir, tmp_path):
  c = tiny_config(data_dir, **{"train.num_epochs": 0, "train.num_steps": 2})
  train.train_and_evaluate(c, str(tmp_path))
  other = tiny_config(data_dir, **{"train.num_epochs": 0, "train.num_steps": 4, "train.learning_rate": 0.1})
  with pytest.raises(config_check.ConfigError, match="train.learning_rate"):
    train.train_and_evaluate(other, str(tmp_path))


@pytest.mark.parametrize("key,value,message", [
    ("train.batch_size", 3, "train.batch_size"),
    ("train.learning_rate", -1.0, "train.learning_rate"),
    ("data.shape", (16, 16, 16), "data.shape"),
    ("model.padding", "SAME", None),          # the too-small-input advice names an existing key
    ("model.name", "resnet3d", "model.dense is not an option of resnet3d"),
])
def test_config_validation_names_the_key(key, value, message, tmp_path):
  c = tiny_config(tmp_path, **{key: value})
  if message is None:
    config_check.validate(c, num_devices=2, input_shape=(16, 16, 16))  # SAME padding fits 16^3
    with pytest.raises(config_check.ConfigError, match="too small"):
      config_check.validate(tiny_config(tmp_path), num_devices=2, input_shape=(16, 16, 16))
    return
  with pytest.raises(config_check.ConfigError, match=message.replace(".", r"\.")):
    config_check.validate(c, num_devices=2)


def test_too_small_error_advises_a_key_that_exists(tmp_path):
  with pytest.raises(ValueError, match="model.padding='SAME'") as e:
    config_check.validate(tiny_config(tmp_path, **{"data.shape": (16, 16, 16)}), num_devices=1)
  config_check.check_keys(tiny_config(tmp_path), ["model.padding"])  # the advice can be followed
  assert "config.model.padding" in str(e.value) or "model.padding" in str(e.value)


def test_freeze_keeps_matching_parameters_fixed(data_dir, tmp_path):
  c = tiny_config(data_dir, **{"train.num_epochs": 0, "train.num_steps": 3})
  graphdef, state0, _ = train.create_state(c, 3)
  frozen_names = [n for n in _names(state0["params"]) if n.startswith(_first_block(state0["params"]))]
  c.freeze = (_first_block(state0["params"]) + "/.*",)
  train.train_and_evaluate(c, str(tmp_path))
  _, p = _params(str(tmp_path), c)
  before, after = _flat(state0["params"]), _flat(p)
  assert frozen_names
  for n in before:
    if n in frozen_names:
      np.testing.assert_array_equal(before[n], after[n])
  assert any(not np.array_equal(before[n], after[n]) for n in before if n not in frozen_names)


def _flat(tree):
  return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _names(tree):
  return list(_flat(tree))


def _first_block(tree):
  return sorted(tree)[0]


def test_precise_bn_running_stats_are_the_mean_of_batch_stats():
  c = tiny_config("/nonexistent")
  graphdef, state, tx = train.create_state(c, 1)
  mesh = runtime.make_mesh(c, jax.devices()[:1])
  _, recal = train.compile_steps(graphdef, tx, None, c, mesh)
  rng = np.random.default_rng(0)
  a, b = (rng.random((4, *c.data.shape, 1), dtype=np.float32) for _ in range(2))
  copy = lambda s: jax.tree.map(lambda x: np.array(x), s)
  only_a = recal(copy(state), a, np.float32(1))["batch_stats"]
  only_b = recal(copy(state), b, np.float32(1))["batch_stats"]
  both = recal(recal(copy(state), a, np.float32(1)), b, np.float32(2))["batch_stats"]
  for x, y, z in zip(jax.tree.leaves(only_a), jax.tree.leaves(only_b), jax.tree.leaves(both)):
    np.testing.assert_allclose(z, (np.asarray(x) + np.asarray(y)) / 2, rtol=1e-5, atol=1e-6)
  assert not np.allclose(jax.tree.leaves(only_a)[0], jax.tree.leaves(only_b)[0])
  # The initial running stats (mean 0, var 1) play no part: k = 1 replaces them.
  init = jax.tree.leaves(state["batch_stats"])
  assert not np.allclose(jax.tree.leaves(only_a)[0], init[0])


def test_train_step_on_the_stored_float16_image_equals_the_step_on_its_float32_cast():
  # The loop feeds the image as stored (float16) and train_step casts it on the device: the same step, to the bit,
  # as on the host-cast float32 batch (augmentation on, so the cast comes before the on-device flips/rotations).
  c = tiny_config("/nonexistent", **{"augment.enabled": True})
  graphdef, state, tx = train.create_state(c, 4)
  mesh = runtime.make_mesh(c, jax.devices()[:1])
  step_fn, _ = train.compile_steps(graphdef, tx, tasks.get(c), c, mesh)
  rng = np.random.default_rng(1)
  stored = rng.random((4, *c.data.shape, 1)).astype(np.float16)
  labels = np.array([0, 1, 1, 0], np.int32)
  copy = lambda s: jax.tree.map(lambda x: np.array(x), s)  # noqa: E731
  key = jax.random.PRNGKey(0)
  from_f16, m16 = step_fn(copy(state), {"image": stored, "target": labels}, key)
  from_f32, m32 = step_fn(copy(state), {"image": stored.astype(np.float32), "target": labels}, key)
  for a, b in zip(jax.tree.leaves(from_f16), jax.tree.leaves(from_f32)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert float(m16["loss"]) == float(m32["loss"]) and float(m16["grad_norm"]) > 0
  other, _ = step_fn(copy(state), {"image": (stored * 0.5).astype(np.float32), "target": labels}, key)
  assert not np.array_equal(jax.tree.leaves(other["params"])[0], jax.tree.leaves(from_f32["params"])[0])


def test_best_step_on_a_tie_is_the_first_and_is_what_the_final_evaluation_uses(data_dir, tmp_path):
  # A learning rate of ~0 keeps the predictions (and so the validation AUC) identical at every evaluation:
  # a tie. The first step must stay best in metrics.json and in the best/ checkpoint the final eval uses.
  c = tiny_config(data_dir, **{"train.num_epochs": 0, "train.num_steps": 4, "train.eval_every_steps": 2,
                               "train.learning_rate": 1e-30, "train.precise_bn_batches": 0,
                               "model.dropout": 0.0, "model.bn_momentum": 1.0, "augment.enabled": False})
  summary = train.train_and_evaluate(c, str(tmp_path))
  assert summary["best_step"] == 2
  assert json.load(open(tmp_path / "metrics.json"))["best_step"] == 2
  assert os.listdir(tmp_path / "best") == ["2"]


def test_one_run_per_workdir_log_and_best(data_dir, tmp_path):
  """Defects 10-12: a leftover best/ is set aside, not outranking the new run; steps re-logged after a resume
  and a line cut by a kill leave metrics.jsonl with each step once; a warmup_cosine run cannot change length."""
  import shutil
  from lungct import checkpoint, viz
  c = tiny_config(data_dir, **{"train.num_epochs": 0, "train.num_steps": 4, "train.checkpoint_every_steps": 2,
                               "train.eval_every_steps": 100, "train.log_every_steps": 1,
                               "train.schedule": "warmup_cosine", "train.warmup_steps": 1,
                               "train.precise_bn_batches": 0})
  work = str(tmp_path)
  _, state, _ = train.create_state(c, 4)
  _, best = checkpoint.managers(work)
  checkpoint.save(best, 99, state, {"config": {}}, metrics={"val_auc": 1.0})  # an earlier run's best/
  best.wait_until_finished()
  summary = train.train_and_evaluate(c, work)
  assert os.listdir(tmp_path / "best") == ["4"] and summary["best_step"] == 4
  aside = [d for d in os.listdir(tmp_path) if d.startswith("best.earlier-")]
  assert len(aside) == 1 and os.listdir(tmp_path / aside[0]) == ["99"]
  # A kill after steps 3-4 were logged but before checkpoint 4 was finished, mid-way through a line.
  shutil.rmtree(tmp_path / "checkpoints" / "4")
  shutil.rmtree(tmp_path / "best" / "4")
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 5, "train/lo')
  train.train_and_evaluate(c, work)  # resumes at step 2
  records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]  # every line complete JSON
  assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3, 4]
  assert [r["step"] for r in viz.load_history(tmp_path / "metrics.jsonl") if "val/auc" in r] == [4]
  longer = c.copy_and_resolve_references()
  longer.train.num_steps = 6
  with pytest.raises(config_check.ConfigError, match="warmup_cosine"):
    train.train_and_evaluate(longer, work)


def test_tensorboard_events_are_written_without_importing_torch(tmp_path):
  """tensorboardX imports PyTorch when it is installed (1.5 s and ~175 MiB per run); the writer hides it from that
  import, writes its events all the same, and leaves torch importable. A fresh interpreter, so torch is not loaded
  before the writer is."""
  pytest.importorskip("torch", reason="the case needs PyTorch installed")
  probe = ("import sys; from lungct import train\n"
           f"w = train.MetricWriter({str(tmp_path)!r}); w.write(3, {{'train/loss': 0.25}}); w.close()\n"
           "print('torch' in sys.modules)\n"
           "import torch; print(float(torch.ones(2).sum()))\n")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=root)
  assert out.stdout.split() == ["False", "2.0"], out.stdout + out.stderr
  (events,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
  assert b"train/loss" in events.read_bytes()
