#!/usr/bin/env bash
# The GPU learning call: one device call of at most 5 minutes from its start (unpacking, installing,
# start-up, graph capture, fit, validate): the real cli.py fit on coinrun (easy, 200 levels) with
# the CUDA-graphed update until the deadline, then validate on training and unseen levels
# (benchmarks/gpu_learn.py says what it prints and why its size and env count).
#
# The GPU machine has no procgen and no network: build the carry here first, then carry it:
#   python benchmarks/gpu_carry.py        # -> benchmarks/gpu_carry/carry.tar.xz, checks the 64 MiB
#   device run: command "bash benchmarks/gpu_learn.sh", carry ["benchmarks/gpu_carry"], timeout_s 330
# Everything goes to $OUT: gpu_learn.txt (this output), episodes.csv, summary.json, fit.log,
# validate.log. Draw the curve here: python benchmarks/gpu_learn.py --plot <files_at>/episodes.csv
# Arguments go to the fit: bash benchmarks/gpu_learn.sh --model.world_model.downsample pool
# The CPU dry run (tests/test_gpu_learn.py), a few updates through the same steps:
#   GPU_LEARN_DEVICE=cpu bash benchmarks/gpu_learn.sh
set -uo pipefail
START=$(date +%s)
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_learn}"
DEVICE="${GPU_LEARN_DEVICE:-cuda}"
BUDGET="${GPU_LEARN_SECONDS:-290}"   # of the 300: the rest is this script's own
# the carry's wheels are the GPU machine's (Python 3.12): a CPU dry run uses the installed procgen
# unless given one of its own Python
CARRY="${GPU_LEARN_CARRY-$([ "$DEVICE" = cuda ] && echo benchmarks/gpu_carry/carry.tar.xz)}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
{
  date -u
  if [ "$DEVICE" = cuda ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  fi
  if [ -n "$CARRY" ] && [ -f "$CARRY" ]; then
    DIR="$(mktemp -d)"
    trap 'rm -rf "$DIR"' EXIT
    tar -xJf "$CARRY" -C "$DIR" || { echo "error: could not unpack $CARRY"; exit 2; }
    if ! "$PYTHON" -m pip install --quiet --no-deps --no-index --target "$DIR/site" "$DIR"/wheels/*.whl; then
      # a machine that has them already can go on without the carry's builds
      "$PYTHON" -c "import cffi, PIL" 2>/dev/null \
        || { echo "error: the carry's wheels do not install on $("$PYTHON" -V 2>&1), and it has no cffi and pillow"; exit 2; }
      echo "note: the carry's wheels did not install; using this machine's cffi and pillow"
    fi
    export PYTHONPATH="$DIR/site${PYTHONPATH:+:$PYTHONPATH}"
    if ldd "$DIR/site/procgen/data/prebuilt/libenv.so" | grep -q "not found"; then
      export LD_LIBRARY_PATH="$DIR/syslibs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
      echo "system libraries from the carry: $(ldd "$DIR/site/procgen/data/prebuilt/libenv.so" | grep -c "$DIR/syslibs")"
    fi
    echo "carry unpacked and installed in $(( $(date +%s) - START )) s"
  elif [ "$DEVICE" = cuda ]; then
    echo "note: no $CARRY (python benchmarks/gpu_carry.py builds it); using the installed procgen"
  fi
  "$PYTHON" -c "import torch, numpy, pytorch_lightning as pl, procgen; print('python', __import__('sys').version.split()[0], 'torch', torch.__version__, 'lightning', pl.__version__, 'numpy', numpy.__version__, 'procgen from', procgen.__file__)" 2>&1 | grep -v "^Gym has been\|^Users of\|^See the migration\|^Please upgrade"
  LEFT=$(( BUDGET - ($(date +%s) - START) ))
  if [ "$DEVICE" = cuda ]; then
    "$PYTHON" benchmarks/gpu_learn.py --device cuda --seconds "$LEFT" --out "$OUT" -- "$@"
  else
    "$PYTHON" benchmarks/gpu_learn.py --device cpu --dry-run --seconds "$LEFT" --out "$OUT" -- "$@"
  fi
  echo "status $?, $(( $(date +%s) - START )) s in all"
  date -u
} 2>&1 | tee "$OUT/gpu_learn.txt"
