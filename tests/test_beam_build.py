"""The lung_ct build on Apache Beam (DirectRunner, 2 worker processes) writes the same records as the
thread-pool build: same splits, same study ids in the same order, byte-equal arrays, same skip report."""
from __future__ import annotations

import numpy as np
import pytest

from tests import helpers  # noqa: F401  (repo root on sys.path)
from configs import default
from lungct import config_check
from lungct.data import lung_ct, nifti, phantom, pipeline
from lungct.data.errors import DataError

pytest.importorskip("apache_beam")

BEAM = "--runner=DirectRunner --direct_num_workers=2 --direct_running_mode=multi_processing"


def _folder(root):
  """10 NIfTI phantoms of 5 patients (two scans each) and one file that is not NIfTI."""
  rows = ["filename,label,patient_id"]
  for i in range(10):
    ph = phantom.make_phantom(i, i % 2, shape_xyz=(20, 20, 10))
    nifti.save_scan(ph.hu, (1.6, 1.6, 3.2), root / f"scan_{i:02d}.nii.gz")
    rows.append(f"scan_{i:02d}.nii.gz,{i % 2},p{i // 2 if i % 2 == 0 else i // 2 + 5}")
  (root / "broken.nii.gz").write_bytes(b"not a nifti file at all")
  rows.append("broken.nii.gz,1,p9")
  (root / "labels.csv").write_text("\n".join(rows) + "\n")


def _data_cfg(root, data_dir, beam_options=""):
  c = default.get_config()
  return config_check.apply_overrides(c, {
      "data.source": "folder", "data.manual_dir": str(root), "data.labels_csv": str(root / "labels.csv"),
      "data.data_dir": str(data_dir), "data.shape": (8, 16, 16), "data.target_spacing": (3.0, 2.0, 2.0),
      "data.fit": "crop_or_pad", "data.split_fractions": (0.6, 0.2, 0.2), "data.build_workers": 2,
      "data.beam_options": beam_options}).data


def test_beam_build_writes_the_records_of_the_thread_pool_build(tmp_path, capsys):
  scans = tmp_path / "scans"
  scans.mkdir()
  _folder(scans)
  here = lung_ct.prepare(_data_cfg(scans, tmp_path / "threads"))
  beam = lung_ct.prepare(_data_cfg(scans, tmp_path / "beam", BEAM))
  out = capsys.readouterr().out
  # The dataset's identity does not depend on how it was built; both printed the skip.
  assert here.builder_config.name == beam.builder_config.name
  assert out.count("skipping") == 2 and out.count("broken.nii.gz") >= 2

  report_here, report_beam = lung_ct.read_build_report(here), lung_ct.read_build_report(beam)
  assert report_here == report_beam
  assert report_beam["totals"] == {"read": 11, "kept": 10, "skipped": 1}
  assert sum(s["kept"] for s in report_beam["splits"].values()) == 10

  for split in lung_ct.SPLITS:
    a, b = here.as_data_source(split), beam.as_data_source(split)
    assert len(a) == len(b) > 0
    assert lung_ct.split_index(here, split) == lung_ct.split_index(beam, split)
    for i in range(len(a)):
      ea, eb = pipeline.decode(a[i]), pipeline.decode(b[i])
      assert ea["study_id"] == eb["study_id"]
      assert set(ea) == set(eb)
      for k in ea:
        np.testing.assert_array_equal(np.asarray(ea[k]), np.asarray(eb[k]), err_msg=f"{split}[{i}].{k}")
      assert float(np.asarray(ea["image"]).std()) > 0.01  # real volumes, not zeros
  assert not list((tmp_path / "beam").rglob("_scratch"))  # scratch files removed


def test_a_misspelt_runner_is_one_line_before_any_file(tmp_path):
  scans = tmp_path / "scans"
  scans.mkdir()
  _folder(scans)
  with pytest.raises(DataError, match=r"^data.beam_options='--runner=NoSuchRunner': Unexpected pipeline runner"):
    lung_ct.prepare(_data_cfg(scans, tmp_path / "beam", "--runner=NoSuchRunner"))
  assert not (tmp_path / "beam").exists()
