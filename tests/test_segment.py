"""Segmentation: U-Net shapes, Dice + BCE loss values, sliding-window reconstruction, a short training run."""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import unet_seg
from lungct import config_check, evaluate, inferers, main, models, tasks, train
from lungct.tasks import segment
from tests.helpers import tiny_config


def test_unet_output_matches_input_shape():
  cfg = ml_collections.ConfigDict({"name": "unet3d", "features": (2, 4, 4), "dropout": 0.5})
  model = models.create_model(cfg, num_outputs=1, rngs=nnx.Rngs(0))
  forward = nnx.jit(lambda m, x, train: m(x, train=train, dropout_key=jax.random.PRNGKey(1)),
                    static_argnames="train")
  out = forward(model, jnp.ones((1, 7, 9, 10, 1)), train=True)  # not multiples of 4: padded, then cropped
  assert out.shape == (1, 7, 9, 10, 1) and out.dtype == jnp.float32
  out = forward(model, jnp.ones((2, 8, 12, 16, 1)), train=False)
  assert out.shape == (2, 8, 12, 16, 1) and bool(jnp.all(jnp.isfinite(out)))


def test_dice_bce_loss_values():
  true = np.zeros((1, 2, 2, 4, 1), np.float32)
  true[0, 0, 0, :] = 1.0                                     # 4 lesion voxels
  big = 30.0
  perfect = jnp.asarray(np.where(true > 0, big, -big))
  disjoint = -perfect
  assert float(segment.soft_dice_loss(perfect, true)) == pytest.approx(0.0, abs=1e-6)
  assert float(segment.dice_bce_loss(perfect, true)) == pytest.approx(0.0, abs=1e-6)
  assert float(segment.soft_dice_loss(disjoint, true)) == pytest.approx(1.0, abs=1e-6)
  # BCE of a confidently wrong voxel is |logit| = 30, every voxel is wrong: 1 + 30.
  assert float(segment.dice_bce_loss(disjoint, true)) == pytest.approx(31.0, rel=1e-5)
  half = np.full(true.shape, -big, np.float32)
  half[0, 0, 0, :2] = big                                   # 2 of the 4 lesion voxels ...
  half[0, 1, 1, :2] = big                                   # ... plus 2 false positives: Dice 4/8
  assert float(segment.soft_dice_loss(jnp.asarray(half), true)) == pytest.approx(0.5, abs=1e-6)
  # An empty mask predicted empty is a perfect prediction (MONAI's smoothing), not 0/0.
  assert float(segment.soft_dice_loss(-big * jnp.ones((1, 2, 2, 2, 1)), jnp.zeros((1, 2, 2, 2, 1)))) == \
      pytest.approx(0.0, abs=1e-6)


def test_window_starts():
  assert inferers.window_starts(20, 8, 0.5) == [0, 4, 8, 12]
  assert inferers.window_starts(28, 16, 0.5) == [0, 8, 12]  # the last window ends flush with the volume
  assert inferers.window_starts(8, 8, 0.5) == [0]
  assert inferers.window_starts(5, 8, 0.5) == [0]


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
def test_sliding_window_reconstructs_identity(mode):
  vol = np.random.default_rng(0).random((2, 20, 24, 28, 1)).astype(np.float32)
  calls = []

  def identity(x):
    calls.append(x.shape)
    return x

  out = inferers.sliding_window_inference(identity, vol, (8, 16, 16), overlap=0.5, mode=mode, sw_batch_size=5)
  np.testing.assert_allclose(out, vol, rtol=1e-5, atol=1e-6)
  # 4 x 2 x 3 windows per volume, 2 volumes = 48 windows, in batches of exactly 5.
  assert len(calls) == 10 and set(calls) == {(5, 8, 16, 16, 1)}


