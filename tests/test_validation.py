"""Honest cross-validation (selection inside each fold's training patients, the held-out fold read only when
scored, pooled out-of-fold estimate) and external validation on a folder of scans."""
import csv
import json
import os

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from lungct import evaluate, runtime, tasks, train
from tests.helpers import ROOT, tiny_config, tiny_trained


class _Logged:
  """A data source that reports every example read as its index in the CV pool."""

  def __init__(self, source, offset, log):
    self.source, self.offset, self.log = source, offset, log

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    self.log(self.offset + int(i))
    return self.source[i]


@pytest.fixture
def guarded(monkeypatch):
  """Instruments cross_validate: a read of the current fold's held-out examples between the start of the fold's
  training and the start of its scoring is recorded as a violation; reads while scoring are counted."""
  state = {"forbidden": set(), "violations": [], "scored_reads": 0, "scoring": None, "folds": []}
  real_sources, real_train, real_score = runtime.data_sources, train.train_and_evaluate, evaluate.score_fold
  real_kfold = evaluate.stratified_group_kfold
  state["outer"] = None

  def log(i):
    if i in state["forbidden"]:
      state["violations"].append(i)
    if state["scoring"] is not None and i in state["scoring"]:
      state["scored_reads"] += 1

  def data_sources(config):
    s = real_sources(config)
    return {"train": _Logged(s["train"], 0, log), "validation": _Logged(s["validation"], len(s["train"]), log),
            "test": s["test"]}

  def kfold(*args, **kwargs):  # the first call is cross_validate's outer split (inner_split calls it later)
    folds = real_kfold(*args, **kwargs)
    if state["outer"] is None:
      state["outer"] = [set(f.tolist()) for f in folds]
    return folds

  def train_fold(config, workdir, sources=None):
    held = state["outer"][len(state["folds"])]
    assert held.isdisjoint(sources["train"].indices.tolist())
    state["forbidden"] = set(held)
    state["folds"].append(sorted(held))
    return real_train(config, workdir, sources=sources)

  def score(config, fold_dir, task, select_src, heldout_src):
    assert set(heldout_src.indices.tolist()) == set(state["folds"][-1])
    state["forbidden"], state["scoring"] = set(), set(heldout_src.indices.tolist())
    try:
      return real_score(config, fold_dir, task, select_src, heldout_src)
    finally:
      state["scoring"] = None

  monkeypatch.setattr(runtime, "data_sources", data_sources)
  monkeypatch.setattr(train, "train_and_evaluate", train_fold)
  monkeypatch.setattr(evaluate, "score_fold", score)
  monkeypatch.setattr(evaluate, "stratified_group_kfold", kfold)
  return state


def _cv_config(tmp_path, selection):
  return tiny_config(tmp_path / "tfds", **{"train.num_epochs": 0, "train.num_steps": 2, "train.eval_every_steps": 2,
                                           "cv.folds": 2, "cv.selection": selection, "eval.n_boot": 50})


def test_cv_never_reads_the_held_out_fold_before_scoring_it(guarded, tmp_path):
  out = evaluate.cross_validate(_cv_config(tmp_path, "inner"), str(tmp_path / "cv"))
  assert guarded["violations"] == [] and len(guarded["folds"]) == 2
  assert guarded["scored_reads"] > 0  # the instrument does see the held-out fold when it is scored
  folds = guarded["folds"]
  n_pool = sum(len(f) for f in folds)
  assert set(folds[0]).isdisjoint(folds[1]) and sorted(folds[0] + folds[1]) == list(range(n_pool))
  for f in out["per_fold"]:
    assert f["n_train"] + f["n_selection"] + f["n_heldout"] == n_pool and f["n_selection"] > 0
  # One pooled table: every study of the pool exactly once, with its own fold's threshold.
  rows = list(csv.DictReader(open(tmp_path / "cv" / "oof_predictions.csv")))
  assert len(rows) == n_pool == out["pooled"]["n"] and len({r["study_id"] for r in rows}) == n_pool
  y, p = np.array([int(r["label"]) for r in rows]), np.array([float(r["probability"]) for r in rows])
  assert out["pooled"]["roc_auc"]["value"] == pytest.approx(roc_auc_score(y, p), abs=1e-6)
  assert out["pooled"]["roc_auc"]["lo"] <= out["pooled"]["roc_auc"]["value"] <= out["pooled"]["roc_auc"]["hi"]
  for r in rows:
    assert int(r["prediction"]) == int(float(r["probability"]) >= float(r["threshold"]))
  assert len({(r["fold"], r["threshold"]) for r in rows}) == 2  # one threshold per fold
  md = open(tmp_path / "cv" / "cv_summary.md").read()
  assert "Folds grouped by patient and stratified by label." in md and out["stratified_by"] == "label"
  assert out["stratification"] == "Folds grouped by patient and stratified by label."
  assert "inner validation split" in md and "Pooled out-of-fold estimate over all" in md and "| roc_auc |" in md
  saved = json.load(open(tmp_path / "cv" / "cv_summary.json"))
  assert saved["selection"] == "inner" and saved["pooled"]["n"] == n_pool
  for i in range(2):  # each fold's own evaluation of its held-out fold, thresholds from its inner split
    ev = json.load(open(tmp_path / "cv" / f"fold_{i}" / "eval_heldout.json"))
    assert ev["split"] == "heldout" and ev["n"] == len(folds[i])


