"""The ablation runner on a micro sweep: 1 seed, 1 variant, 2 steps; including the pretraining prerequisite."""
import csv
import shlex

import pytest

from experiments import ablations, compare, run
from lungct import config_check

# Explicit micro sizes: the ablations' base config is the full default size (160 phantoms at 48x64x64).
TINY = ["--set", "data.num_scans=24", "--set", "data.shape=(48, 48, 48)", "--set", "model.features=(4, 8, 8, 16)",
        "--set", "model.dense=16", "--set", "train.batch_size=4", "--set", "train.num_epochs=0",
        "--set", "train.num_steps=2"]


def test_micro_sweep_writes_the_table(tmp_path):
  out = tmp_path / "results"
  argv = ["pretraining", "--seeds", "1", "--variants", "scratch", "finetuned", "--out", str(out),
          "--set", f"data.data_dir={tmp_path / 'tfds'}"] + TINY
  rows = run.main(argv)
  assert [r["variant"] for r in rows] == ["scratch", "finetuned"] and rows[0]["seeds"] == 1
  assert (out / "runs" / "pretraining" / "_pretrain" / "metrics.json").exists()  # the prerequisite ran first
  runs = out / "runs" / "pretraining"
  assert (runs / "finetuned" / "seed_0" / "metrics.json").exists()
  # The paired difference against the first variant, on the same test studies.
  cmp = compare.compare(str(runs / "finetuned"), str(runs / "scratch"), n_boot=2000)
  assert rows[1]["test_auc_diff"] == pytest.approx(cmp["bootstrap"]["diff"], abs=1e-12)
  assert rows[1]["test_auc_diff_p"] == pytest.approx(cmp["bootstrap"]["p_value"], abs=1e-12)
  assert "test_auc_diff" not in rows[0]

  table = list(csv.DictReader(open(out / "pretraining.csv")))
  assert list(table[0]) == ["variant", "seeds", "val_auc", "val_auc_std", "test_auc", "test_auc_std",
                            "test_accuracy", "test_accuracy_std", "test_sensitivity", "test_sensitivity_std",
                            "test_specificity", "test_specificity_std", "wall_time_s", "wall_time_s_std",
                            "test_auc_diff", "test_auc_diff_lo", "test_auc_diff_hi", "test_auc_diff_p"]
  assert table[1]["variant"] == "finetuned" and table[1]["seeds"] == "1" and table[0]["test_auc_diff"] == ""
  assert float(table[1]["test_accuracy"]) == pytest.approx(rows[1]["test_accuracy"], abs=1e-4)
  assert 0 <= float(table[1]["test_accuracy"]) <= 1 and float(table[1]["wall_time_s"]) > 0
  assert float(table[1]["wall_time_s_std"]) == 0.0  # one seed
  md = open(out / "pretraining.md").read().splitlines()
  assert md[2] == f"`python -m experiments.run {shlex.join(argv)}`"
  assert "| finetuned | 1 | " in "\n".join(md) and md[-1].startswith("| finetuned | ")
  assert "Paired differences in test AUC against `scratch`" in "\n".join(md)

  # Same command again: every run is reused from its metrics.json, nothing retrains.
  again = run.main(argv)
  assert again[1]["test_accuracy"] == rows[1]["test_accuracy"] and again[1]["test_auc_diff"] == rows[1]["test_auc_diff"]


def test_every_variant_override_names_a_config_key():
  for name, ablation in ablations.ABLATIONS.items():
    for variant, overrides in ablation.variants:
      c = config_check.apply_overrides(ablation.config(), {**ablation.common, **overrides})
      if c.init_from:
        assert c.init_from[1:] in ablation.requires, (name, variant)
  with pytest.raises(config_check.ConfigError, match="model.nope"):
    config_check.apply_overrides(ablations.base_config(), {"model.nope": 1})


