"""Tests for lungct.viz: figure structure, slice selection, PNG output."""
import json
import os

import matplotlib.image
from matplotlib.figure import Figure
import numpy as np
import pytest

from lungct import viz

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _volume_hu(shape=(10, 12, 14)):
  """Air (-1000 HU) with a +40 HU block; deterministic."""
  vol = np.full(shape, -1000.0, np.float32)
  vol[3:7, 4:8, 5:9] = 40.0
  return vol


def _lesion_mask(shape=(10, 12, 14)):
  mask = np.zeros(shape, np.uint8)
  mask[4:6, 5:7, 6:8] = 1
  return mask


def _image_axes(fig):
  """Visible non-colorbar axes."""
  return [ax for ax in fig.axes if ax.axison and ax.get_label() != "<colorbar>"]


def _assert_png(path, width, height):
  with open(path, "rb") as f:
    assert f.read(8) == PNG_MAGIC
  img = matplotlib.image.imread(path)
  assert img.shape[:2] == (height, width)


# ------------------------------------------------------------------ pure helpers


def test_slice_indices_hand_values():
  np.testing.assert_array_equal(viz.slice_indices(32, 4), [4, 12, 20, 28])
  np.testing.assert_array_equal(viz.slice_indices(10, 3), [1, 5, 8])
  np.testing.assert_array_equal(viz.slice_indices(5, 1), [2])
  np.testing.assert_array_equal(viz.slice_indices(3, 16), [0, 1, 2])
  with pytest.raises(ValueError):
    viz.slice_indices(0, 4)


def test_top_slices_picks_highest_heatmap():
  heat = np.zeros((8, 4, 4), np.float32)
  heat[1, 0, 0] = 0.3
  heat[6, 2, 2] = 0.9
  heat[3, 1, 1] = 0.7
  heat[5] = 0.5  # peak 0.5 everywhere
  heat[2, 0, 0] = 0.5  # same peak as slice 5, smaller sum -> loses the tie
  np.testing.assert_array_equal(viz.top_slices(heat, 3), [3, 5, 6])
  np.testing.assert_array_equal(viz.top_slices(heat, 1), [6])
  np.testing.assert_array_equal(viz.top_slices(heat, 20), np.arange(8))


def test_mask_slices_spread_over_nonempty_slices():
  mask = np.zeros((20, 3, 3), np.uint8)
  mask[10:14, 1, 1] = 1  # slices 10..13
  # slice_indices(4, 2) = [1, 3] -> slices 11, 13
  np.testing.assert_array_equal(viz.mask_slices(mask, 2), [11, 13])
  np.testing.assert_array_equal(viz.mask_slices(np.zeros((8, 2, 2)), 2), [2, 6])


def test_resolve_window_and_center_of_mass():
  assert viz.resolve_window(_volume_hu()) == (-1000.0, 400.0)
  assert viz.resolve_window(np.linspace(0, 1, 27).reshape(3, 3, 3)) == (0.0, 1.0)
  assert viz.resolve_window(_volume_hu(), window=(-160, 240)) == (-160.0, 240.0)
  assert viz.resolve_window(_volume_hu(), vmin=-500.0, vmax=0.0) == (-500.0, 0.0)
  with pytest.raises(ValueError, match="lo < hi"):
    viz.resolve_window(_volume_hu(), window=(1, 1))
  # mask[4:6, 5:7, 6:8] -> centre (4.5, 5.5, 6.5); Python rounds half to even.
  assert viz.center_of_mass(_lesion_mask()) == (4, 6, 6)
  assert viz.center_of_mass(np.zeros((2, 2, 2))) is None


def test_dice_hand_values():
  t = np.zeros((1, 2, 4), bool)
  p = np.zeros((1, 2, 4), bool)
  t[0, 0, :3] = True  # 3 voxels
  p[0, 0, 1:] = True  # 3 voxels, overlap 2
  assert viz._dice_str(t, p) == f"{2 * 2 / 6:.2f}"
  assert viz._dice_str(np.zeros(3), np.zeros(3)) == "n/a"


