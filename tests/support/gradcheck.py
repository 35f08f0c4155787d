"""Float64 central finite differences against a layer's backward pass."""
from __future__ import annotations

import numpy

import gpunet as gn
from gpunet.testing import central_difference


def numeric_gradient(f, array, indices, eps=1e-6):
    return numpy.array([central_difference(f, array, idx, eps) for idx in indices])


def sample_indices(shape, count, seed=0):
    r = numpy.random.default_rng(seed)
    size = int(numpy.prod(shape))
    flat = r.choice(size, size=min(count, size), replace=False)
    return [numpy.unravel_index(i, shape) for i in flat]


def check_layer(layer, x, *, count=25, rtol=1e-5, atol=1e-7, input_grad=True, seed=7):
    """Compare backward()'s input and parameter gradients with finite differences of
    sum(forward(x) * dy) in float64; dropout masks are redrawn identically on every forward.
    The tolerance is float64's, not a float32 comparison's: central differences with eps = 1e-6
    err by eps^2 |f3| / 6 (f3 the third derivative; about 1e-12) plus the objective's rounding
    u |f| / eps (u = 1.1e-16: about 1e-10 |f|), far inside rtol 1e-5 and atol 1e-7 here."""
    layer.to(dtype="float64")
    x = numpy.array(x, dtype="float64") if numpy.asarray(x).dtype.kind == "f" else numpy.asarray(x)

    def forward():
        gn.manual_seed(seed)
        return layer.forward(x)

    dy = numpy.random.default_rng(1).standard_normal(forward().shape)
    dx = layer.backward(dy)
    analytic = {k: numpy.array(v) for k, v in layer.grads.items()}

    def objective():
        return float((forward() * dy).sum())

    if input_grad:
        idx = sample_indices(x.shape, count)
        numeric = numeric_gradient(objective, x, idx)
        numpy.testing.assert_allclose([dx[i] for i in idx], numeric, rtol=rtol, atol=atol, err_msg="input gradient")
    for name, param in layer.params.items():
        idx = sample_indices(param.shape, count)
        numeric = numeric_gradient(objective, param, idx)
        numpy.testing.assert_allclose([analytic[name][i] for i in idx], numeric, rtol=rtol, atol=atol,
                                      err_msg=f"gradient of {name}")
