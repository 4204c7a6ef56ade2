"""Classification evaluation without a model: operating points at the level they are applied, undefined
thresholds, recalibration, decision curves in eval and the report, class names, stale evaluations."""
import json

import numpy as np
import pytest

from lungct import checkpoint, metrics, predict, report, runtime
from lungct.data import pipeline
from lungct.tasks import classify
from tests.helpers import tiny_config


def _split(seed, n_patients=40, scale=1.0):
  """Several studies per patient; the patient's label is that of any study."""
  rng = np.random.default_rng(seed)
  per = rng.integers(1, 6, n_patients)
  pid = np.repeat([f"P{i:03d}" for i in range(n_patients)], per)
  y = (rng.random(pid.size) < 0.35).astype(np.int32)
  z = scale * (1.5 * (2 * y - 1) + 1.5 * rng.standard_normal(pid.size))
  return {"prob": 1 / (1 + np.exp(-z)), "label": y, "patient_id": pid.astype(object),
          "study_id": np.array([f"{p}/s{i}" for i, p in enumerate(pid)], dtype=object)}


@pytest.mark.parametrize("seed", [0, 1])
def test_patient_thresholds_are_chosen_on_patient_level_validation_scores(seed):
  val, test = _split(seed), _split(seed + 10)
  ev = classify.with_confidence(val, test, n_boot=50, seed=0)
  pv = metrics.patient_level(val["prob"], val["label"], val["patient_id"])
  pt = metrics.patient_level(test["prob"], test["label"], test["patient_id"])
  pl = ev["patient_level"]
  assert ev["level"] == "study" and pl["level"] == "patient" and pl["n_patients"] == 40
  t_patient = pl["operating_points"]["youden"]["threshold"]
  assert t_patient == metrics.youden_threshold(pv["label"], pv["prob"])
  assert t_patient != ev["operating_points"]["youden"]["threshold"]  # the per-study one, chosen on studies
  m = pl["operating_points"]["youden"]["metrics"]
  ref = metrics.binary_metrics(pt["label"], pt["prob"], t_patient)
  assert m["sensitivity"]["value"] == ref["sensitivity"] and m["specificity"]["value"] == ref["specificity"]
  # The decision curve at each level, and the operating point read on it.
  assert pl["decision_curve"]["n"] == 40 and ev["decision_curve"]["n"] == len(test["prob"])
  nb = ev["operating_points"]["youden"]["net_benefit"]["model"]["value"]
  assert nb == pytest.approx(metrics.net_benefit(test["label"], test["prob"],
                                                 ev["operating_points"]["youden"]["threshold"]))
  assert "per patient" in classify._summary_line("test", ev)


def test_one_class_validation_gives_undefined_thresholds_not_metrics(tmp_path):
  """Defect 6: Youden and the sensitivity targets are undefined on a validation split without positives."""
  val, test = _split(0), _split(1)
  val["label"] = np.zeros_like(val["label"])
  ev = classify.with_confidence(val, test, n_boot=20, seed=0)
  for name in ("youden", "sens>=0.90", "sens>=0.95"):
    op = ev["operating_points"][name]
    assert op["threshold"] is None and "metrics" not in op and "no positive studies" in op["undefined"]
  assert ev["operating_points"]["default@0.5"]["metrics"]["sensitivity"]["value"] > 0
  assert classify.decision_threshold(ev)[0] == 0.5
  assert "youden: undefined (the validation split has no positive" in classify._summary_line("test", ev)
  head, rows = classify.metric_table(ev["operating_points"])
  assert head[2] == "youden<br>(undefined)" and rows[0][2] == "undefined"
  # Strict JSON round trip, then predict's threshold: 0.5 with the reason, not a TypeError on null.
  c = tiny_config(tmp_path)
  pred = _fake_predictor(c)
  ev["checkpoint_fingerprint"] = checkpoint.fingerprint(pred.variables.params, pred.variables.batch_stats)
  (tmp_path / "eval_test.json").write_text(json.dumps(metrics.json_safe(ev), allow_nan=False))
  threshold, why, rec = classify.choose_threshold(c, str(tmp_path), pred)
  assert threshold == 0.5 and "Youden's threshold is undefined" in why and rec == {"method": "none"}


def _fake_predictor(config, w=1.0):
  v = runtime.Variables(None, {"dense": {"kernel": np.full((2, 1), w, np.float32)}}, {})
  return runtime.Predictor(v, None, config, 8, "/run/best/8")


