"""The attributes task (multi-output ratings + millimetres), its metrics, and the open dataset schema
(`data.targets`) from a labels CSV and from the generated nodules."""
import os

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from lungct import config_check, metrics
from lungct.data import errors, nifti, phantom, pipeline, sources
from lungct.data import lung_ct
from lungct.tasks import attributes
from tests.helpers import ROOT


def tiny():
  return config_check.load_config_file(f"{ROOT}/configs/nodule_attributes.py:tiny")


# ----------------------------------------------------------------------------- metrics against hand values

def test_regression_and_agreement_metrics_against_hand_values():
  y = np.array([1, 2, 3, 4, 5], float)
  p = np.array([1.2, 2.6, 2.9, 4.0, 3.4])
  assert metrics.mae(y, p) == pytest.approx((0.2 + 0.6 + 0.1 + 0 + 1.6) / 5)
  assert metrics.rmse(y, p) == pytest.approx(np.sqrt((0.04 + 0.36 + 0.01 + 0 + 2.56) / 5))
  assert metrics.pearson(y, p) == pytest.approx(stats.pearsonr(y, p)[0])
  ties = np.array([1, 1, 2, 3, 3, 3, 5], float)
  q = np.array([0.5, 0.7, 2.0, 2.0, 4.0, 1.0, 9.0])
  assert metrics.spearman(ties, q) == pytest.approx(stats.spearmanr(ties, q)[0])
  # rounded predictions 1, 3, 3, 4, 3: exact 3/5, within one 4/5 (5 vs 3 is two off)
  assert metrics.exact_agreement(y, p) == pytest.approx(0.6)
  assert metrics.within_one(y, p) == pytest.approx(0.8)
  assert np.isnan(metrics.pearson([1, 2, 3], [2, 2, 2]))    # constant prediction: undefined, not 0


def test_weighted_kappa_matches_scikit_learn():
  from sklearn.metrics import cohen_kappa_score
  rng = np.random.default_rng(1)
  y = rng.integers(1, 6, 60)
  p = np.clip(y + rng.integers(-2, 3, 60), 1, 5)
  for w in ("quadratic", "linear"):
    want = cohen_kappa_score(y, p, weights=w, labels=[1, 2, 3, 4, 5])
    assert metrics.weighted_kappa(y, p.astype(float), range(1, 6), weights=w) == pytest.approx(want)
  assert metrics.weighted_kappa(y, y.astype(float), range(1, 6)) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- the loss

def _outputs(config, rows):
  """Raw outputs (N, num_outputs) for predictions given per target: continuous in units, ratings as levels."""
  out = []
  for row in rows:
    z = []
    for t, v in zip(attributes.targets_of(config), row):
      if t.is_rating:   # logits strongly above the thresholds below v, below above it
        z += [8.0 if k < v else -8.0 for k in range(1, t.levels)]
      else:
        z.append((v - t.location) / t.spread)
    out.append(z)
  return jnp.asarray(out, jnp.float32)


def test_ordinal_loss_respects_the_order_and_decodes_to_the_rating():
  c = tiny()   # diameter_mm (continuous) and malignancy (1..5)
  assert attributes.num_outputs(c) == 1 + 4
  batch = attributes.prepare_batch({"image": np.zeros((1, 2, 2, 2, 1)), "targets": np.array([[8.0, 5.0]]),
                                    "study_id": np.array(["s"])}, c, 0)
  losses = [float(attributes.per_target_loss(_outputs(c, [[8.0, r]]), batch["targets"], batch["present"], c)[0][1])
            for r in (5, 4, 3, 2, 1)]
  assert losses[0] < 0.01 and all(a < b for a, b in zip(losses, losses[1:])), losses   # further = dearer
  np.testing.assert_allclose(attributes.decode_outputs(np.asarray(_outputs(c, [[12.5, 3]])), c), [[12.5, 3.0]],
                             atol=1e-3)