def test_metric_groups():
  history = [{"step": 1, "train/loss": 1.0, "train/accuracy": 0.5, "lr": 1e-3},
             {"step": 2, "val/loss": 0.9, "val/auc": 0.7, "val/accuracy": 0.6, "note": "x"}]
  groups = viz.metric_groups(history)
  assert list(groups) == ["loss", "accuracy", "auc", "lr"]
  assert groups["loss"] == ["train/loss", "val/loss"]
  assert groups["accuracy"] == ["train/accuracy", "val/accuracy"]


# ------------------------------------------------------------------ figures


def test_montage_axes_titles_and_png(tmp_path):
  vol = _volume_hu()
  fig = viz.montage(vol, num_slices=6, cols=4, mask=_lesion_mask(), title="demo")
  assert isinstance(fig, Figure)
  assert len(fig.axes) == 2 * 4 + 1  # 2x4 grid + colorbar
  panels = _image_axes(fig)
  assert [ax.get_title() for ax in panels] == [f"z = {z}" for z in (0, 2, 4, 5, 7, 9)]
  assert fig.get_suptitle() == "demo"
  # The gray image of panel "z = 4" is exactly that slice.
  np.testing.assert_array_equal(panels[2].images[0].get_array(), vol[4])
  assert panels[2].images[0].get_clim() == (-1000.0, 400.0)
  path = viz.save(fig, tmp_path / "sub" / "montage.png")
  w, h = fig.get_size_inches() * 100
  _assert_png(path, round(w), round(h))


def test_orthogonal_views_center_from_mask_and_aspect():
  vol = _volume_hu()
  fig = viz.orthogonal_views(vol, spacing=(5.0, 2.0, 2.0), mask=_lesion_mask())
  assert len(fig.axes) == 4  # 3 views + colorbar
  axial, coronal, sagittal = fig.axes[:3]
  assert axial.get_title() == "Axial z = 4"
  assert coronal.get_title() == "Coronal y = 6"
  assert sagittal.get_title() == "Sagittal x = 6"
  np.testing.assert_array_equal(coronal.images[0].get_array(), vol[:, 6, :])
  assert coronal.get_aspect() == pytest.approx(2.5)  # sz / sx
  assert axial.get_aspect() == pytest.approx(1.0)
  fig2 = viz.orthogonal_views(vol, center=(1, 2, 3), overlay=np.zeros(vol.shape))
  assert [ax.get_title() for ax in fig2.axes[:3]] == ["Axial z = 1", "Coronal y = 2",
                                                      "Sagittal x = 3"]
  assert len(fig2.axes[0].images) == 2  # CT + heatmap
  with pytest.raises(ValueError, match="mask shape"):
    viz.orthogonal_views(vol, mask=np.zeros((2, 2, 2)))


def test_overlay_slices_uses_top_heatmap_slices():
  vol = _volume_hu()
  heat = np.zeros(vol.shape, np.float32)
  heat[8, 1, 1], heat[2, 3, 3], heat[5, 0, 0], heat[0, 0, 0] = 1.0, 0.8, 0.6, 0.1
  fig = viz.overlay_slices(vol, heat, num_slices=3, mask=_lesion_mask())
  panels = _image_axes(fig)
  assert len(fig.axes) == 3 + 1
  assert [ax.get_title().split("  ")[0] for ax in panels] == ["z = 2", "z = 5", "z = 8"]
  shown = panels[2].images[1].get_array()
  np.testing.assert_array_equal(np.ma.getdata(shown), heat[8])
  assert np.ma.count(shown) == 1  # only the 1.0 peak is above the 5% cutoff; the rest is clear
  assert panels[2].images[1].get_alpha() == 0.4