def test_an_evaluation_of_other_weights_is_ignored(tmp_path):
  c = tiny_config(tmp_path)
  ev = classify.with_confidence(_split(0), _split(1), n_boot=20, seed=0)
  ev.update(checkpoint="/run/best/8", checkpoint_step=8,
            checkpoint_fingerprint=checkpoint.fingerprint({"dense": {"kernel": np.full((2, 1), 1.0, np.float32)}},
                                                          {}))
  (tmp_path / "eval_test.json").write_text(json.dumps(metrics.json_safe(ev), allow_nan=False))
  assert classify.load_eval(str(tmp_path), "test", _fake_predictor(c))[0] is not None
  got, why = classify.load_eval(str(tmp_path), "test", _fake_predictor(c, w=2.0))  # same path, other weights
  assert got is None and "was written for checkpoint /run/best/8" in why
  c.eval.calibration = "temperature"
  got, why = classify.load_eval(str(tmp_path), "test", _fake_predictor(c))
  assert got is None and "eval.calibration='none'" in why
  with pytest.raises(FileNotFoundError, match="run --mode=eval first"):
    classify.choose_threshold(c, str(tmp_path), _fake_predictor(c, w=2.0))
  # With the evaluation of these weights at this calibration, predict takes its threshold and temperature.
  ev = classify.with_confidence(_split(0, scale=3.0), _split(1, scale=3.0), n_boot=20, seed=0,
                                calibration="temperature")
  ev.update(checkpoint_fingerprint=checkpoint.fingerprint(*_fake_predictor(c).variables[1:]))
  (tmp_path / "eval_test.json").write_text(json.dumps(metrics.json_safe(ev), allow_nan=False))
  threshold, why, rec = classify.choose_threshold(c, str(tmp_path), _fake_predictor(c))
  assert threshold == ev["operating_points"]["youden"]["threshold"] and rec["temperature"] > 1.5
  assert classify.calibrated(np.array([0.9]), rec)[0] == pytest.approx(
      1 / (1 + np.exp(-np.log(9) / rec["temperature"])))


@pytest.mark.parametrize("seed", [0, 1])
def test_temperature_fitted_on_validation_is_applied_to_test(seed):
  val, test = _split(seed, 200, scale=3.0), _split(seed + 5, 200, scale=3.0)  # over-confident logits
  ev = classify.with_confidence(val, test, n_boot=50, seed=0, calibration="temperature")
  rec = ev["recalibration"]
  assert rec["temperature"] == pytest.approx(metrics.fit_temperature(val["label"], metrics.logits_of(val["prob"])))
  assert rec["temperature"] > 1.5  # softens the over-confident outputs (recovery itself: tests/test_metrics.py)
  assert rec["after"]["ece"]["value"] < rec["before"]["ece"]["value"]
  assert rec["before"]["ece"]["lo"] <= rec["before"]["ece"]["value"] <= rec["before"]["ece"]["hi"]
  p_cal = classify.calibrated(test["prob"], rec)
  assert ev["operating_points"]["default@0.5"]["counts"] == metrics.confusion_counts(
      test["label"], (p_cal >= 0.5).astype(int))
  # Ranking is unchanged: same AUC as the raw probabilities.
  assert ev["operating_points"]["youden"]["metrics"]["roc_auc"]["value"] == pytest.approx(
      metrics.roc_auc(test["label"], test["prob"]))


def _grades(seed, n=3000, k=4, true_t=2.5):
  """K-class predictions whose softmax logits are ``true_t`` times too large (grades drawn from softmax(z))."""
  rng = np.random.default_rng(seed)
  z = 1.2 * rng.standard_normal((n, k))
  p_true = metrics.apply_temperature(z, 1.0)
  grade = (rng.random((n, 1)) > np.cumsum(p_true, axis=1)).sum(axis=1)
  pid = np.array([f"P{i // 2:04d}" for i in range(n)], dtype=object)
  return {"prob": metrics.apply_temperature(z * true_t, 1.0), "grade": grade, "patient_id": pid}


