#!/usr/bin/env bash
# Installs gpunet into the current Python (editable), with the test extra when called as
# `setup.sh test`, and the CuPy extra that matches the NVIDIA driver's CUDA version when one
# is present. Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
extras=()
[ "${1:-}" = "test" ] && extras+=(test)
if command -v nvidia-smi >/dev/null 2>&1; then
  cuda=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9]*\).*/\1/p' | head -n 1 || true)
  case "$cuda" in
    12) extras+=(cuda12) ;;
    13|14|15) extras+=(cuda13) ;;
    "") echo "setup: nvidia-smi found but no CUDA version reported; installing for the CPU only" >&2 ;;
    *) echo "setup: CUDA $cuda has no CuPy extra here; installing for the CPU only" >&2 ;;
  esac
fi
spec="."
if [ ${#extras[@]} -gt 0 ]; then spec=".[$(IFS=,; echo "${extras[*]}")]"; fi
echo "setup: $python -m pip install -e \"$spec\"" >&2
"$python" -m pip install --quiet --disable-pip-version-check -e "$spec"
