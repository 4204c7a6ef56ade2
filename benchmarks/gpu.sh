#!/usr/bin/env bash
# Every GPU row of benchmarks/README.md in one run (at most 9.5 minutes of timeouts, about 6 expected, one H100/H200), JSON + logs in $OUT:
#   1. train step, lungct vs PyTorch (if importable), both models, float32 and bfloat16, batch 2 and 16;
#      lungct sides: "xla" (cnn3d.py as it is: max-pool by reduce_window/select_and_scatter) and "xla:rpool"
#      (lungct.models.common.max_pool: reshape + max with a first-maximum VJP for the tutorial CNN's 2x2x2 pools,
#      separable strided-slice max for ResNet-18's 3x3x3/2 stem pool; the proposed fix for the batch-16
#      regression of the tutorial CNN). FLOPs: XLA's count of the same step compiled for the CPU (cuDNN calls are not
#      counted on the GPU); MFU is against a jnp matmul in the compute dtype measured in the same run.
#   2. autotuning variant: tutorial CNN, float32, batch 16 with --xla_gpu_autotune_level=0 (vs the default above).
#   3. profile: tutorial CNN at batch 2 vs 16, both pool variants: device time per kernel (printed), optimized
#      HLO and Perfetto traces in $OUT/profile.
#   4. the nodule recipe's train step (configs/nodule.py: ResNet-10 width 8, batch 16 of 32^3, augmentation on;
#      XLA's convolutions on the GPU) vs its PyTorch twin and the MONAI pipeline on CUDA (MONAI's per-example
#      transforms on the CPU, as a MONAI user runs them): benchmarks/nodule_step.py --part step (needs torch + monai
#      for the peers; lungct alone otherwise). Adds up to 100 s of timeout.
# Needs only JAX/Flax/Optax/Orbax (+ ml_collections, absl); no tensorflow_datasets/grain, no internet.
#
#   OUT=/tmp/out bash benchmarks/gpu.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out}
PY=${PYTHON:-python3}
STEPS=${STEPS:-10}
mkdir -p "$OUT"
export TF_CPP_MIN_LOG_LEVEL=2
{
  date -Is; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  $PY -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" 2>&1
  $PY -c "import torch; print('torch', torch.__version__, torch.cuda.is_available())" 2>&1 | tail -1
} | tee "$OUT/env.txt"
run() {  # name, timeout, args...
  local name=$1 limit=$2; shift 2
  echo "== $name: $*" | tee -a "$OUT/summary.txt"
  timeout "$limit" $PY benchmarks/train_step.py --steps "$STEPS" --warmup 2 --json "$OUT/$name.json" "$@" \
    > "$OUT/$name.log" 2>&1
  echo "   exit $?" >> "$OUT/summary.txt"
  grep -E "lungct|pytorch|ratio|peak" "$OUT/$name.log" | grep -v "^W0000\|^I0000" | tee -a "$OUT/summary.txt"
}
# Batch 16 rows skip the CPU FLOP count (FLOPs per volume are those of the batch-2 rows).
for dtype in float32 bfloat16; do
  run "step_${dtype}_b2" 100 --model all --dtype "$dtype" --batch 2 --conv-impl xla,xla:rpool
  run "step_${dtype}_b16" 100 --model all --dtype "$dtype" --batch 16 --conv-impl xla,xla:rpool --no-flops
done
XLA_FLAGS="--xla_gpu_autotune_level=0" run "step_float32_b16_autotune0" 70 --model cnn3d --dtype float32 \
  --batch 16 --conv-impl xla,xla:rpool --no-peak --no-flops
echo "== nodule_step: --part step" | tee -a "$OUT/summary.txt"
timeout 100 $PY benchmarks/nodule_step.py --part step --steps "$STEPS" --json "$OUT/nodule_step.json" \
  > "$OUT/nodule_step.log" 2>&1
echo "   exit $?" >> "$OUT/summary.txt"
grep -E "^Part|^side|^lungct|^twin|^monai|^load" "$OUT/nodule_step.log" | tee -a "$OUT/summary.txt"
timeout 100 $PY benchmarks/gpu_profile.py --batches 2 16 --out "$OUT" > "$OUT/profile.log" 2>&1
grep -v "^W0000\|^I0000" "$OUT/profile.log" | tee -a "$OUT/summary.txt"
ls -l "$OUT"
