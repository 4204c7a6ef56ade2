"""The data boundary of issue 17, one test per defect: each failed before its fix.

1 the documented CSV (per-patient folders, files of the same name) builds; ids are relative paths
2 editing the labels CSV or replacing a scan rebuilds, saying why
3 a mask on another grid is refused naming both files
4 resuming on another dataset is refused (manual_dir / labels_csv are decided by the dataset identity)
5 label="grade" needs grades in [0, num_classes); every split holds both labels
7 the same settings in another spelling are the same dataset; a relative labels_csv is read in manual_dir
8 a symbolic link out of manual_dir is refused
13 predict prepares a scan as training did: a lesion for mask-centred models, MedMNIST intensities
Odd files for the HU rule: what is clearly not HU is refused, CT with air padding or without soft tissue kept.
"""
from __future__ import annotations

import os
import re
import shutil

import nibabel as nib
import numpy as np
import pytest

from tests import helpers
from configs import default, nodule
from lungct import config_check, predict
from lungct.data import lung_ct, nifti, pipeline, preprocess, sources
from lungct.data.errors import DataError, ScanError

SPACING = (0.7, 0.7, 1.25)


def _crop(seed, shape_xyz=(24, 24, 6), radius=3.0):
  """A nodule-crop-like HU volume: lung (-850 +- 30) with a soft-tissue sphere; and its mask."""
  rng = np.random.default_rng(seed)
  vol = -850.0 + rng.normal(0, 30, shape_xyz)
  grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape_xyz], indexing="ij"), -1) * np.asarray(SPACING)
  centre = (np.asarray(shape_xyz) - 1) / 2 * np.asarray(SPACING)
  mask = (np.linalg.norm(grid - centre, axis=-1) <= radius).astype(np.uint8)
  vol[mask > 0] = 30.0
  return vol, mask


def _write(root, rel, seed, shape_xyz=(24, 24, 6)):
  vol, mask = _crop(seed, shape_xyz)
  path = nifti.save_scan(vol, SPACING, os.path.join(root, rel))
  mask_rel = rel.replace(".nii.gz", "_mask.nii.gz")
  img = nib.load(path)
  nib.save(nib.Nifti1Image(mask, img.affine), os.path.join(root, mask_rel))
  return mask_rel


def _folder(tmp_path, n_patients=6, name="crops"):
  """Per-patient folders P<i>/nodule_1.nii.gz (+ nodule_2 for some), masks beside them; labels.csv inside."""
  root = tmp_path / name
  rows = ["filename,label,patient_id,mask"]
  for p in range(n_patients):
    for k in range(1 + p % 2):
      rel = f"P{p}/nodule_{k + 1}.nii.gz"
      rows.append(f"{rel},{p % 2},P{p},{_write(str(root), rel, 10 * p + k)}")
  (root / "labels.csv").write_text("\n".join(rows) + "\n")
  return root


def _cfg(data_dir, root, **kw):
  d = nodule.get_data_config()
  d.update(dict(source="folder", manual_dir=str(root), labels_csv="labels.csv", data_dir=str(data_dir),
                shape=(16, 16, 16), build_workers=1))
  d.update(kw)
  return d


def _stored(builder):
  return {e["study_id"]: e for s in lung_ct.SPLITS for e in
          map(pipeline.decode, (builder.as_data_source(s)[i] for i in range(len(builder.as_data_source(s)))))}


# ----------------------------------------------------------------------------- 1: ids


def test_1_docs_example_csv_builds_and_ids_are_relative_paths(tmp_path):
  """docs/data.md's own example CSV (before: "duplicate study id 'nodule_1'")."""
  with open(os.path.join(helpers.ROOT, "docs", "data.md")) as f:
    block = re.search(r"```\n(filename,label,patient_id,mask\n.*?)```", f.read(), re.S).group(1)
  root = tmp_path / "crops"
  for line in block.strip().splitlines()[1:]:
    filename, _, _, mask = line.split(",")
    written = _write(str(root), filename, len(filename) + hash(filename) % 7)
    if mask:
      assert written == mask
  (root / "labels.csv").write_text(block)
  items = sources.list_folder_items(str(root), "labels.csv")
  assert [it.study_id for it in items] == ["LIDC-0001/nodule_1", "LIDC-0001/nodule_2", "LIDC-0002/nodule_1"]
  # Built with more patients (three splits need more than two), the ids stay relative paths throughout.
  more = [f"P{p}/nodule_1.nii.gz,{p % 2},P{p},{_write(str(root), f'P{p}/nodule_1.nii.gz', p)}" for p in range(6)]
  (root / "labels.csv").write_text(block + "\n".join(more) + "\n")
  builder = lung_ct.prepare(_cfg(tmp_path / "tfds", root))
  ids = {e["study_id"] for s in lung_ct.SPLITS for e in lung_ct.split_index(builder, s)}
  assert {"LIDC-0001/nodule_1", "LIDC-0002/nodule_1", "P5/nodule_1"} <= ids and len(ids) == 9
  assert sources.safe_name("LIDC-0001/nodule_1") == "LIDC-0001__nodule_1"


