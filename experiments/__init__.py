"""Ablation experiments: `python -m experiments.run <name>`; see experiments/README.md."""