def test_a_prerequisite_on_its_own_base_config():
  """The nodule ablation's pretraining: the attributes task on the real LIDC crops (its own base config), which
  never sees a malignancy label nor the embedded crops the variants are tested on; the backbone matches."""
  nodule = ablations.ABLATIONS["nodule"]
  assert run.needed_prerequisites(nodule, ["recipe", "width_16"]) == []  # no pretraining for these
  assert run.needed_prerequisites(nodule, ["recipe", "from_attributes"]) == ["attributes"]
  pre = run.prerequisite_config(nodule, "attributes", {"train.num_epochs": 2})
  assert pre.task == "attributes" and pre.data.source == "folder" and pre.train.num_epochs == 2
  assert pre.data.manual_dir == "../shared/data/lidc_indeterminate" and "malignancy" not in pre.data.targets
  fine = run._config(nodule, dict(nodule.variants)["from_attributes"], {}, {"attributes": "/w/_attributes"})
  assert fine.task == "classify" and fine.data.source == "nodules" and fine.init_from == "/w/_attributes"
  assert fine.model.to_dict() == pre.model.to_dict()  # every backbone array loads; only the head is fresh
  assert fine.to_dict() == {**nodule.config().to_dict(), "init_from": "/w/_attributes"}  # one change
  # Overrides of the ablation's base: `common` and then the prerequisite's own overrides.
  pretraining = ablations.ABLATIONS["pretraining"]
  grade = run.prerequisite_config(pretraining, "pretrain", {})
  assert grade.task == "classify" and grade.data.label == "grade" and grade.train.num_epochs == 4
  assert grade.data.split_fractions == (0.8, 0.1, 0.1) and grade.data.num_scans == 120


def test_a_missing_data_folder_stops_with_one_line(tmp_path):
  argv = ["nodule", "--seeds", "1", "--variants", "from_attributes", "--out", str(tmp_path / "results"),
          "--set", f"data.manual_dir={tmp_path / 'absent'}", "--set", f"data.data_dir={tmp_path / 'tfds'}"]
  with pytest.raises(SystemExit) as e:
    run.main(argv)
  message = str(e.value.code)
  assert message.startswith("error: ") and "\n" not in message, message
  assert f"runs/nodule/_attributes: data dir '{tmp_path / 'absent'}' (data.manual_dir) does not exist" in message
  assert not (tmp_path / "results" / "nodule.md").exists()


def test_a_retrained_prerequisite_retrains_the_variants_started_from_it(tmp_path, monkeypatch):
  """A variant's finished run is reused only if it was trained from the same config and, with init_from, from
  the same prerequisite run: changing the prerequisite's config (same workdir path) invalidates it."""
  from lungct import main
  from lungct.data import lung_ct
  trained = []

  def fake_run(config, workdir, mode, **_):
    if mode == "train":
      trained.append((workdir, config.train.num_epochs))
      with open(f"{workdir}/metrics.json", "w") as f:
        f.write('{"validation": {"auc": 0.5}, "test": {"auc": 0.5}}')
    return {"validation": {"auc": 0.5}, "test": {"auc": 0.5}}
  monkeypatch.setattr(main, "run", fake_run)
  monkeypatch.setattr(lung_ct, "prepare", lambda data_cfg: None)
  nodule = ablations.ABLATIONS["nodule"]
  pre_dir, fine_dir = tmp_path / "_attributes", tmp_path / "from_attributes"
  pre_dir.mkdir(), fine_dir.mkdir()
  fine = run._config(nodule, dict(nodule.variants)["from_attributes"], {}, {"attributes": str(pre_dir)})
  for epochs in (2, 2, 3):  # the prerequisite's config: the same twice, then changed
    run._train(run.prerequisite_config(nodule, "attributes", {"train.num_epochs": epochs}), str(pre_dir))
    run._train(fine, str(fine_dir))
  assert trained == [(str(pre_dir), 2), (str(fine_dir), fine.train.num_epochs),  # first time: both train
                     (str(pre_dir), 3), (str(fine_dir), fine.train.num_epochs)]  # the rerun reused both
