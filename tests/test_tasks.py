"""The task contract as code: every module of `tasks.TASKS` against `tasks.Task` (and `Predicts` / `Reports` for
the modes it offers), and what the rest of the code reads from the registry."""
import re
import types

import pytest

from lungct import config_check, tasks, train
from lungct.tasks import classify
from tests.helpers import ROOT


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_every_task_meets_the_contract(name):
  task = tasks.TASKS[name]
  assert task.NAME == name
  assert tasks.contract_errors(task) == []
  assert isinstance(task, tasks.Task)
  assert {"train", "eval", "cv"} <= set(task.MODES)
  assert all(k.startswith(task.CONFIG_GROUP + ".") for k in task.EXECUTION_KEYS)
  config = config_check.load_config_file(f"{ROOT}/{task.CONFIG}:tiny")
  assert tasks.get(config) is task                      # its reference config runs it
  assert task.check(config) == []
  if task.CONFIG_GROUP:
    assert task.CONFIG_GROUP in config
    for key in task.EXECUTION_KEYS:
      config_check.get(config, key)                      # each declared key exists


def test_the_contract_check_can_fail():
  """A module with a wrong signature, a missing function or a wrong constant type is named."""
  bad = types.ModuleType("bad_task")
  for name in ("NAME", "BEST_METRIC", "CONFIG", "CONFIG_GROUP"):
    setattr(bad, name, "x")
  bad.MODES, bad.HEADLINE_METRICS, bad.EXECUTION_KEYS = ("train", "predict"), (), "not a tuple"
  for name in ("check", "input_shape", "num_outputs", "augment", "loss", "make_apply", "evaluate", "run_eval"):
    setattr(bad, name, getattr(classify, name))
  bad.prepare_batch = lambda batch, config: batch                 # step missing
  errors = tasks.contract_errors(bad)
  assert any("prepare_batch(batch, config) does not match" in e for e in errors), errors
  assert any("EXECUTION_KEYS must be a tuple" in e for e in errors), errors
  assert any("no scan_predictor (Predicts)" in e for e in errors), errors   # offers predict, lacks it
  assert len(errors) == 3


def test_unknown_task_is_refused_naming_the_registry():
  c = config_check.load_config_file(f"{ROOT}/configs/default.py:tiny")
  c.task = "regress"
  with pytest.raises(tasks.TaskError, match=re.escape(f"config.task='regress' is not a task; known: {sorted(tasks.TASKS)}")):
    tasks.get(c)


def test_execution_keys_and_headline_come_from_the_task():
  seg = tasks.TASKS["segment"]
  assert config_check.is_execution_key("segment.threshold", seg.EXECUTION_KEYS)
  assert not config_check.is_execution_key("segment.threshold")          # not without the task
  assert not config_check.is_execution_key("segment.patch", seg.EXECUTION_KEYS)   # what is learned
  with pytest.raises(config_check.ConfigError, match="segment.patch"):
    config_check.same_run({"segment": {"patch": [8, 8, 8], "threshold": 0.5}},
                          {"segment": {"patch": [4, 8, 8], "threshold": 0.5}}, "w", seg.EXECUTION_KEYS)
  config_check.same_run({"segment": {"threshold": 0.5}}, {"segment": {"threshold": 0.3}}, "w", seg.EXECUTION_KEYS)
  val = {"loss": 1.0, "dice": 0.5, "iou": 0.4, "hd95": 3.0, "accuracy": 0.9}
  assert train._headline(val, seg) == ["loss", "dice", "iou", "hd95"]
  assert train._headline(val, classify) == ["loss", "accuracy"]          # no auc in val: not printed


def test_reliability_suite_covers_every_task():
  from tests.reliability import _cli
  assert set(_cli.TASKS) == set(tasks.TASKS)
