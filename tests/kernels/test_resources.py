"""Every kernel in kernels/*.cu fits the block its wrapper launches it with (cuda_wrappers.KERNELS,
sized by cuda_kernels.THREADS), by ptxas' own count (`nvcc --resource-usage -arch=sm_90`, with the
-D constants gpunet compiles with): registers x threads and static shared memory within one
block's limits. A kernel over them would fail only at launch on a GPU ("too many resources
requested"); here it fails on any machine with nvcc. The kernel emulator reports the same numbers
(EmulatedModule.resources) and refuses such launches as a GPU would.

Each of those constants is defined once, in cuda_kernels.py, and is what the kernels get; each
kernel has one wrapper, declared with the parameter types its source has."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy
import pytest

from gpunet.backend.cuda_kernels import ACTIVATION_CODES, DEFINE_FLAGS, DEFINES, NVRTC_OPTIONS, THREADS, source
from gpunet.backend.cuda_wrappers import KERNELS as WRAPPED
from gpunet.backend.ops import ACTIVATIONS
from tests.cuda.emulator import LIMITS, build, kernel_names, parse_resource_usage
from tests.kernels.test_emulated import compiled, marshal

ROOT = Path(__file__).parents[2]
KERNELS = ROOT / "kernels"
FAMILIES = sorted(path.stem for path in KERNELS.glob("*.cu"))


@pytest.fixture(scope="module")
def usage() -> dict[str, dict[str, tuple[int, int]]]:
    """{family: {kernel: (registers per thread, static shared bytes)}}, from nvcc run on each file."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on this machine: no register or shared memory counts to check")
    runs = {family: subprocess.Popen([nvcc, "--resource-usage", "-arch=sm_90", *DEFINE_FLAGS, "-c",
                                      str(KERNELS / f"{family}.cu"), "-o", "/dev/null"], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
            for family in FAMILIES}  # all at once: nvcc takes about a second a file
    counts = {}
    for family, run in runs.items():
        output = run.communicate(timeout=300)[0]
        assert run.returncode == 0, output
        counts[family] = parse_resource_usage(output)
    return counts


def test_ptxas_output_is_parsed():
    output = """ptxas info    : Compiling entry function 'layer_norm' for 'sm_90'
ptxas info    : Function properties for layer_norm
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 1 barriers, 32 bytes smem
ptxas info    : Compiling entry function 'sgd_update' for 'sm_90'
ptxas info    : Used 20 registers, used 0 barriers, 424 bytes cmem[0]"""
    assert parse_resource_usage(output) == {"layer_norm": (32, 32), "sgd_update": (20, 0)}


@pytest.mark.parametrize("family", FAMILIES)
def test_kernels_fit_the_blocks_gpunet_launches(usage, family):
    kernels = kernel_names((KERNELS / f"{family}.cu").read_text())
    assert sorted(usage[family]) == sorted(kernels)  # ptxas counted every kernel
    for kernel, (registers, shared) in usage[family].items():
        threads = WRAPPED[kernel].block  # the block its wrapper launches it with
        assert registers * threads <= LIMITS["max_registers_per_block"], f"{kernel}: {registers} x {threads}"
        assert shared <= LIMITS["max_shared_bytes"], f"{kernel}: {shared} bytes of shared memory"


@pytest.mark.parametrize("family", FAMILIES)
def test_a_kernel_sources_fallback_constants_equal_pythons(family):
    """The kernels get THREADS, the tiles and the activation codes as -D flags from
    cuda_kernels.DEFINES. A .cu file may hold a fallback, so that plain `nvcc FILE.cu` compiles,
    only under #ifndef of the same name and only with Python's value: never a second value. (The file
    as compiled: the fallbacks of a header it includes count as its own.)"""
    text = source(family)
    guarded = dict(re.findall(r"^#ifndef (\w+)\n#define \1 (\S+)\n#endif", text, flags=re.M))
    defined = set(re.findall(r"^\s*#\s*define\s+(\w+)", text, flags=re.M)) & set(DEFINES)
    assert defined == set(guarded) & set(DEFINES)
    assert {name: int(guarded[name]) for name in defined} == {name: DEFINES[name] for name in defined}


def test_python_assigns_each_kernel_constant_once():
    """Outside cuda_kernels.py no module of gpunet (nor a kernel test) gives a kernel constant a
    value of its own: they import it."""
    names = "|".join([*DEFINES, "ACTIVATION_CODES", "BLOCK", "GEMM_TILE"])
    assignment = re.compile(rf"^\s*({names})\s*(:[^=]*)?=[^=]", flags=re.M)
    owners = {}
    for path in sorted([*(ROOT / "src" / "gpunet").rglob("*.py"), *(ROOT / "tests").glob("test_kernel*.py")]):
        for match in assignment.finditer(path.read_text()):
            owners.setdefault(match.group(1), []).append(path.relative_to(ROOT).as_posix())
    assert owners == {name: ["src/gpunet/backend/cuda_kernels.py"] for name in [*DEFINES, "ACTIVATION_CODES"]
                      if not name.startswith("ACT_")}


def test_the_gemm_kernels_have_a_code_for_every_activation_of_ops():
    assert set(ACTIVATION_CODES) == {None, *ACTIVATIONS}
    assert sorted(ACTIVATION_CODES.values()) == list(range(len(ACTIVATION_CODES))) and ACTIVATION_CODES[None] == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_the_emulator_reports_the_same_resources(usage, family):
    try:
        module = build((KERNELS / f"{family}.cu").read_text(), name=family, defines=DEFINE_FLAGS)
    except RuntimeError as exc:
        if "is not on this machine" in str(exc):
            pytest.skip(str(exc))
        raise
    assert module.resources == usage[family]


def test_the_kernels_get_the_constants_python_defines():
    """Each constant of cuda_kernels.DEFINES reaches the compiled code with its Python value."""
    names = list(DEFINES)
    code = ('extern "C" __global__ void constants(long long* out) {\n'
            + "".join(f"  out[{i}] = {name};\n" for i, name in enumerate(names)) + "}\n")
    module, out = compiled(code, "constants"), numpy.zeros(len(names), "int64")
    module.launch("constants", 1, 1, marshal(module, "constants", (out,)))
    assert dict(zip(names, out.tolist())) == DEFINES
    assert DEFINES["THREADS"] == THREADS and DEFINES["ACT_GELU_TANH"] == ACTIVATION_CODES["gelu_tanh"]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_kernel_built_without_the_flags_gets_the_same_constants(family):
    """Built alone (no -D flags), a kernel source compiles, with the values Python would pass."""
    assert compiled(source(family), f"{family}_standalone", defines=()).kernels


def test_every_kernel_has_one_wrapper_declared_as_its_source_declares_it():
    """cuda_wrappers declares each kernel's parameter types; the emulator's build (which sees
    through macros such as im2col's GEOMETRY_ARGS) reads the real ones from the source."""
    as_compiled = {"int": ("int", 4), "long long": ("int", 8), "float": ("float", 4), "double": ("float", 8)}
    declared = set()
    for family in FAMILIES:
        module = compiled(source(family), family)
        for name, info in module.kernels.items():
            kernel = WRAPPED[name]
            assert kernel.family == family
            want = [("pointer", 8) if p.endswith("*") else as_compiled[p] for p in kernel.signature]
            assert want == [(p.kind, p.size) for p in info.params], name
            declared.add(name)
    assert declared == set(WRAPPED)


HEADER = KERNELS / "common.cuh"


def header_definitions() -> set[str]:
    """The macros and device functions kernels/common.cuh defines."""
    text = HEADER.read_text()
    return (set(re.findall(r"^#define (\w+) \S", text, flags=re.M))
            | set(re.findall(r"__device__ __forceinline__ \w+ (\w+)\(", text)))


def test_each_shared_device_helper_is_written_once_in_the_header():
    """last_block_done, warp_sum and NEG_INF live in kernels/common.cuh alone; each family that uses
    one (itself, or through another header it includes: gemm_tiles.cuh's bias_act_backward_rows) includes
    the header instead of a copy of its own."""
    assert header_definitions() == {"NEG_INF", "warp_sum", "last_block_done"}
    users = set()
    for family in FAMILIES:
        text = (KERNELS / f"{family}.cu").read_text()
        defined = (set(re.findall(r"^\s*#\s*define (\w+)", text, flags=re.M))
                   | set(re.findall(r"__device__\s+__forceinline__\s+\w+\s+(\w+)\(", text)))
        assert not defined & header_definitions(), family
        includes = re.findall(r'^#include "(\w+\.cuh)"', text, flags=re.M)
        code = "\n".join([text] + [(KERNELS / i).read_text() for i in includes if i != "common.cuh"])
        code = re.sub(r"//[^\n]*", "", code)  # (a name in a comment is not a use)
        used = {name for name in header_definitions() if re.search(rf"\b{name}\b", code)}
        assert [i for i in includes if i == "common.cuh"] == (["common.cuh"] if used else []), family
        users |= {family} if used else set()
    assert users == {"attention", "batch_norm", "gemm", "gemm16", "sequence", "softmax_xent"}


def test_the_tiled_gemm_is_written_once_for_every_input_type():
    """kernels/gemm_tiles.cuh holds the tiled GEMM and the activations once; gemm.cu instantiates it for
    float32, gemm16.cu for bfloat16 and float16, and no family has a copy of its own."""
    header = (KERNELS / "gemm_tiles.cuh").read_text()
    assert "void gemm_tiles(" in header and "float activate(" in header
    including = set()
    for family in FAMILIES:
        text = (KERNELS / f"{family}.cu").read_text()
        assert not re.search(r"\b(gemm_tiles|activate)\([^;]*\)\s*\{", text), family
        if re.search(r'^#include "gemm_tiles.cuh"', text, flags=re.M):
            including.add(family)
    assert including == {"gemm", "gemm16"}


def test_the_source_nvrtc_gets_holds_the_header_in_place_of_its_include():
    """source() puts the header's text where the .cu includes it, with #line back to the .cu's own
    line numbers, so NVRTC needs no include path and CuPy's kernel cache is keyed by the header too."""
    raw = (KERNELS / "softmax_xent.cu").read_text()
    include_line = raw.splitlines().index('#include "common.cuh"  // NEG_INF, last_block_done') + 1
    text = source("softmax_xent")
    before, rest = text.split('#line 1 "common.cuh"\n')
    header, after = rest.split(f'\n#line {include_line + 1} "softmax_xent.cu"\n')
    assert header == HEADER.read_text().rstrip() and "#include" not in before + after
    assert before + '#include "common.cuh"  // NEG_INF, last_block_done\n' + after == raw
    assert source("optim") == (KERNELS / "optim.cu").read_text()  # no include: the file as it is


@pytest.mark.parametrize("family", ["gemm", "sequence"])
def test_a_source_with_its_header_in_place_compiles_with_nvrtc_and_no_include_path(family):
    from tests.support import nvrtc
    if nvrtc.library() is None:
        pytest.skip("libnvrtc is not on this machine (pip install nvidia-cuda-nvrtc, part of the test extra)")
    for options in (NVRTC_OPTIONS, ("--std=c++17",)):
        compiled, log = nvrtc.compile_source(source(family), f"{family}.cu", (*options, "--gpu-architecture=sm_90"),
                                             headers={})
        assert compiled, log
    compiled, log = nvrtc.compile_source((KERNELS / f"{family}.cu").read_text(), f"{family}.cu", headers={})
    assert not compiled and "common.cuh" in log  # (the raw file needs the header: source() is what makes it whole)


def test_a_changed_header_changes_what_keys_the_kernel_caches(monkeypatch, tmp_path):
    """The GEMM-choice cache is keyed by compile_inputs (CupyOps._gemm_dispatch hashes it) and CuPy's
    kernel cache by the code: both change with the header alone, the .cu files unchanged."""
    from gpunet.backend import cuda_kernels
    from gpunet.backend.gemm_dispatch import source_hash

    for path in KERNELS.iterdir():
        if path.suffix in (".cu", ".cuh"):
            (tmp_path / path.name).write_text(path.read_text())
    monkeypatch.setattr(cuda_kernels, "_kernels_folder", lambda: tmp_path)
    before = source_hash(*cuda_kernels.compile_inputs("gemm"))
    assert before == source_hash(source("gemm"), *DEFINE_FLAGS)
    (tmp_path / "common.cuh").write_text(HEADER.read_text().replace("atomicAdd(done_blocks, 1u)",
                                                                    "atomicAdd(done_blocks, 1u) /* changed */"))
    assert source_hash(*cuda_kernels.compile_inputs("gemm")) != before
    assert "/* changed */" in cuda_kernels.source("sequence")
    (tmp_path / "common.cuh").unlink()
    with pytest.raises(FileNotFoundError, match="kernel source common.cuh is missing"):
        cuda_kernels.source("gemm")


def test_the_emulator_finds_the_header_and_rebuilds_when_it_changes(monkeypatch, tmp_path):
    """A .cu text as it is (its #include unresolved) builds in the emulator, last_block_done runs in the
    block that finishes last, and a changed header is a new build, not the cached one."""
    from tests.cuda import emulator

    code = ('#include "common.cuh"\n'
            'extern "C" __global__ void count_blocks(unsigned int* done, int* out) {\n'
            '  if (threadIdx.x == 0) out[blockIdx.x] = 1;\n'
            '  if (last_block_done(done) && threadIdx.x == 0) {\n'
            '    int seen = 0;\n'
            '    for (unsigned int b = 0; b < gridDim.x; ++b) seen += out[b];\n'
            '    out[gridDim.x] = seen * PROBE;\n'
            '  }\n}\n')
    (tmp_path / "common.cuh").write_text(HEADER.read_text() + "#define PROBE 1\n")
    monkeypatch.setattr(emulator, "KERNEL_HEADERS", tmp_path)
    monkeypatch.setenv("GPUNET_EMULATOR_CACHE", str(tmp_path / "cache"))
    results = []
    for probe in (1, 3):
        (tmp_path / "common.cuh").write_text(HEADER.read_text() + f"#define PROBE {probe}\n")
        module = compiled(code, "count_blocks", defines=())
        done, out = numpy.zeros(1, "uint32"), numpy.zeros(6, "int32")
        module.launch("count_blocks", 5, 64, marshal(module, "count_blocks", (done, out)))
        results.append((int(done[0]), out.tolist()))
    assert results == [(0, [1, 1, 1, 1, 1, 5]), (0, [1, 1, 1, 1, 1, 15])]