def test_mask_comparison_colors():
  vol = _volume_hu()
  t = np.zeros(vol.shape, np.uint8)
  p = np.zeros(vol.shape, np.uint8)
  t[4, 2:4, 2] = 1  # (4,2,2) overlap, (4,3,2) true only
  p[4, 2, 2:4] = 1  # (4,2,3) predicted only
  fig = viz.mask_comparison(vol, t, p, num_slices=4)
  assert len(fig.axes) == 1  # only slice 4 holds mask voxels
  rgba = fig.axes[0].images[1].get_array()
  np.testing.assert_allclose(rgba[2, 2, :3], [1.0, 0.9, 0.0])  # yellow overlap
  np.testing.assert_allclose(rgba[3, 2, :3], [0.0, 0.8, 0.0])  # green true
  np.testing.assert_allclose(rgba[2, 3, :3], [0.9, 0.0, 0.0])  # red predicted
  assert rgba[0, 0, 3] == 0.0
  assert "Dice 0.50" in fig.axes[0].get_title()


def test_confusion_matrix_annotations():
  fig = viz.confusion_matrix(np.array([[8, 2], [1, 9]]))
  assert len(fig.axes) == 2  # matrix + colorbar
  texts = [t.get_text() for t in fig.axes[0].texts]
  assert texts == ["8\n(80.0%)", "2\n(20.0%)", "1\n(10.0%)", "9\n(90.0%)"]
  assert "accuracy 0.850" in fig.axes[0].get_title()
  fig = viz.confusion_matrix(np.array([[8, 2], [1, 9]]), normalize=True)
  np.testing.assert_allclose(fig.axes[0].images[0].get_array(), [[0.8, 0.2], [0.1, 0.9]])
  with pytest.raises(ValueError, match="must be"):
    viz.confusion_matrix(np.eye(3))


def test_roc_curve_operating_points():
  ops = [{"name": "Youden", "fpr": 0.2, "tpr": 0.8, "threshold": 0.45},
         {"name": "sens90", "fpr": 0.4, "tpr": 0.9, "threshold": 0.3}]
  fig = viz.roc_curve([0, 0.2, 0.4, 1], [0, 0.8, 0.9, 1], auc=0.83, operating_points=ops)
  assert len(fig.axes) == 1
  ax = fig.axes[0]
  labels = [line.get_label() for line in ax.lines]
  assert labels == ["ROC (AUC = 0.830)", "chance", "Youden (t = 0.45)", "sens90 (t = 0.30)"]
  np.testing.assert_allclose(ax.lines[2].get_xydata(), [[0.2, 0.8]])
  np.testing.assert_allclose(ax.lines[1].get_xydata(), [[0, 0], [1, 1]])


def test_reliability_diagram_bar_heights():
  conf = np.array([0.1, 0.3, 0.5, 0.7, 0.9])
  acc = np.array([0.2, 0.25, np.nan, 0.6, 0.95])
  counts = np.array([10, 4, 0, 6, 30])
  fig = viz.reliability_diagram(conf, acc, counts, ece=0.05)
  assert len(fig.axes) == 2
  top, bottom = fig.axes
  heights = [b.get_height() for b in top.containers[0]]
  np.testing.assert_allclose(heights, [0.2, 0.25, 0.0, 0.6, 0.95])
  np.testing.assert_allclose([b.get_x() + b.get_width() / 2 for b in top.containers[0]],
                             [0.1, 0.3, 0.5, 0.7, 0.9])
  gaps = [b.get_height() for b in top.containers[1]]
  np.testing.assert_allclose(gaps, [-0.1, 0.05, 0.0, 0.1, -0.05], atol=1e-12)
  np.testing.assert_allclose([b.get_height() for b in bottom.containers[0]], counts)
  assert any(t.get_text() == "ECE = 0.050" for t in top.texts)


