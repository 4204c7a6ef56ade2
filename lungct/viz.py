"""Headless matplotlib pictures of CT volumes, predictions and training runs.

Every plotting function takes numpy arrays and returns a `matplotlib.figure.Figure`
built with the object-oriented API on the Agg canvas, so no display (and no pyplot
global state) is ever involved. `save(fig, path)` writes a PNG and releases the figure.

Volumes are (D, H, W) = (z, y, x), either Hounsfield units or already windowed to
[0, 1]. Slices are drawn with `origin="lower"`, so in canonical RAS data anterior is
up in axial views and superior is up in coronal and sagittal views.

CLI:
  python -m lungct.viz scan.nii.gz --out viz/               # montage.png, orthogonal.png
  python -m lungct.viz runs/x/metrics.jsonl --out viz/      # training_curves.png
  python -m lungct.viz dataset --config configs/default.py --split train --n 4 --out viz/
"""
from __future__ import annotations

import argparse
import base64
import html
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # Never needs a display, even if pyplot gets imported later.

from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
import matplotlib.colors  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
import numpy as np  # noqa: E402

LUNG_WINDOW = (-1000.0, 400.0)
Window = tuple[float, float]

_MASK_COLOR = "red"
_TRUE_COLOR = np.array([0.0, 0.8, 0.0])     # green
_PRED_COLOR = np.array([0.9, 0.0, 0.0])     # red
_BOTH_COLOR = np.array([1.0, 0.9, 0.0])     # yellow


# ----------------------------------------------------------------------------- helpers


def _new_figure(figsize: tuple[float, float]) -> Figure:
  fig = Figure(figsize=figsize, dpi=100, layout="constrained")
  FigureCanvasAgg(fig)
  return fig


def save(fig: Figure, path: str | os.PathLike[str], *, dpi: int = 100) -> str:
  """Writes `fig` as a PNG to `path` (parent folders created) and releases it."""
  path = os.fspath(path)
  parent = os.path.dirname(path)
  if parent:
    os.makedirs(parent, exist_ok=True)
  fig.savefig(path, format="png", dpi=dpi)
  fig.clear()
  return path


def resolve_window(volume: np.ndarray, window: Window | None = None,
                   vmin: float | None = None, vmax: float | None = None) -> Window:
  """Display range: `window`, else (vmin, vmax), else [0, 1] data -> (0, 1), else the lung window."""
  if window is not None:
    lo, hi = float(window[0]), float(window[1])
  elif vmin is not None or vmax is not None:
    lo = float(np.nanmin(volume)) if vmin is None else float(vmin)
    hi = float(np.nanmax(volume)) if vmax is None else float(vmax)
  else:
    finite = np.asarray(volume)[np.isfinite(volume)]
    if finite.size and finite.min() >= -0.01 and finite.max() <= 1.01:
      lo, hi = 0.0, 1.0
    else:
      lo, hi = LUNG_WINDOW
  if not hi > lo:
    raise ValueError(f"display window must have lo < hi, got ({lo}, {hi})")
  return lo, hi


def _check_volume(volume: np.ndarray, name: str = "volume") -> np.ndarray:
  volume = np.asarray(volume)
  if volume.ndim == 4 and volume.shape[-1] == 1:
    volume = volume[..., 0]
  if volume.ndim != 3:
    raise ValueError(f"{name} must be (D, H, W) (or (D, H, W, 1)), got shape {volume.shape}")
  return volume


def _check_same_shape(volume: np.ndarray, other: np.ndarray | None, name: str) -> np.ndarray | None:
  if other is None:
    return None
  other = _check_volume(other, name)
  if other.shape != volume.shape:
    raise ValueError(f"{name} shape {other.shape} differs from volume shape {volume.shape}")
  return other


def slice_indices(depth: int, n: int) -> np.ndarray:
  """`n` evenly spaced slice indices in [0, depth): the centres of n equal bins.

  E.g. slice_indices(32, 4) = [4, 12, 20, 28]; n >= depth gives every slice.
  """
  if depth < 1 or n < 1:
    raise ValueError(f"need depth >= 1 and n >= 1, got depth={depth}, n={n}")
  if n >= depth:
    return np.arange(depth)
  return ((2 * np.arange(n) + 1) * depth) // (2 * n)