# ----------------------------------------------------------------------------- 2: follows its files


def test_2_editing_the_csv_or_a_scan_rebuilds_saying_why(tmp_path, capsys):
  root = _folder(tmp_path)
  d = _cfg(tmp_path / "tfds", root)
  first = lung_ct.prepare(d)
  labels = {k: int(e["label"]) for k, e in _stored(first).items()}
  # Swap every label in the CSV (before: is_prepared() stayed true and the old labels were used).
  text = (root / "labels.csv").read_text().splitlines()
  swapped = [text[0]] + [re.sub(r",([01]),", lambda m: f",{1 - int(m.group(1))},", r, count=1) for r in text[1:]]
  (root / "labels.csv").write_text("\n".join(swapped) + "\n")
  assert not lung_ct.builder_for(d).is_prepared()
  capsys.readouterr()
  second = lung_ct.prepare(d)
  assert f"the data changed since {first.builder_config.name} was built (the labels CSV was edited)" in \
      capsys.readouterr().out
  assert {k: int(e["label"]) for k, e in _stored(second).items()} == {k: 1 - v for k, v in labels.items()}
  # Replace one scan (same name) with another of the same size.
  shutil.copyfile(root / "P1" / "nodule_2.nii.gz", root / "P0" / "nodule_1.nii.gz")
  os.utime(root / "P0" / "nodule_1.nii.gz", ns=(1, 1))
  assert not lung_ct.builder_for(d).is_prepared()
  lung_ct.prepare(d)
  assert "1 file(s) changed (size or modification time): P0/nodule_1.nii.gz" in capsys.readouterr().out
  assert lung_ct.builder_for(d).is_prepared()  # unchanged data: reused


# ----------------------------------------------------------------------------- 3: mask grid


def test_3_a_mask_on_another_grid_is_refused_naming_both_files(tmp_path):
  vol, mask = _crop(0)
  scan_path = nifti.save_scan(vol, SPACING, tmp_path / "scan.nii.gz")
  scan = nifti.load_scan(scan_path)
  nib.save(nib.Nifti1Image(mask, nib.load(scan_path).affine), str(tmp_path / "ok.nii.gz"))
  assert sources.load_mask(str(tmp_path / "ok.nii.gz"), scan).sum() == mask.sum()
  nib.save(nib.Nifti1Image(mask, np.eye(4)), str(tmp_path / "identity.nii.gz"))  # before: accepted
  with pytest.raises(ScanError, match=r"identity.nii.gz: mask is not on the grid of its scan .*scan.nii.gz") as e:
    sources.load_mask(str(tmp_path / "identity.nii.gz"), scan)
  assert "\n" not in str(e.value)
  other = nib.load(scan_path).affine.copy()
  other[2, 2] = 2.5  # another slice spacing
  nib.save(nib.Nifti1Image(mask, other), str(tmp_path / "spacing.nii.gz"))
  with pytest.raises(ScanError, match=r"mask spacing \[0.7, 0.7, 2.5\] mm, scan \[0.7, 0.7, 1.25\] mm"):
    sources.load_mask(str(tmp_path / "spacing.nii.gz"), scan)


# ----------------------------------------------------------------------------- 4: resume