def test_the_guard_catches_selection_on_the_held_out_fold(guarded, tmp_path):
  """Negative control: the old, optimistic selection reads the held-out fold while training, and the instrument
  says so."""
  out = evaluate.cross_validate(_cv_config(tmp_path, "heldout"), str(tmp_path / "cv"))
  assert len(guarded["violations"]) > 0
  assert out["selection"] == "heldout"
  assert "OPTIMISTIC" in open(tmp_path / "cv" / "cv_summary.md").read()


def test_inner_split_is_by_patient_and_stratified():
  groups = np.array([f"p{i // 2}" for i in range(40)])  # 20 patients of two studies each
  labels = np.array([(i // 2) % 2 for i in range(40)])   # patients alternate benign / malignant
  rest = np.arange(4, 40)                                 # 18 patients, 9 of each label
  fit, val = evaluate.inner_split(labels, groups, rest, 1 / 3, seed=3)
  assert sorted(np.concatenate([fit, val]).tolist()) == rest.tolist()
  assert set(groups[fit]).isdisjoint(groups[val])
  assert len(set(groups[val])) == 6 and labels[val].sum() == 6  # a third of the patients, 3 of each label
  other = evaluate.inner_split(labels, groups, rest, 1 / 3, seed=4)[1]
  assert set(other.tolist()) != set(val.tolist())  # the seed moves it
  with pytest.raises(Exception, match="config.cv.selection"):
    evaluate.cross_validate(tiny_config("/nonexistent", **{"cv.selection": "best"}), "/nonexistent")


def test_cv_strata_say_what_the_folds_are_stratified_on():
  """The attributes task (targets such as diameter_mm and 1-5 ratings; the LIDC labels CSV has no label column:
  label and grade -1 for every study) is grouped by patient only, not stratified, and cv says so in a sentence;
  its continuous target never stratifies. A class label, where studies have one, does; a study without one among
  labelled ones is a stratum of its own; a grade classifier stratifies by grade."""
  from lungct import config_check
  c = config_check.load_config_file(f"{ROOT}/configs/nodule_attributes.py:tiny")
  rows = lambda labels, grades=None: [  # noqa: E731  (as the split index has them, plus a continuous value)
      {"label": y, "grade": -1 if grades is None else grades[i], "patient_id": f"p{i}", "diameter_mm": 3.0 + 1.7 * i}
      for i, y in enumerate(labels)]
  strata, by, sentence = evaluate.cv_strata(c, rows([-1] * 6))
  assert strata.tolist() == [0] * 6 and by == "none"
  assert sentence == ("Folds grouped by patient only, not stratified: no study has a label, so the folds' outcomes "
                      "are not balanced.")
  folds = evaluate.stratified_group_kfold(strata, [f"p{i}" for i in range(6)], 3)
  assert sorted(np.concatenate(folds).tolist()) == list(range(6)) and [len(f) for f in folds] == [2, 2, 2]
  strata, by, sentence = evaluate.cv_strata(c, rows([1, 0, 1, 0]))
  assert strata.tolist() == [1, 0, 1, 0] and by == "label"
  assert sentence == "Folds grouped by patient and stratified by label."
  strata, by, sentence = evaluate.cv_strata(c, rows([1, -1, 0, 1, 0, -1]))
  assert strata.tolist() == [2, 0, 1, 2, 1, 0] and by == "label"
  assert sentence == ("Folds grouped by patient and stratified by label (2 studies without one form a stratum of "
                      "their own).")
  folds = evaluate.stratified_group_kfold(strata, [f"p{i}" for i in range(6)], 2)
  assert [sorted(strata[f].tolist()) for f in folds] == [[0, 1, 2]] * 2   # every stratum split evenly
  with pytest.raises(ValueError, match="labels must be >= 0"):
    evaluate.stratified_group_kfold([-1] * 6, [f"p{i}" for i in range(6)], 3)
  g = tiny_config("/nonexistent", **{"data.label": "grade"})
  strata, by, _ = evaluate.cv_strata(g, rows([0, 0, 1, 1], grades=[0, 3, 4, 3]))
  assert strata.tolist() == [0, 1, 2, 1] and by == "grade"


# ----------------------------------------------------------------------------- external validation

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  return tiny_trained(tmp_path_factory, steps=4, eval_every=2)


def _external_folder(root, patients, bad=True):
  """Phantom scans of another 'site' (seeds and patient ids the training set never had) + labels.csv, and one
  file that is not a scan."""
  from lungct.data import phantom
  root.mkdir(parents=True, exist_ok=True)
  rows = ["filename,label,patient_id"]
  for i, pid in enumerate(patients):
    grade = 0 if i % 2 == 0 else 2
    phantom.write_phantom_nifti(phantom.make_phantom(5000 + i, grade, shape_xyz=(64, 64, 48)),
                                str(root / f"{pid}_scan.nii.gz"))
    rows.append(f"{pid}_scan.nii.gz,{int(grade > 0)},{pid}")
  if bad:
    (root / "corrupt.nii.gz").write_bytes(b"not a nifti file")
    rows.append("corrupt.nii.gz,1,site2-bad")
  (root / "labels.csv").write_text("\n".join(rows) + "\n")
  return str(root), str(root / "labels.csv")


def test_external_evaluation_on_another_site_skips_and_reports_a_bad_scan(trained, tmp_path):
  from lungct import main, report
  from lungct.data import lung_ct
  c, workdir = trained
  folder, labels = _external_folder(tmp_path / "site2", [f"site2-{i:02d}" for i in range(6)])
  ext = c.copy_and_resolve_references()
  ext.eval.external_dir, ext.eval.external_csv = folder, labels
  ext.data.shape = (48, 64, 64)  # the config file's value, not the checkpoint's: the checkpoint's wins
  result = main.run(ext, workdir, "eval")
  saved = json.load(open(os.path.join(workdir, "eval_external.json")))
  info = saved["external"]
  assert info["totals"] == {"read": 7, "kept": 6, "skipped": 1}
  assert [os.path.basename(s["file"]) for s in info["skipped"]] == ["corrupt.nii.gz"] and info["skipped"][0]["reason"]
  assert info["shared_patients"] == [] and info["n_patients"] == 6
  assert saved["split"] == "external" and saved["n"] == 6 == result["n"] and saved["n_positive"] == 3
  # Prepared exactly as the checkpoint's training data: its geometry, window and spacing.
  ext_builder = lung_ct.builder_for(evaluate.external_data_config(tasks.restore(ext, workdir, "", (), "eval")[0].config))
  assert ext_builder.info.features["image"].shape == tuple(c.data.shape) + (1,)
  assert lung_ct.written_splits(ext_builder) == ["test"]
  # Thresholds come from the internal validation split: the same as for the internal test split.
  internal = evaluate.evaluate_checkpoint(c, workdir, split="test")
  for name, op in saved["operating_points"].items():
    assert op["threshold"] == internal["operating_points"][name]["threshold"]
  rows = list(csv.DictReader(open(os.path.join(workdir, "predictions_external.csv"))))
  assert sorted(r["patient_id"] for r in rows) == [f"site2-{i:02d}" for i in range(6)]
  # The report renders the external set, its build summary and the skipped file.
  text = open(report.build_report(ext, workdir)).read()
  for needed in ("Results on the external test set", "7 scans read, 6 kept, <b>1 skipped</b>", "corrupt.nii.gz",
                 "none of them in the training dataset"):
    assert needed in text, needed


def test_external_set_sharing_a_training_patient_is_flagged(trained, tmp_path):
  c, workdir = trained
  train_patients = [r["patient_id"] for r in evaluate._index(c, "train")]
  folder, labels = _external_folder(tmp_path / "site3", [train_patients[0], "site3-01"], bad=False)
  ext = c.copy_and_resolve_references()
  ext.eval.external_dir, ext.eval.external_csv = folder, labels
  _, info = evaluate.external_sources(ext)
  assert info["shared_patients"] == [train_patients[0]] and info["totals"]["skipped"] == 0
  ext.eval.external_csv = ""
  with pytest.raises(Exception, match="external_csv"):
    evaluate.external_data_config(ext)