def test_sliding_window_pads_small_volume_and_weights_windows():
  vol = np.random.default_rng(1).random((1, 5, 6, 7, 1)).astype(np.float32)
  out = inferers.sliding_window_inference(lambda x: x, vol, (8, 8, 8), overlap=0.5)
  np.testing.assert_allclose(out, vol, rtol=1e-6)
  # A predictor answering 1 in the first window [0, 8) and 3 in the second [4, 12) (along D). With
  # sigma = 0.125 * 8 = 1 and the Gaussian centred at 3.5, voxel 5 is 1.5 from window 1's centre and
  # 2.5 from window 2's: weights a = exp(-1.125), b = exp(-3.125) (the H, W factors are shared and cancel).
  seen = []

  def by_window(x):
    seen.append(1)
    return np.full(x.shape, 1.0 if len(seen) == 1 else 3.0, np.float32)

  out = inferers.sliding_window_inference(by_window, np.zeros((1, 12, 8, 8, 1), np.float32), (8, 8, 8),
                                         overlap=0.5, sw_batch_size=1)[0, :, 4, 4, 0]
  a, b = np.exp(-1.125), np.exp(-3.125)
  np.testing.assert_allclose(out[:4], 1.0, rtol=1e-6)
  np.testing.assert_allclose(out[8:], 3.0, rtol=1e-6)
  assert out[5] == pytest.approx((a + 3 * b) / (a + b), rel=1e-5)   # 1.2384
  assert out[6] == pytest.approx((3 * a + b) / (a + b), rel=1e-5)   # the mirror image: 2.7616


def test_flip_tta_averages_the_eight_flipped_back_outputs():
  """A predictor that is not flip-equivariant (it adds a ramp along each axis, and mixes in the batch's other
  window): segment.tta="flips" gives the hand-computed mean of its 8 flipped-back outputs, "none" the plain one."""
  rng = np.random.default_rng(3)
  vol = rng.random((2, 8, 6, 4, 1)).astype(np.float32)
  ramp = (np.arange(8)[:, None, None] + 10 * np.arange(6)[None, :, None] + 100 * np.arange(4)[None, None, :])
  ramp = ramp[None, ..., None].astype(np.float32)
  shapes = []

  def skewed(x):
    shapes.append(x.shape)
    return x * ramp + 0.5 * x[::-1]
  sc = ml_collections.ConfigDict({"roi": (), "patch": (8, 6, 4), "overlap": 0.5, "mode": "gaussian",
                                  "sw_batch_size": 2, "tta": "none"})
  np.testing.assert_allclose(segment.probabilities(skewed, vol, sc), skewed(vol)[..., 0], rtol=1e-6)
  expected = np.zeros_like(vol)
  for fd in (False, True):
    for fh in (False, True):
      for fw in (False, True):
        axes = tuple(a for a, f in zip((1, 2, 3), (fd, fh, fw)) if f)
        expected += np.flip(skewed(np.flip(vol, axes)), axes) / 8
  sc.tta = "flips"
  shapes.clear()
  got = segment.probabilities(skewed, vol, sc)
  assert len(shapes) == 8 and set(shapes) == {(2, 8, 6, 4, 1)}    # one window batch, 8 calls of one shape
  np.testing.assert_allclose(got, expected[..., 0], rtol=1e-5)
  assert not np.allclose(got, skewed(vol)[..., 0], rtol=1e-3)      # the flips changed the answer
  # An equivariant predictor is unchanged by it; an unknown tta is refused by the config check.
  np.testing.assert_allclose(segment.probabilities(lambda x: 2 * x, vol, sc), 2 * vol[..., 0], rtol=1e-6)
  c = unet_seg.get_config("tiny")
  assert c.segment.tta == "none" and segment.check(c) == []
  c.segment.tta = "rot90"
  assert segment.check(c) == ["config.segment.tta='rot90': must be one of ('none', 'flips')"]
  assert config_check.is_execution_key("segment.tta", segment.EXECUTION_KEYS)


