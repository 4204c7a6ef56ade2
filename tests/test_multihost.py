"""Multi-host training, tested on one machine: 2 processes x 2 virtual CPU devices vs 1 process x 4 devices.

`python -m lungct.main` runs as two processes (tests/multihost_launch.py: loopback coordinator, JAX's CPU
collectives) on a fresh data dir:
  A. two processes, SIGTERM to process 1 once the loop is about to start: both save the same step and exit 0;
  B. the same command again: it resumes and finishes;
  C. (at the same time as B) the reference: one process with 4 devices, same global batch, same config;
  D. two processes, --mode=eval.
Asserted: the dataset is built once (process 0) and both processes train on it; per-step losses and the final
parameters of A+B equal C's; each process read only its half of every global batch; one set of checkpoints,
metrics.jsonl lines, TensorBoard event files and metrics.json; eval writes one eval_test.json and one
predictions_test.csv holding every test example exactly once.

Why the numbers agree: both setups build the same (data=4, space=1) mesh, so XLA partitions the step
identically; they differ only in how the gradient all-reduce is carried out (in-process vs. gloo between
processes), i.e. float32 summation order (~1e-7 relative per step). Adam then divides by sqrt(v) + eps, which
for near-zero gradient entries turns such noise into updates of size ~lr: the tiny model here is trained with
SGD so the bound stays honest (measured: see the printed drift).
"""
import glob
import json
import os
import subprocess
import sys
import textwrap
import time
from collections import Counter

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import multihost_launch  # noqa: E402

STEPS, BATCH = 6, 4

CONFIG = textwrap.dedent(f"""
    from configs import default
    from lungct import models

    def get_config():
      c = default.get_config()
      c.data.num_scans = 16
      c.data.shape = (16, 16, 16)
      c.loader.num_threads = 1
      c.model = models.model_config("cnn3d", features=(4, 8), dense=8, padding="SAME", conv_impl="xla")
      c.train.optimizer = "sgd"
      c.train.learning_rate = 0.05
      c.train.schedule = "constant"
      c.train.batch_size = {BATCH}
      c.train.num_steps = {STEPS}
      c.train.eval_every_steps = 3
      c.train.log_every_steps = 1
      c.train.progress_bar = False
      c.train.precise_bn_batches = 0
      c.eval.n_boot = 20
      return c
""")


def _logs(prefix, n):
  return "\n".join(f"--- {prefix}.{i}.log\n" + open(f"{prefix}.{i}.log").read()[-4000:] for i in range(n))


def _run(tmp, name, args, processes, devices, **kw):
  procs = multihost_launch.start(args, processes=processes, devices_per_process=devices,
                                 log_prefix=os.path.join(tmp, name), **kw)
  return procs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  tmp = str(tmp_path_factory.mktemp("multihost"))
  cfg = os.path.join(tmp, "tiny.py")
  with open(cfg, "w") as f:
    f.write(CONFIG)
  data = f"--config.data.data_dir={tmp}/tfds"
  two, ref = os.path.join(tmp, "two"), os.path.join(tmp, "one")
  for d in ("reads_a", "reads_b", "reads_c"):
    os.makedirs(os.path.join(tmp, d))
  t0 = time.time()
  # A: two processes on a fresh data dir; SIGTERM to process 1 as soon as it handles it.
  procs = _run(tmp, "a", ["--config", cfg, "--workdir", two, data], 2, 2, reads_dir=f"{tmp}/reads_a",
               ready_prefix=f"{tmp}/ready")
  deadline = time.time() + 300
  while not os.path.exists(f"{tmp}/ready.1") and time.time() < deadline and procs[1].poll() is None:
    time.sleep(0.05)
  procs[1].send_signal(15)
  codes_a = multihost_launch.wait(procs, 300)
  # B (resume) and C (reference, 1 process x 4 devices) at the same time: the dataset exists now.
  procs_b = _run(tmp, "b", ["--config", cfg, "--workdir", two, data], 2, 2, reads_dir=f"{tmp}/reads_b")
  procs_c = _run(tmp, "c", ["--config", cfg, "--workdir", ref, data], 1, 4, reads_dir=f"{tmp}/reads_c")
  codes_b, codes_c = multihost_launch.wait(procs_b, 300), multihost_launch.wait(procs_c, 300)
  procs_d = _run(tmp, "d", ["--config", cfg, "--workdir", two, data, "--mode=eval"], 2, 2)
  codes_d = multihost_launch.wait(procs_d, 300)
  print(f"four runs in {time.time() - t0:.0f} s")
  return dict(tmp=tmp, two=two, ref=ref, codes=dict(a=codes_a, b=codes_b, c=codes_c, d=codes_d))


