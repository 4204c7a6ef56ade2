"""Severity grades (5-way softmax, CT-0..CT-4) on the synthetic phantoms: CPU-friendly.

    python -m lungct.main --config configs/synthetic_grades.py --workdir runs/grades
    python -m lungct.main --config configs/synthetic_grades.py --workdir runs/grades --mode=eval

Validation/test metrics: accuracy, per-class and macro one-vs-rest ROC AUC, sensitivity, specificity,
quadratic weighted kappa (grades are ordinal); the best checkpoint is chosen by macro ROC AUC.
"""
from configs import default


def get_config():
  c = default.get_config()
  c.data.label = "grade"
  c.data.num_classes = 5          # the phantoms have grades 0 (normal) .. 4
  c.data.num_scans = 200          # half normal, the rest spread over grades 1..4 (25 each)
  c.data.shape = (48, 64, 64)
  c.train.num_epochs = 15
  return c
