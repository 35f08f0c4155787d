"""Data races in gpunet's CUDA kernels, looked for by ThreadSanitizer in the kernel emulator
(tests/cuda/emulator.py, tsan=True), and proof that the checks bite: kernels with one barrier
removed give wrong results in the normal emulator and a TSan report in the TSan one.

TSan needs its runtime preloaded, so the TSan runs are child processes: sys.executable itself
(a pyenv shell shim crashes under TSan) with tsan_environment().
"""
from __future__ import annotations

import functools
import re
import subprocess
import sys
from pathlib import Path

import numpy
import pytest

from gpunet.backend.cuda_kernels import DEFINE_FLAGS, THREADS, TILE_M, TILE_N, source
from tests.support.arrays import rng
from tests.cuda.emulator import build, kernel_names, tsan_environment, tsan_runtime
from tests.kernels.test_emulated import compiled, layer_norm_case, marshal

ROOT = Path(__file__).parents[2]
RACE = "WARNING: ThreadSanitizer: data race"


def without_barrier(code: str, start: str, end: str, last: bool) -> str:
    """code with the first (or last) `__syncthreads();` between markers start and end removed."""
    begin = code.index(start)
    stop = code.index(end, begin)
    cut = code.rindex("__syncthreads();", begin, stop) if last else code.index("__syncthreads();", begin, stop)
    return code[:cut] + "/* removed */" + code[cut + len("__syncthreads();"):]


def block_sum_mutant() -> str:  # scratch is read by slow warps while fast ones write the next sums
    return without_barrier(source("sequence"), "float block_sum(", "return total;", last=True)


def gemm_mutant() -> str:  # the tile is used before every thread has loaded its part
    return without_barrier(source("gemm"), "for (int k0 = 0;", "fmaf(", last=False)


def gemm_case(module):
    """(got, want) of one fused GEMM with a bias over 6 blocks (3 x 2 tiles) and 3 K tiles."""
    m, k, n = TILE_M + 6, 33, 2 * TILE_N + 2
    x, w, b = (rng(1).standard_normal(s).astype("float32") for s in ((m, k), (n, k), (n,)))
    out = numpy.full((m, n), numpy.nan, "float32")
    module.launch("gemm_bias_act", (3, 2), THREADS, marshal(module, "gemm_bias_act", (x, w, b, out, m, n, k, 1, 0)))
    return out, x @ w.T + b


def test_every_kernel_has_an_emulated_case():
    """The TSan run below covers every kernel only if kernels/test_emulated.py launches each."""
    cases = (ROOT / "tests" / "kernels" / "test_emulated.py").read_text()
    for path in sorted((ROOT / "kernels").glob("*.cu")):
        for kernel in kernel_names(path.read_text()):
            assert f'"{kernel}"' in cases, f"{path.name}: {kernel} is never launched there"


def test_block_sum_without_its_trailing_barrier_gives_wrong_layer_norm():
    (y, rstd, dx), (want_y, want_rstd, want_dx) = layer_norm_case(compiled(block_sum_mutant(), "no_barrier"), 600, True)
    assert not numpy.allclose(y, want_y, rtol=1e-4, atol=1e-5)
    assert not numpy.allclose(rstd, want_rstd, rtol=1e-5)
    (y, rstd, dx), want = layer_norm_case(compiled(source("sequence"), "sequence"), 600, True)  # the real one
    numpy.testing.assert_allclose(y, want[0], rtol=1e-4, atol=1e-5)


def test_gemm_without_its_tile_barrier_gives_a_wrong_product():
    out, want = gemm_case(compiled(gemm_mutant(), "no_barrier"))
    assert not numpy.allclose(out, want, rtol=1e-4, atol=1e-4)
    out, want = gemm_case(compiled(source("gemm"), "gemm"))
    numpy.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)


# TSan checks of the emulator's model: shuffles order no memory, __syncwarp does, blocks are
# concurrent (two blocks, run one after the other, writing one address race).
MODEL = r'''
extern "C" __global__ void publish(float* out, int use_syncwarp) {
  __shared__ float slot[32];
  const int lane = threadIdx.x % 32;
  if (lane == 0) slot[threadIdx.x / 32] = 1.f;
  float v = threadIdx.x;
  if (use_syncwarp) __syncwarp();
  else v = __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = slot[threadIdx.x / 32] + v;
}

extern "C" __global__ void same_address(float* out) {
  if (threadIdx.x == 0) out[0] = blockIdx.x;
}

// The last-block-done reduction: a block's write reaches the last block only through a
// __threadfence before the counting atomic (without it, the atomic orders nothing).
extern "C" __global__ void last_block_sums(float* out, float* partial, unsigned int* done, int fence) {
  if (threadIdx.x != 0) return;
  partial[blockIdx.x] = blockIdx.x + 1.f;
  if (fence) __threadfence();
  if (atomicAdd(done, 1u) == gridDim.x - 1) {
    float sum = 0.f;
    for (unsigned b = 0; b < gridDim.x; ++b) sum += partial[b];
    out[0] = sum;
  }
}
'''