def top_slices(heatmap: np.ndarray, n: int) -> np.ndarray:
  """Indices (ascending) of the `n` axial slices with the highest heatmap peak (ties: larger sum)."""
  heatmap = _check_volume(heatmap, "heatmap")
  flat = np.nan_to_num(heatmap.reshape(heatmap.shape[0], -1).astype(np.float64), nan=-np.inf)
  peak, total = flat.max(axis=1), np.where(np.isfinite(flat), flat, 0.0).sum(axis=1)
  order = np.lexsort((-total, -peak))  # last key is primary: highest peak first
  return np.sort(order[:min(n, heatmap.shape[0])])


def mask_slices(mask: np.ndarray, n: int) -> np.ndarray:
  """`n` slice indices evenly spread over the slices where `mask` is non-zero (all slices if none)."""
  mask = _check_volume(mask, "mask")
  present = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))
  if present.size == 0:
    return slice_indices(mask.shape[0], n)
  return present[slice_indices(present.size, n)]


def center_of_mass(mask: np.ndarray) -> tuple[int, int, int] | None:
  """Rounded centre of mass (z, y, x) of the non-zero voxels, or None for an empty mask."""
  coords = np.argwhere(np.asarray(mask) > 0)
  if coords.size == 0:
    return None
  return tuple(int(round(c)) for c in coords.mean(axis=0))


def _grid(n: int, cols: int) -> tuple[int, int]:
  cols = max(1, min(cols, n))
  return math.ceil(n / cols), cols


def _show(ax, image: np.ndarray, window: Window, *, aspect: float = 1.0):
  return ax.imshow(image, cmap="gray", vmin=window[0], vmax=window[1], origin="lower",
                   aspect=aspect, interpolation="nearest")


def _draw_mask(ax, mask2d: np.ndarray, color: str = _MASK_COLOR, *, fill: bool = True,
               aspect: float = 1.0, linewidth: float = 1.0) -> None:
  """Contour (and a light fill) of a binary slice; no-op for an empty or full slice."""
  m = np.asarray(mask2d) > 0
  if not m.any():
    return
  if fill:
    rgba = np.zeros(m.shape + (4,))
    rgba[..., :3] = matplotlib.colors.to_rgb(color)
    rgba[..., 3] = 0.25 * m
    ax.imshow(rgba, origin="lower", aspect=aspect, interpolation="nearest")
  if not m.all():
    ax.contour(m.astype(np.float32), levels=[0.5], colors=[color], linewidths=linewidth)


def _clean(ax) -> None:
  ax.set_xticks([])
  ax.set_yticks([])


# ----------------------------------------------------------------------------- volumes


def _slice_grid(shape: Sequence[int], idx: np.ndarray, cols: int, *, panel: float):
  """A grid of axial panels, one per slice index: (figure, axes array, [(ax, z), ...]); spare panels hidden."""
  rows, cols = _grid(len(idx), cols)
  aspect_hw = shape[1] / shape[2]
  fig = _new_figure((panel * cols + 0.8, panel * rows * aspect_hw + 0.6))
  axes = fig.subplots(rows, cols, squeeze=False)
  panels = []
  for k, ax in enumerate(axes.flat):
    _clean(ax)
    if k >= len(idx):
      ax.set_axis_off()
    else:
      panels.append((ax, int(idx[k])))
  return fig, axes, panels


def montage(volume: np.ndarray, *, num_slices: int = 16, cols: int = 4,
            window: Window | None = None, vmin: float | None = None, vmax: float | None = None,
            title: str | None = None, mask: np.ndarray | None = None) -> Figure:
  """Grid of evenly spaced axial slices (see `slice_indices`), optional mask in red.

  Axes: rows * cols image panels (unused ones hidden) + 1 colorbar.
  """
  volume = _check_volume(volume)
  mask = _check_same_shape(volume, mask, "mask")
  win = resolve_window(volume, window, vmin, vmax)
  idx = slice_indices(volume.shape[0], num_slices)
  fig, axes, panels = _slice_grid(volume.shape, idx, cols, panel=2.4)
  im = None
  for ax, z in panels:
    im = _show(ax, volume[z], win)
    if mask is not None:
      _draw_mask(ax, mask[z])
    ax.set_title(f"z = {z}", fontsize=9)
  fig.colorbar(im, ax=axes, shrink=0.8, label=_intensity_label(win))
  fig.suptitle(title or f"Axial slices of a {_shape_str(volume.shape)} volume")
  return fig


