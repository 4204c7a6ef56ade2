"""Predict feeds the model exactly what training saw: a scan's predict-time input equals its stored example.

Two independent paths: the dataset build (folder source: CSV -> builder -> ArrayRecord, read back through TFDS)
and --mode=predict's `scan_input` (file -> model input). Compared byte for byte.
"""
import numpy as np

from lungct import predict
from lungct.data import lung_ct, phantom
from tests.helpers import tiny_config


def test_predict_input_equals_the_stored_training_example(tmp_path):
  scans = tmp_path / "scans"
  rows = ["filename,label,patient_id"]
  for i in range(6):
    ph = phantom.make_phantom(100 + i, i % 2 * 2, shape_xyz=(40, 36, 20))
    phantom.write_phantom_nifti(ph, str(scans / f"s{i}.nii.gz"))
    rows.append(f"s{i}.nii.gz,{int(i % 2)},p{i}")
  (scans / "labels.csv").write_text("\n".join(rows) + "\n")
  c = tiny_config(tmp_path / "tfds", **{"data.source": "folder", "data.manual_dir": str(scans),
                                        "data.labels_csv": "labels.csv", "data.shape": (16, 24, 24)})
  builder = lung_ct.prepare(c.data)
  compared = 0
  for split in ("train", "validation", "test"):
    source = builder.as_data_source(split)
    for i in range(len(source)):
      ex = source[i]
      sid = ex["study_id"].decode() if isinstance(ex["study_id"], bytes) else str(ex["study_id"])
      stored = np.asarray(ex["image"])
      given = predict.scan_input(str(scans / f"{sid}.nii.gz"), c.data)
      assert given.dtype == stored.dtype == np.float32 and given.shape == stored.shape
      assert given.tobytes() == stored.tobytes(), f"{sid}: predict input differs from the stored example"
      compared += 1
  assert compared == 6
