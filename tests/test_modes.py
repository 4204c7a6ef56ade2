"""The evaluation modes end to end on a tiny trained model: eval, predict, report, cv."""
import csv
import json
import os

import numpy as np
import pytest

from lungct import config_check, evaluate, predict, report, runtime, tasks, train
from lungct.tasks import classify
from lungct.data import phantom
from tests.helpers import ROOT, tiny_config, tiny_trained


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  return tiny_trained(tmp_path_factory, steps=8, eval_every=4)


def test_eval_writes_metrics_with_cis_and_predictions(trained):
  c, workdir = trained
  result = evaluate.evaluate_checkpoint(c, workdir, split="test")
  saved = json.load(open(os.path.join(workdir, "eval_test.json")))
  assert set(saved["operating_points"]) == {"default@0.5", "youden", "sens>=0.90", "sens>=0.95"}
  op = saved["operating_points"]["default@0.5"]
  assert op["threshold"] == 0.5
  for name in ("accuracy", "sensitivity", "specificity", "roc_auc", "ppv", "npv", "f1", "brier", "ece"):
    m = op["metrics"][name]
    if m["value"] is not None:  # null: undefined on this split (strict JSON)
      assert m["lo"] <= m["value"] + 1e-9 and m["value"] <= m["hi"] + 1e-9
  rows = list(csv.DictReader(open(os.path.join(workdir, "predictions_test.csv"))))
  assert len(rows) == saved["n"] == result["n"]
  # Per patient (max over a patient's studies): one row per patient, same patients as the split.
  assert saved["patient_level"]["n_patients"] == saved["n_patients"] == len({r["patient_id"] for r in rows})
  probs = np.array([float(r["probability"]) for r in rows])
  labels = np.array([int(r["label"]) for r in rows])
  assert np.all((probs >= 0) & (probs <= 1))
  counts = op["counts"]
  assert counts["tp"] == int(np.sum((probs >= 0.5) & (labels == 1)))
  assert counts["tn"] == int(np.sum((probs < 0.5) & (labels == 0)))


def test_predict_scans_and_skips_bad_files(trained, tmp_path):
  c, workdir = trained
  ph = phantom.make_phantom(3, 2, shape_xyz=(64, 64, 48))
  phantom.write_phantom_nifti(ph, str(tmp_path / "scans" / "a" / "good.nii.gz"))
  phantom.write_phantom_nifti(ph, str(tmp_path / "scans" / "b" / "good.nii.gz"))  # same base name elsewhere
  (tmp_path / "scans" / "broken.nii.gz").write_bytes(b"not a nifti file")
  c = c.copy_and_resolve_references()
  c.predict.input = str(tmp_path / "scans")
  rows = predict.predict_scans(c, workdir)
  by_name = {os.path.relpath(r["file"], tmp_path / "scans"): r for r in rows}
  assert by_name["broken.nii.gz"]["error"] and by_name["broken.nii.gz"]["probability"] == ""
  p = float(by_name["a/good.nii.gz"]["probability"])
  assert 0 <= p <= 1 and by_name["a/good.nii.gz"]["decision"] in ("normal", "abnormal")
  assert by_name["b/good.nii.gz"]["probability"] == by_name["a/good.nii.gz"]["probability"]
  pngs = sorted(os.listdir(os.path.join(workdir, "predictions")))
  assert pngs == ["a__good.nii.gz_gradcam.png", "b__good.nii.gz_gradcam.png"]  # no overwriting
  assert os.path.getsize(os.path.join(workdir, "predictions", pngs[0])) > 1000


def test_inference_takes_data_and_model_settings_from_the_checkpoint(trained):
  c, workdir = trained
  other = c.copy_and_resolve_references()
  other.data.shape = (48, 64, 64)           # e.g. the config file's default, not what the model was trained at
  other.model.dense = 32
  m = runtime.restore_for_inference(other, workdir, task_of=tasks.get)
  assert tuple(m.config.data.shape) == tuple(c.data.shape) and m.config.model.dense == c.model.dense
  with pytest.raises(config_check.ConfigError, match="data.shape"):  # said explicitly: refused, one line
    runtime.restore_for_inference(other, workdir, explicit=["data.shape"], task_of=tasks.get)


