#!/usr/bin/env bash
# The real-CuPy tier (tests/real_cupy): the real cupy-cuda13x wheel (without its [ctk] extra; the
# test extra's nvidia-cuda-nvrtc wheel is the compiler) and nvmath-python (without [cu13]), checked
# on a machine with no GPU: every API gpunet's source reaches, every kernel compiled through CuPy's
# NVRTC path for sm_80, sm_90 and sm_100, gpunet's import, fallback and `gpunet info`.
#
# They go into their own environment, .venv-realcupy (git-ignored), so the main suite's environment
# keeps no real CuPy and its stand-in path. That environment sees the main one's packages (NumPy,
# Numba, pytest, NVRTC, gpunet itself) through a .pth file: run `bash scripts/setup.sh test` first.
# The wheels are kept in $GPUNET_WHEELS (default ~/.cache/gpunet/wheels): a second run downloads
# nothing and installs nothing new. The versions are those of pyproject.toml's cuda13 and cuda13-lt
# extras.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-realcupy
wheels=${GPUNET_WHEELS:-${XDG_CACHE_HOME:-$HOME/.cache}/gpunet/wheels}
log=$venv/install.log
say() { echo "real-cupy tier: $*" >&2; }
seconds() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(seconds)" 'BEGIN { printf "%.1f", b - a }'; }

# The interpreter the main suite runs in (scripts/run): its packages are the ones the tier reuses.
main_python=$(scripts/run python3 -c 'import sys; print(sys.executable)')
read -r cupy_spec nvmath_spec < <("$main_python" - <<'EOF'
import re, tomllib
extras = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]
def spec(extra, name):  # the requirement as the extra writes it, less its own extras ([ctk], [cu13])
    found = [r for r in extras[extra] if re.match(rf"{name}\b", r)]
    return re.sub(r"\[[^]]*\]", "", found[0]).replace(" ", "")
print(spec("cuda13", "cupy-cuda13x"), spec("cuda13-lt", "nvmath-python"))
EOF
)

if [ ! -x "$venv/bin/python" ]; then
  start=$(seconds)
  "$main_python" -m venv "$venv" || { say "could not create $venv with $main_python -m venv"; exit 1; }
  say "created $venv in $(since "$start") s"
fi
version='import sys; print("%d.%d" % sys.version_info[:2])'
if [ "$("$venv/bin/python" -c "$version")" != "$("$main_python" -c "$version")" ]; then
  say "$venv is for Python $("$venv/bin/python" -c "$version"), the main environment's is $("$main_python" -c "$version"); remove $venv and run again"
  exit 1
fi
# The main environment's site-packages, processed as a site directory (its .pth files too: gpunet's
# editable install), after the tier's own: cupy and nvmath come from here, the rest from there. Its
# prefix joins site.PREFIXES because CuPy finds NVRTC's library through cuda-pathfinder, which
# looks in site.getsitepackages() (those prefixes), not in sys.path.
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
"$main_python" -c '
import sys, sysconfig
paths = sorted({sysconfig.get_path("purelib"), sysconfig.get_path("platlib")})
print("import site; " + "; ".join(f"site.addsitedir({p!r})" for p in paths) + f"; site.PREFIXES.append({sys.prefix!r})")' \
  > "$site/gpunet_main_env.pth"

missing=$("$venv/bin/python" -c '
from importlib import metadata
def absent(name):
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        return True
print(" ".join(n for n in ("gpunet", "numpy", "numba", "pytest", "nvidia-cuda-nvrtc") if absent(n)))' 2>/dev/null ||
  echo "(its packages could not be read)")
if [ -n "$missing" ]; then
  say "the main environment ($main_python) lacks: $missing; run bash scripts/setup.sh test first"
  exit 1
fi

install() { "$venv/bin/python" -m pip install --no-index --find-links "$wheels" "$cupy_spec" "$nvmath_spec" >>"$log" 2>&1; }
: > "$log"
start=$(seconds)
if ! install; then
  mkdir -p "$wheels" 2>>"$log" || { say "cannot create the wheel folder $wheels (GPUNET_WHEELS)"; exit 1; }
  before=$(du -sb "$wheels" | cut -f1)
  if ! "$venv/bin/python" -m pip download --dest "$wheels" "$cupy_spec" "$nvmath_spec" >>"$log" 2>&1; then
    say "could not download $cupy_spec and $nvmath_spec into $wheels (pip's output: $log)"
    exit 1
  fi
  say "downloaded $(( ($(du -sb "$wheels" | cut -f1) - before) / 1000000 )) MB of wheels into $wheels in $(since "$start") s"
  start=$(seconds)
  install || { say "could not install $cupy_spec and $nvmath_spec from $wheels (pip's output: $log)"; exit 1; }
fi
installed=$("$venv/bin/python" -c '
from importlib.metadata import version as v
print("cupy-cuda13x", v("cupy-cuda13x"), "and nvmath-python", v("nvmath-python"))')
say "$installed in $venv ($(since "$start") s to install or confirm, from $wheels)"

# `import cupy` makes CuPy's kernel cache folder (~/.cupy by default): keep it in the tier's environment.
export CUPY_CACHE_DIR=$PWD/$venv/cupy-cache
exec "$venv/bin/python" -m pytest tests/real_cupy -q -p no:cacheprovider
