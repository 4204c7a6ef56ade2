"""The tutorial runs top to bottom: docs/tutorial.py (jupytext percent format, plain Python cells) is executed as a
script at quick sizes (LUNGCT_TUTORIAL_QUICK=1), so CI needs no Jupyter; any failing cell fails the test.
The committed docs/tutorial.ipynb must be generated from the current source (same code cells)."""
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "docs", "tutorial.py")
NOTEBOOK = os.path.join(ROOT, "docs", "tutorial.ipynb")


def test_tutorial_runs_at_quick_sizes(tmp_path):
  env = {**os.environ, "LUNGCT_TUTORIAL_QUICK": "1", "LUNGCT_TUTORIAL_DIR": str(tmp_path), "MPLBACKEND": "Agg"}
  proc = subprocess.run([sys.executable, SOURCE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
  assert proc.returncode == 0, f"tutorial failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
  out = proc.stdout
  assert out.rstrip().endswith("TUTORIAL OK"), out[-2000:]
  # Values the tutorial prints that are facts of the library, not of training:
  assert "1,352,897" in out                                   # the Keras tutorial CNN's trainable parameters
  assert "axis codes ('R', 'A', 'S')" in out                  # load_scan reorients to canonical RAS
  assert "same in a fresh loader: True" in out                # step-indexed batches
  assert "blocks/0/conv/kernel: unchanged by fine-tuning = True" in out   # freeze
  assert "blocks/1/conv/kernel: unchanged by fine-tuning = False" in out
  assert "Dice(a, a) = 1.000, Dice(a, a shifted by 1 voxel) = 0.750, IoU = 0.600" in out
  assert "patients shared between splits: 0" in out
  assert "kept fresh 2: ['params/head/bias', 'params/head/kernel']" in out  # init_from: new head only

  figures = sorted(os.listdir(tmp_path / "figures"))
  assert len(figures) >= 16, figures
  assert all(os.path.getsize(tmp_path / "figures" / f) > 5000 for f in figures)

  work = tmp_path / "runs"
  history = [json.loads(line) for line in open(work / "classify" / "metrics.jsonl")]
  losses = [r["train/loss"] for r in history if "train/loss" in r]
  assert len(losses) >= 2 and all(math.isfinite(v) and v > 0 for v in losses)
  ev = json.load(open(work / "classify" / "eval_test.json"))
  assert set(ev["operating_points"]) >= {"default@0.5", "youden"} and ev["n"] > 0
  assert os.path.getsize(work / "classify" / "report.html") > 10_000
  grades = json.load(open(work / "pretrain_grades" / "eval_test.json"))["metrics"]
  assert grades["num_classes"] == 5 and sum(map(sum, grades["confusion_matrix"])) == grades["n"]
  seg = json.load(open(work / "segment" / "eval_test.json"))["summary"]
  assert 0.0 <= seg["dice"] <= 1.0


def test_committed_notebook_matches_source():
  """docs/tutorial.ipynb's code cells are docs/tutorial.py's (regenerate with jupytext when the source changes)."""
  source = open(SOURCE).read()
  nb = json.load(open(NOTEBOOK))
  code = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
  assert len(code) >= 30
  missing = [c[:80] for c in code if c.strip() not in source]
  assert not missing, f"notebook cells not in docs/tutorial.py (rerun jupytext and execute): {missing}"
  n_source_cells = sum(1 for line in source.splitlines() if line.startswith("# %%") and "[markdown]" not in line)
  assert len(code) == n_source_cells


def test_rendered_per_100_text_is_what_the_code_prints():
  """The rendered copies (docs/tutorial.md and the notebook's outputs) hold the per-100 sentences as
  `classify.per_100` prints them today for the sensitivity and specificity they show."""
  import re
  from lungct import report
  from lungct.tasks import classify
  line = re.compile(r"(\S+) \(t = [0-9.]+\): (.*\(sensitivity ([0-9.]+)\).*\(specificity ([0-9.]+)\)\.)")
  nb = json.load(open(NOTEBOOK))
  outputs = ["".join(o.get("text", "")) for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
  for name, text in (("tutorial.md", open(os.path.join(ROOT, "docs", "tutorial.md")).read()),
                     ("tutorial.ipynb", "\n".join(outputs))):
    found = [m for m in map(line.search, text.splitlines()) if m]
    assert len(found) >= 2, name
    for m in found:
      ops = {"sensitivity": {"value": float(m.group(3))}, "specificity": {"value": float(m.group(4))}}
      assert m.group(2) == report._strip(classify.per_100(ops)), (name, m.group(1))
