#!/usr/bin/env bash
# The GPU check, one call on the device machine (about 4 minutes on an H100/H200):
#   1. the same update on CPU and on the GPU gives the same losses (fp32), and a finite one in bf16;
#   2. seconds per update per model size, fp32 against bf16-mixed, eager against torch.compile.
# Needs torch with CUDA and pytorch-lightning; no procgen (acting is skipped). Writes everything to
# $OUT/gpu_check.txt (the device tool brings $OUT back). Usage: bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.txt"
export PYTHONUNBUFFERED=1
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, pytorch_lightning as pl; print('torch', torch.__version__, 'lightning', pl.__version__)"

  echo "== 1. CPU and GPU compute the same update"
  python3 - <<'EOF'
import torch
from benchmarks.agent_speed import fake_batch
from dreamer.agent import Dreamer

losses = {}
for device in ("cpu", "cuda"):
    torch.manual_seed(0)
    model = Dreamer(size="small").to(device)
    batch = fake_batch(16, 64, torch.device(device))
    torch.manual_seed(1)
    _, metrics = model.loss(batch)
    losses[device] = {k: float(v) for k, v in metrics.items() if k.startswith("loss/") and k != "loss/actor"}
worst = max(abs(losses["cpu"][k] - losses["cuda"][k]) / max(abs(losses["cpu"][k]), 1e-3) for k in losses["cpu"])
for k in sorted(losses["cpu"]):
    print(f"{k:<22} cpu {losses['cpu'][k]:>12.5f}  cuda {losses['cuda'][k]:>12.5f}")
print(f"largest relative difference {worst:.2e}: {'OK' if worst < 1e-3 else 'MISMATCH'}")
with torch.autocast("cuda", dtype=torch.bfloat16):
    loss, _ = model.loss(batch)
print(f"bf16-mixed loss {float(loss):.4f}: {'finite' if torch.isfinite(loss) else 'NOT FINITE'}")
EOF

  echo "== 2. seconds per update (batch 16 x 64), fp32 then bf16-mixed, eager"
  python3 benchmarks/agent_speed.py --device cuda --no-act --sizes 1M 12M 25M 50M --updates 5
  python3 benchmarks/agent_speed.py --device cuda --no-act --sizes 1M 12M 25M 50M --updates 5 --precision bf16
  echo "== 2b. torch.compile, 12M, fp32 and bf16"
  timeout 240 python3 benchmarks/agent_speed.py --device cuda --no-act --sizes 12M --updates 5 --compile
  timeout 240 python3 benchmarks/agent_speed.py --device cuda --no-act --sizes 12M --updates 5 --compile --precision bf16
  date -u
} 2>&1 | tee "$LOG"
