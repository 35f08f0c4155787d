"""Losses against PyTorch (float32, every device) and finite differences (float64)."""
from __future__ import annotations

import numpy
import pytest
import torch
import torch.nn.functional as F

import gpunet as gn
from tests.support.arrays import on, rng
from tests.support.gradcheck import numeric_gradient, sample_indices
from tests.support.tolerance import assert_within, path_atol, xent_atol, xent_grad_atol


def check(loss, grad, tlogits, tloss, loss_atol, grad_atol):
    tloss.backward()
    assert loss.shape == ()
    assert_within(float(loss), tloss.item(), loss_atol, "loss")
    assert_within(gn.to_numpy(grad), tlogits.grad.numpy(), grad_atol, "gradient")


def mean_loss_atols(x, want_grad):
    """A loss summed over the classes (or elements) of each row and averaged over R rows, the last
    axis C: the sums' lengths as gpunet.parity_bound counts the softmax cross-entropy's, 2 (C + R),
    times the loss's and the gradient's sizes."""
    length = 2 * (x.shape[-1] + x.size // x.shape[-1])
    return (lambda want: path_atol(want, length)), path_atol(want_grad, length)


@pytest.mark.parametrize("shape, scale", [((16, 10), 1.0), ((5, 7, 13), 3.0), ((8, 4), 1e4), ((3, 2), 1e4)])
def test_softmax_cross_entropy_matches_pytorch(device, shape, scale):
    logits = (rng(1).standard_normal(shape) * scale).astype("float32")
    labels = rng(2).integers(0, shape[-1], shape[:-1])
    t = torch.from_numpy(logits).requires_grad_(True)
    tloss = F.cross_entropy(t.reshape(-1, shape[-1]), torch.from_numpy(labels).reshape(-1))
    loss, grad = gn.losses.softmax_cross_entropy(on(device, logits), on(device, labels))
    assert numpy.isfinite(float(loss))
    z = logits.reshape(-1, shape[-1])
    tloss.backward()
    want_grad = t.grad.numpy().reshape(z.shape)
    assert_within(float(loss), tloss.item(), xent_atol(z, labels.reshape(-1)), "loss")
    assert_within(gn.to_numpy(grad).reshape(z.shape), want_grad,
                  xent_grad_atol(z, want_grad), "gradient")


def test_softmax_cross_entropy_soft_targets(device):
    logits = rng(1).standard_normal((6, 5)).astype("float32")
    probs = rng(2).dirichlet(numpy.ones(5), 6).astype("float32")
    t = torch.from_numpy(logits).requires_grad_(True)
    tloss = F.cross_entropy(t, torch.from_numpy(probs))
    loss, grad = gn.losses.softmax_cross_entropy(on(device, logits), on(device, probs))
    loss_atol, grad_atol = mean_loss_atols(logits, (torch.softmax(t.detach(), -1).numpy() - probs) / len(logits))
    check(loss, grad, t, tloss, loss_atol(tloss.item()), grad_atol)


def test_mse_and_bce_match_pytorch(device):
    y = rng(1).standard_normal((7, 3)).astype("float32") * 5
    target = rng(2).uniform(0, 1, (7, 3)).astype("float32")
    for ours, theirs in ((gn.losses.mse, F.mse_loss), (gn.losses.binary_cross_entropy_with_logits,
                                                       F.binary_cross_entropy_with_logits)):
        t = torch.from_numpy(y).requires_grad_(True)
        tloss = theirs(t, torch.from_numpy(target))
        loss, grad = ours(on(device, y), on(device, target))
        tloss.backward()
        loss_atol, grad_atol = mean_loss_atols(y.reshape(1, -1), t.grad.numpy())  # both average all 21 elements
        assert_within(float(loss), tloss.item(), loss_atol(tloss.item()), f"{ours.__name__} loss")
        assert_within(gn.to_numpy(grad), t.grad.numpy(), grad_atol, f"{ours.__name__} gradient")


def test_bce_is_stable_for_huge_logits():
    loss, grad = gn.losses.binary_cross_entropy_with_logits(numpy.array([1e4, -1e4], "float32"),
                                                           numpy.array([0.0, 1.0], "float32"))
    numpy.testing.assert_allclose(float(loss), 1e4, rtol=1e-6)  # mean(1e4 + log1p(e^-1e4)) = 1e4: exact in float32
    assert numpy.isfinite(gn.to_numpy(grad)).all()


@pytest.mark.parametrize("name", ["softmax_cross_entropy", "mse", "binary_cross_entropy_with_logits"])
def test_loss_gradients_match_finite_differences(name):
    fn = gn.losses.LOSSES[name]
    x = rng(3).standard_normal((4, 3, 5))
    target = rng(4).integers(0, 5, (4, 3)) if name == "softmax_cross_entropy" else rng(4).uniform(0, 1, (4, 3, 5))
    _, grad = fn(x, target)
    idx = sample_indices(x.shape, 30)
    numeric = numeric_gradient(lambda: float(fn(x, target)[0]), x, idx)
    # float64 central differences with eps 1e-6: truncation eps^2 f''' ~ 1e-12, rounding u f / eps ~ 1e-10
    numpy.testing.assert_allclose([grad[i] for i in idx], numeric, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("logits, labels, error, message", [
    (numpy.zeros((4, 3), "float32"), numpy.array([0, 1, 3, 2]), ValueError, "label 3 is out of range for 3 classes"),
    (numpy.zeros((4, 3), "float32"), numpy.array([0, -1, 2, 2]), ValueError, "label -1 is out of range"),
    (numpy.zeros((4, 3), "float32"), numpy.array([0, 1, 2]), ValueError, "labels of shape (4,) expected"),
    (numpy.zeros((4,), "float32"), numpy.array([0, 1, 2, 1]), ValueError, "logits must be float (B, C)"),
    (numpy.zeros((2, 3), "float32"), numpy.zeros((2, 2), "float32"), ValueError, "probability targets must have"),
    (numpy.zeros((2, 3), "float32"), numpy.array([True, False]), TypeError, "labels must be integer class ids"),
])
def test_bad_labels_get_clear_errors(logits, labels, error, message):
    import re
    with pytest.raises(error, match=re.escape(message)):
        gn.losses.softmax_cross_entropy(logits, labels)


def test_mse_shape_mismatch():
    with pytest.raises(ValueError, match=r"input shape \(2, 3\) and target shape \(3, 2\) differ"):
        gn.losses.mse(numpy.zeros((2, 3), "float32"), numpy.zeros((3, 2), "float32"))
