"""The CupyOps guard written once (gpunet.backend.kernel_guard.kernel_or_fallback): a kernel path runs
only on float32, C-contiguous, non-empty arguments it names; anything else gets the base Ops' method
with the same arguments. Checked here on NumPy arrays with a small Ops subclass (the decorator reads
only dtype, flags, size and xp), and on CupyOps itself for which overrides state their own rule."""
from __future__ import annotations

import inspect

import numpy
import pytest

from gpunet.backend.cupy_gemm import CupyGemmPaths
from gpunet.backend.cupy_ops import CupyOps
from gpunet.backend.kernel_guard import float32_contiguous, kernel_or_fallback
from gpunet.backend.ops import Ops


class Guarded(Ops):
    """layer_norm's 'kernel' records its call and returns a marker; the fallback is Ops.layer_norm."""

    def __init__(self):
        self.kernel_calls = []

    @kernel_or_fallback("x", "weight", "bias", nonempty="x")
    def layer_norm(self, x, weight, bias, eps, for_product=False):
        self.kernel_calls.append(eps)
        return "kernel"

    @kernel_or_fallback("dy", "xhat", "residual", nonempty="dy", contiguous=("dy",))
    def layer_norm_backward(self, dy, xhat, rstd, weight, grad_weight=None, grad_bias=None, residual=None):
        self.kernel_calls.append(dy)
        return "kernel"

    @kernel_or_fallback("c_prev", nonempty="c_prev", if_empty="nothing to do")
    def lstm_cell(self, x_gates, h_gates, c_prev, acts_out, h_out, c_out, tanh_c_out):
        return "kernel"


def reference_layer_norm(x, weight, bias, eps):
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / numpy.sqrt(var + eps) * weight + bias


def test_float32_contiguous_arguments_take_the_kernel_path_by_position_or_by_name():
    ops, x = Guarded(), numpy.arange(6, dtype="float32").reshape(2, 3)
    w, b = numpy.ones(3, "float32"), numpy.zeros(3, "float32")
    assert ops.layer_norm(x, w, b, 1e-5) == "kernel"
    assert ops.layer_norm(x, weight=w, bias=b, eps=0.5) == "kernel"
    assert ops.layer_norm(x, None, None, 0.25) == "kernel"  # None: an unused argument passes
    assert ops.kernel_calls == [1e-5, 0.5, 0.25]


@pytest.mark.parametrize("case", ["float64 x", "float64 bias by name", "non-contiguous x", "empty x"])
def test_anything_else_gets_the_base_ops_result_with_the_same_arguments(case):
    ops = Guarded()
    x = numpy.array([[1.0, 2.0, 4.0], [0.0, -1.0, 3.0]], dtype="float32")
    w, b = numpy.array([1.0, 2.0, 0.5], "float32"), numpy.array([0.0, 1.0, -1.0], "float32")
    if case == "float64 x":
        x = x.astype("float64")
    elif case == "float64 bias by name":
        b = b.astype("float64")
    elif case == "non-contiguous x":
        x = numpy.asfortranarray(x)
    else:
        x = x[:0]
    y = ops.layer_norm(x, w, bias=b, eps=1e-3)[0] if case != "float64 bias by name" else \
        ops.layer_norm(x, weight=w, bias=b, eps=1e-3)[0]
    numpy.testing.assert_allclose(y, reference_layer_norm(x, w, b, 1e-3), rtol=1e-6, atol=1e-6)
    assert y.shape == x.shape and ops.kernel_calls == []


def test_named_arguments_are_made_contiguous_first_for_the_kernel_and_the_fallback():
    ops = Guarded()
    dy = numpy.arange(12, dtype="float32").reshape(3, 4).T  # (4, 3), not C-contiguous
    xhat = numpy.full((4, 3), 0.5, "float32")
    assert ops.layer_norm_backward(dy, xhat, numpy.ones((4, 1), "float32"), None) == "kernel"
    (seen,) = ops.kernel_calls
    assert seen.flags.c_contiguous and numpy.array_equal(seen, dy)
    # a float64 xhat falls back: the base gets the same numbers, dx = rstd * (dy - mean - xhat * mean(dy xhat))
    dx, dweight, dbias = ops.layer_norm_backward(dy=dy, xhat=xhat.astype("float64"),
                                                 rstd=numpy.ones((4, 1), "float32"), weight=None)
    centred = dy - dy.mean(axis=-1, keepdims=True) - 0.5 * (dy * 0.5).sum(axis=-1, keepdims=True) / 3
    numpy.testing.assert_allclose(dx, centred, rtol=1e-6)
    assert dweight is None and dbias is None and len(ops.kernel_calls) == 1


def test_an_empty_input_can_return_a_value_of_its_own_instead_of_falling_back():
    ops, empty = Guarded(), numpy.zeros((0, 4), "float32")
    assert ops.lstm_cell(None, None, empty, None, None, None, None) == "nothing to do"
    assert ops.lstm_cell(None, None, numpy.zeros((1, 4), "float32"), None, None, None, None) == "kernel"


def test_a_name_the_method_does_not_take_is_refused_when_decorating():
    with pytest.raises(TypeError, match=r"kernel_or_fallback: .*layer_norm has no argument 'gamma'"):
        kernel_or_fallback("x", "gamma")(Ops.layer_norm)
    with pytest.raises(TypeError, match="has no argument 'dx'"):
        kernel_or_fallback("dy", contiguous=("dx",))(Ops.layer_norm_backward)


def test_the_decorated_method_keeps_the_base_signature():
    assert inspect.signature(Guarded.layer_norm) == inspect.signature(Ops.layer_norm)
    assert inspect.signature(Guarded.layer_norm_backward) == inspect.signature(Ops.layer_norm_backward)


def test_float32_contiguous():
    a = numpy.zeros((3, 2), "float32")
    assert float32_contiguous(a, None) and float32_contiguous()
    assert not float32_contiguous(a.T) and not float32_contiguous(a.astype("float64"))


def test_every_cupyops_kernel_path_states_its_arguments_through_the_one_guard():
    """The overrides not decorated are the ones whose rule the guard cannot state, named here: a
    list of arrays (clip_grad_norm), any layout (col2im), and what launches no kernel of its own; in the
    mixin CupyGemmPaths (its overrides of Ops), conv_gemm, whose guard is its product's."""
    public = {name: member for cls in (CupyOps, CupyGemmPaths) for name, member in vars(cls).items()
              if callable(member) and not name.startswith("_") and (cls is CupyOps or hasattr(Ops, name))}
    undecorated = {name for name, member in public.items() if not hasattr(member, "__wrapped__")}
    assert undecorated == {"erf", "activation_backward", "check_labels", "check_errors", "clip_grad_norm", "col2im",
                           "embedding_backward", "conv_gemm"}
    assert len(public) - len(undecorated) == 33
    assert hasattr(vars(CupyOps)["_activation_backward"], "__wrapped__")  # activation_backward's guarded half
