"""The medmnist source: a MedMNIST 3D .npz (train_/val_/test_ images and labels), its splits kept."""
from __future__ import annotations

import numpy as np
import pytest

from tests import helpers  # noqa: F401  (repo root on sys.path)
from configs import default
from lungct.data import lung_ct, pipeline
from lungct.data.errors import DataError

SIZES = {"train": 6, "val": 3, "test": 3}


def _write_npz(path, size=28):
  """Tiny NoduleMNIST3D look-alike: uint8 (N, s, s, s), labels (N, 1); image i of a split is
  filled with 10 * i + offset so the tests can tell which one they got."""
  arrays = {}
  for k, (split, n) in enumerate(SIZES.items()):
    imgs = np.zeros((n, size, size, size), np.uint8)
    for i in range(n):
      imgs[i] = 10 * i + 50 * k
      imgs[i, 0, 0, 0] = 255
    arrays[f"{split}_images"] = imgs
    arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(n, 1).astype(np.uint8)
  np.savez(path, **arrays)
  return path


def _cfg(tmp_path, manual_dir, **kw):
  d = default.get_data_config()
  d.update(dict(source="medmnist", data_dir=str(tmp_path / "tfds"), manual_dir=str(manual_dir),
                shape=(28, 28, 28)))
  d.update(kw)
  return d


def test_splits_labels_and_values_are_kept(tmp_path):
  _write_npz(tmp_path / "nodulemnist3d.npz")
  builder = lung_ct.prepare(_cfg(tmp_path, tmp_path))  # the folder: <flag>.npz for size 28
  for split, name in (("train", "train"), ("validation", "val"), ("test", "test")):
    index = lung_ct.split_index(builder, split)
    assert sorted(e["study_id"] for e in index) == [f"{name}_{i:05d}" for i in range(SIZES[name])]
    src = builder.as_data_source(split)
    for i in range(len(src)):
      ex = pipeline.decode(src[i])
      j = int(ex["study_id"].split("_")[1])
      assert ex["label"] == j % 2 and ex["patient_id"] == ex["study_id"]
      k = ("train", "val", "test").index(name)
      # uint8 v -> v / 255 (no HU window), as stored (float16).
      assert ex["image"][5, 5, 5, 0] == np.float32(np.float16((10 * j + 50 * k) / 255))
      assert ex["image"][0, 0, 0, 0] == 1.0
      np.testing.assert_array_equal(ex["voxel_spacing"], [1.0, 1.0, 1.0])
  assert lung_ct.read_build_report(builder)["totals"] == {"read": 12, "kept": 12, "skipped": 0}


def test_size_64_file_name_and_crop(tmp_path):
  _write_npz(tmp_path / "nodulemnist3d_64.npz", size=64)
  d = _cfg(tmp_path, tmp_path, medmnist_size=64, shape=(48, 48, 48), fit="crop_or_pad")
  builder = lung_ct.prepare(d)
  ex = pipeline.decode(builder.as_data_source("test")[0])
  assert ex["image"].shape == (48, 48, 48, 1)
  assert ex["image"][0, 0, 0, 0] != 1.0  # the corner marker was cropped away (centre 48 of 64)


def test_bad_files_give_one_line_errors(tmp_path):
  with pytest.raises(DataError, match=r"MedMNIST file .*nodulemnist3d.npz not found"):
    lung_ct.prepare(_cfg(tmp_path, tmp_path))
  np.savez(tmp_path / "x.npz", train_images=np.zeros((2, 28, 28)), train_labels=np.zeros((2, 1)))
  with pytest.raises(DataError, match=r"x.npz: a MedMNIST 3D file holds train_/val_/test_"):
    lung_ct.prepare(_cfg(tmp_path, tmp_path / "x.npz"))
  arrays = {f"{s}_images": np.zeros((2, 28, 28), np.uint8) for s in SIZES}
  arrays.update({f"{s}_labels": np.zeros((2, 1), np.uint8) for s in SIZES})
  np.savez(tmp_path / "flat.npz", **arrays)
  with pytest.raises(DataError, match=r"flat.npz: train_images has shape \(2, 28, 28\), expected \(N, D, H, W\)"):
    lung_ct.prepare(_cfg(tmp_path, tmp_path / "flat.npz"))