def test_eval_survives_a_changed_optimizer_schedule_and_freeze(trained, tmp_path):
  c, workdir = trained
  before = evaluate.evaluate_checkpoint(c, workdir, split="validation")
  other = c.copy_and_resolve_references()
  other.train.optimizer = "sgd"
  other.train.schedule = "warmup_cosine"
  other.freeze = ("blocks/0/.*",)
  after = evaluate.evaluate_checkpoint(other, workdir, split="validation")
  assert after["operating_points"]["youden"] == before["operating_points"]["youden"]


def test_report_is_self_contained_html(trained):
  c, workdir = trained
  path = report.build_report(c, workdir)
  text = open(path).read()
  assert "data:image/png;base64," in text and "<img src='report/" not in text
  for needed in ("Sensitivity", "Specificity", "ROC-AUC", "Of 100 <b>abnormal</b> studies", "not for diagnosis",
                 "synthetic", "Dataset build: 24 scans read, 24 kept, <b>0 skipped</b>", "Task: abnormal vs normal",
                 "Per study: each study is one case", "net benefit", "Decision curve (per study)",
                 "No recalibration"):
    assert needed in text, needed
  md = open(os.path.join(workdir, "report.md")).read()
  assert "| ROC-AUC |" in md
  for png in ("roc.png", "confusion.png", "reliability.png", "training_curves.png", "decision_curve.png"):
    assert os.path.getsize(os.path.join(workdir, "report", png)) > 1000


def test_report_and_predict_never_use_an_evaluation_of_other_weights(trained, capsys):
  """Defect 9: eval_test.json written for another checkpoint (--checkpoint=) is not the best checkpoint's."""
  c, workdir = trained
  best = runtime.restore_for_inference(c, workdir, task_of=tasks.get)
  other_step = next(s for s in (4, 8) if s != best.step)
  evaluate.evaluate_checkpoint(c, workdir, split="test", checkpoint_path=os.path.join(workdir, "checkpoints",
                                                                                       str(other_step)))
  assert json.load(open(os.path.join(workdir, "eval_test.json")))["checkpoint_step"] == other_step
  threshold, why, _ = classify.choose_threshold(c, workdir, best)
  out = capsys.readouterr().out
  assert "ignored:" in out and f"step {other_step}" in out
  assert "eval_test.json" not in why  # not the other checkpoint's Youden threshold
  report.build_report(c, workdir)
  saved = json.load(open(os.path.join(workdir, "eval_test.json")))  # recomputed for the report's checkpoint
  assert saved["checkpoint_step"] == best.step and saved["checkpoint"] == best.checkpoint
  assert f"step {best.step}, fingerprint {saved['checkpoint_fingerprint']}" in open(
      os.path.join(workdir, "report.html")).read()
  threshold, why, _ = classify.choose_threshold(c, workdir, best)
  assert why == "Youden's J on validation (eval_test.json)"
  assert threshold == saved["operating_points"]["youden"]["threshold"]


def test_per_100_wording():
  m = {"sensitivity": {"value": 0.9}, "specificity": {"value": 0.75}}
  text = classify.per_100(m)
  assert "flags about <b>90</b>" in text and "misses about <b>10</b>" in text
  assert "clears about <b>75</b>" in text and "wrongly flags about <b>25</b>" in text


def test_stratified_group_kfold_keeps_patients_together():
  labels = np.array([0, 0, 1, 1, 0, 1, 0, 1, 1, 0, 0, 1])
  groups = np.array(["a", "a", "b", "c", "d", "e", "f", "g", "g", "h", "i", "j"])
  folds = evaluate.stratified_group_kfold(labels, groups, 3, seed=0)
  assert sorted(np.concatenate(folds).tolist()) == list(range(12))
  owner = {}
  for f, idx in enumerate(folds):
    for i in idx:
      assert owner.setdefault(groups[i], f) == f  # a patient never spans folds
  for idx in folds:
    assert 1 <= labels[idx].sum() <= 3 and (labels[idx] == 0).sum() >= 1