def orthogonal_views(volume: np.ndarray, *, center: Sequence[int] | None = None,
                     spacing: Sequence[float] = (1.0, 1.0, 1.0), window: Window | None = None,
                     vmin: float | None = None, vmax: float | None = None,
                     mask: np.ndarray | None = None, overlay: np.ndarray | None = None,
                     title: str | None = None) -> Figure:
  """Axial, coronal and sagittal slices through `center` (z, y, x) with crosshairs.

  `center` defaults to the mask's centre of mass (if the mask is non-empty), else the
  volume centre. `spacing` is (z, y, x) mm and sets each panel's pixel aspect.
  `overlay` is an optional heatmap (same shape) drawn in jet. Axes: 3 panels + 1 colorbar.
  """
  volume = _check_volume(volume)
  mask = _check_same_shape(volume, mask, "mask")
  overlay = _check_same_shape(volume, overlay, "overlay")
  if len(spacing) != 3 or min(spacing) <= 0:
    raise ValueError(f"spacing must be three positive (z, y, x) mm values, got {spacing}")
  sz, sy, sx = (float(s) for s in spacing)
  if center is None:
    center = center_of_mass(mask) if mask is not None else None
    center = center or tuple(s // 2 for s in volume.shape)
  cz, cy, cx = (int(np.clip(c, 0, s - 1)) for c, s in zip(center, volume.shape))
  win = resolve_window(volume, window, vmin, vmax)
  d, h, w = volume.shape
  # (name, slicer, pixel aspect rows/cols, crosshair (x, y) in panel coordinates, axis labels)
  panels = [
      (f"Axial z = {cz}", np.s_[cz, :, :], sy / sx, (cx, cy), ("x", "y"), (w * sx, h * sy)),
      (f"Coronal y = {cy}", np.s_[:, cy, :], sz / sx, (cx, cz), ("x", "z"), (w * sx, d * sz)),
      (f"Sagittal x = {cx}", np.s_[:, :, cx], sz / sy, (cy, cz), ("y", "z"), (h * sy, d * sz)),
  ]
  widths = [p[5][0] for p in panels]
  height = max(p[5][1] for p in panels)
  fig = _new_figure((12.5, max(3.0, 11.0 * height / sum(widths)) + 1.0))
  axes = fig.subplots(1, 3, width_ratios=widths)
  mappable = None
  for ax, (name, sl, aspect, (px, py), (xl, yl), _) in zip(axes, panels):
    im = _show(ax, volume[sl], win, aspect=aspect)
    if overlay is not None:
      mappable = _heat_layer(ax, overlay[sl], _heat_range(overlay), 0.4, aspect=aspect)
    if mask is not None:
      _draw_mask(ax, mask[sl], aspect=aspect)
    ax.axvline(px, color="yellow", lw=0.6, alpha=0.7)
    ax.axhline(py, color="yellow", lw=0.6, alpha=0.7)
    ax.set_title(name, fontsize=10)
    ax.set_xlabel(xl)
    ax.set_ylabel(yl)
  if overlay is not None:
    fig.colorbar(mappable, ax=axes, shrink=0.8, label="heatmap")
  else:
    fig.colorbar(im, ax=axes, shrink=0.8, label=_intensity_label(win))
  fig.suptitle(title or (f"Orthogonal views through (z, y, x) = ({cz}, {cy}, {cx}); "
                         f"spacing {sz:g} x {sy:g} x {sx:g} mm"))
  return fig


def _heat_layer(ax, heat2d: np.ndarray, heat_range: Window, alpha: float, *,
                aspect: float = 1.0, cutoff: float = 0.05):
  """Jet heatmap; values below `cutoff` of the range are transparent so the CT stays visible."""
  lo, hi = heat_range
  shown = np.ma.masked_less(np.asarray(heat2d, dtype=np.float32), lo + cutoff * (hi - lo))
  return ax.imshow(shown, cmap="jet", alpha=alpha, vmin=lo, vmax=hi, origin="lower",
                   aspect=aspect, interpolation="nearest")


def _heat_range(heatmap: np.ndarray) -> Window:
  lo, hi = float(np.nanmin(heatmap)), float(np.nanmax(heatmap))
  if lo >= 0.0 and hi <= 1.0:
    return 0.0, 1.0
  return lo, (hi if hi > lo else lo + 1.0)


def overlay_slices(volume: np.ndarray, heatmap: np.ndarray, *, num_slices: int = 6,
                   alpha: float = 0.4, mask: np.ndarray | None = None, title: str | None = None,
                   window: Window | None = None, cols: int = 3) -> Figure:
  """Heatmap (e.g. Grad-CAM, saliency in [0, 1]) over the axial slices where it peaks.

  Slices come from `top_slices`; heat below 5% of its range is left transparent;
  true-lesion `mask` contours are drawn in white.
  Axes: rows * cols panels (unused hidden) + 1 colorbar.
  """
  volume = _check_volume(volume)
  heatmap = _check_same_shape(volume, heatmap, "heatmap")
  mask = _check_same_shape(volume, mask, "mask")
  win = resolve_window(volume, window)
  hlo, hhi = _heat_range(heatmap)
  idx = top_slices(heatmap, num_slices)
  fig, axes, panels = _slice_grid(volume.shape, idx, cols, panel=3.0)
  hm = None
  for ax, z in panels:
    _show(ax, volume[z], win)
    hm = _heat_layer(ax, heatmap[z], (hlo, hhi), alpha)
    if mask is not None:
      _draw_mask(ax, mask[z], "white", fill=False, linewidth=1.2)
    ax.set_title(f"z = {z}  (max {float(np.nanmax(heatmap[z])):.2f})", fontsize=9)
  fig.colorbar(hm, ax=axes, shrink=0.8, label="heatmap")
  extra = " (white: true lesion)" if mask is not None else ""
  fig.suptitle(title or f"Heatmap on its {len(idx)} strongest axial slices{extra}")
  return fig


def mask_comparison(volume: np.ndarray, true_mask: np.ndarray, pred_mask: np.ndarray, *,
                    num_slices: int = 4, window: Window | None = None,
                    title: str | None = None) -> Figure:
  """Predicted vs true segmentation: green true only, red predicted only, yellow overlap.

  Slices are spread over those where either mask is non-empty. Axes: num_slices panels.
  """
  volume = _check_volume(volume)
  true_mask = _check_same_shape(volume, true_mask, "true_mask") > 0
  pred_mask = _check_same_shape(volume, pred_mask, "pred_mask") > 0
  win = resolve_window(volume, window)
  idx = mask_slices(true_mask | pred_mask, num_slices)
  aspect_hw = volume.shape[1] / volume.shape[2]
  fig = _new_figure((3.0 * len(idx), 3.0 * aspect_hw + 1.2))
  axes = fig.subplots(1, len(idx), squeeze=False)[0]
  for ax, z in zip(axes, idx):
    z = int(z)
    t, p = true_mask[z], pred_mask[z]
    rgba = np.zeros(t.shape + (4,))
    rgba[t & ~p, :3] = _TRUE_COLOR
    rgba[p & ~t, :3] = _PRED_COLOR
    rgba[t & p, :3] = _BOTH_COLOR
    rgba[..., 3] = 0.55 * (t | p)
    _show(ax, volume[z], win)
    ax.imshow(rgba, origin="lower", interpolation="nearest")
    _clean(ax)
    ax.set_title(f"z = {z}  Dice {_dice_str(t, p)}", fontsize=9)
  fig.legend(handles=[Patch(color=_TRUE_COLOR, label="true only"),
                      Patch(color=_PRED_COLOR, label="predicted only"),
                      Patch(color=_BOTH_COLOR, label="overlap")],
             loc="lower center", ncol=3, fontsize=9, frameon=False)
  fig.get_layout_engine().set(rect=(0, 0.08, 1, 0.92))
  fig.suptitle(title or f"Segmentation: volume Dice {_dice_str(true_mask, pred_mask)}")
  return fig


def _dice_str(t: np.ndarray, p: np.ndarray) -> str:
  from lungct import metrics
  return "n/a" if not (t.any() or p.any()) else f"{metrics.dice(p > 0, t > 0):.2f}"


def _intensity_label(win: Window) -> str:
  return "intensity [0, 1]" if win == (0.0, 1.0) else "HU"


def _shape_str(shape: Sequence[int]) -> str:
  return " x ".join(str(s) for s in shape)


# ----------------------------------------------------------------------------- metrics


def confusion_matrix(cm: np.ndarray, class_names: Sequence[str] = ("normal", "abnormal"), *,
                     normalize: bool = False, title: str | None = None) -> Figure:
  """Annotated confusion matrix (rows = true, columns = predicted): counts and row percentages.

  `normalize=True` colours cells by row fraction instead of count. Axes: 1 + colorbar.
  """
  cm = np.asarray(cm, dtype=np.float64)
  n = len(class_names)
  if cm.shape != (n, n):
    raise ValueError(f"cm must be ({n}, {n}) for classes {tuple(class_names)}, got {cm.shape}")
  row_sums = cm.sum(axis=1, keepdims=True)
  frac = np.divide(cm, row_sums, out=np.zeros_like(cm), where=row_sums > 0)
  shown = frac if normalize else cm
  fig = _new_figure((1.4 * n + 3.4, 1.3 * n + 2.0))
  ax = fig.subplots()
  vmax = 1.0 if normalize else max(float(cm.max()), 1.0)
  im = ax.imshow(shown, cmap="Blues", vmin=0.0, vmax=vmax)
  for i in range(n):
    for j in range(n):
      count = int(cm[i, j]) if float(cm[i, j]).is_integer() else cm[i, j]
      text = f"{count}\n({100 * frac[i, j]:.1f}%)"
      color = "white" if shown[i, j] > 0.6 * vmax else "black"
      ax.text(j, i, text, ha="center", va="center", color=color, fontsize=11)
  ax.set_xticks(range(n), class_names)
  ax.set_yticks(range(n), class_names)
  ax.set_xlabel("Predicted")
  ax.set_ylabel("True")
  fig.colorbar(im, ax=ax, shrink=0.8, label="row fraction" if normalize else "count")
  total = int(cm.sum())
  acc = float(np.trace(cm) / cm.sum()) if cm.sum() > 0 else float("nan")
  ax.set_title(title or f"Confusion matrix (n = {total}, accuracy {acc:.3f})")
  return fig


def predicted_vs_reference(panels: Sequence[Mapping[str, Any]], *, cols: int = 3) -> Figure:
  """One scatter per target: reference (x) vs predicted (y) with the identity line; ratings (``levels`` given)
  jittered horizontally so tied reference values stay visible. Each panel: dict(name, y, p, levels=None, unit="")."""
  rows = max(1, math.ceil(len(panels) / cols))
  fig = _new_figure((4.0 * min(cols, max(len(panels), 1)), 3.6 * rows))
  axes = np.atleast_1d(fig.subplots(rows, min(cols, max(len(panels), 1)), squeeze=False)).ravel()
  rng = np.random.default_rng(0)
  for ax, panel in zip(axes, panels):
    y, p = np.asarray(panel["y"], float), np.asarray(panel["p"], float)
    levels = panel.get("levels")
    x = y + (rng.uniform(-0.15, 0.15, y.shape) if levels else 0.0)
    ax.scatter(x, p, s=12, alpha=0.6, color="tab:blue")
    lo = np.nanmin(np.concatenate([y, p])) if y.size else 0.0
    hi = np.nanmax(np.concatenate([y, p])) if y.size else 1.0
    ax.plot([lo, hi], [lo, hi], ls="--", color="gray", lw=1)
    unit = f" ({panel['unit']})" if panel.get("unit") else ""
    ax.set_title(str(panel["name"]), fontsize=10)
    ax.set_xlabel(f"reference{unit}")
    ax.set_ylabel(f"predicted{unit}")
    if levels:
      ax.set_xticks(list(levels))
  for ax in axes[len(panels):]:
    ax.set_axis_off()
  return fig


def roc_curve(fpr: np.ndarray, tpr: np.ndarray, auc: float | None = None,
              operating_points: Sequence[Mapping[str, Any]] | None = None, *,
              title: str | None = None) -> Figure:
  """ROC curve with the chance diagonal and labelled operating points.

  `operating_points`: dicts with keys name, fpr, tpr and optionally threshold. Axes: 1.
  """
  fpr, tpr = np.asarray(fpr, dtype=np.float64), np.asarray(tpr, dtype=np.float64)
  if fpr.shape != tpr.shape or fpr.ndim != 1:
    raise ValueError(f"fpr and tpr must be 1-D of equal length, got {fpr.shape} and {tpr.shape}")
  fig = _new_figure((5.5, 5.2))
  ax = fig.subplots()
  label = "ROC" if auc is None else f"ROC (AUC = {auc:.3f})"
  ax.plot(fpr, tpr, color="tab:blue", lw=2, label=label, drawstyle="default")
  ax.plot([0, 1], [0, 1], ls="--", color="gray", lw=1, label="chance")
  markers = "os^Dvp*h"
  for k, op in enumerate(operating_points or ()):
    name = str(op.get("name", f"point {k}"))
    thr = op.get("threshold")
    text = name if thr is None else f"{name} (t = {float(thr):.2f})"
    x, y = float(op["fpr"]), float(op["tpr"])
    ax.plot([x], [y], ls="none", marker=markers[k % len(markers)], ms=8, mec="black",
            label=text, zorder=3)
    ax.annotate(text, (x, y), xytext=(8, -12), textcoords="offset points", fontsize=8)
  ax.set_xlim(-0.01, 1.01)
  ax.set_ylim(-0.01, 1.01)
  ax.set_aspect("equal")
  ax.set_xlabel("False positive rate (1 - specificity)")
  ax.set_ylabel("True positive rate (sensitivity)")
  ax.grid(alpha=0.3)
  ax.legend(loc="lower right", fontsize=8)
  ax.set_title(title or "ROC curve")
  return fig


def decision_curve(thresholds: Sequence[float], model: Sequence[float], treat_all: Sequence[float], *,
                   model_lo: Sequence[float] | None = None, model_hi: Sequence[float] | None = None,
                   operating_points: Sequence[Mapping[str, Any]] | None = None, title: str | None = None,
                   max_threshold: float | None = None) -> Figure:
  """Decision curve (Vickers & Elkin 2006): net benefit against threshold probability for the model (with its
  interval band), treat all and treat none (0). ``operating_points``: dicts with name, threshold and optionally
  net_benefit (its exact value; else read off the curve), marked on the model's curve. The y range is clipped below at -0.05 (treat all falls steeply at high thresholds).
  Axes: 1; ax.lines[0] = model, [1] = treat all, [2] = treat none."""
  t = np.asarray(thresholds, dtype=np.float64)
  nb, nb_all = np.asarray(model, dtype=np.float64), np.asarray(treat_all, dtype=np.float64)
  if not t.shape == nb.shape == nb_all.shape or t.ndim != 1:
    raise ValueError(f"thresholds, model and treat_all must be 1-D of equal length, got {t.shape}, "
                     f"{nb.shape}, {nb_all.shape}")
  fig = _new_figure((6.0, 4.6))
  ax = fig.subplots()
  ax.plot(t, nb, color="tab:blue", lw=2, label="model")
  ax.plot(t, nb_all, color="tab:orange", lw=1.5, label="treat all")
  ax.plot(t, np.zeros_like(t), color="black", lw=1, ls="--", label="treat none")
  if model_lo is not None and model_hi is not None:
    lo, hi = np.asarray(model_lo, dtype=np.float64), np.asarray(model_hi, dtype=np.float64)
    ax.fill_between(t, lo, hi, color="tab:blue", alpha=0.15, lw=0, label="model, 95% CI")
  markers = "os^Dvp*h"
  for k, op in enumerate(operating_points or ()):
    thr = op.get("threshold")
    if thr is None or not np.isfinite(thr) or not (t.min() <= thr <= t.max()):
      continue
    y = op.get("net_benefit")
    y = float(np.interp(thr, t, nb)) if y is None or not np.isfinite(y) else float(y)
    ax.plot([thr], [y], ls="none", marker=markers[k % len(markers)], ms=7, mec="black",
            label=f"{op.get('name', k)} (t = {float(thr):.2f})", zorder=3)
  finite = np.concatenate([nb[np.isfinite(nb)], nb_all[np.isfinite(nb_all)], [0.0]])
  ax.set_ylim(-0.05, max(0.05, float(finite.max()) * 1.1))
  ax.set_xlim(float(t.min()), float(max_threshold or t.max()))
  ax.set_xlabel("Threshold probability (risk at which one would act)")
  ax.set_ylabel("Net benefit")
  ax.grid(alpha=0.3)
  ax.legend(loc="upper right", fontsize=8)
  ax.set_title(title or "Decision curve")
  return fig


def figures_html(figs: Mapping[str, str]) -> str:
  """``{caption: png path}`` as self-contained HTML figures (each PNG embedded as a data URI), for the reports."""
  def uri(path: str) -> str:
    with open(path, "rb") as f:
      return "data:image/png;base64," + base64.b64encode(f.read()).decode()
  return "".join(f"<figure><img src='{uri(p)}' alt='{html.escape(t)}'><figcaption>{html.escape(t)}</figcaption>"
                 f"</figure>" for t, p in figs.items())


def reliability_diagram(bin_confidence: np.ndarray, bin_accuracy: np.ndarray,
                        bin_counts: np.ndarray, ece: float | None = None, *,
                        title: str | None = None) -> Figure:
  """Calibration: per-bin accuracy bars vs the diagonal, gap bars, and a count histogram.

  Bins are taken as equal-width over [0, 1]. Empty bins (count 0 or NaN) are drawn at
  height 0. Axes: 2 (top: ax.containers[0] = accuracy bars, [1] = gap; bottom: counts).
  """
  conf = np.asarray(bin_confidence, dtype=np.float64)
  acc = np.asarray(bin_accuracy, dtype=np.float64)
  counts = np.asarray(bin_counts, dtype=np.float64)
  if not conf.shape == acc.shape == counts.shape or conf.ndim != 1:
    raise ValueError("bin_confidence, bin_accuracy and bin_counts must be 1-D of equal length, "
                     f"got {conf.shape}, {acc.shape}, {counts.shape}")
  n = conf.size
  empty = (counts <= 0) | ~np.isfinite(acc) | ~np.isfinite(conf)
  acc_h = np.where(empty, 0.0, acc)
  conf_h = np.where(empty, 0.0, conf)
  width = 1.0 / n
  centers = (np.arange(n) + 0.5) * width
  fig = _new_figure((5.5, 6.5))
  top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
  top.bar(centers, acc_h, width=width, color="tab:blue", edgecolor="black", lw=0.6,
          label="accuracy")
  gap = conf_h - acc_h
  top.bar(centers, gap, bottom=acc_h, width=width, color="tab:red", alpha=0.3,
          edgecolor="tab:red", hatch="//", lw=0.6, label="gap to confidence")
  top.plot([0, 1], [0, 1], ls="--", color="gray", label="perfect calibration")
  top.set_xlim(0, 1)
  top.set_ylim(0, 1)
  top.set_ylabel("Accuracy")
  top.legend(loc="upper left", fontsize=8)
  if ece is not None:
    top.text(0.97, 0.05, f"ECE = {ece:.3f}", ha="right", va="bottom", transform=top.transAxes,
             fontsize=10, bbox=dict(boxstyle="round", fc="white", ec="gray"))
  top.set_title(title or "Reliability diagram")
  bottom.bar(centers, counts, width=width, color="gray", edgecolor="black", lw=0.6)
  bottom.set_xlabel("Confidence")
  bottom.set_ylabel("Count")
  return fig


# ----------------------------------------------------------------------------- training


_NON_METRIC_KEYS = frozenset({"step", "epoch", "time", "timestamp", "wall_time", "elapsed"})


def load_history(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
  """Reads a JSON-lines metrics file (one record per line; blank lines skipped).

  A last line cut short (a run killed while writing it) is skipped with a note on stderr; a bad line
  elsewhere is a ValueError naming it. A record that repeats an earlier one's step and keys (a resumed run
  logging again the steps after its checkpoint, in files written before the loop dropped them) replaces it.
  """
  with open(path) as f:
    lines = f.read().split("\n")
  numbered = [(i, line) for i, line in enumerate(lines, 1) if line.strip()]
  records: dict[tuple, dict[str, Any]] = {}
  for k, (lineno, line) in enumerate(numbered):
    try:
      rec = json.loads(line)
    except json.JSONDecodeError as e:
      if k == len(numbered) - 1:
        print(f"{os.fspath(path)}: line {lineno} is incomplete (a run killed while writing?); skipped",
              file=sys.stderr)
        continue
      raise ValueError(f"{os.fspath(path)}: line {lineno} is not valid JSON: {e}") from e
    key = (rec.get("step"), tuple(sorted(rec))) if isinstance(rec, dict) else (lineno,)
    records.pop(key, None)
    records[key] = rec
  return list(records.values())


def metric_groups(history: Sequence[Mapping[str, Any]]) -> dict[str, list[str]]:
  """Numeric keys grouped into panels by their name after the last '/'; 'loss' first.

  E.g. {"train/loss", "val/loss", "val/auc"} -> {"loss": ["train/loss", "val/loss"], "auc": ["val/auc"]}.
  """
  keys: list[str] = []
  for rec in history:
    for k, v in rec.items():
      if k in _NON_METRIC_KEYS or k in keys:
        continue
      if isinstance(v, (int, float)) and not isinstance(v, bool):
        keys.append(k)
  groups: dict[str, list[str]] = {}
  for k in sorted(keys):
    groups.setdefault(k.rsplit("/", 1)[-1], []).append(k)
  return dict(sorted(groups.items(), key=lambda kv: (not kv[0].endswith("loss"), kv[0])))


def training_curves(history: Sequence[Mapping[str, Any]], *, cols: int = 3,
                    title: str | None = None) -> Figure:
  """One panel per metric name (loss first), a line per split, vs "step" (record index if absent).

  Axes: one per group from `metric_groups` (unused grid cells hidden).
  """
  groups = metric_groups(history)
  if not groups:
    raise ValueError("training history has no numeric metrics to plot")
  rows, cols = _grid(len(groups), cols)
  fig = _new_figure((4.2 * cols, 3.2 * rows + 0.4))
  axes = fig.subplots(rows, cols, squeeze=False)
  for ax, (name, keys) in zip(axes.flat, groups.items()):
    for key in keys:
      pts = [(float(r.get("step", i)), float(r[key])) for i, r in enumerate(history)
             if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
      xs, ys = zip(*pts)
      style = dict(marker="o", ms=3) if len(pts) < 30 else {}
      ax.plot(xs, ys, label=key, **style)
    ax.set_title(name)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  for ax in list(axes.flat)[len(groups):]:
    ax.remove()
  fig.suptitle(title or "Training curves")
  return fig


# ----------------------------------------------------------------------------- CLI


def _is_nifti(path: str) -> bool:
  return path.endswith((".nii", ".nii.gz"))


def _scan_figures(path: str, out: str) -> list[str]:
  from lungct.data import nifti, preprocess  # Lazy: heavy, and only the CLI needs them.
  scan = nifti.load_scan(path)
  volume = preprocess.to_dhw(scan.volume)
  spacing_dhw = tuple(float(s) for s in scan.spacing[::-1])
  name = os.path.basename(path)
  written = [
      save(montage(volume, window=LUNG_WINDOW, title=f"{name}: axial slices (lung window)"),
           os.path.join(out, "montage.png")),
      save(orthogonal_views(volume, spacing=spacing_dhw, window=LUNG_WINDOW,
                            title=f"{name}: orthogonal views"),
           os.path.join(out, "orthogonal.png")),
  ]
  return written


def _dataset_figures(config_path: str, split: str, n: int, out: str) -> list[str]:
  """Figures for the first `n` examples of a built TFDS split (lazy imports)."""
  from lungct.config_check import load_config_file
  data_cfg = load_config_file(config_path).data
  from lungct.data import lung_ct, pipeline  # Lazy: pulls in TFDS.
  builder = lung_ct.builder_for(data_cfg)
  if not os.path.isdir(builder.data_dir) or not builder.is_prepared():
    raise FileNotFoundError(f"{builder.data_dir}: dataset not built yet; build it first "
                            "(lungct.data.lung_ct.prepare(config.data))")
  source = builder.as_data_source(split=split)
  written = []
  for i in range(min(n, len(source))):
    ex = pipeline.decode(source[i])
    volume = ex["image"][..., 0]
    mask = ex["mask"][..., 0]
    label = f"{ex['study_id']} label={ex['label']} grade={ex['grade']}"
    has_mask = bool(mask.any())
    written.append(save(montage(volume, window=(0.0, 1.0), mask=mask if has_mask else None,
                                title=f"{split}[{i}] {label}"),
                        os.path.join(out, f"{split}_{i:03d}_montage.png")))
    written.append(save(orthogonal_views(volume, window=(0.0, 1.0),
                                         mask=mask if has_mask else None,
                                         title=f"{split}[{i}] {label}"),
                        os.path.join(out, f"{split}_{i:03d}_orthogonal.png")))
  return written


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m lungct.viz", description=__doc__.split("\n")[0])
  parser.add_argument("source", help="a NIfTI scan (.nii/.nii.gz), a metrics .jsonl file, "
                                     "or 'dataset' (with --config)")
  parser.add_argument("--out", required=True, help="output folder for the PNGs")
  parser.add_argument("--config", default="configs/default.py", help="config file for 'dataset'")
  parser.add_argument("--split", default="train")
  parser.add_argument("--n", type=int, default=4, help="examples to draw for 'dataset'")
  args = parser.parse_args(argv)
  if _is_nifti(args.source):
    written = _scan_figures(args.source, args.out)
  elif args.source.endswith((".jsonl", ".json")):
    written = [save(training_curves(load_history(args.source), title=args.source),
                    os.path.join(args.out, "training_curves.png"))]
  elif args.source == "dataset":
    written = _dataset_figures(args.config, args.split, args.n, args.out)
  else:
    parser.error(f"{args.source}: not a .nii/.nii.gz scan, a .jsonl metrics file, or 'dataset'")
  for path in written:
    print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
