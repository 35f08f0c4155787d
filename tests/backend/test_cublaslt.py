"""The cuBLASLt path of the GEMM dispatch (nvmath-python; on the CuPy stand-in, its stand-in, which
keeps nvmath's documented rules): it computes D = W x^T with the bias per row of D, so that D's
column-major memory is y; a path whose result disagrees with gpunet's kernel is never timed."""
from __future__ import annotations

import numpy
import pytest

import gpunet as gn
from gpunet.backend import cublaslt, ops_for_device
from gpunet.backend.gemm_dispatch import agreeing
from gpunet.backend.ops import Ops
from tests.support.arrays import ON_STANDIN, on, rng
from tests.support.tolerance import assert_within, linear_atol

REFERENCE = Ops()

pytestmark = pytest.mark.gpu


def close_to_linear(got, x, w, b, activation):
    """A GEMM path's output against the reference Ops, within tests/support/tolerance.py's bound."""
    assert_within(gn.to_numpy(got), REFERENCE.linear(x, w, b, activation), linear_atol(x, w, b, activation), "linear")


def operands(m=37, k=19, n=23):
    x, w, b = (rng(i).standard_normal(s).astype("float32") for i, s in enumerate(((m, k), (n, k), (n,))))
    return x, w, b


@pytest.mark.skipif(not cublaslt.available(), reason="nvmath-python is not installed")
@pytest.mark.parametrize("activation", [None, "relu"])
def test_the_cublaslt_path_gives_a_row_major_y_without_a_copy(activation):
    ops = ops_for_device("gpu")
    x, w, b = operands()
    for _ in range(2):  # planned, then its operands reset
        y = ops._lt(on("gpu", x), on("gpu", w), on("gpu", b), activation)
        assert y.shape == (37, 23) and y.flags.c_contiguous
        close_to_linear(y, x, w, b, activation)
        x = x[::-1].copy()
    out = on("gpu", numpy.full((37, 23), numpy.nan, "float32"))
    assert ops._lt(on("gpu", x), on("gpu", w), on("gpu", b), activation, out) is out
    close_to_linear(out, x, w, b, activation)


@pytest.mark.skipif(not ON_STANDIN, reason="checks the stand-in's nvmath rules")
def test_the_nvmath_stand_in_refuses_what_nvmath_refuses():
    from nvmath.linalg.advanced import Matmul, MatmulEpilog

    x, w, b = (on("gpu", a) for a in operands())
    with pytest.raises(ValueError, match="M dimension of the bias vector"):
        Matmul(x, w.T).plan(epilog=MatmulEpilog.BIAS, epilog_inputs={"bias": b})  # a bias per column: not cuBLASLt's
    with pytest.raises(ValueError, match="requires the following input tensors"):
        Matmul(w, x.T).plan(epilog=MatmulEpilog.RELU_BIAS)
    planned = Matmul(w, x.T)
    planned.plan(epilog=MatmulEpilog.BIAS, epilog_inputs={"bias": b})
    assert planned.execute().flags.f_contiguous  # a bias epilogue's D is column-major
    with pytest.raises(ValueError, match="must match the planned one"):
        planned.reset_operands(b=x)


def test_a_path_that_disagrees_with_the_kernel_is_never_timed(monkeypatch):
    ops = ops_for_device("gpu")
    x, w, b = (on("gpu", a) for a in operands())
    paths = dict(ops._linear_paths(b, "relu"))
    paths["cublas"] = lambda x, w, b, act, out=None: ops._cublas_linear(x, w, b, None, out)  # ReLU forgotten
    with pytest.warns(RuntimeWarning, match=r"^gemm dispatch: the cublas path differs from gpunet's kernel by .* "
                                            r"\(relative\) for x \(37, 19\), weight \(23, 19\); it is not used$"):
        candidates = agreeing(paths, (x, w, b, "relu"), 1e-4, ops.xp)
    assert "cublas" not in candidates and "fused" in candidates
    assert ("cublaslt" in candidates) == cublaslt.available()
    close_to_linear(candidates["fused"](), *operands(), "relu")


def test_a_gelu_or_a_missing_bias_never_takes_the_cublaslt_path():
    ops = ops_for_device("gpu")
    b = on("gpu", operands()[2])
    assert not cublaslt.handles(b, "gelu") and not cublaslt.handles(None, "relu")
    assert "cublaslt" not in ops._linear_paths(b, "gelu") and "cublaslt" not in ops._linear_paths(None, "relu")


def test_a_nan_in_the_batch_that_is_measured_first_excludes_no_path():
    """The first batch of a size class decides its candidates, and the choice is kept on disk: a NaN
    that every path carries through alike must not shut a path out for good."""
    import warnings

    ops = ops_for_device("gpu")
    x, w, b = operands()
    x[3, 5] = numpy.nan
    x[7, 2] = numpy.inf
    paths = ops._linear_paths(on("gpu", b), "relu")
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        candidates = agreeing(paths, (on("gpu", x), on("gpu", w), on("gpu", b), "relu"), 1e-4, ops.xp)
    assert set(candidates) == set(paths)
    assert not [w for w in said if "gemm dispatch" in str(w.message)]
