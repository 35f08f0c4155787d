"""The derived tolerances of tests/support/tolerance.py still catch real bugs: for each kind of
comparison whose bound grew (GEMM, convolution, softmax cross-entropy, layer norm, LSTM against
PyTorch), the unchanged result passes and a result with one planted bug fails the same check: a
wrong element (one element off by one ordinary term of its sum), a swapped index, a missing term."""
from __future__ import annotations

import numpy
import pytest
import torch

import gpunet as gn
from gpunet import layers as L
from gpunet.backend.numpy_ops import NumpyOps
from gpunet.backend.ops import Ops
from tests.support.arrays import rng
from tests.support.tolerance import (assert_within, conv_atol, layer_atol, linear_atol, linear_backward_atol,
                                     path_atol, ulps, xent_atol, xent_grad_atol)

OPS, REFERENCE = NumpyOps(), Ops()
MUTATIONS = ["wrong element", "swapped index", "missing term"]


def median_term(terms):
    """An ordinary term of a sum: the one of median magnitude (not the largest, which is easy to catch)."""
    flat = numpy.asarray(terms, "float64").ravel()
    return flat[numpy.argsort(numpy.abs(flat))[len(flat) // 2]]


def gemm_case(mutation):
    """Dense forward and dW, the CPU backend against the reference Ops (tests/backend/test_ops.py's check)."""
    r = rng(1)
    x, w, b, dy = (r.standard_normal(s).astype("float32") for s in ((130, 77), (203, 77), (203,), (130, 203)))
    y = OPS.linear(x, w, b)
    grad_w = numpy.zeros_like(w)
    OPS.linear_backward(x, w, dy, grad_w, need_dx=False)
    want_y = REFERENCE.linear(x, w, b)
    want_w = numpy.zeros_like(w)
    REFERENCE.linear_backward(x, w, dy, want_w, need_dx=False)
    if mutation == "wrong element":  # one product term counted twice
        y[5, 7] += median_term(x[5] * w[7])
    elif mutation == "swapped index":  # two input rows of dW's sum exchanged for one output column
        grad_w[3] = dy[:, 3] @ x[numpy.r_[1, 0, 2:130]]
    elif mutation == "missing term":  # the last inner index dropped from one output
        y[9, 11] -= x[9, -1] * w[11, -1]
    _, dw_atol, _ = linear_backward_atol(x, w, dy, numpy.zeros(dy.shape))
    assert_within(y, want_y, linear_atol(x, w, b), "linear")
    assert_within(grad_w, want_w, dw_atol, "dW")


def conv_case(mutation):
    """Conv2D forward, the CPU backend's wide-row convolution against PyTorch's (test_conv_random_shapes)."""
    r = rng(2)
    x = r.standard_normal((2, 3, 9, 11)).astype("float32")
    w = r.standard_normal((4, 3, 3, 3)).astype("float32")
    b = r.standard_normal(4).astype("float32")
    if mutation == "swapped index":  # the kernel's taps flipped (convolution for correlation)
        y, _ = OPS.conv2d(x, numpy.ascontiguousarray(w[..., ::-1, ::-1]), b, (1, 1), (1, 1))
    else:
        y, _ = OPS.conv2d(x, w, b, (1, 1), (1, 1))
    want = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b), padding=1).numpy()
    terms = x[1, :, 3:6, 4:7] * w[2]  # output (1, 2, 4, 5) with padding 1
    if mutation == "wrong element":
        y[1, 2, 4, 5] += median_term(terms)
    elif mutation == "missing term":  # the last tap of the last channel dropped at one position
        y[1, 2, 4, 5] -= terms[-1, -1, -1]
    assert_within(y, want, conv_atol(x, w, 1, 1) + ulps(want, 2), "conv2d")