def _check_codes(runs, name, n):
  assert runs["codes"][name] == [0] * n, _logs(os.path.join(runs["tmp"], name), n)


def _losses(workdir):
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  return [r for r in rows if "train/loss" in r]


def test_sigterm_to_one_process_saves_and_stops_both(runs):
  _check_codes(runs, "a", 2)
  log0 = open(os.path.join(runs["tmp"], "a.0.log")).read()
  assert "Stopped at step" in log0, _logs(os.path.join(runs["tmp"], "a"), 2)
  stopped = int(log0.split("Stopped at step ")[1].split(":")[0])
  assert 1 <= stopped < STEPS
  # one dataset, built by process 0 only (process 1 waited at the barrier, then opened it)
  assert "lung_ct: building" in log0
  assert "lung_ct: building" not in open(os.path.join(runs["tmp"], "a.1.log")).read()
  assert len(glob.glob(os.path.join(runs["tmp"], "tfds", "lung_ct", "*", "*", "dataset_info.json"))) == 1


def test_two_processes_equal_one_with_the_same_global_batch(runs):
  _check_codes(runs, "b", 2)
  _check_codes(runs, "c", 1)
  two, one = _losses(runs["two"]), _losses(runs["ref"])
  assert [r["step"] for r in two] == list(range(1, STEPS + 1))   # A's steps then B's, each logged once
  assert [r["step"] for r in one] == list(range(1, STEPS + 1))
  l2 = np.array([r["train/loss"] for r in two])
  l1 = np.array([r["train/loss"] for r in one])
  print("per-step loss, 2 processes:", l2, "\n1 process:", l1, "\nmax |diff|", np.abs(l2 - l1).max())
  # The bound comes from what the test must catch, not from one machine's drift. Both runs differ only in float32
  # summation order. Step 1 starts from equal parameters on the same batch, so only the reductions of its loss and
  # BN statistics differ: a few roundings of u = 2^-24 each, bounded by 64 u of the loss (condition numbers of BN
  # and the sigmoid included). Later steps carry that noise through the updates, and how much training amplifies it
  # depends on the CPU's kernels (max |diff| after 6 steps: 1.6e-6 on an Intel AVX-512 machine, 1.3e-4 on an AMD
  # AVX2-only one). A real defect moves the loss by the size of a step's own effect: a process training on the
  # wrong half of the batch changes that step's loss by the batch-to-batch spread, a lost gradient share halves an
  # update. Both are of the order of the reference's step-to-step loss change (here ~4e-2), so 5% of its median
  # still catches them while leaving room for amplified rounding on any CPU.
  u = float(np.finfo(np.float32).eps) / 2
  assert abs(l2[0] - l1[0]) <= 64 * u * abs(l1[0]), (l2[0], l1[0])
  bound = 0.05 * float(np.median(np.abs(np.diff(l1))))
  print(f"steps 2..{STEPS}: max |diff| {np.abs(l2 - l1)[1:].max():.2e} <= bound {bound:.2e}")
  assert np.abs(l2 - l1)[1:].max() <= bound, (l2, l1, bound)
  from lungct import checkpoint
  p2, s2, _ = checkpoint.restore_variables(os.path.join(runs["two"], checkpoint.LATEST_DIR), STEPS)
  p1, s1, _ = checkpoint.restore_variables(os.path.join(runs["ref"], checkpoint.LATEST_DIR), STEPS)
  import jax
  # After 6 steps the float32 summation-order noise of the all-reduce (~1e-7 per step) has been amplified by
  # training to at most ~1.5e-4 of a tensor's scale (measured: 2e-6 to 1.4e-4 over runs); a real difference
  # (another batch, a missed gradient share) moves parameters by the size of an update, ~1e-2 of the scale here.
  worst = 0.0
  for a, b in zip(jax.tree.leaves((p2, s2)), jax.tree.leaves((p1, s1))):
    a, b = np.asarray(a), np.asarray(b)
    ratio = float(np.abs(a - b).max() / (np.abs(b).max() + 1e-12))
    worst = max(worst, ratio)
    assert ratio <= 1e-3, ratio
  print("final params and BN stats: max over tensors of max |p2 - p1| / max |p1|:", worst)
  m2 = json.load(open(os.path.join(runs["two"], "metrics.json")))
  m1 = json.load(open(os.path.join(runs["ref"], "metrics.json")))
  assert m2["steps"] == m1["steps"] == STEPS
  for split in ("validation", "test"):
    np.testing.assert_allclose(m2[split]["loss"], m1[split]["loss"], rtol=1e-4)


