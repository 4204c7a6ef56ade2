"""The tutorial CNN on MosMedData's severity grades: CT-0 .. CT-4 as a 5-way softmax.

Download MosMedData yourself and point manual_dir at the folder holding CT-0 ... CT-4:

    python -m lungct.main --config configs/mosmed_grades.py --workdir runs/mosmed_grades \
        --config.data.manual_dir=/path/to/MosMedData

MosMedData is very unbalanced (CT-1 has ~684 studies, CT-4 only 2): class_weights (e.g. inverse class
frequency over the training split) are worth trying; the macro AUC and quadratic kappa are the metrics to
read, not accuracy.
"""
from configs import mosmed_cnn3d


def get_config():
  c = mosmed_cnn3d.get_config()
  c.data.label = "grade"
  c.data.num_classes = 5
  return c