@functools.cache
def tsan_module(name: str):
    code = {"sequence_no_barrier": block_sum_mutant, "gemm_no_barrier": gemm_mutant, "tsan_model": lambda: MODEL,
            "sequence": lambda: source("sequence"), "gemm": lambda: source("gemm")}[name]()
    return build(code, name=name, tsan=True, defines=DEFINE_FLAGS)


def model_case(kernel: str, args: tuple):
    module, out = tsan_module("tsan_model"), numpy.zeros(64, "float32")
    module.launch(kernel, 2 if kernel == "same_address" else 1, 64, marshal(module, kernel, (out, *args)))


def last_block_case(fence: int):
    module, out, partial, done = (tsan_module("tsan_model"), numpy.zeros(1, "float32"), numpy.zeros(4, "float32"),
                                  numpy.zeros(1, "uint32"))
    module.launch("last_block_sums", 4, 32, marshal(module, "last_block_sums", (out, partial, done, fence)))
    assert out[0] == 10.0


# name: (what the child runs, the function a report must start in (a regex), or None: no report)
CASES = {
    "block_sum_mutant": (lambda: layer_norm_case(tsan_module("sequence_no_barrier"), 600, True), "block_sum"),
    # (the tile loop is gemm_tiles.cuh's template, which gemm_bias_act calls: the race is in its frame)
    "gemm_mutant": (lambda: gemm_case(tsan_module("gemm_no_barrier")), r"void gemm_tiles<float>\("),
    "shuffle_orders_no_memory": (lambda: model_case("publish", (0,)), "publish"),
    "syncwarp_orders_memory": (lambda: model_case("publish", (1,)), None),
    "blocks_are_concurrent": (lambda: model_case("same_address", ()), "same_address"),
    "a_fence_publishes_to_the_last_block": (lambda: last_block_case(1), None),
    "no_fence_no_order": (lambda: last_block_case(0), "last_block_sums"),
    "real_kernels": (lambda: (layer_norm_case(tsan_module("sequence"), 600, True), gemm_case(tsan_module("gemm"))),
                     None),
}
MARK = "=== tsan case "


def child(names: list[str]) -> None:
    """In the TSan process: run the cases, each after a marker line on stderr (TSan writes there).
    Every module is loaded first: TSan's symbolizer only knows the modules loaded at its first report."""
    for module in ("sequence_no_barrier", "gemm_no_barrier", "tsan_model", "sequence", "gemm"):
        tsan_module(module)
    for name in names:
        print(MARK + name, file=sys.stderr, flush=True)
        CASES[name][0]()


def tsan_python(args: list[str], halt_on_error: bool, timeout: int, **variables) -> subprocess.CompletedProcess:
    if tsan_runtime() is None:
        pytest.skip("no ThreadSanitizer runtime (libtsan) for g++ on this machine")
    env = dict(tsan_environment(), **variables)
    if not halt_on_error:  # go on after a report; report again on an address reused by a later case
        env["TSAN_OPTIONS"] += ":halt_on_error=0:suppress_equal_addresses=0"
    env["PYTHONPATH"] = f"{ROOT}:{ROOT / 'src'}"
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tsan_reports() -> dict[str, str]:
    """Each case's stderr from one TSan child process."""
    result = tsan_python(["-c", "import sys; from tests.kernels.test_races import child; child(sys.argv[1:])",
                          *CASES], halt_on_error=False, timeout=600)
    assert MARK + list(CASES)[-1] in result.stderr, result.stderr[-5000:]
    assert "Traceback" not in result.stderr, result.stderr[-5000:]
    parts = re.sub(r"ThreadSanitizer: reported \d+ warnings\n", "", result.stderr).split(MARK)[1:]  # (at exit)
    return {part.split("\n", 1)[0]: part for part in parts}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_tsan_reports_exactly_the_planted_races(tsan_reports, name):
    report, where = tsan_reports[name], CASES[name][1]
    if where is None:
        assert "ThreadSanitizer" not in report, report[:5000]
    else:
        assert RACE in report, report[:5000]
        assert re.search(rf"#0 {where}\b", report), report[:5000]  # a race inside the kernel itself
        assert "CUDA thread (" in report  # the emulator names the threads


@pytest.mark.slow
def test_every_kernel_family_is_race_free_under_tsan():
    """kernels/test_emulated.py, every case, with every module built under TSan."""
    result = tsan_python(["-m", "pytest", "tests/kernels/test_emulated.py", "-q", "-x", "-p", "no:cacheprovider"],
                         halt_on_error=True, timeout=900, GPUNET_EMULATOR_TSAN="1")
    output = result.stdout + result.stderr
    assert "ThreadSanitizer" not in output, output[-8000:]
    assert result.returncode == 0 and " passed" in output, output[-8000:]