def test_4_resume_decides_by_the_dataset_identity_not_the_path(tmp_path):
  assert not config_check.is_execution_key("data.manual_dir")  # before: freely changeable on resume
  assert not config_check.is_execution_key("data.labels_csv")
  a, b = _folder(tmp_path, name="a"), _folder(tmp_path, name="b")
  (b / "labels.csv").write_text((b / "labels.csv").read_text().replace(",1,P1,", ",0,P1,"))
  ca, cb = default.get_config(), default.get_config()
  ca.data, cb.data = _cfg(tmp_path / "tfds", a), _cfg(tmp_path / "tfds", b)
  saved = {"config": ca.to_dict(), "dataset": lung_ct.config_name(ca.data)}
  # Another folder: the path differs, which alone is no reason to refuse; the data differs, which is.
  config_check.same_run(saved["config"], cb.to_dict(), "runs/x")
  with pytest.raises(config_check.ConfigError) as e:
    config_check.same_dataset(saved, lung_ct.config_name(cb.data), cb.to_dict(), "runs/x")
  msg = str(e.value)
  assert "\n" not in msg and saved["dataset"] in msg and lung_ct.config_name(cb.data) in msg
  assert f"from {a} + labels.csv" in msg and f"from {b} + labels.csv" in msg
  # The same files moved elsewhere (times kept) are the same dataset: resuming is allowed.
  moved = tmp_path / "moved"
  shutil.copytree(a, moved, copy_function=shutil.copy2)
  config_check.same_dataset(saved, lung_ct.config_name(_cfg(tmp_path / "tfds", moved)), cb.to_dict(), "x")


# ----------------------------------------------------------------------------- 5: classes


def test_5_grades_must_be_classes_and_every_split_holds_both_labels(tmp_path):
  root = _folder(tmp_path, n_patients=9)
  builder = lung_ct.prepare(_cfg(tmp_path / "tfds", root))
  assert lung_ct.check_classes(builder, "binary") == []
  # No grade column: every grade is -1 (before: trained silently as the last class).
  with pytest.raises(DataError, match=r"study 'P\d/nodule_\d' \((train|validation|test)\) has grade unknown "
                                      r"\(-1: no grade column"):
    lung_ct.check_classes(builder, "grade", 5)
  text = (root / "labels.csv").read_text().splitlines()
  (root / "labels.csv").write_text("\n".join([text[0] + ",grade"] + [r + ",4" for r in text[1:]]) + "\n")
  graded = lung_ct.prepare(_cfg(tmp_path / "tfds", root))
  with pytest.raises(DataError, match=r"has grade 4; data.label='grade' needs grades in \[0, 3\)"):
    lung_ct.check_classes(graded, "grade", 3)  # before: a NaN loss
  assert lung_ct.check_classes(graded, "grade", 5) == []
  # A split without one of the labels stops before training, naming the split.
  one = _folder(tmp_path, n_patients=4, name="few")  # 2 patients of label 1: not enough for 3 splits
  few = lung_ct.prepare(_cfg(tmp_path / "tfds", one))
  with pytest.raises(DataError, match=r"split (validation|test) holds no study with label \[1\]"):
    lung_ct.check_classes(few, "binary")


# ----------------------------------------------------------------------------- 7: spelling


def test_7_the_same_settings_spelled_otherwise_are_the_same_dataset(tmp_path, monkeypatch):
  root = _folder(tmp_path)
  base = _cfg(tmp_path / "tfds", root)
  name = lung_ct.config_name(base)
  ints = _cfg(tmp_path / "tfds", root, hu_window=(-1000, 400), shape=(16.0, 16, 16), target_spacing=(1, 1, 1))
  explicit = _cfg(tmp_path / "tfds", root, anti_aliasing=False, min_extent_mm=0.0)
  del base["min_extent_mm"]  # a default left out
  one = _cfg(tmp_path / "tfds", root, target_spacing=(1.0,))
  absolute = _cfg(tmp_path / "tfds", root, labels_csv=str(root / "labels.csv"))
  assert {lung_ct.config_name(c) for c in (base, ints, explicit, one, absolute)} == {name}
  assert lung_ct.config_name(_cfg(tmp_path / "tfds", root, hu_window=(-1000, 500))) != name
  # A relative labels_csv is read inside manual_dir, wherever the command runs (before: the cwd).
  (tmp_path / "elsewhere").mkdir()
  (tmp_path / "elsewhere" / "labels.csv").write_text("filename,label\nnot/there.nii.gz,0\n")
  monkeypatch.chdir(tmp_path / "elsewhere")
  assert lung_ct.config_name(_cfg(tmp_path / "tfds", root)) == name
  assert len(sources.list_items(_cfg(tmp_path / "tfds", root))) == 9


# ----------------------------------------------------------------------------- 8: symlinks


