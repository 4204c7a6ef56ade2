"""Real LIDC-IDRI crops through the folder source with the nodule recipe's data settings (issue 17).

`tests/data/lidc/` holds five committed crops that data rules once refused (README there: the thinnest, the
faintest, one at the old 5 mm limit, a ground-glass one, the largest). When the development set of 364 crops
(`<repo>/../shared/data/lidc_indeterminate`) is present, all of them are built the same way and none may be
skipped (before: 39 skipped, 37 "too small" and 2 "not Hounsfield units").
"""
from __future__ import annotations

import csv
import os
import time

import numpy as np
import pytest

from tests import helpers
from configs import nodule
from lungct.data import lung_ct, nifti, pipeline, preprocess, sources

CROPS = os.path.join(helpers.ROOT, "tests", "data", "lidc")
SHARED = os.path.join(os.path.dirname(helpers.ROOT), "shared", "data", "lidc_indeterminate")


def _labels_csv(src_csv: str, out_csv: str) -> list[dict]:
  """The set's nodules.csv + a label column (texture <= 2, ground glass: there is no malignancy label in
  these indeterminate crops; any 0/1 column exercises the build)."""
  with open(src_csv, newline="") as f:
    rows = list(csv.DictReader(f))
  with open(out_csv, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["filename", "label", "patient_id", "mask"])
    for r in rows:
      w.writerow([r["filename"], int(int(r["texture"]) <= 2), r["patient_id"], r["mask"]])
  return rows


def _recipe(data_dir, manual_dir, labels_csv):
  """configs/nodule.py's data config with the folder source, as docs/data.md's command sets it."""
  d = nodule.get_data_config()
  d.source, d.manual_dir, d.labels_csv, d.data_dir = "folder", manual_dir, labels_csv, str(data_dir)
  return d


def _bbox_mm(mask_dhw, spacing_dhw):
  nz = np.nonzero(mask_dhw)
  return np.array([(a.max() - a.min() + 1) * s for a, s in zip(nz, spacing_dhw)])


def test_committed_real_crops_are_all_kept_with_their_geometry(tmp_path):
  rows = _labels_csv(os.path.join(CROPS, "nodules.csv"), str(tmp_path / "labels.csv"))
  d = _recipe(tmp_path / "tfds", CROPS, str(tmp_path / "labels.csv"))
  builder = lung_ct.prepare(d)
  report = lung_ct.read_build_report(builder)
  assert report["totals"] == {"read": 5, "kept": 5, "skipped": 0}, report["skipped"]
  stored = {e["study_id"]: e for s in lung_ct.SPLITS
            for e in map(pipeline.decode, (builder.as_data_source(s)[i] for i in range(len(builder.as_data_source(s)))))}
  assert sorted(stored) == sorted(r["filename"][: -len(".nii.gz")] for r in rows)  # ids: relative paths
  for r in rows:
    ex = stored[r["filename"][: -len(".nii.gz")]]
    scan = nifti.load_scan(os.path.join(CROPS, r["filename"]))
    mask = sources.load_mask(os.path.join(CROPS, r["mask"]), scan)
    mask_dhw, spacing_dhw = preprocess.to_dhw(mask), scan.spacing[::-1]
    crop = ex["mask"][..., 0]
    # The mask-centred 32 mm crop holds the whole nodule: as many voxels as the mask resampled to 1 mm,
    # none on the crop's border.
    resampled = preprocess.resample_to_spacing(mask_dhw, spacing_dhw, (1.0, 1.0, 1.0), order=0)
    assert crop.sum() == resampled.sum() > 0, r["filename"]
    assert not (crop[0].any() or crop[-1].any() or crop[:, 0].any() or crop[:, -1].any()
                or crop[:, :, 0].any() or crop[:, :, -1].any()), r["filename"]
    # Millimetres are kept: the nodule's extent per axis at 1 mm is its native extent within one voxel.
    np.testing.assert_allclose(_bbox_mm(crop, (1.0, 1.0, 1.0)), _bbox_mm(mask_dhw, spacing_dhw), atol=1.0 + 1e-6)
    np.testing.assert_array_equal(ex["voxel_spacing"], [1.0, 1.0, 1.0])
  # The faint crop keeps its nodule: the brightest voxel (-506 HU, (-506 + 1000) / 1400 in the lung window)
  # stays far above lung (-850 HU) after linear resampling to 1 mm.
  faint = float(stored["image/LIDC-IDRI-0269_R_1"]["image"].max())
  assert (-600 + 1000) / 1400 < faint <= 494 / 1400 + 1e-3


def test_all_364_development_crops_are_kept(tmp_path):
  if not os.path.isdir(SHARED):
    pytest.skip(f"the development set of 364 real LIDC-IDRI crops is not here ({SHARED})")
  _labels_csv(os.path.join(SHARED, "nodules.csv"), str(tmp_path / "labels.csv"))
  t0 = time.perf_counter()
  builder = lung_ct.prepare(_recipe(tmp_path / "tfds", SHARED, str(tmp_path / "labels.csv")))
  report = lung_ct.read_build_report(builder)
  print(f"364 real crops built in {time.perf_counter() - t0:.1f} s: {report['totals']}")
  assert report["totals"] == {"read": 364, "kept": 364, "skipped": 0}, report["skip_reasons"]
  index = [e for s in lung_ct.SPLITS for e in lung_ct.split_index(builder, s)]
  assert len({e["study_id"] for e in index}) == 364
  # Patients stay in one split (258 patients, several nodules each).
  split_of = {}
  for s in lung_ct.SPLITS:
    for e in lung_ct.split_index(builder, s):
      assert split_of.setdefault(e["patient_id"], s) == s


def test_every_real_mask_is_on_its_scans_grid():
  """The mask/scan grid check (sources.load_mask) accepts the real masks: checked on all 364 when present."""
  root = SHARED if os.path.isdir(SHARED) else CROPS
  with open(os.path.join(root, "nodules.csv"), newline="") as f:
    rows = list(csv.DictReader(f))
  for r in rows:
    scan = nifti.load_scan(os.path.join(root, r["filename"]))
    assert sources.load_mask(os.path.join(root, r["mask"]), scan).sum() > 0
  assert len(rows) in (5, 364)


def test_a_csv_with_masks_needs_no_label(tmp_path):
  """The set's own nodules.csv (filename, mask, patient_id, ratings; no label) lists every crop for segmentation:
  the masks are the targets, the label is unknown (-1). Without masks or targets the label stays required."""
  items = sources.list_folder_items(CROPS, "nodules.csv")
  assert len(items) == 5 and all(i.label == -1 and i.mask_path for i in items)
  assert {i.patient_id for i in items} == {"LIDC-IDRI-0064", "LIDC-IDRI-0120", "LIDC-IDRI-0269", "LIDC-IDRI-0341",
                                           "LIDC-IDRI-0866"}
  (tmp_path / "plain.csv").write_text("filename,patient_id\nimage/LIDC-IDRI-0064_R_1.nii.gz,P1\n")
  with pytest.raises(sources.DataError, match="missing \\['label'\\]"):
    sources.list_folder_items(CROPS, str(tmp_path / "plain.csv"))
