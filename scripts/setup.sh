#!/usr/bin/env bash
# Installs gpunet (editable), with the test extra when called as `setup.sh test`, and the CuPy
# extra that matches the NVIDIA driver's CUDA version when one is present. Idempotent: a second
# run installs nothing new.
#
# Where it installs, never touching a system interpreter (the same order as scripts/run):
#   1. the active virtual or conda environment ($VIRTUAL_ENV, $CONDA_PREFIX);
#   2. else the project's .venv, when one exists;
#   3. else python3 itself, when pip may install into it (pyenv, a user-owned Python, CI);
#   4. else (an "externally managed" Python, PEP 668, as on Debian 12 and Ubuntu 24.04, or one
#      this user cannot write to) a new project .venv, which scripts/run then runs commands in.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
venv=.venv

# pip may install here: inside a virtual environment pip ignores the PEP 668 marker; outside one,
# the marker in the standard library's folder forbids it, and so does a site-packages we cannot write.
may_install='
import os, sys, sysconfig
in_venv = sys.prefix != sys.base_prefix
managed = os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))
writable = os.access(sysconfig.get_path("purelib"), os.W_OK)
sys.exit(0 if in_venv or (not managed and writable) else 1)'

if [ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ]; then
  if ! "$python" -c "$may_install"; then
    echo "setup: $python in the active environment ${VIRTUAL_ENV:-$CONDA_PREFIX} refuses installs (externally managed or read-only); deactivate it to use a project .venv" >&2
    exit 1
  fi
elif [ -x "$venv/bin/python" ]; then
  python=$venv/bin/python
elif ! "$python" -c "$may_install" || ! "$python" -m pip --version >/dev/null 2>&1; then
  echo "setup: $python may not be installed into (PEP 668 or read-only); creating the project environment $venv" >&2
  if ! "$python" -m venv "$venv"; then
    rm -rf "$venv"  # only the half-made environment this run just created
    echo "setup: $python cannot create a virtual environment; on Debian or Ubuntu: apt install python3-venv" >&2
    exit 1
  fi
  python=$venv/bin/python
  echo "setup: commands run in $venv through scripts/run, or after: source $venv/bin/activate" >&2
fi

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
