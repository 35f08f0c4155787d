"""Every kernel in kernels/*.cu fits the blocks gpunet launches it with, by ptxas' own count
(`nvcc --resource-usage -arch=sm_90`): registers x threads and static shared memory within one
block's limits. A kernel over them would fail only at launch on a GPU ("too many resources
requested"); here it fails on any machine with nvcc. The kernel emulator reports the same numbers
(EmulatedModule.resources) and refuses such launches as a GPU would."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from gpunet.backend.cuda_kernels import THREADS
from tests.cuda_emulator import LIMITS, build, kernel_names, parse_resource_usage

KERNELS = Path(__file__).parents[1] / "kernels"
FAMILIES = sorted(path.stem for path in KERNELS.glob("*.cu"))


@pytest.fixture(scope="module")
def usage() -> dict[str, dict[str, tuple[int, int]]]:
    """{family: {kernel: (registers per thread, static shared bytes)}}, from nvcc run on each file."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on this machine: no register or shared memory counts to check")
    runs = {family: subprocess.Popen([nvcc, "--resource-usage", "-arch=sm_90", "-c", str(KERNELS / f"{family}.cu"),
                                      "-o", "/dev/null"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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
        assert registers * THREADS <= LIMITS["max_registers_per_block"], f"{kernel}: {registers} registers"
        assert shared <= LIMITS["max_shared_bytes"], f"{kernel}: {shared} bytes of shared memory"


@pytest.mark.parametrize("family", FAMILIES)
def test_kernels_written_for_a_block_size_match_gpunets(family):
    """A kernel that sizes its reductions by a block-size macro assumes gpunet's THREADS."""
    for macro, value in re.findall(r"#define\s+(THREADS|BLOCK)\s+(\d+)", (KERNELS / f"{family}.cu").read_text()):
        assert int(value) == THREADS, f"{family}.cu: {macro} {value}, but gpunet launches {THREADS} threads"


@pytest.mark.parametrize("family", FAMILIES)
def test_the_emulator_reports_the_same_resources(usage, family):
    try:
        module = build((KERNELS / f"{family}.cu").read_text(), name=family)
    except RuntimeError as exc:
        if "is not on this machine" in str(exc):
            pytest.skip(str(exc))
        raise
    assert module.resources == usage[family]