def test_each_process_reads_only_its_share(runs):
  """Process i reads examples [2i, 2i + 2) of every global batch of 4 (the 1-process run's order)."""
  _check_codes(runs, "b", 2)
  ref = json.load(open(os.path.join(runs["tmp"], "reads_c", "reads_0.json")))
  batches = [ref[k:k + BATCH] for k in range(0, len(ref), BATCH)]
  stopped = int(open(os.path.join(runs["tmp"], "a.0.log")).read().split("Stopped at step ")[1].split(":")[0])
  for run, first in (("reads_a", 0), ("reads_b", stopped)):
    reads = [json.load(open(os.path.join(runs["tmp"], run, f"reads_{i}.json"))) for i in (0, 1)]
    assert len(reads[0]) == len(reads[1]) > 0
    for i, r in enumerate(reads):
      n = min(len(r) // 2, len(batches) - first)  # batches read (prefetch included) that the reference has too
      expected = [x for b in batches[first:first + n] for x in b[2 * i:2 * i + 2]]
      assert Counter(r[:2 * n]) == Counter(expected), (run, i, r, expected)
    assert len(reads[0]) + len(reads[1]) < 2 * len(ref)  # not everyone reading everything


def test_one_set_of_outputs(runs):
  _check_codes(runs, "b", 2)
  two = runs["two"]
  assert sorted(os.listdir(os.path.join(two, "checkpoints"))) == ["3", "6"]
  events = glob.glob(os.path.join(two, "tensorboard", "events.out.tfevents.*"))
  assert len(events) == 2, events   # one per run (A, B), written by process 0 only
  assert os.path.exists(os.path.join(two, "metrics.json"))
  assert not glob.glob(os.path.join(two, "**", ".write_probe*"), recursive=True)


def test_eval_gathers_every_example_once(runs):
  _check_codes(runs, "d", 2)
  two = runs["two"]
  rows = open(os.path.join(two, "predictions_test.csv")).read().strip().splitlines()[1:]
  ids = [r.split(",")[0] for r in rows]
  from lungct.data import lung_ct  # the test split, read without the volumes
  sys.path.insert(0, runs["tmp"])
  spec = __import__("tiny")
  cfg = spec.get_config()
  cfg.data.data_dir = os.path.join(runs["tmp"], "tfds")
  expected = [r["study_id"] for r in lung_ct.split_index(lung_ct.builder_for(cfg.data), "test")]
  assert sorted(ids) == sorted(expected) and len(ids) == len(set(ids)), (ids, expected)
  assert os.path.exists(os.path.join(two, "eval_test.json"))
  log1 = open(os.path.join(runs["tmp"], "d.1.log")).read()
  assert "eval_test.json" not in log1 or "Wrote" not in log1