def test_cross_validation_writes_summary(trained, tmp_path):
  c, _ = trained
  c = c.copy_and_resolve_references()
  c.cv.folds = 2
  c.train.num_steps = 2
  c.train.eval_every_steps = 2
  out = evaluate.cross_validate(c, str(tmp_path))
  assert out["folds"] == 2 and len(out["per_fold"]) == 2
  n_pool = sum(f["n_heldout"] for f in out["per_fold"])
  assert all(f["n_train"] + f["n_selection"] + f["n_heldout"] == n_pool for f in out["per_fold"])
  assert out["selection"] == "inner" and out["pooled"]["n"] == n_pool
  s = json.load(open(tmp_path / "cv_summary.json"))["summary"]["auc"]
  assert s["mean"] == pytest.approx(np.nanmean(s["per_fold"]))
  assert "| auc |" in open(tmp_path / "cv_summary.md").read()
  assert os.path.exists(tmp_path / "fold_0" / "metrics.json") and os.path.exists(tmp_path / "fold_1" / "metrics.json")


# ----------------------------------------------------------------------------- every mode x every task

MATRIX_MODES = ("eval", "predict", "report", "cv")
# Each task on its reference config, and the config variants that change which modes a task supports
# (`unsupported_modes`): a K-class classifier has no predict or report.
MATRIX_CASES = {**{name: (name, {}) for name in tasks.TASKS}, "classify_grade": ("classify", {"data.label": "grade"})}


def _matrix_config(name: str, data_dir: str, extra: dict):
  c = config_check.load_config_file(f"{ROOT}/{tasks.TASKS[name].CONFIG}:tiny")
  return config_check.apply_overrides(c, {
      "data.data_dir": data_dir, "loader.num_threads": 1, "train.batch_size": 4,
      "train.num_epochs": 0, "train.num_steps": 4, "train.eval_every_steps": 2, "train.log_every_steps": 2,
      "train.progress_bar": False, "train.precise_bn_batches": 0, "eval.n_boot": 20, **extra})


@pytest.fixture(scope="module", params=sorted(MATRIX_CASES))
def task_run(request, tmp_path_factory):
  """Each case of MATRIX_CASES trained for 4 steps on its task's reference config's :tiny variant."""
  name, extra = MATRIX_CASES[request.param]
  task = tasks.TASKS[name]
  c = _matrix_config(name, str(tmp_path_factory.mktemp("tfds")), extra)
  workdir = str(tmp_path_factory.mktemp(f"run_{request.param}"))
  summary = train.train_and_evaluate(c, workdir)
  assert summary["task"] == task.NAME and summary["steps"] == 4
  return task, c, workdir


def _scans(tmp_path) -> tuple[str, list[str]]:
  """Two scans in another orientation than RAS (LPS, like DICOM-derived files) and one broken file."""
  import nibabel as nib
  ph = phantom.make_phantom(2, 2, shape_xyz=(40, 36, 24))
  paths = []
  for name in ("a.nii.gz", "b.nii.gz"):
    path = str(tmp_path / "scans" / name)
    phantom.write_phantom_nifti(ph, path)
    img = nib.load(path)
    lps = img.as_reoriented([[0, -1], [1, -1], [2, 1]])   # x and y flipped: RAS -> LPS
    nib.save(nib.Nifti1Image(np.asarray(lps.dataobj), lps.affine), path)
    paths.append(path)
  (tmp_path / "scans" / "broken.nii.gz").write_bytes(b"not a nifti file")
  return str(tmp_path / "scans"), paths


def _no_work(*args, **kwargs):
  raise AssertionError("an unsupported mode did work (read a checkpoint's arrays or built the model)")