def test_case_metrics_and_summary():
  true = np.zeros((4, 4, 4), bool)
  true[1:3, 1:3, 1:3] = True                                # 8 voxels
  pred = true.copy()
  pred[1, 1, 1] = False                                     # 7 of them
  c = segment.case_metrics(pred, true, (2.0, 1.0, 1.0))    # 2 mm^3 voxels
  assert c["dice"] == pytest.approx(14 / 15) and c["iou"] == pytest.approx(7 / 8)
  assert c["true_ml"] == pytest.approx(0.016) and c["fp_ml"] == 0.0
  empty = segment.case_metrics(pred, np.zeros_like(true), (2.0, 1.0, 1.0))
  assert not empty["has_lesion"] and empty["fp_ml"] == pytest.approx(0.014)
  s = segment.summarize([c, empty])
  assert s["num_lesion_cases"] == 1 and s["dice"] == pytest.approx(14 / 15)
  assert s["fp_ml_lesion_free"] == pytest.approx(0.014) and s["lesion_free_with_fp"] == 1


def test_random_patches_prefers_lesions():
  images = np.arange(2 * 8 * 8 * 8, dtype=np.float32).reshape(2, 8, 8, 8, 1)
  masks = np.zeros(images.shape, np.uint8)
  masks[:, 6, 6, 6] = 1
  x, m = inferers.random_patches(images, masks, (4, 4, 4), 1.0, np.random.default_rng(0))
  assert x.shape == (2, 4, 4, 4, 1) and m.sum() == 2       # every crop holds the lesion voxel
  x, m = inferers.random_patches(images[:, :3], masks[:, :3], (4, 4, 4), 0.0, np.random.default_rng(0))
  assert x.shape == (2, 4, 4, 4, 1) and np.all(x[:, 3] == 0)  # depth 3 < 4: zero-padded


def seg_config(data_dir, **overrides):
  """The segmentation config (configs/unet_seg.py) shrunk to seconds."""
  return tiny_config(data_dir, base=unet_seg.get_config(), **{
      "data.num_scans": 12, "data.shape": (16, 32, 32), "model.features": (4, 8), "augment.enabled": False,
      "train.num_epochs": 0, "train.num_steps": 16, "train.eval_every_steps": 8, "train.log_every_steps": 4,
      "train.learning_rate": 1e-2, "segment.patch": (16, 16, 16), "segment.pos_fraction": 0.75,
      "segment.sw_batch_size": 2, "segment.num_overlays": 2, **overrides})


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory):
  c = seg_config(tmp_path_factory.mktemp("tfds"))
  workdir = str(tmp_path_factory.mktemp("seg"))
  return c, workdir, train.train_and_evaluate(c, workdir)


def test_short_training_run(seg_run):
  c, workdir, summary = seg_run
  records = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  losses = [r["train/loss"] for r in records if "train/loss" in r]
  # Observed 1.70, 1.61, 1.55, 1.50 (Dice part 0.981 -> 0.977): BCE learns the background first.
  assert len(losses) == 4 and all(b < a for a, b in zip(losses, losses[1:])), losses
  assert losses[-1] < losses[0] - 0.1, losses
  m = json.load(open(os.path.join(workdir, "metrics.json")))
  for split in ("validation", "test"):
    for key in ("dice", "iou", "hd95", "fp_ml_lesion_free", "num_lesion_cases"):
      assert key in m[split]
  assert m["steps"] == summary["steps"] == 16 and m["task"] == "segment"
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["16", "8"]
  assert os.listdir(os.path.join(workdir, "best")) == [str(m["best_step"])]
  result = evaluate.evaluate_checkpoint(c, workdir, split="validation")
  saved = json.load(open(os.path.join(workdir, "eval_validation.json")))
  assert len(saved["cases"]) == len(result["cases"]) > 0
  assert saved["summary"]["dice"] == pytest.approx(m["validation"]["dice"])  # same checkpoint, same numbers
  assert all(os.path.exists(p) for p in result["overlays"])
  # segment.tta is an inference setting: taken from the current config, not the checkpoint's, and recorded.
  assert saved["tta"] == "none"
  flips = c.copy_and_resolve_references()
  flips.segment.tta = "flips"
  flipped = evaluate.evaluate_checkpoint(flips, workdir, split="validation")
  assert json.load(open(os.path.join(workdir, "eval_validation.json")))["tta"] == flipped["tta"] == "flips"
  assert len(flipped["cases"]) == len(result["cases"])