def test_8_a_symlink_out_of_manual_dir_is_refused(tmp_path):
  root = _folder(tmp_path)
  outside = tmp_path / "outside.nii.gz"
  shutil.copyfile(root / "P0" / "nodule_1.nii.gz", outside)
  os.symlink(outside, root / "P0" / "link.nii.gz")
  os.symlink(root / "P1" / "nodule_1.nii.gz", root / "P0" / "inside.nii.gz")  # a link inside is fine
  (root / "labels.csv").write_text("filename,label\nP0/inside.nii.gz,0\nP0/link.nii.gz,1\n")
  with pytest.raises(DataError, match=r"row 3: filename 'P0/link.nii.gz' is a symbolic link leading outside"):
    sources.list_folder_items(str(root), "labels.csv")


def test_8_a_dicom_slice_linked_from_outside_is_refused(tmp_path):
  root = tmp_path / "dicom"
  (root / "s1").mkdir(parents=True)
  (root / "s1" / "IM0.dcm").write_bytes(b"x")
  (tmp_path / "elsewhere.dcm").write_bytes(b"y")
  os.symlink(tmp_path / "elsewhere.dcm", root / "s1" / "IM1.dcm")
  (root / "labels.csv").write_text("filename,label\ns1,0\n")
  d = _cfg(tmp_path / "tfds", root, source="dicom")
  with pytest.raises(DataError, match=r"s1/IM1.dcm: a symbolic link leading outside the data dir"):
    lung_ct.builder_for(d)  # before anything is read or written


# ----------------------------------------------------------------------------- 13: predict input


def test_13_predict_prepares_mask_centred_inputs_as_training_did(tmp_path):
  root = _folder(tmp_path)
  d = _cfg(tmp_path / "tfds", root)
  stored = _stored(lung_ct.prepare(d))
  scan_path = str(root / "P1" / "nodule_2.nii.gz")
  # Before: centre-cropped whatever it was given. Now a mask-centred model needs the lesion.
  with pytest.raises(ScanError, match="no lesion mask or centre"):
    predict.scan_input(scan_path, d)
  with_mask = predict.scan_input(scan_path, d, {"mask": str(root / "P1" / "nodule_2_mask.nii.gz")})
  assert with_mask.tobytes() == stored["P1/nodule_2"]["image"].tobytes()
  # A centre instead of the mask: the lesion's centre in voxels of the file, or in world (RAS) mm.
  vol, mask = _crop(11)
  centre_ijk = np.argwhere(mask).mean(0)
  by_voxel = predict.scan_input(scan_path, d, {"point": tuple(centre_ijk), "coords": "voxel"})
  world = nib.load(scan_path).affine @ np.append(centre_ijk, 1.0)
  by_world = predict.scan_input(scan_path, d, {"point": tuple(world[:3]), "coords": "world"})
  np.testing.assert_array_equal(by_voxel, by_world)
  np.testing.assert_allclose(by_voxel, with_mask, atol=1e-6)
  with pytest.raises(ScanError, match="lies outside the scan"):
    predict.scan_input(scan_path, d, {"point": (500.0, 0.0, 0.0), "coords": "voxel"})
  # A centre-cropped model takes the scan as it is.
  assert predict.scan_input(scan_path, _cfg(tmp_path, root, crop_center="center")).shape == (16, 16, 16, 1)
  # The lesions CSV: masks relative to the CSV, or x,y,z with coords.
  (tmp_path / "lesions.csv").write_text("filename,mask,x,y,z,coords\nP1/nodule_2.nii.gz,crops/P1/nodule_2_mask"
                                        ".nii.gz,,,,\nP0/nodule_1.nii.gz,,1,2,3,world\n")
  lesions = sources.read_lesions(str(tmp_path / "lesions.csv"))
  assert lesions["P0/nodule_1.nii.gz"] == {"point": (1.0, 2.0, 3.0), "coords": "world"}
  assert lesions["P1/nodule_2.nii.gz"]["mask"] == str(tmp_path / "crops" / "P1" / "nodule_2_mask.nii.gz")
  assert predict.lesion_key(scan_path, str(root)) == "P1/nodule_2.nii.gz"


