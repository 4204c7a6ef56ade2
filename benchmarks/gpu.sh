#!/usr/bin/env bash
# Train-step benchmark on one GPU (H100/H200): the tutorial CNN and ResNet-18, float32 and bfloat16,
# lungct and (if torch is importable) PyTorch, JSON + logs to $OUT. Needs only JAX/Flax/Optax/Orbax
# (no tensorflow_datasets, grain, internet). About 3-5 minutes.
#
#   OUT=/tmp/out bash benchmarks/gpu.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out}
PY=${PYTHON:-python3}
STEPS=${STEPS:-20}
mkdir -p "$OUT"
{
  date -Is; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  $PY -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" 2>&1
  $PY -c "import torch; print('torch', torch.__version__, torch.cuda.is_available())" 2>&1 | tail -1
} | tee "$OUT/env.txt"
for dtype in float32 bfloat16; do
  for model in cnn3d resnet18; do
    timeout 150 $PY benchmarks/train_step.py --model "$model" --dtype "$dtype" --batch 2 \
      --steps "$STEPS" --warmup 3 --json "$OUT/train_step_${model}_${dtype}.json" \
      2>&1 | tee "$OUT/train_step_${model}_${dtype}.log" | grep -v "^W0000\|^I0000"
  done
done
ls -l "$OUT"