def test_missing_targets_are_masked_out_of_the_loss():
  c = tiny()
  y = np.array([[8.0, 2.0], [20.0, np.nan], [np.nan, 4.0]])
  batch = attributes.prepare_batch({"image": np.zeros((3, 2, 2, 2, 1)), "targets": y,
                                    "study_id": np.array(["a", "b", "c"])}, c, 0)
  assert batch["present"].tolist() == [[1, 1], [1, 0], [0, 1]] and np.isfinite(batch["targets"]).all()
  out = _outputs(c, [[10.0, 3], [5.0, 1], [30.0, 5]])
  value, _ = attributes.loss(out, batch, c)
  # By hand: the diameter from studies a and b only, the rating from a and c only.
  per, counts = attributes.per_target_loss(out, batch["targets"], batch["present"], c)
  assert counts.tolist() == [2, 2]
  alone = [attributes.per_target_loss(out[i:i + 1], batch["targets"][i:i + 1], batch["present"][i:i + 1], c)[0]
           for i in range(3)]
  assert float(per[0]) == pytest.approx((float(alone[0][0]) + float(alone[1][0])) / 2, rel=1e-6)
  assert float(per[1]) == pytest.approx((float(alone[0][1]) + float(alone[2][1])) / 2, rel=1e-6)
  assert float(value) == pytest.approx(float(per.mean()), rel=1e-6)
  changed = out.at[1, 1:].set(100.0).at[2, 0].set(-100.0)     # what the missing targets "predict" is ignored
  assert float(attributes.loss(changed, batch, c)[0]) == pytest.approx(float(value), rel=1e-6)


def test_a_rating_outside_its_levels_is_refused_naming_the_study():
  c = tiny()
  with pytest.raises(ValueError, match=r"study b: malignancy=6.0 is not a rating in 1..5"):
    attributes.prepare_batch({"image": np.zeros((2, 2, 2, 2, 1)), "targets": np.array([[8.0, 2.0], [8.0, 6.0]]),
                              "study_id": np.array(["a", "b"])}, c, 0)


def test_summary_per_target_and_best_metric():
  c = tiny()
  pred = {"targets": np.array([[8.0, 2], [20.0, np.nan], [np.nan, 4], [5.0, 1]]),
          "patient_id": np.array(["p", "p", "q", "r"]), "study_id": np.array(["a", "b", "c", "d"])}
  pred["outputs"] = np.asarray(_outputs(c, [[10.0, 2], [15.0, 1], [30.0, 5], [5.0, 1]]))
  pred["pred"] = attributes.decode_outputs(pred["outputs"], c)
  s = attributes.summarize(pred, c)
  assert s["diameter_mm/n"] == 3 and s["malignancy/n"] == 3
  assert s["diameter_mm/mae"] == pytest.approx((2 + 5 + 0) / 3, abs=1e-3)
  assert s["malignancy/mae"] == pytest.approx(1 / 3, abs=1e-3) and s["malignancy/within_one"] == 1.0
  assert s["neg_mae"] == pytest.approx(-((7 / 3) / 5 + (1 / 3) / 4) / 2, abs=1e-3)
  ci = attributes.with_confidence(pred, c, n_boot=200, seed=0)
  assert ci["diameter_mm"]["n_patients"] == 2 and ci["malignancy"]["kind"] == "rating 1-5"
  m = ci["diameter_mm"]["mae"]
  assert m["lo"] <= m["value"] <= m["hi"]


def test_cross_validation_pools_every_out_of_fold_prediction_per_target(tmp_path):
  """--mode=cv: the folds' held-out predictions in one table (oof_predictions.csv, with the fold) and each
  target's metrics over all of them with patient-bootstrap CIs; the values are those of the pooled studies, not
  a mean of the folds' values."""
  import csv
  from lungct import evaluate
  c = tiny()
  c.eval.n_boot = 100
  rng = np.random.default_rng(0)
  oof = []
  for f, n in enumerate((5, 7)):
    targets = np.column_stack([rng.uniform(3, 30, n), rng.integers(1, 6, n).astype(float)])
    targets[0, 1] = np.nan                                   # a missing rating: left out of that target only
    pred = np.column_stack([targets[:, 0] + rng.normal(0, 2 + 4 * f, n), rng.uniform(1, 5, n)])
    oof.append({"pred": pred, "targets": targets, "study_id": np.array([f"f{f}s{i}" for i in range(n)]),
                "patient_id": np.array([f"f{f}p{i // 2}" for i in range(n)])})
  pooled = evaluate.pool_out_of_fold(attributes, oof, c, str(tmp_path))
  y = np.concatenate([o["targets"] for o in oof])
  p = np.concatenate([o["pred"] for o in oof])
  assert pooled["n"] == 12 and pooled["n_patients"] == 3 + 4
  mae = pooled["diameter_mm/mae"]
  assert mae["value"] == pytest.approx(np.mean(np.abs(y[:, 0] - p[:, 0])))
  fold_means = np.mean([np.mean(np.abs(o["targets"][:, 0] - o["pred"][:, 0])) for o in oof])
  assert abs(mae["value"] - fold_means) > 1e-3              # pooled over studies, not averaged over folds
  assert mae["lo"] <= mae["value"] <= mae["hi"] and mae["lo"] < mae["hi"]
  known = np.isfinite(y[:, 1])
  assert pooled["malignancy/within_one"]["value"] == pytest.approx(metrics.within_one(y[known, 1], p[known, 1]))
  assert "malignancy/kappa" in pooled and "diameter_mm/kappa" not in pooled
  rows = list(csv.DictReader(open(tmp_path / "oof_predictions.csv")))
  assert [r["fold"] for r in rows] == ["0"] * 5 + ["1"] * 7 and rows[5]["study_id"] == "f1s0"
  assert rows[0]["malignancy"] == "" and float(rows[1]["diameter_mm_predicted"]) == pytest.approx(p[1, 0], abs=1e-4)
  lines = "\n".join(evaluate.pooled_lines(pooled))
  assert "over all 12 studies of 7 patients" in lines and "| diameter_mm/mae |" in lines


