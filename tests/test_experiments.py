"""The ablation runner on a micro sweep: 1 seed, 1 variant, 2 steps; including the pretraining prerequisite."""
import csv
import shlex

import pytest

from experiments import ablations, run
from lungct import config_check

# Explicit micro sizes: the ablations' base config is the full default size (160 phantoms at 48x64x64).
TINY = ["--set", "data.num_scans=24", "--set", "data.shape=(48, 48, 48)", "--set", "model.features=(4, 8, 8, 16)",
        "--set", "model.dense=16", "--set", "train.batch_size=4", "--set", "train.num_epochs=0",
        "--set", "train.num_steps=2"]


def test_micro_sweep_writes_the_table(tmp_path):
  out = tmp_path / "results"
  argv = ["pretraining", "--seeds", "1", "--variants", "finetuned", "--out", str(out),
          "--set", f"data.data_dir={tmp_path / 'tfds'}"] + TINY
  rows = run.main(argv)
  assert [r["variant"] for r in rows] == ["finetuned"] and rows[0]["seeds"] == 1
  assert (out / "runs" / "pretraining" / "_pretrain" / "metrics.json").exists()  # the prerequisite ran first
  assert (out / "runs" / "pretraining" / "finetuned" / "seed_0" / "metrics.json").exists()
  assert not (out / "runs" / "pretraining" / "scratch").exists()

  table = list(csv.DictReader(open(out / "pretraining.csv")))
  assert list(table[0]) == ["variant", "seeds", "val_auc", "val_auc_std", "test_auc", "test_auc_std",
                            "test_accuracy", "test_accuracy_std", "test_sensitivity", "test_sensitivity_std",
                            "test_specificity", "test_specificity_std", "wall_time_s", "wall_time_s_std"]
  assert table[0]["variant"] == "finetuned" and table[0]["seeds"] == "1"
  assert float(table[0]["test_accuracy"]) == pytest.approx(rows[0]["test_accuracy"], abs=1e-4)
  assert 0 <= float(table[0]["test_accuracy"]) <= 1 and float(table[0]["wall_time_s"]) > 0
  assert float(table[0]["wall_time_s_std"]) == 0.0  # one seed
  md = open(out / "pretraining.md").read().splitlines()
  assert md[2] == f"`python -m experiments.run {shlex.join(argv)}`"
  assert md[-1].startswith("| finetuned | 1 | ")

  # Same command again: every run is reused from its metrics.json, nothing retrains.
  assert run.main(argv)[0]["test_accuracy"] == rows[0]["test_accuracy"]


def test_every_variant_override_names_a_config_key():
  for name, ablation in ablations.ABLATIONS.items():
    for variant, overrides in ablation.variants:
      c = config_check.apply_overrides(ablations.base_config(), {**ablation.common, **overrides})
      if c.init_from:
        assert c.init_from[1:] in ablation.requires, (name, variant)
  with pytest.raises(config_check.ConfigError, match="model.nope"):
    config_check.apply_overrides(ablations.base_config(), {"model.nope": 1})
