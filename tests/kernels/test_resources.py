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

from gpunet.backend.cuda_kernels import ACTIVATION_CODES, DEFINE_FLAGS, DEFINES, THREADS, source
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
    only under #ifndef of the same name and only with Python's value: never a second value."""
    text = (KERNELS / f"{family}.cu").read_text()
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


def test_the_last_block_done_helper_is_the_same_in_every_family_that_has_it():
    """Each .cu compiles on its own, so the helper is written out in each file that needs it: one copy."""
    copies = {family: re.search(r"__device__ __forceinline__ bool last_block_done\(.*?\n}\n", source(family), re.S)
              for family in ("gemm", "im2col", "optim", "random", "sequence", "softmax_xent")}
    found = {family: m.group(0) for family, m in copies.items() if m}
    assert {"gemm", "softmax_xent"} <= set(found)
    assert len(set(found.values())) == 1, sorted(found)