# ----------------------------------------------------------------------------- the open schema

def _crops(tmp_path, header, rows):
  os.makedirs(tmp_path / "img", exist_ok=True)
  ph = phantom.make_phantom(0, 1, shape_xyz=(16, 16, 12))
  for name in ("a", "b", "c"):
    phantom.write_phantom_nifti(ph, str(tmp_path / "img" / f"{name}.nii.gz"))
  (tmp_path / "labels.csv").write_text("\n".join([header] + rows) + "\n")
  return str(tmp_path), "labels.csv"


def test_csv_targets_are_parsed_missing_is_nan_and_label_may_be_absent(tmp_path):
  root, csv = _crops(tmp_path, "filename,patient_id,diameter_mm,texture",
                     ["img/a.nii.gz,p1,5.5,3", "img/b.nii.gz,p1,,5", "img/c.nii.gz,p2,12,NA"])
  items = sources.list_folder_items(root, csv, targets=("diameter_mm", "texture"))
  assert [it.label for it in items] == [-1, -1, -1]
  got = np.array([[v for _, v in it.targets] for it in items])
  np.testing.assert_array_equal(np.isnan(got), [[0, 0], [1, 0], [0, 1]])
  assert got[0].tolist() == [5.5, 3.0] and got[2, 0] == 12.0
  with pytest.raises(errors.DataError, match=r"data.targets \['spiculation'\] are not columns"):
    sources.list_folder_items(root, csv, targets=("spiculation",))
  with pytest.raises(errors.DataError, match="missing \\['label'\\]"):   # no targets: a label is needed
    sources.list_folder_items(root, csv)


def test_a_non_numeric_target_names_the_row_and_column(tmp_path):
  root, csv = _crops(tmp_path, "filename,label,texture", ["img/a.nii.gz,0,3", "img/b.nii.gz,1,solid"])
  with pytest.raises(errors.DataError, match=r"labels.csv row 3: texture 'solid' is not a number"):
    sources.list_folder_items(root, csv, targets=("texture",))


def test_a_target_the_source_cannot_provide_is_refused():
  with pytest.raises(errors.DataError, match=r"data.source='nodules' provides diameter_mm, malignancy"):
    sources.target_names({"source": "nodules", "targets": ("texture",)})
  with pytest.raises(errors.DataError, match="provides no targets"):
    sources.target_names({"source": "mosmeddata", "targets": ("x",)})


def test_targets_reach_the_decoded_example_and_the_dataset_identity(tmp_path):
  c = tiny()
  c.data.data_dir = str(tmp_path)
  item = sources.list_items(c.data)[0]
  ex = pipeline.decode(lung_ct.make_example(item, c.data))
  nod = sources.load_item(item, c.data)
  assert ex["targets"].dtype == np.float32 and ex["targets"].shape == (2,)
  assert ex["targets"][0] == pytest.approx(nod.targets["diameter_mm"]) and ex["targets"][1] == item.grade + 1
  other = c.copy_and_resolve_references()
  other.data.targets = ("diameter_mm",)
  assert lung_ct.config_name(other.data) != lung_ct.config_name(c.data)     # the names are in its identity
  none = c.copy_and_resolve_references()
  none.data.targets = ()
  del none.data["targets"]
  bare = c.copy_and_resolve_references()
  bare.data.targets = ()
  assert lung_ct.config_name(none.data) == lung_ct.config_name(bare.data)  # no targets: the old dataset