def test_every_mode_of_every_task(task_run, tmp_path, monkeypatch):
  """Each supported (mode, task) pair writes its files from the checkpoint; each other pair fails at start with
  one line naming the task and the mode, and does no work: neither when the config given says so, nor when only
  the checkpoint's settings do (a reference config pointed at the run), before its arrays are read."""
  import nibabel as nib
  from lungct import checkpoint, main
  task, c, workdir = task_run
  supported = tasks.supported_modes(c)
  assert supported == (("train", "eval", "cv") if c.data.label == "grade" else task.MODES)
  for mode in MATRIX_MODES:
    if mode not in supported:
      message = f"--mode={mode} is not supported by config.task='{task.NAME}'"
      plain = _matrix_config(task.NAME, str(tmp_path / "tfds"), {})   # the reference config: supports every mode
      assert mode in tasks.supported_modes(plain)
      before = sorted(os.listdir(workdir))
      with monkeypatch.context() as m:
        m.setattr(runtime, "init_variables", _no_work)
        m.setattr(checkpoint, "_replicated_target", _no_work)
        for config, where in ((c, str(tmp_path / mode)), (plain, workdir)):
          with pytest.raises(tasks.TaskError) as e:
            main.run(config, where, mode)
          assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)
          if c.data.label == "grade":
            assert "with config.data.label='grade' (a 5-class classifier" in str(e.value)
            assert str(e.value).endswith("(it supports: train, eval, cv)")
      assert not os.path.exists(tmp_path / mode) and sorted(os.listdir(workdir)) == before
      continue
    c2 = c.copy_and_resolve_references()
    if mode == "eval":
      main.run(c2, workdir, "eval", split="test")
      saved = json.load(open(os.path.join(workdir, "eval_test.json")))
      assert saved["checkpoint_step"] in (2, 4)
      if task.NAME == "attributes":
        assert set(saved["targets"]) == set(c.data.targets)
        m = saved["targets"]["diameter_mm"]["mae"]
        assert m["value"] > 0 and m["lo"] <= m["value"] <= m["hi"]
        assert "kappa" in saved["targets"]["malignancy"] and "kappa" not in saved["targets"]["diameter_mm"]
    elif mode == "predict":
      root, paths = _scans(tmp_path)
      c2.predict.input = root
      from lungct.data import preprocess
      if preprocess.needs_lesion(c.data):   # a model trained on lesion-centred crops gets each scan's lesion
        (tmp_path / "lesions.csv").write_text("filename,x,y,z\na.nii.gz,20,18,12\nb.nii.gz,20,18,12\n")
        c2.predict.lesions = str(tmp_path / "lesions.csv")
      rows = main.run(c2, workdir, "predict")
      assert [bool(r["error"]) for r in rows] == [False, False, True]
      same = lambda r: {k: v for k, v in r.items() if k not in ("file", "mask_file")}  # noqa: E731
      assert same(rows[0]) == same(rows[1])          # the same scan twice: the same prediction
      if task.NAME == "segment":   # the mask on the input's own grid, the volume in ml from it
        img, mask = nib.load(paths[0]), nib.load(rows[0]["mask_file"])
        assert mask.shape == img.shape and np.allclose(mask.affine, img.affine)
        ml = float(np.count_nonzero(np.asarray(mask.dataobj))) * float(np.prod(img.header.get_zooms())) / 1000
        assert float(rows[0]["lesion_ml"]) == pytest.approx(ml, abs=1e-3)
      if task.NAME == "attributes":
        assert float(rows[0]["diameter_mm"]) > 0 and 1 <= int(rows[0]["malignancy_rating"]) <= 5
      header = next(csv.reader(open(os.path.join(workdir, "predictions.csv"))))
      assert header[0] == "file" and header[-1] == "error" and len(header) > 2
    elif mode == "report":
      main.run(c2, workdir, "report")
      page = open(os.path.join(workdir, "report.html")).read()
      assert "<table>" in page and "data:image/png;base64," in page
      if task.NAME == "attributes":
        assert "diameter_mm" in page and "weighted kappa" in page
        assert os.path.getsize(os.path.join(workdir, "report", "predicted_vs_reference.png")) > 1000
    elif mode == "cv":
      c2.cv.folds, c2.train.num_steps, c2.train.eval_every_steps = 2, 1, 1
      out = main.run(c2, str(tmp_path / "cv"), "cv")
      assert len(out["per_fold"]) == 2 and task.BEST_METRIC in out["summary"]
      assert out["stratified_by"] == ("grade" if c.data.label == "grade" else "label")
      if c.data.label == "grade":   # K classes: the per-fold table; no pooled estimate (`pool_out_of_fold`)
        assert out["pooled"] == {} and len(out["summary"][task.BEST_METRIC]["per_fold"]) == 2
        continue
      assert out["pooled"]["n"] == sum(f["n_heldout"] for f in out["per_fold"])  # every held-out study, once
      if task.NAME == "attributes":
        m = out["pooled"]["diameter_mm/mae"]
        assert m["value"] > 0 and m["lo"] <= m["value"] <= m["hi"]
        rows = list(csv.DictReader(open(tmp_path / "cv" / "oof_predictions.csv")))
        assert len(rows) == out["pooled"]["n"] and {r["fold"] for r in rows} == {"0", "1"}


