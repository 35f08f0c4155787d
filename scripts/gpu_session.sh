#!/usr/bin/env bash
# Everything a session lent a GPU should run, in one device call (see the device tool's
# README): the GPU test suite, compute-sanitizer's memcheck and racecheck over the kernel tests,
# `gpunet bench --device gpu` and `gpunet parity` for each model.
# Usage there, from the repository root:  bash scripts/gpu_session.sh "$OUT"
# The machine has no package registry: it runs from the source tree with PYTHONPATH=src.
# It writes 8 files, the most a device call brings back.
set -uo pipefail
out="${1:-gpu-results}"
mkdir -p "$out"
export PYTHONPATH=src PYTHONUNBUFFERED=1
{
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import cupy, torch, numpy; print('cupy', cupy.__version__, 'torch', torch.__version__, 'numpy', numpy.__version__)"
  python3 -m gpunet info
} > "$out/environment.txt" 2>&1
python3 -m pytest -m gpu -q -ra > "$out/tests.txt" 2>&1
echo "gpu tests: exit $?" >> "$out/summary.txt"
python3 -m pytest -q -ra >> "$out/tests.txt" 2>&1
echo "all tests: exit $?" >> "$out/summary.txt"
# Every kernel, every launch configuration CupyOps uses: out-of-bounds accesses, then shared-memory
# races (racecheck is slow: the op suite only). Appended to tests.txt: a call brings back 8 files.
for tool in memcheck racecheck; do
  echo "== compute-sanitizer --tool $tool" >> "$out/tests.txt"
  compute-sanitizer --tool "$tool" --error-exitcode 3 --target-processes all \
    python3 -m pytest -q -m gpu -p no:cacheprovider tests/backend/test_ops.py >> "$out/tests.txt" 2>&1
  echo "compute-sanitizer $tool: exit $?" >> "$out/summary.txt"
done
python3 -m gpunet bench --device gpu --json "$out/gpu.json" --markdown "$out/gpu.md" --plot "$out/gpu.png" \
  > "$out/bench.txt" 2>&1
echo "bench: exit $?" >> "$out/summary.txt"
# CUDA-graph replay (on by default on a GPU) against eager steps: the same run both ways, its seconds and losses
for graph in --cuda-graph --no-cuda-graph; do
  python3 -m gpunet train --device gpu --model cnn --steps 300 --no-progress "$graph" --out "/tmp/graph$graph" \
    >> "$out/parity.txt" 2>&1
  echo "train cnn $graph: exit $? $(python3 -c "import json,sys; r=json.load(open(sys.argv[1]))[-1]; \
print('seconds', r.get('seconds'), 'train_loss', r.get('train_loss'))" "/tmp/graph$graph/history.json" 2>&1)" \
    >> "$out/summary.txt"
done
for model in mlp cnn rnn transformer; do
  python3 -m gpunet parity --model "$model" --steps 50 >> "$out/parity.txt" 2>&1
  echo "parity $model: exit $?" >> "$out/summary.txt"
done
cat "$out/summary.txt"
