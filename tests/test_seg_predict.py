"""Segmentation --mode=predict on the committed real LIDC-IDRI crops (tests/data/lidc/): the predicted mask goes
back to the scan's own grid where the model's window was cut (around the given lesion for a model trained on
mask-centred crops), written as NIfTI with the input's shape and affine, and the lesion volume in ml.

The model is replaced by an oracle that answers the reference mask on the model's grid, so what is tested is the
geometry and the plumbing of predict, exactly: a mask that the inverse mapping puts back must land on the
reference mask, and the volume must be the voxel count times the voxel volume.
"""
from __future__ import annotations

import csv
import os
import types

import ml_collections
import nibabel as nib
import numpy as np
import pytest

from configs import nodule_seg
from lungct import predict, runtime
from lungct.data import nifti, preprocess, sources
from lungct.tasks import segment
from tests import helpers

CROPS = os.path.join(helpers.ROOT, "tests", "data", "lidc")


def _rows() -> list[dict]:
  with open(os.path.join(CROPS, "nodules.csv"), newline="") as f:
    return list(csv.DictReader(f))


def _dice(a, b) -> float:
  a, b = np.asarray(a) > 0, np.asarray(b) > 0
  return 2.0 * np.sum(a & b) / (a.sum() + b.sum())


def _config() -> ml_collections.ConfigDict:
  c = nodule_seg.get_config()
  c.segment.keep = "all"
  return c


@pytest.mark.parametrize("row", _rows(), ids=lambda r: os.path.basename(r["filename"]).split(".")[0])
def test_inverse_mapping_puts_the_model_mask_back_on_the_reference(row):
  """The reference mask taken to the model's grid (1 mm, 32^3 around the lesion) and back with the window's
  crop_start lands on the reference mask: as close as 1 mm voxels allow (nearest neighbour both ways; over the
  364 development crops the round trip's Dice is 0.75-0.99, median 0.91), and closer than the same mask put 3 mm
  off along any axis (more than the thickest slice, 2.5 mm)."""
  d = _config().data
  scan = nifti.load_scan(os.path.join(CROPS, row["filename"]))
  ref_xyz = sources.load_mask(os.path.join(CROPS, row["mask"]), scan)
  ref = preprocess.to_dhw(ref_xyz)
  pre = preprocess.preprocess_scan(scan, d, ref_xyz)
  spacing = np.asarray(scan.spacing, np.float64)[::-1]
  back = preprocess.to_scan_grid(pre["mask"], ref.shape, spacing, d, pre["crop_start"])
  assert back.shape == ref.shape and back.dtype == np.uint8
  dice = _dice(back, ref)
  assert dice >= 0.8, dice
  for axis in range(3):
    for shift in (-3, 3):
      start = pre["crop_start"].copy()
      start[axis] += shift
      assert _dice(preprocess.to_scan_grid(pre["mask"], ref.shape, spacing, d, start), ref) < dice, (axis, shift)


def _predict_with_oracle(tmp_path, monkeypatch, scan_path, oracle_mask_dhw, lesions_csv="", without_lesion="skip"):
  """predict.predict_scans for one scan with segment.make_apply replaced by an oracle answering
  ``oracle_mask_dhw`` (model grid) as the probability of every window."""
  c = _config()
  c.predict.input = scan_path
  c.predict.lesions = lesions_csv
  c.predict.without_lesion = without_lesion
  variables = types.SimpleNamespace(graphdef=None, params=None, batch_stats=None)
  predictor = runtime.Predictor(variables=variables, mesh=None, config=c, step=0, checkpoint="oracle")
  prob = np.asarray(oracle_mask_dhw, np.float32)[None, ..., None]
  monkeypatch.setattr(predict.tasks, "restore", lambda *a, **k: (predictor, segment))
  monkeypatch.setattr(segment, "make_apply", lambda *a: (lambda p, b, x: np.repeat(prob, len(x), 0)))
  return predict.predict_scans(c, str(tmp_path / "work"))