def xent_case(mutation):
    """Softmax cross-entropy, the CPU backend's kernel against the reference Ops (tests/backend/test_ops.py)."""
    logits = (rng(3).standard_normal((257, 1000)) * 5).astype("float32")
    labels = rng(4).integers(0, 1000, 257)
    planted = labels.copy()
    if mutation == "swapped index":  # two rows' labels exchanged
        planted[[0, 1]] = planted[[1, 0]]
    loss, grad = OPS.softmax_cross_entropy(logits, planted)
    want_loss, want_grad = REFERENCE.softmax_cross_entropy(logits, labels)
    if mutation == "wrong element":  # one gradient entry off by 1% of its one-hot term
        grad[0, labels[0]] += 0.01 / len(logits)
    elif mutation == "missing term":  # row 0's largest other class left out of its normaliser
        other = numpy.where(numpy.arange(1000) == labels[0], -numpy.inf, logits[0]).argmax()
        dropped = logits.copy()
        dropped[0, other] = -numpy.inf
        loss, grad = OPS.softmax_cross_entropy(dropped, labels)
    assert_within(grad, want_grad, xent_grad_atol(logits, want_grad), "gradient")
    assert_within(loss, want_loss, xent_atol(logits, labels), "loss")


def layer_norm_case(mutation):
    """LayerNorm forward, the CPU backend's kernel against the reference Ops (tests/backend/test_ops.py)."""
    r = rng(5)
    x = (r.standard_normal((4, 9, 256)) * 3 + 1).astype("float32")
    w, b = r.standard_normal(256).astype("float32"), r.standard_normal(256).astype("float32")
    want, _, _ = REFERENCE.layer_norm(x, w, b, 1e-5)
    if mutation == "missing term":  # the mean and variance over the first 255 values only
        _, _, short_rstd = REFERENCE.layer_norm(x[..., :-1], None, None, 1e-5)
        mean = x[..., :-1].mean(axis=-1, keepdims=True)
        y = ((x - mean) * short_rstd * w + b).astype("float32")
    else:
        y, _, _ = OPS.layer_norm(x, w, b, 1e-5)
    if mutation == "wrong element":
        y[1, 2, 3] += 0.01 * numpy.abs(want).max()
    elif mutation == "swapped index":  # two features' weights exchanged
        y[..., [4, 5]] = ((y[..., [4, 5]] - b[[4, 5]]) / w[[4, 5]] * w[[5, 4]] + b[[4, 5]])
    assert_within(y, want, path_atol(want, 4 * 256 + 36), "layer_norm")  # as test_ops counts LayerNorm's sums


def lstm_case(mutation):
    """An LSTM's output and weight gradients against torch.nn.LSTM (tests/layers/test_sequence.py's check)."""
    gn.manual_seed(6)
    layer = L.LSTM(5, 7)
    module = torch.nn.LSTM(5, 7, batch_first=True)
    params = {k: v.copy() for k, v in layer.params.items()}
    if mutation == "swapped index":  # the input and forget gates' rows exchanged
        for key in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            params[key][:7], params[key][7:14] = params[key][7:14].copy(), params[key][:7].copy()
    module.load_state_dict({f"{k}_l0": torch.from_numpy(v) for k, v in params.items()})
    x = rng(7).standard_normal((3, 11, 5)).astype("float32")
    dy = rng(8).standard_normal((3, 11, 7)).astype("float32")
    tx = torch.from_numpy(x.copy())
    if mutation == "missing term":  # the first step's input left out of the gates
        tx[:, 0] = 0
    ty = module(tx.requires_grad_(True))[0]
    ty.backward(torch.from_numpy(dy))
    y = layer.forward(x)
    layer.backward(dy)
    grad = layer.grads["weight_ih"].copy()
    if mutation == "wrong element":  # one (row, step) term of the sum over B T counted twice
        grad[0, 0] += numpy.median(numpy.abs(grad)) / (3 * 11)
    want_y, want_grad = ty.detach().numpy(), module.weight_ih_l0.grad.numpy()
    assert_within(y, want_y, layer_atol(layer, x.shape, want_y), "output")
    assert_within(grad, want_grad, layer_atol(layer, x.shape, want_grad), "gradient of weight_ih")


CASES = {"gemm": gemm_case, "conv": conv_case, "softmax_xent": xent_case, "layer_norm": layer_norm_case,
         "lstm": lstm_case}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_unchanged_result_is_within_the_bound(case):
    CASES[case](None)


@pytest.mark.parametrize("mutation", MUTATIONS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_planted_bug_is_outside_the_bound(case, mutation):
    with pytest.raises(AssertionError, match=r": element \(.*\): got .*, \|diff\| .* > bound .* \(ratio .*\)"):
        CASES[case](mutation)
