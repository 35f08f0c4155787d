#!/usr/bin/env bash
# Everything a session lent a GPU should run, in ONE device call of at most 5 minutes on an H100,
# the most informative stages first, each under its own `timeout`:
#   1. preflight (scripts/gpu_preflight.py): GPU, driver, CUDA, CuPy, NVRTC, cuBLAS, NCCL,
#      compute-sanitizer, the Python packages; stops the whole session when a required part is
#      missing, naming it and the offline step (a wheel to carry) that adds it;
#   2. the gpu tests, under GPUNET_REQUIRE_GPU=1: the CuPy stand-in refuses to load, so a test
#      cannot pass on it; without a usable GPU every gpu test fails with the reason;
#   3. `gpunet parity` for the four models;
#   4. compute-sanitizer (memcheck, racecheck) over a few training steps;
#   5. timings: `gpunet bench --device gpu` (and in bf16: the 16-bit GEMM, the cnn and transformer steps),
#      and a CUDA-graph run against an eager one.
# A stage whose timeout would pass the budget is not started (the summary says so).
# Usage there, from the repository root:  bash scripts/gpu_session.sh "$OUT"
# The machine has no package registry: it runs from the source tree with PYTHONPATH=src.
# It writes 7 files into the folder (a device call brings back 8 at most); summary.txt says each
# stage's exit status and seconds.
set -uo pipefail
out="${1:?usage: bash scripts/gpu_session.sh RESULTS_FOLDER}"
mkdir -p "$out" || exit 2
export PYTHONPATH=src PYTHONUNBUFFERED=1 GPUNET_REQUIRE_GPU=1 GPUNET_DEVICE=gpu
budget=290  # seconds: the call's 5 minutes, less the machine's start and the files' way back
start=$SECONDS
summary="$out/summary.txt"
failed=0
date -u +"gpu session %Y-%m-%dT%H:%M:%SZ" > "$summary"

# stage NAME SECONDS FILE COMMAND...: COMMAND under `timeout SECONDS`, its output appended to FILE,
# one line in the summary; returns the command's status (124: it ran out of time). The script's
# own status is 1 when any stage failed, 2 when the preflight stopped it.
stage() {
  local name=$1 seconds=$2 file=$3 began=$SECONDS status
  shift 3
  if (( began - start + seconds > budget )); then
    echo "$name: not started: ${seconds} s would pass the ${budget} s budget" | tee -a "$summary"
    return 125
  fi
  echo "== $name" >> "$file"
  timeout --kill-after=5 "$seconds" "$@" >> "$file" 2>&1
  status=$?
  echo "$name: exit $status$([[ $status == 124 ]] && echo ' (timed out)'), $((SECONDS - began)) s" | tee -a "$summary"
  (( status == 0 )) || failed=$((failed + 1))
  return "$status"
}

if ! stage preflight 40 "$out/preflight.txt" python3 scripts/gpu_preflight.py; then
  grep '^preflight: STOP' "$out/preflight.txt" | tee -a "$summary"
  exit 2
fi
stage "gpu tests" 95 "$out/tests.txt" python3 -m pytest -m gpu -q -ra -p no:cacheprovider --durations=5
for model in mlp cnn rnn transformer; do
  stage "parity $model" 15 "$out/parity.txt" python3 -m gpunet parity --model "$model" --steps 30
done
if command -v compute-sanitizer > /dev/null; then
  # out-of-bounds accesses, then shared-memory races, over a few steps of the kernels' models
  stage "memcheck cnn" 20 "$out/sanitizer.txt" compute-sanitizer --tool memcheck --error-exitcode 3 \
    python3 -m gpunet train --model cnn --steps 3 --no-progress --no-cuda-graph --out /tmp/gpunet-memcheck --overwrite
  stage "racecheck transformer" 20 "$out/sanitizer.txt" compute-sanitizer --tool racecheck --error-exitcode 3 \
    python3 -m gpunet train --model transformer --steps 2 --no-progress --no-cuda-graph --out /tmp/gpunet-racecheck --overwrite
else
  echo "compute-sanitizer: not on PATH, sanitizer stages not run (it ships with the CUDA toolkit: put its bin/ on PATH)" \
    | tee -a "$summary"
fi
stage bench 35 "$out/timings.txt" python3 -m gpunet bench --device gpu --repeats 3 --json "$out/bench.json"
# issue 30 item 7: the 16-bit Dense product (the dispatch's pick of gemm16, gemm16_tc, cublasGemmEx, cuBLAS on the
# rounded values) against cuBLAS's 16-bit GEMM through autocast, and the cnn and transformer steps in bf16
stage "bench bf16" 15 "$out/timings.txt" python3 -m gpunet bench --device gpu --repeats 3 --precision bf16 \
  --only gemm16,lenet,transformer --json "$out/bench-bf16.json"
# CUDA-graph replay (on by default on a GPU) against eager steps: the same run both ways
for graph in --cuda-graph --no-cuda-graph; do
  stage "train cnn $graph" 10 "$out/timings.txt" python3 -m gpunet train --model cnn --steps 200 --no-progress \
    "$graph" --out "/tmp/gpunet-graph$graph" --overwrite
done
echo "total: $((SECONDS - start)) s, $failed stage(s) failed" | tee -a "$summary"
(( failed == 0 ))  # the session's status: 0 when every stage that ran passed