def test_predict_writes_the_mask_on_the_scan_grid_where_the_lesion_is(tmp_path, monkeypatch):
  """A real crop put off-centre into a larger volume (as a nodule in a bigger scan): with its lesion given in
  predict.lesions the mask NIfTI has the input's shape and affine and lies on the reference mask; the volume
  is its voxel count x the voxel volume. Cut around the scan's centre instead, the same mask lands elsewhere."""
  row = next(r for r in _rows() if "0120_R_3" in r["filename"])   # ground glass, 17.6 mm
  img = nib.load(os.path.join(CROPS, row["filename"]))
  ref = np.asarray(nib.load(os.path.join(CROPS, row["mask"])).dataobj).astype(np.uint8)
  vol = np.asarray(img.dataobj).astype(np.int16)
  big = np.full((90, 80, 30), -1000, np.int16)
  big_mask = np.zeros(big.shape, np.uint8)
  at = (4, 30, 17)                                      # far from the centre along every axis
  sl = tuple(slice(a, a + n) for a, n in zip(at, vol.shape))
  big[sl], big_mask[sl] = vol, ref
  affine = img.affine.copy()
  affine[:3, 3] -= affine[:3, :3] @ np.asarray(at, np.float64)   # the crop keeps its world position
  scans = tmp_path / "scans"
  scans.mkdir()
  nib.save(nib.Nifti1Image(big, affine), str(scans / "big.nii.gz"))
  nib.save(nib.Nifti1Image(big_mask, affine), str(scans / "big_mask.nii.gz"))
  (tmp_path / "lesions.csv").write_text("filename,mask\nbig.nii.gz,scans/big_mask.nii.gz\n")

  d = _config().data
  scan = nifti.load_scan(str(scans / "big.nii.gz"))
  model_mask = preprocess.preprocess_scan(scan, d, sources.load_mask(str(scans / "big_mask.nii.gz"), scan))["mask"]
  assert model_mask.sum() > 1000                          # the whole nodule is inside the 32 mm window

  rows = _predict_with_oracle(tmp_path, monkeypatch, str(scans / "big.nii.gz"), model_mask,
                              lesions_csv=str(tmp_path / "lesions.csv"))
  assert rows[0]["error"] == "" and rows[0]["crop_centre"] == "lesion"
  out = nib.load(rows[0]["mask_file"])
  assert out.shape == big.shape and np.allclose(out.affine, affine)
  got = np.asarray(out.dataobj)
  assert _dice(got, big_mask) >= 0.85     # 0.90 measured: what the 1 mm grid keeps of this 0.95 mm crop
  voxel_ml = float(np.prod(img.header.get_zooms())) / 1000.0
  assert float(rows[0]["lesion_ml"]) == pytest.approx(np.count_nonzero(got) * voxel_ml, abs=1e-4)
  assert float(rows[0]["lesion_ml"]) == pytest.approx(np.count_nonzero(big_mask) * voxel_ml, rel=0.05)
  assert float(rows[0]["lesion_ml_model_grid"]) == pytest.approx(model_mask.sum() / 1000.0, abs=1e-4)

  # No lesion given: with without_lesion=center the crop is the scan's centre, and the same answer lands there.
  rows = _predict_with_oracle(tmp_path, monkeypatch, str(scans / "big.nii.gz"), model_mask,
                              without_lesion="center")
  assert rows[0]["crop_centre"] == "scan centre"
  assert _dice(np.asarray(nib.load(rows[0]["mask_file"]).dataobj), big_mask) < 0.05
  # ...and without that option a mask-centred model refuses to guess.
  with pytest.raises(Exception, match="predict.lesions"):
    _predict_with_oracle(tmp_path, monkeypatch, str(scans / "big.nii.gz"), model_mask)


def test_predict_on_a_committed_crop_without_lesion_entry_uses_its_centre(tmp_path, monkeypatch):
  """An LIDC volume of interest is centred on its nodule: without_lesion=center cuts the same window as the
  mask would within a voxel, so the reference mask comes back in place."""
  row = next(r for r in _rows() if "0064_R_1" in r["filename"])   # the largest, 26.8 mm
  path = os.path.join(CROPS, row["filename"])
  d = _config().data
  scan = nifti.load_scan(path)
  ref = sources.load_mask(os.path.join(CROPS, row["mask"]), scan)
  by_mask = preprocess.preprocess_scan(scan, d, ref)
  by_centre = preprocess.preprocess_scan(scan, d)
  assert np.abs(by_mask["crop_start"] - by_centre["crop_start"]).max() <= 2
  rows = _predict_with_oracle(tmp_path, monkeypatch, path, by_mask["mask"], without_lesion="center")
  out = nib.load(rows[0]["mask_file"])
  assert out.shape == nib.load(path).shape and np.allclose(out.affine, nib.load(path).affine)
  assert _dice(np.asarray(out.dataobj), np.asarray(nib.load(os.path.join(CROPS, row["mask"])).dataobj)) >= 0.9


def test_center_component_keeps_the_lesion_at_the_centre():
  pred = np.zeros((16, 16, 16), bool)
  pred[6:10, 6:10, 6:10] = True          # at the centre
  pred[0:3, 0:3, 0:3] = True             # a false positive in a corner
  pred[13:16, 13:16, 0:5] = True
  kept = segment.center_component(pred)
  assert kept.sum() == 64 and kept[8, 8, 8] and not kept[0, 0, 0]
  # No component holds the centre: the nearest one is kept.
  off = np.zeros((16, 16, 16), bool)
  off[10:12, 10:12, 10:12] = True        # nearest to the centre (7.5, 7.5, 7.5)
  off[0:5, 0:5, 0:5] = True              # larger but farther (corner (4, 4, 4): 6.1 voxels vs 4.3)
  np.testing.assert_array_equal(segment.center_component(off), np.pad(np.ones((2, 2, 2), bool), [(10, 4)] * 3))
  assert not segment.center_component(np.zeros((4, 4, 4), bool)).any()
  sc = ml_collections.ConfigDict({"threshold": 0.5, "keep": "center"})
  np.testing.assert_array_equal(segment.lesion_mask(pred * 0.9, sc), kept)
  sc.keep = "all"
  np.testing.assert_array_equal(segment.lesion_mask(pred * 0.9, sc), pred)