def test_training_curves_from_jsonl(tmp_path):
  records = [{"step": s, "train/loss": 1.0 / s, "train/accuracy": 0.5 + s / 100} for s in (1, 2, 3)]
  records += [{"step": 3, "val/loss": 0.8, "val/auc": 0.75, "val/accuracy": 0.7}]
  path = tmp_path / "metrics.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
  history = viz.load_history(path)
  fig = viz.training_curves(history)
  assert len(fig.axes) == 3  # loss, accuracy, auc
  assert [ax.get_title() for ax in fig.axes] == ["loss", "accuracy", "auc"]
  loss_ax = fig.axes[0]
  assert [line.get_label() for line in loss_ax.lines] == ["train/loss", "val/loss"]
  np.testing.assert_allclose(loss_ax.lines[0].get_xydata(), [[1, 1.0], [2, 0.5], [3, 1 / 3]])
  np.testing.assert_allclose(loss_ax.lines[1].get_xydata(), [[3, 0.8]])
  with pytest.raises(ValueError, match="no numeric metrics"):
    viz.training_curves([{"step": 1}])
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"step": 1}\nnot json\n{"step": 2}\n')  # a bad line before the last
  with pytest.raises(ValueError, match="bad.jsonl: line 2"):
    viz.load_history(bad)


def test_cli_jsonl(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text(json.dumps({"step": 1, "train/loss": 0.7}) + "\n")
  assert viz.main([str(path), "--out", str(tmp_path / "out")]) == 0
  out = tmp_path / "out" / "training_curves.png"
  assert out.stat().st_size > 0
  with open(out, "rb") as f:
    assert f.read(8) == PNG_MAGIC


def test_cli_nifti(tmp_path):
  nib = pytest.importorskip("nibabel")
  pytest.importorskip("lungct.data.nifti")
  vol_xyz = np.transpose(_volume_hu((12, 16, 16)), (2, 1, 0)).copy()
  affine = np.diag([2.0, 2.0, 5.0, 1.0])
  path = tmp_path / "scan.nii.gz"
  nib.save(nib.Nifti1Image(vol_xyz, affine), str(path))
  assert viz.main([str(path), "--out", str(tmp_path / "out")]) == 0
  for name in ("montage.png", "orthogonal.png"):
    out = tmp_path / "out" / name
    with open(out, "rb") as f:
      assert f.read(8) == PNG_MAGIC
    assert matplotlib.image.imread(out).shape[0] > 100


def test_load_history_after_a_kill_and_a_resume(tmp_path):
  """Defect 11: a truncated last line does not break the report; re-logged steps count once."""
  path = tmp_path / "metrics.jsonl"
  lines = [{"step": 1, "train/loss": 0.9}, {"step": 2, "train/loss": 0.8}, {"step": 2, "val/auc": 0.6},
           {"step": 3, "train/loss": 0.7}, {"step": 3, "train/loss": 0.65}]  # step 3 logged again on resume
  path.write_text("\n".join(json.dumps(r) for r in lines) + '\n{"step": 4, "train/lo')
  history = viz.load_history(path)
  assert [(r["step"], r.get("train/loss")) for r in history] == [(1, 0.9), (2, 0.8), (2, None), (3, 0.65)]
  fig = viz.training_curves(history)
  np.testing.assert_allclose(fig.axes[0].lines[0].get_xydata(), [[1, 0.9], [2, 0.8], [3, 0.65]])


def test_decision_curve_lines_band_and_points():
  t = np.array([0.1, 0.2, 0.3])
  fig = viz.decision_curve(t, [0.3, 0.25, 0.2], [0.28, 0.1, -0.2], model_lo=[0.2, 0.15, 0.1],
                           model_hi=[0.4, 0.35, 0.3],
                           operating_points=[{"name": "youden", "threshold": 0.25, "net_benefit": 0.24},
                                             {"name": "undefined", "threshold": None}])
  ax = fig.axes[0]
  np.testing.assert_allclose(ax.lines[0].get_xydata(), [[0.1, 0.3], [0.2, 0.25], [0.3, 0.2]])
  np.testing.assert_allclose(ax.lines[1].get_ydata(), [0.28, 0.1, -0.2])
  np.testing.assert_allclose(ax.lines[2].get_ydata(), 0.0)        # treat none
  assert len(ax.lines) == 4 and ax.lines[3].get_xydata().tolist() == [[0.25, 0.24]]  # the exact value, once
  assert ax.get_ylim()[0] == -0.05 and len(ax.collections) == 1   # the CI band