@pytest.mark.parametrize("mode", ["report"])
def test_unsupported_modes_fail_at_start_with_one_line(mode, tmp_path, monkeypatch):
  """Segmentation offers every mode now; a task that lacks one (here: segmentation without it) is refused."""
  monkeypatch.setattr(segment, "MODES", tuple(m for m in segment.MODES if m != mode))
  c = seg_config(tmp_path / "tfds")
  with pytest.raises(tasks.TaskError, match=f"--mode={mode} is not supported by config.task='segment'"):
    main.run(c, str(tmp_path / "run"), mode)
  assert not os.path.exists(tmp_path / "run") and not os.path.exists(tmp_path / "tfds")  # no work was done


def test_segmentation_cross_validation_runs_through_the_loop(seg_run, tmp_path):
  c, _, _ = seg_run
  c = c.copy_and_resolve_references()
  c.cv.folds = 2
  c.train.num_steps = 2
  c.train.eval_every_steps = 2
  out = evaluate.cross_validate(c, str(tmp_path))
  assert len(out["per_fold"]) == 2 and "dice" in out["summary"]
  assert out["pooled"]["n"] == sum(f["n_heldout"] for f in out["per_fold"]) and "dice" in out["pooled"]
  assert all(0 <= f["dice"] <= 1 for f in out["per_fold"] if f["dice"] is not None and np.isfinite(f["dice"]))


def test_segmentation_external_evaluation_through_the_task(seg_run, tmp_path):
  """The external set path is the task's own run_eval: segmentation gets it without code of its own."""
  from lungct.data import phantom
  c, workdir, _ = seg_run
  root = tmp_path / "site2"
  rows = ["filename,label,patient_id,mask"]
  for i in range(3):
    ph = phantom.make_phantom(7000 + i, 2, shape_xyz=(32, 32, 16))
    phantom.write_phantom_nifti(ph, str(root / f"s{i}.nii.gz"), mask_path=str(root / f"s{i}_mask.nii.gz"))
    rows.append(f"s{i}.nii.gz,1,site2-{i},s{i}_mask.nii.gz")
  (root / "flat.nii.gz").write_bytes(b"\x1f\x8b broken")
  rows.append("flat.nii.gz,1,site2-9,")
  (root / "labels.csv").write_text("\n".join(rows) + "\n")
  ext = c.copy_and_resolve_references()
  ext.eval.external_dir, ext.eval.external_csv = str(root), str(root / "labels.csv")
  result = main.run(ext, workdir, "eval")
  saved = json.load(open(os.path.join(workdir, "eval_external.json")))
  assert saved["split"] == "external" and len(saved["cases"]) == 3 == len(result["cases"])
  assert saved["external"]["totals"] == {"read": 4, "kept": 3, "skipped": 1}
  assert saved["external"]["shared_patients"] == [] and saved["summary"]["num_lesion_cases"] == 3
  assert all(0 <= case["dice"] <= 1 for case in saved["cases"])
  # The report of the external set: its build summary, the skipped file, and Dice with a CI over its 3 cases.
  from lungct import report
  text = open(report.build_report(ext, workdir)).read()
  for needed in ("Segmentation on the external test set", "External test set: 3 studies from 3 patients, 3 with "
                 "a lesion", "4 scans read, 3 kept, <b>1 skipped</b>", "flat.nii.gz",
                 "none of them in the training dataset", "Lesion volume, predicted vs reference (external test set)"):
    assert needed in text, needed
  dice = float(np.mean([case["dice"] for case in saved["cases"]]))
  row = next(r for r in segment.report_table(saved["cases"], n_boot=20, seed=0)[1] if r[0] == "Dice")
  assert row[2] == "3" and row[3].startswith(f"{dice:.3f} (")