@pytest.mark.parametrize("seed", [0, 1])
def test_multiclass_temperature_is_fitted_on_validation_and_applied_to_test(seed):
  val, test = _grades(seed), _grades(seed + 7)
  result, cal = classify.multiclass_result(val, test, calibration="temperature", n_boot=30, seed=0)
  rec = result["recalibration"]
  assert rec["temperature"] == pytest.approx(2.5, rel=0.1)  # the known over-confidence is recovered
  assert rec["after"]["ece"]["value"] < 0.04 and rec["before"]["ece"]["value"] > 0.15  # seeds 0-7: 0.015-0.024, 0.21-0.23
  log_p = np.log(np.clip(test["prob"], 1e-7, 1.0))  # logits of stored probabilities, clipped as documented
  assert np.allclose(cal["prob"], metrics.apply_temperature(log_p, rec["temperature"]))
  assert np.array_equal(cal["prob"].argmax(1), test["prob"].argmax(1))  # argmax (and accuracy) unchanged
  assert result["metrics"]["accuracy"] == pytest.approx(metrics.multiclass_metrics(test["grade"],
                                                                                  test["prob"])["accuracy"])
  plain, same = classify.multiclass_result(val, test, n_boot=30, seed=0)
  assert plain["recalibration"] == {"method": "none"} and same["prob"] is test["prob"]


def test_every_task_report_reruns_an_evaluation_of_other_weights(tmp_path, capsys):
  """runtime.current_evaluation (every task's report_sections): eval_<split>.json is reused only when written for
  the same weights; an older json without a fingerprint, or one of other weights, is evaluated afresh."""
  c = tiny_config(tmp_path)
  calls = []

  def run_eval(predictor, sources, workdir, split):
    calls.append(split)
    (tmp_path / f"eval_{split}.json").write_text(json.dumps(
        {"split": split, "checkpoint": predictor.checkpoint, "checkpoint_fingerprint": runtime.fingerprint(predictor)}))
  (tmp_path / "eval_test.json").write_text(json.dumps({"split": "test", "checkpoint": "/old/run"}))
  ev = runtime.current_evaluation(_fake_predictor(c), {}, str(tmp_path), "test", run_eval)
  assert calls == ["test"] and ev["checkpoint_fingerprint"] == runtime.fingerprint(_fake_predictor(c))
  assert "was written for checkpoint /old/run" in capsys.readouterr().out
  runtime.current_evaluation(_fake_predictor(c), {}, str(tmp_path), "test", run_eval)  # current now: read
  assert calls == ["test"]
  runtime.current_evaluation(_fake_predictor(c, w=2.0), {}, str(tmp_path), "test", run_eval)
  assert calls == ["test", "test"]


def test_report_names_the_classes_and_reads_each_operating_point_on_the_decision_curve(tmp_path):
  c = tiny_config(tmp_path)
  c.data.class_names = ("benign", "malignant")
  c.data.source = "nodules"
  ev = classify.with_confidence(_split(0), _split(1), n_boot=50, seed=0, calibration="temperature")
  ev.update(class_names=["benign", "malignant"], checkpoint="/run/best/8", checkpoint_step=8,
            checkpoint_fingerprint="f" * 16)
  ev = classify._null_to_nan(json.loads(json.dumps(metrics.json_safe(ev))))
  page, md = report.render(c, classify, {**classify.report_part(c, ev), "figures": {}}, {}, {}, {}, {},
                           {"checkpoint": "/run/best/8", "step": 8, "fingerprint": "f" * 16})
  assert "Task: malignant vs benign" in page and "abnormal" not in page
  assert "Of 100 <b>malignant</b> studies" in page and "Of 100 <b>malignant</b> patients" in page
  assert "Per patient: 40 patients" in md and "thresholds chosen on per-patient validation scores" in md
  n_ops = len(ev["operating_points"]) + len(ev["patient_level"]["operating_points"])
  assert page.count("model's net benefit is") == n_ops  # one sentence per operating point and level
  adv = ev["operating_points"]["youden"]["net_benefit"]["advantage"]["value"]
  assert f"<b>{100 * adv:.1f}</b>" in page and "more malignant studies per 100 studies" in page
  assert f"T = {ev['recalibration']['temperature']:.3f}" in page


def test_class_names_are_checked():
  c = tiny_config("/tmp")
  c.data.class_names = ("benign",)
  assert any("data.class_names" in e for e in classify.check(c))
  c.data.class_names = ("benign", "malignant")
  c.eval.calibration = "platt"
  assert classify.check(c) == ["config.eval.calibration='platt': must be one of ('none', 'temperature')"]
  c.eval.calibration = "temperature"
  assert classify.check(c) == [] and classify.class_names(c) == ("benign", "malignant")
