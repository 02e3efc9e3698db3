#!/usr/bin/env bash
# The GPU check: one unattended call on the device machine, about 8 minutes on an H100/H200.
#   1. the same update on CPU and on the GPU gives the same losses (fp32), and a finite one in bf16;
#      the update replayed as a CUDA graph follows the eager one;
#   2. seconds per update and peak GPU memory at 12M, 50M and 200M, fp32 and bf16-mixed, eager and
#      as one CUDA graph;
#   3. the same with torch.compile (each precision under its own time limit: sizes not reached
#      by then are missing from the table);
#   4. world-model quality, fp32 against bf16-mixed, for the same minutes of training on the
#      bigfish dataset shipped in benchmarks/datasets/ (collected on a CPU machine with
#      benchmarks/world_model_quality.py --save-data; no procgen needed here);
#   5. a Lightning fit with model.cuda_graph on fake batches, resumed eagerly, resumed graphed.
# Needs torch with CUDA, pytorch-lightning, numpy and PyYAML; no procgen, gymnasium, mlflow or
# omegaconf. Everything goes to $OUT/gpu_check.txt (the device tool brings $OUT back).
#   bash benchmarks/gpu_check.sh
# A CPU smoke run of the same steps (what tests/test_benchmarks.py runs):
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_SIZES=tiny GPU_CHECK_UPDATES=1 GPU_CHECK_MINUTES=0.05 \
#   GPU_CHECK_COMPILE_S=0 bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_check}"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
SIZES="${GPU_CHECK_SIZES:-12M 50M 200M}"
UPDATES="${GPU_CHECK_UPDATES:-3}"
MINUTES="${GPU_CHECK_MINUTES:-1}"
QUALITY_SIZE="${GPU_CHECK_QUALITY_SIZE:-${SIZES%% *}}"
COMPILE_S="${GPU_CHECK_COMPILE_S:-60}"  # per precision; 0 skips the compiled runs
mkdir -p "$OUT"
LOG="$OUT/gpu_check.txt"
export PYTHONUNBUFFERED=1 GPU_CHECK_DEVICE="$DEVICE"
{
  date -u
  if [ "$DEVICE" = cuda ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  fi
  python3 -c "import torch, numpy, pytorch_lightning as pl; print('torch', torch.__version__, 'lightning', pl.__version__, 'numpy', numpy.__version__)"

  echo "== 1. CPU and $DEVICE compute the same update"
  timeout 120 python3 benchmarks/gpu_agreement.py --device "$DEVICE" || echo "(status $?)"

  echo "== 2. seconds per update (batch 16 x 64) and peak GPU memory, eager, fp32 then bf16-mixed"
  for precision in 32 bf16; do
    timeout 240 python3 benchmarks/agent_speed.py --device "$DEVICE" --no-act --sizes $SIZES \
      --updates "$UPDATES" --precision "$precision" || echo "(stopped: status $?)"
  done

  echo "== 2b. the same, the whole update replayed as one CUDA graph (dreamer.update.GraphedUpdate)"
  if [ "$DEVICE" = cuda ]; then
    for precision in 32 bf16; do
      timeout 240 python3 benchmarks/agent_speed.py --device "$DEVICE" --no-act --sizes $SIZES \
        --updates "$UPDATES" --precision "$precision" --cuda-graph || echo "(stopped: status $?)"
    done
  fi

  echo "== 3. the same with torch.compile (at most ${COMPILE_S} s per precision)"
  if [ "$COMPILE_S" -gt 0 ]; then
    for precision in 32 bf16; do
      timeout "$COMPILE_S" python3 benchmarks/agent_speed.py --device "$DEVICE" --no-act --sizes $SIZES \
        --updates "$UPDATES" --precision "$precision" --compile || echo "(stopped: status $?)"
    done
  fi

  echo "== 4. world-model quality after ${MINUTES} min of training, $QUALITY_SIZE, fp32 then bf16-mixed"
  for precision in 32 bf16; do
    timeout 200 python3 benchmarks/world_model_quality.py --games bigfish --data "benchmarks/datasets/{game}.npz" \
      --size "$QUALITY_SIZE" --minutes "$MINUTES" --evals 2 --device "$DEVICE" --precision "$precision" \
      --json "$OUT/quality.jsonl" || echo "(stopped: status $?)"
  done
  echo "== 5. training through Lightning with model.cuda_graph: fit, resume eagerly, resume graphed"
  timeout 240 python3 benchmarks/gpu_fit_check.py --device "$DEVICE" || echo "(status $?)"
  date -u
} 2>&1 | tee "$LOG"