def test_13_medmnist_models_get_scaled_intensities_not_a_hu_window(tmp_path):
  d = default.get_data_config()
  d.update(dict(source="medmnist", shape=(8, 8, 8), target_spacing=(), fit="crop_or_pad"))
  vol = np.random.default_rng(0).integers(0, 256, (8, 8, 8)).astype(np.uint8)
  nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "m.nii.gz"))
  x = predict.scan_input(str(tmp_path / "m.nii.gz"), d)[..., 0]
  expected = preprocess.round_stored(preprocess.to_dhw(vol.astype(np.float32) / 255.0))
  np.testing.assert_array_equal(x, expected)  # before: HU-windowed, every voxel ~0.71-0.9
  assert "already scaled to [0, 1]" in predict.data_line(d)
  nifti.save_scan(_crop(0)[0], SPACING, tmp_path / "hu.nii.gz")
  with pytest.raises(ScanError, match="trained on volumes already scaled"):
    predict.scan_input(str(tmp_path / "hu.nii.gz"), d)


# ----------------------------------------------------------------------------- odd files for the HU rule


@pytest.mark.parametrize("name, make, refused", [
    ("constant", lambda v: np.full_like(v, -1000.0), "constant volume"),
    ("uint8", lambda v: np.round((v - v.min()) / (v.max() - v.min()) * 255), "no voxel below 0"),
    ("raw_0_4095", lambda v: v + 1024.0, "no voxel below 0"),
    ("unit", lambda v: (v - v.min()) / (v.max() - v.min()), "no voxel below 0"),
    ("minus1_1", lambda v: 2 * (v - v.min()) / (v.max() - v.min()) - 1, r"within \+-20"),
    ("zscore", lambda v: (v - v.mean()) / v.std(), r"within \+-20"),
    ("mri", lambda v: np.abs(v) * 12.0, "no voxel below 0"),
    ("mri_offset", lambda v: np.where(v > -500, 5000.0, -1000.0), "exceed 3071 HU"),
    ("ct_air_padding", lambda v: np.pad(v, 4, constant_values=-3024.0), None),
    ("lung_only", lambda v: np.minimum(v, -506.0), None),
    ("air_only", lambda v: -1000.0 + (v - v.mean()) / v.std() * 5, None),
    ("soft_tissue_and_fat", lambda v: np.where(v > -500, 40.0, -100.0), None),
])
def test_hu_rule_on_odd_files(tmp_path, name, make, refused):
  vol = make(_crop(3, (20, 20, 8))[0].astype(np.float32)).astype(np.float32)
  path = tmp_path / f"{name}.nii.gz"
  nib.save(nib.Nifti1Image(vol, np.diag([*SPACING, 1.0])), str(path))
  if refused is None:
    assert nifti.load_scan(path).volume.shape == vol.shape
  else:
    with pytest.raises(ScanError, match=refused):
      nifti.load_scan(path)


def test_4_resuming_on_edited_data_is_refused_end_to_end(tmp_path):
  """Through the loop: the checkpoints record the dataset identity; an edited CSV is refused on resume."""
  from lungct import train
  root = _folder(tmp_path, n_patients=9)
  c = helpers.tiny_config(tmp_path / "tfds", **{
      "data.source": "folder", "data.manual_dir": str(root), "data.labels_csv": "labels.csv",
      "train.num_steps": 2})  # test_train's tiny model and shapes: one compilation in a suite run
  train.train_and_evaluate(c, str(tmp_path / "run"))
  first = lung_ct.config_name(c.data)
  text = (root / "labels.csv").read_text()
  (root / "labels.csv").write_text(text.replace(",1,P1,", ",0,P1,"))
  with pytest.raises(config_check.ConfigError, match=rf"was trained on dataset {first} from {root} \+ labels.csv, "
                                                     r"but the data now gives folder-\S+ from"):
    train.train_and_evaluate(c, str(tmp_path / "run"))


def test_inference_takes_the_data_location_from_the_checkpoint_unless_given():
  """--mode=eval/report/predict with the recipe's config and no --config.data.manual_dir find the checkpoint's
  folder; a folder named on the command line (or in the config) stays, and its dataset identity decides."""
  import ml_collections
  from lungct import runtime
  saved = {"task": "classify", "data": {"source": "folder", "manual_dir": "/data/site1", "labels_csv": "labels.csv",
                                        "shape": [32, 32, 32]}}
  now = ml_collections.ConfigDict({"task": "classify", "data": {"source": "folder", "manual_dir": "",
                                                                 "labels_csv": "labels.csv", "shape": (8, 8, 8)}})
  c = runtime.inference_config(now, saved)
  assert c.data.manual_dir == "/data/site1" and c.data.shape == (32, 32, 32)
  now.data.manual_dir = "/data/site2"
  c = runtime.inference_config(now, saved, explicit=("data.manual_dir",))
  assert c.data.manual_dir == "/data/site2"