def test_attributes_eval_and_report_of_an_external_set(task_run, tmp_path):
  """Attributes through --mode=eval and --mode=report of an external folder (the five committed real LIDC crops,
  whose patients the generated training set never had, and one broken file): the per-attribute table is the
  external set's, the data section shows its build with the skipped file."""
  task, c, workdir = task_run
  if task.NAME != "attributes":
    pytest.skip("the attributes task's external report (runs once, on the attributes checkpoint)")
  import shutil
  from lungct import main
  root = tmp_path / "site2"
  shutil.copytree(os.path.join(ROOT, "tests", "data", "lidc"), root)
  rows = list(csv.DictReader(open(root / "nodules.csv")))
  with open(root / "labels.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["filename", "mask", "patient_id", "diameter_mm", "malignancy"])
    for r in rows:
      w.writerow([r["filename"], r["mask"], r["patient_id"], r["diameter_mm"], r["malignancy"]])
    w.writerow(["broken.nii.gz", rows[0]["mask"], "site2-broken", "5.0", "3"])
  (root / "broken.nii.gz").write_bytes(b"not a nifti file")
  ext = c.copy_and_resolve_references()
  ext.eval.external_dir, ext.eval.external_csv = str(root), str(root / "labels.csv")
  main.run(ext, workdir, "report")
  saved = json.load(open(os.path.join(workdir, "eval_external.json")))
  assert saved["split"] == "external" and saved["n"] == len(rows) == 5
  assert saved["external"]["totals"] == {"read": 6, "kept": 5, "skipped": 1}
  assert saved["external"]["shared_patients"] == []
  # Its MAE is the external crops' own: the mean |reference - prediction| of predictions_external.csv.
  pred = list(csv.DictReader(open(os.path.join(workdir, "predictions_external.csv"))))
  by_id = {r["filename"][: -len(".nii.gz")]: float(r["diameter_mm"]) for r in rows}
  assert sorted(p["study_id"] for p in pred) == sorted(by_id)
  mae = float(np.mean([abs(float(p["diameter_mm_predicted"]) - by_id[p["study_id"]]) for p in pred]))
  assert saved["targets"]["diameter_mm"]["mae"]["value"] == pytest.approx(mae, abs=1e-3)
  page = open(os.path.join(workdir, "report.html")).read()
  for needed in ("Attributes on the external test set", "External test set: 5 studies from 5 patients",
                 "6 scans read, 5 kept, <b>1 skipped</b>", "broken.nii.gz", "none of them in the training dataset",
                 f"<td>diameter_mm</td><td>continuous</td><td>5</td>"
                 f"<td>{saved['targets']['diameter_mm']['mae']['value']:.2f} ["):
    assert needed in page, needed


def test_attributes_backbone_transfers_to_malignancy(task_run, tmp_path):
  """configs/nodule.py --config.init_from=<attributes workdir>: every backbone array loaded, the head fresh."""
  task, c, workdir = task_run
  if task.NAME != "attributes":
    pytest.skip("the attributes -> malignancy recipe (runs once, on the attributes checkpoint)")
  from lungct import checkpoint
  m = config_check.load_config_file(f"{ROOT}/configs/nodule.py")
  config_check.apply_overrides(m, {"data.data_dir": str(tmp_path), "data.shape": tuple(c.data.shape),
                                   "model.width": c.model.width, "init_from": workdir})
  _, state, _ = train.create_state(m, total_steps=1)
  params, _, report = checkpoint.restore_params(m.init_from, state["params"], state["batch_stats"])
  skipped = sorted(report["skipped"])
  assert skipped and all(k.startswith("params/head/") for k in skipped), skipped   # only the head is fresh
  assert any(k.startswith("params/blocks/") or k.startswith("params/stem") for k in report["loaded"])
  fresh = checkpoint.flatten(state["params"])
  got = checkpoint.flatten(params)
  saved = checkpoint.flatten(checkpoint.restore_variables(*checkpoint.find_checkpoint(workdir))[0])
  loaded = [k[len("params/"):] for k in report["loaded"] if k.startswith("params/")]
  assert all(np.array_equal(np.asarray(got[k]), np.asarray(saved[k])) for k in loaded)
  head = [k for k in fresh if k.startswith("head/")]
  assert all(np.array_equal(np.asarray(got[k]), np.asarray(fresh[k])) for k in head)
