"""Transfer learning: partial restore of a 5-way grade checkpoint into the binary model; the configs."""
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import finetune, pretrain_grades
from lungct import checkpoint, train
from lungct.data import phantom
from tests.helpers import tiny_config


def _flat(tree):
  return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """A saved 5-way checkpoint whose parameters differ from the binary model's fresh init (another seed)."""
  workdir = str(tmp_path_factory.mktemp("pretrain"))
  c = tiny_config(workdir, **{"data.label": "grade", "seed": 1})
  _, state, _ = train.create_state(c, 1)
  state["params"] = jax.tree.map(lambda a: a + 0.5, state["params"])  # not any init's values
  state["batch_stats"] = jax.tree.map(lambda a: a + 0.25, state["batch_stats"])
  latest, best = checkpoint.managers(workdir)
  checkpoint.save(latest, 7, state, {"config": {}})
  latest.wait_until_finished()
  return workdir, jax.tree.map(np.asarray, state)


def test_partial_restore_loads_every_match_exactly_and_reports_the_head(pretrained):
  workdir, saved = pretrained
  c = tiny_config(workdir)  # binary: 1 output
  _, fresh, _ = train.create_state(c, 1)
  params, stats, report = checkpoint.restore_params(workdir, fresh["params"], fresh["batch_stats"])

  assert report["checkpoint"].endswith("checkpoints/7")
  assert set(report["skipped"]) == {"params/head/kernel", "params/head/bias"}
  assert report["skipped"]["params/head/kernel"] == "shape (16, 5) in checkpoint vs (16, 1) in model"
  assert report["skipped"]["params/head/bias"] == "shape (5,) in checkpoint vs (1,) in model"
  assert report["unused"] == []
  src = {**{f"params/{k}": v for k, v in _flat(saved["params"]).items()},
         **{f"batch_stats/{k}": v for k, v in _flat(saved["batch_stats"]).items()}}
  new = {**{f"params/{k}": v for k, v in _flat(params).items()},
         **{f"batch_stats/{k}": v for k, v in _flat(stats).items()}}
  init = {**{f"params/{k}": v for k, v in _flat(fresh["params"]).items()},
          **{f"batch_stats/{k}": v for k, v in _flat(fresh["batch_stats"]).items()}}
  assert sorted(report["loaded"]) == sorted(k for k in new if not k.startswith("params/head/"))
  assert any(k.startswith("batch_stats/") for k in report["loaded"])
  for k in report["loaded"]:
    np.testing.assert_array_equal(new[k], src[k], err_msg=k)
    assert new[k].dtype == init[k].dtype and not np.array_equal(new[k], init[k]), k
  for k in report["skipped"]:
    np.testing.assert_array_equal(new[k], init[k], err_msg=k)  # the head keeps its fresh init


def test_restore_params_reads_a_step_folder_and_fails_plainly(pretrained, tmp_path):
  workdir, _ = pretrained
  assert checkpoint.find_checkpoint(f"{workdir}/checkpoints/7") == (f"{workdir}/checkpoints", 7)
  with pytest.raises(checkpoint.CheckpointError, match="no checkpoint found under"):
    checkpoint.find_checkpoint(str(tmp_path))


def test_freeze_pattern_names_match_the_first_two_conv_blocks(pretrained):
  _, saved = pretrained
  labels = _flat(train.freeze_labels(saved["params"], ("blocks/0/.*", "blocks/1/.*")))
  frozen = sorted(k for k, v in labels.items() if v == "frozen")
  assert frozen == sorted(f"blocks/{i}/{layer}/{p}" for i in (0, 1)
                          for layer, p in (("conv", "kernel"), ("conv", "bias"), ("bn", "scale"), ("bn", "bias")))


def test_configs_pretrain_on_a_disjoint_phantom_set():
  pre, fine = pretrain_grades.get_config(), finetune.get_config("runs/x")
  assert pre.data.label == "grade" and pre.data.num_classes == 5 and fine.data.label == "binary"
  assert fine.init_from == "runs/x" and finetune.get_config().init_from == "runs/pretrain"
  assert pre.model.to_dict() == fine.model.to_dict()  # everything but the head loads
  seeds_pre = {s for *_, s in phantom.phantom_set(pre.data.num_scans, pre.data.phantom_seed)}
  seeds_fine = {s for *_, s in phantom.phantom_set(fine.data.num_scans, fine.data.phantom_seed)}
  assert seeds_pre.isdisjoint(seeds_fine)
