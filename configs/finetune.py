"""Binary fine-tuning (normal vs abnormal) from a pretrained workdir, big_vision style config argument.

    python -m lungct.main --config configs/pretrain_grades.py --workdir runs/pretrain
    python -m lungct.main --config configs/finetune.py:runs/pretrain --workdir runs/finetune
    # freeze the first two conv blocks (paths as nnx.split names them: blocks/<i>/conv/kernel, ...):
    python -m lungct.main --config configs/finetune.py:runs/pretrain --workdir runs/finetune_frozen \
        --config.freeze='("blocks/0/.*", "blocks/1/.*")'

The argument (default runs/pretrain) is a workdir, its best/ or checkpoints/ folder, or one step folder.
Every parameter whose path and shape match is loaded (the conv blocks, BatchNorm statistics, the dense
layer); the head (5 outputs in pretraining, 1 here) keeps its fresh initialisation and is reported as
skipped. The data are the default phantom set (phantom_seed=0), disjoint from pretraining's.
"""
from configs import default


def get_config(init_from: str = "runs/pretrain"):
  c = default.get_config()
  c.init_from = init_from or "runs/pretrain"
  c.freeze = ()                   # e.g. ("blocks/0/.*", "blocks/1/.*")
  c.train.learning_rate = 3e-4    # smaller steps than from scratch, not to wash out the pretrained features
  return c
