"""Severity grades (label=grade): softmax metrics by hand, a short 5-way training run, --mode=eval."""
import csv
import json

import numpy as np
import pytest

from lungct import evaluate, metrics, train
from tests.helpers import tiny_config

# 3 classes, 6 cases. argmax predictions: 0, 1, 1, 1, 2, 0.
Y = np.array([0, 0, 1, 1, 2, 2])
PROBS = np.array([[0.6, 0.3, 0.1],
                  [0.3, 0.5, 0.2],
                  [0.2, 0.7, 0.1],
                  [0.1, 0.8, 0.1],
                  [0.1, 0.2, 0.7],
                  [0.5, 0.1, 0.4]])


def test_multiclass_metrics_by_hand():
  m = metrics.multiclass_metrics(Y, PROBS)
  assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]  # rows = true grade
  assert m["accuracy"] == pytest.approx(4 / 6)
  np.testing.assert_allclose(m["sensitivity"], [1 / 2, 2 / 2, 1 / 2])
  np.testing.assert_allclose(m["specificity"], [3 / 4, 3 / 4, 4 / 4])
  # One-vs-rest AUC of class 0: positives score 0.6, 0.3; negatives 0.2, 0.1, 0.1, 0.5 -> 7 of 8 pairs.
  np.testing.assert_allclose(m["roc_auc"], [7 / 8, 1.0, 1.0])
  assert m["macro_roc_auc"] == pytest.approx((7 / 8 + 2) / 3)
  # Quadratic kappa: weights (i-j)^2/4; observed weighted disagreement 1/4 + 1 = 1.25, expected (row
  # totals 2,2,2 x predicted totals 2,3,1 / 6) 1.75 -> 1 - 1.25 / 1.75 = 2/7.
  assert m["quadratic_kappa"] == pytest.approx(2 / 7)
  assert m["num_classes"] == 3 and m["n"] == 6


def test_grade_training_and_eval(tmp_path):
  c = tiny_config(tmp_path / "tfds", **{"data.label": "grade", "train.num_epochs": 0, "train.num_steps": 4,
                                        "train.eval_every_steps": 4})
  workdir = str(tmp_path / "run")
  summary = train.train_and_evaluate(c, workdir)
  m = json.load(open(f"{workdir}/metrics.json"))
  for split in ("validation", "test"):
    for key in ("accuracy", "macro_roc_auc", "macro_sensitivity", "quadratic_kappa", "loss", "auc"):
      assert key in m[split], (split, key)
    assert 0.0 <= m[split]["accuracy"] <= 1.0
    assert m[split]["loss"] > 0
  assert m["validation"]["auc"] == summary["validation"]["macro_roc_auc"] or np.isnan(summary["validation"]["auc"])

  result = evaluate.evaluate_checkpoint(c, workdir, split="test")
  cm = np.array(result["metrics"]["confusion_matrix"])
  assert cm.shape == (5, 5) and cm.sum() == result["n"] > 0
  assert result["metrics"]["accuracy"] == pytest.approx(np.trace(cm) / cm.sum())
  saved = json.load(open(f"{workdir}/eval_test.json"))
  assert saved["metrics"]["confusion_matrix"] == cm.tolist() and saved["split"] == "test"
  rows = list(csv.DictReader(open(f"{workdir}/predictions_test.csv")))
  assert len(rows) == result["n"]
  assert list(rows[0])[-5:] == [f"prob_{i}" for i in range(5)]
  for r in rows:
    probs = [float(r[f"prob_{i}"]) for i in range(5)]
    assert sum(probs) == pytest.approx(1.0, abs=1e-4)
    assert int(r["predicted_grade"]) == int(np.argmax(probs))
  # The eval-mode grades reproduce the test metrics of the training run (same best checkpoint).
  assert result["metrics"]["accuracy"] == pytest.approx(m["test"]["accuracy"])
