"""The GPU ops at their edges, from one test definition on every backend: more row tiles than
gridDim.y allows, the conv backward's column layout read without a copy, labels out of range
(raised where the loss is read, with no sync inside the step) and zero-size inputs."""
from __future__ import annotations

import contextlib
import re
import warnings
from contextlib import nullcontext

import numpy
import pytest

import gpunet as gn
from gpunet.backend import cuda_kernels, ops_for_device
from gpunet.backend.ops import Ops
from tests import gpu_standin
from tests.support.arrays import ON_STANDIN, on, rng
from tests.backend.test_ops import check_linear, check_xent, close
from tests.support.tolerance import assert_within, elementwise_atol, linear_backward_atol, sum_atol

REFERENCE = Ops()

def _lower_the_grid_y_limit(monkeypatch, limit: int) -> None:
    """gpunet's cap and, where the emulator has one, the emulated GPU's own limit."""
    from tests.cuda import emulator as cuda_emulator

    monkeypatch.setattr(cuda_kernels, "MAX_GRID_Y", limit)
    x, _, z = cuda_emulator.LIMITS["max_grid"]
    monkeypatch.setitem(cuda_emulator.LIMITS, "max_grid", (x, limit, min(z, limit)))


def test_gemm_and_bias_backward_loop_over_row_tiles_beyond_the_grid_limit(device, monkeypatch):
    """More row tiles than gridDim.y may have: the kernels walk the rest (grid-stride in y).

    A real GPU caps gridDim.y at 65,535, which 64-row tiles reach at about 4.2 million rows; a
    Dense layer that size (1 GiB of activations per 64 columns) would take hours in the kernel
    emulator, so the limit is lowered to 2 instead and 6 tiles (and 6 bias chunks) need the loop.
    """
    _lower_the_grid_y_limit(monkeypatch, 2)
    ops = ops_for_device(device)
    monkeypatch.setattr(ops, "gemm_mode", "fused", raising=False)  # the kernel, not cuBLAS
    m, k, n = 5 * 64 + 3, 20, 70
    r = rng(7)
    x, w, b, dy = (r.standard_normal(s).astype("float32") for s in ((m, k), (n, k), (n,), (m, n)))
    check_linear(ops, device, x, w, b, dy, "relu")


# ------------------------------------------------------------------ col2im's input layout
def test_col2im_reads_the_conv_backward_layout_without_a_copy(device, monkeypatch):
    """The conv backward hands col2im dY W as the transpose of a row-major GEMM result (a
    column-major view); the kernel reads it through its strides, with no copy and no other op."""
    shape, kernel, stride, padding = (2, 3, 9, 11), (3, 3), (1, 1), (1, 1)
    rows, width = REFERENCE.im2col(numpy.zeros(shape, "float32"), kernel, stride, padding).shape
    cols_t = rng(3).standard_normal((width, rows)).astype("float32")
    want = REFERENCE.col2im(cols_t.T, shape, kernel, stride, padding)
    ops = ops_for_device(device)
    cols = on(device, cols_t).T
    if device == "gpu":
        monkeypatch.setattr(ops.xp, "ascontiguousarray", lambda *a, **k: pytest.fail("col2im copied its input"))
    if device == "gpu" and ON_STANDIN:
        with gpu_standin.counting() as done:
            got = ops.col2im(cols, shape, kernel, stride, padding)
        assert (done["launches"], done["raw_launches"]) == (1, 1), done
    else:
        got = ops.col2im(cols, shape, kernel, stride, padding)
    close(got, want)


# ------------------------------------------------------------------ labels out of range
@pytest.mark.parametrize("dtype", ["float32", "float64"])  # the fused kernel, and the xp fallback
@pytest.mark.parametrize("labels, bad", [([-1], -1), ([5], 5), ([3, 7, -1, 9, -3], -3), ([6, 0, 9], 9)],
                         ids=["minus-one", "classes", "lowest-negative", "highest"])
def test_a_label_out_of_range_raises_the_cpu_error_where_the_loss_is_read(device, dtype, labels, bad):
    classes = 5
    logits = on(device, rng().standard_normal((len(labels), classes)).astype(dtype))
    message = re.escape(f"softmax_cross_entropy: label {bad} is out of range for {classes} classes")
    stepped = []

    def step():
        loss, grad = gn.losses.softmax_cross_entropy(logits, on(device, numpy.array(labels)))
        stepped.append(grad)  # on the GPU the step goes on: the host has not waited for the kernel
        return gn.losses.item(loss)

    if device == "gpu" and ON_STANDIN:
        with gpu_standin.counting() as done:
            gn.losses.softmax_cross_entropy(logits, on(device, numpy.array(labels)))
        assert done["d2h"] == 0, "the loss read something back to the host inside the step"
    with pytest.raises(ValueError, match=message):
        step()
    if device == "gpu":
        assert stepped and numpy.isfinite(gn.to_numpy(stepped[0])).all()  # harmless rows, no stray reads
    # the error is reported once: the next, valid, step reads cleanly and equals the reference
    good = rng(1).integers(0, classes, len(labels))
    loss, grad = gn.losses.softmax_cross_entropy(logits, on(device, good))
    check_xent(loss, grad, gn.to_numpy(logits), good)


@pytest.mark.parametrize("dtype", ["float32", "float64"])  # the embedding kernel, and the xp fallback
@pytest.mark.parametrize("positions", [False, True])
def test_an_embedding_id_out_of_range_raises_on_the_cpu_at_once_and_on_the_gpu_where_the_loss_is_read(
        device, dtype, positions):
    layers = [gn.layers.Embedding(6, 4)] + ([gn.layers.PositionalEmbedding(3, 4)] if positions else [])
    model = gn.Sequential(*layers, gn.layers.Dense(4, 6)).to(device, dtype)
    ids, bad_ids = numpy.array([[1, 5, 0], [2, 3, 4]]), numpy.array([[1, 7, 0], [-2, 3, 6]])
    message = r"Embedding.*: id -2 is out of range \[0, 6\)"

    def step(batch):
        logits = model.forward(on(device, batch))
        loss, grad = gn.losses.softmax_cross_entropy(logits.reshape(-1, 6), on(device, numpy.zeros(6, "int64")))
        return gn.losses.item(loss)

    if device == "cpu":
        with pytest.raises(ValueError, match=message):
            model.forward(bad_ids)
    else:
        if ON_STANDIN:
            model.forward(on(device, ids))  # (the GEMM dispatch measures a new size class once, reading the host)
            with gpu_standin.counting() as done:
                model.forward(on(device, bad_ids))
            assert done["d2h"] == 0, "the embedding read something back to the host"
        with pytest.raises(ValueError, match=message):
            step(bad_ids)
    # reported once: the next, valid, step reads cleanly
    assert numpy.isfinite(step(ids))


def test_evaluate_reads_the_loss_through_the_check(device):
    model = gn.models.mlp((4, 3)).to(device)
    x, y = rng().standard_normal((6, 4)).astype("float32"), numpy.array([0, 1, 2, 3, 0, 1])
    with pytest.raises(ValueError, match="label 3 is out of range for 3 classes"):
        gn.evaluate(model, x, y, batch_size=4)


# ------------------------------------------------------------------ empty inputs
def _zero_size_cases():
    """name -> (label, run(ops, put)) for every hot op CupyOps overrides, each with a zero-size
    batch and, where meaningful, zero width; put moves a host array to the device under test."""
    f32 = lambda *s: rng(len(s)).standard_normal(s).astype("float32")  # noqa: E731

    def linear(m, k, n):
        return lambda ops, put: [ops.linear(put(f32(m, k)), put(f32(n, k)), put(f32(n)), "relu")]

    def linear_backward(m, k, n):
        def run(ops, put):
            grads = [put(numpy.full((n, k), numpy.nan, "float32")), put(numpy.full(n, numpy.nan, "float32"))]
            z = f32(m, n)
            dx = ops.linear_act_backward(put(f32(m, k)), put(f32(n, k)), put(z), put(numpy.maximum(z, 0)),
                                         put(f32(m, n)), "relu", *grads)
            return [dx, *grads]
        return run

    def lstm(batch, hidden):
        def run(ops, put):
            outs = [put(numpy.zeros((batch, 4 * hidden), "float32"))] + [
                put(numpy.zeros((batch, hidden), "float32")) for _ in range(3)]
            ops.lstm_cell(put(f32(batch, 4 * hidden)), put(f32(batch, 4 * hidden)), put(f32(batch, hidden)), *outs)
            dc, dgates = put(f32(batch, hidden)), put(numpy.zeros((batch, 4 * hidden), "float32"))
            ops.lstm_cell_backward(put(f32(batch, hidden)), dc, put(f32(batch, 4 * hidden)), put(f32(batch, hidden)),
                                   put(f32(batch, hidden)), dgates)
            return [*outs, dc, dgates]
        return run

    def lstm_step(batch, hidden):
        def run(ops, put):
            outs = [put(numpy.zeros((batch, 4 * hidden), "float32"))] + [
                put(numpy.zeros((batch, hidden), "float32")) for _ in range(3)]
            ops.lstm_step(put(f32(batch, 4 * hidden)), put(f32(hidden, 4 * hidden)), put(f32(batch, hidden)),
                          put(f32(batch, hidden)), *outs)
            dc, dgates = put(f32(batch, hidden)), put(numpy.zeros((batch, 4 * hidden), "float32"))
            for later in (None, put(f32(batch, 4 * hidden))):  # the last step, then one before it
                ops.lstm_step_backward(put(f32(batch, hidden)), later, put(f32(4 * hidden, hidden)), dc,
                                       put(f32(batch, 4 * hidden)), put(f32(batch, hidden)), put(f32(batch, hidden)),
                                       dgates)
            return [*outs, dc, dgates]
        return run

    def optimizer(name):
        def run(ops, put):
            param, grad, m, v = (put(numpy.zeros(0, "float32")) for _ in range(4))
            if name == "sgd_update":
                ops.sgd_update(param, grad, m, 0.1, 0.9, 0.0, 0.01, True, False)
            else:
                ops.adam_update(param, grad, m, v, 1e-3, 0.9, 0.999, 1e-8, 0.01, True, 3)
            return [param, m]
        return run

    def softmax_cross_entropy(ops, put):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the mean of no rows is NaN, as NumPy's
            return list(ops.softmax_cross_entropy(put(f32(0, 5)), put(numpy.zeros(0, "int64"))))

    def embedding_backward(ops, put):
        grad_weight = put(numpy.full((7, 5), 3.0, "float32"))
        ops.embedding_backward(put(numpy.zeros((0, 4), "int64")), put(f32(0, 4, 5)), grad_weight)
        return [grad_weight]

    def embed_backward(ops, put):
        grads = put(numpy.full((7, 5), 3.0, "float32")), put(numpy.full((6, 5), 3.0, "float32"))
        ops.embed_backward(put(numpy.zeros((0, 4), "int64")), put(f32(0, 4, 5)), *grads)
        return list(grads)

    conv = ((3, 3), (1, 1), (1, 1))
    return {
        "erf": [("batch", lambda ops, put: [ops.erf(put(f32(0, 5)))])],
        "activation": [(f"{a}-{s}", lambda ops, put, a=a, s=s: [ops.activation(a, put(f32(*s)))])
                       for a in ("relu", "gelu") for s in ((0, 5), (3, 0))],
        "activation_backward": [(s, lambda ops, put, s=s: [ops.activation_backward("relu", put(f32(*s)), put(f32(*s)),
                                                                                   put(f32(*s)))])
                                for s in ((0, 5), (3, 0))],
        "linear": [("batch", linear(0, 5, 3)), ("out", linear(4, 5, 0)), ("in", linear(4, 0, 3))],
        "linear_act_backward": [("batch", linear_backward(0, 5, 3)), ("out", linear_backward(4, 5, 0)),
                                ("in", linear_backward(4, 0, 3))],
        "im2col": [(s, lambda ops, put, s=s: [ops.im2col(put(f32(*s)), *conv)]) for s in ((0, 3, 5, 5), (2, 0, 5, 5))],
        "col2im": [(s, lambda ops, put, s=s, w=w: [ops.col2im(put(f32(s[0] * 25, w)), s, *conv)])
                   for s, w in (((0, 3, 5, 5), 27), ((2, 0, 5, 5), 0))],
        "max_pool": [(s, lambda ops, put, s=s: list(ops.max_pool(put(f32(*s)), (2, 2), (2, 2))))
                     for s in ((0, 2, 4, 4), (2, 0, 4, 4))],
        "max_pool_backward": [(s, lambda ops, put, s=s: [ops.max_pool_backward(
            put(f32(s[0], s[1], 2, 2)), put(numpy.zeros((s[0], s[1], 2, 2), "int32")), s, (2, 2), (2, 2))])
            for s in ((0, 2, 4, 4), (2, 0, 4, 4))],
        "conv_gemm": [(s, lambda ops, put, s=s: list(ops.conv_gemm(put(f32(*s)), put(f32(3, s[1], 3, 3)), (1, 1),
                                                                   (1, 1))[:2])) for s in ((0, 2, 5, 5), (2, 0, 5, 5))],
        "conv_epilogue": [(s, lambda ops, put, s=s: [ops.conv_epilogue(put(f32(*s)), put(f32(s[0])), "relu")])
                          for s in ((3, 0, 4), (0, 2, 4), (3, 2, 0))],
        "conv_bias_act_backward": [(s, lambda ops, put, s=s: [ops.conv_bias_act_backward(
            put(f32(*s)), put(f32(*s)), "relu", g := put(numpy.zeros(s[1], "float32"))), g])
            for s in ((0, 3, 2, 2), (2, 3, 0, 2))],
        "conv2d_relu_pool": [(s, lambda ops, put, s=s: list(ops.conv2d_relu_pool(
            put(f32(*s)), put(f32(3, s[1], 2, 2)), put(f32(3)), (1, 1), (0, 0), (2, 2))[:3]))
            for s in ((0, 2, 5, 5), (2, 0, 5, 5))],
        "conv2d_relu_pool_backward": [("batch", lambda ops, put: [ops.conv2d_relu_pool_backward(
            put(f32(0, 3, 2, 2)), put(f32(0, 3, 2, 2)), put(numpy.zeros((0, 3, 2, 2), "int32")), put(f32(0, 18)),
            (0, 2, 5, 5), (0, 3, 4, 4), put(f32(3, 2, 3, 3)), gw := put(numpy.zeros((3, 2, 3, 3), "float32")),
            gb := put(numpy.zeros(3, "float32")), (1, 1), (0, 0), (2, 2)), gw, gb])],
        "softmax_cross_entropy": [("batch", softmax_cross_entropy)],
        "check_labels": [("batch", lambda ops, put: [ops.check_labels(put(numpy.zeros(0, "int64")), 5)])],
        "check_errors": [("none", lambda ops, put: [ops.check_errors()])],
        "lstm_cell": [("batch", lstm(0, 3)), ("hidden", lstm(2, 0))],
        "lstm_cell_backward": [("batch", lstm(0, 3)), ("hidden", lstm(2, 0))],
        "lstm_step": [("batch", lstm_step(0, 3)), ("hidden", lstm_step(2, 0))],
        "lstm_step_backward": [("batch", lstm_step(0, 3)), ("hidden", lstm_step(2, 0))],
        "attention_softmax": [("batch", lambda ops, put: [ops.attention_softmax(put(f32(0, 2, 4, 4)), 0.5, True)])],
        "attention_softmax_backward": [("batch", lambda ops, put: [ops.attention_softmax_backward(
            put(f32(0, 2, 4, 4)), put(f32(0, 2, 4, 4)), 0.5)])],
        "batch_norm": [("batch", lambda ops, put: list(ops.batch_norm(  # (eval: training refuses a count < 2)
            put(f32(0, 3, 4, 4)), put(f32(3)), put(f32(3)), put(f32(3)), put(numpy.ones(3, "float32")),
            put(numpy.zeros((), "int64")), False, 0.1, 1e-5)))],
        "batch_norm_backward": [("batch", lambda ops, put: [ops.batch_norm_backward(
            put(f32(0, 3, 4, 4)), put(f32(0, 3, 4, 4)), put(numpy.ones((1, 3, 1, 1), "float32")), put(f32(3)),
            put(numpy.zeros(3, "float32")), put(numpy.zeros(3, "float32")), False)])],
        "layer_norm": [("batch", lambda ops, put: list(ops.layer_norm(put(f32(0, 6)), put(f32(6)), put(f32(6)), 1e-5)))],
        "layer_norm_backward": [("batch", lambda ops, put: list(ops.layer_norm_backward(
            put(f32(0, 6)), put(f32(0, 6)), put(f32(0, 1)), put(f32(6))))),
            ("residual", lambda ops, put: list(ops.layer_norm_backward(
                put(f32(0, 6)), put(f32(0, 6)), put(f32(0, 1)), put(f32(6)), put(f32(6)), put(f32(6)), put(f32(0, 6)))))],
        "add_layer_norm": [("batch", lambda ops, put: list(ops.add_layer_norm(put(f32(0, 6)), put(f32(0, 6)),
                                                                              put(f32(6)), put(f32(6)), 1e-5)))],
        "attention": [("batch", lambda ops, put: [ops.attention(put(f32(0, 4, 3, 2, 5)), True)[0]])],
        "attention_backward": [("batch", lambda ops, put: [ops.attention_backward(
            put(f32(0, 4, 2, 5)), ops.attention(put(f32(0, 4, 3, 2, 5)), True)[1])])],
        "sgd_update": [("empty", optimizer("sgd_update"))],
        "adam_update": [("empty", optimizer("adam_update"))],
        "clip_grad_norm": [("empty", lambda ops, put: [ops.clip_grad_norm([g := put(numpy.zeros(0, "float32"))], 1.0),
                                                       g])],
        "embedding_backward": [("batch", embedding_backward)],
        "embed": [("batch", lambda ops, put: [ops.embed(put(numpy.zeros((0, 4), "int64")), put(f32(7, 5)), put(f32(6, 5)))])],
        "embed_backward": [("batch", embed_backward)],
        "dropout": [(s, lambda ops, put, s=s: [ops.dropout(put(f32(*s)), 0.5, (1, 2, 3, 0))[0]]) for s in ((0, 5), (3, 0))],
        "dropout_backward": [("batch", lambda ops, put: [ops.dropout_backward(put(f32(0, 5)), 0.5, (1, 2, 3, 0), None)])],
        "to_16bit": [(k, lambda ops, put, k=k: [ops.to_16bit(put(f32(0, 5)), k)]) for k in ("bf16", "fp16")],
        "from_16bit": [("fp16", lambda ops, put: [ops.from_16bit(put(numpy.zeros((0, 5), "float16")))])],
        "round_16bit": [(k, lambda ops, put, k=k: [ops.round_16bit(put(f32(3, 0)), k)]) for k in ("bf16", "fp16")],
    }


ZERO_SIZE = [(name, label, run) for name, cases in _zero_size_cases().items() for label, run in cases]


def test_every_gpu_override_has_a_zero_size_case():
    from gpunet.backend.cupy_gemm import CupyGemmPaths
    from gpunet.backend.cupy_ops import CupyOps

    overrides = {n for cls in (CupyOps, CupyGemmPaths) for n, member in vars(cls).items()
                 if callable(member) and not n.startswith("_") and (cls is CupyOps or hasattr(Ops, n))}
    assert overrides == {name for name, _, _ in ZERO_SIZE}


@pytest.mark.parametrize("name, label, run", ZERO_SIZE, ids=[f"{n}-{label}" for n, label, _ in ZERO_SIZE])
def test_zero_size_inputs_give_the_reference_result(device, monkeypatch, name, label, run):
    """An empty input must not reach a launch (the driver refuses a grid with no blocks, and
    blocks_for(0) is 0): each op returns the reference's empty result, zeros where it gives zeros."""
    ops = ops_for_device(device)
    monkeypatch.setattr(ops, "gemm_mode", "fused", raising=False)  # the kernel path of linear
    got = run(ops, lambda a: on(device, a))
    # The reference's LSTM cell reshapes (B, 4H) with -1, which an empty batch cannot take
    # (sequence_ops.py): there the CPU backend's result is the reference.
    reference = ops_for_device("cpu") if name.startswith("lstm") else REFERENCE
    want = run(reference, lambda a: a)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if w is None:
            assert g is None
            continue
        g, w = gn.to_numpy(g), numpy.asarray(w)
        if name in ("max_pool", "conv2d_relu_pool"):  # the backends lay argmax out differently (flat or as y)
            g, w = g.reshape(-1), w.reshape(-1)
        assert g.shape == w.shape and g.dtype.kind == w.dtype.kind, (g.shape, g.dtype, w.shape, w.dtype)
        numpy.testing.assert_array_equal(g, w)


# ------------------------------------------------------------------ the typed kernel boundary
def test_the_typed_boundary_converts_scalars_exactly_and_refuses_wrong_arrays():
    params = cuda_kernels.Kernel("k", "k", "float*, strided float*, long long*, int, long long, float")._params
    f32, i64 = numpy.zeros((3, 4), "float32"), numpy.zeros(2, "int64")
    arrays = (f32, f32.T, i64)  # the strided parameter takes a transposed view as it is
    args = cuda_kernels.marshal("k", "k", (*arrays, True, 7, 2), params)
    assert all(a is b for a, b in zip(args, arrays))
    assert [(type(a), a) for a in args[3:]] == [(numpy.int32, 1), (numpy.int64, 7), (numpy.float32, 2.0)]
    refused = [((f32.astype("float64"), f32, i64, 1, 2, 0.5), r"argument 0: expected a C-contiguous float32 array, "
                                                              r"got a float64 array"),
               ((f32.T, f32, i64, 1, 2, 0.5), r"argument 0: .*got a non-contiguous float32 array"),
               ((f32, f32, i64.astype("int32"), 1, 2, 0.5), r"argument 2: expected a C-contiguous int64 array"),
               ((f32, f32, i64, 1.5, 2, 0.5), r"argument 3: expected an integer \(sent as int32\), got float"),
               ((f32, f32, i64, f32, 2, 0.5), r"argument 3: expected an integer \(sent as int32\), got ndarray"),
               ((f32, f32, 3, 1, 2, 0.5), r"argument 2: expected a C-contiguous int64 array, got int"),
               ((f32, None, i64, 1, 2, 0.5), r"argument 1: expected a float32 array, got NoneType"),  # see marshal
               ((f32, f32, i64, 1, 2), r"kernel k.k takes 6 arguments, got 5")]
    for args, message in refused:
        with pytest.raises(TypeError, match=message):
            cuda_kernels.marshal("k", "k", args, params)
    with pytest.raises(OverflowError):
        cuda_kernels.marshal("k", "k", (f32, f32, i64, 2**31, 2, 0.5), params)
    with pytest.raises(ValueError, match=r"unknown parameter types \['half'\]"):
        cuda_kernels.Kernel("k", "k", "float*, half")


@pytest.mark.gpu
def test_a_kernel_wrapper_refuses_arrays_its_kernel_would_misread():
    """CupyOps falls back before a wrapper for what a kernel cannot take; called directly, a
    wrapper refuses it rather than launch the kernel on the wrong bytes."""
    from gpunet.backend import cuda_wrappers as kernels

    doubles = on("gpu", rng().standard_normal((4, 6)))
    transposed = on("gpu", rng().standard_normal((6, 4)).astype("float32")).T
    labels = on("gpu", numpy.zeros(4, "int32"))
    with gpu_standin.counting() if ON_STANDIN else nullcontext({}) as done:
        with pytest.raises(TypeError, match=r"kernel gemm.activation_forward, argument 0: expected a C-contiguous "
                                            r"float32 array, got a float64 array"):
            kernels.activation_forward(doubles, "relu")
        with pytest.raises(TypeError, match=r"kernel gemm.gemm_bias_act, argument 0: .*got a non-contiguous float32"):
            kernels.gemm_bias_act(transposed, transposed, None, None, on("gpu", numpy.zeros((4, 4), "float32")))
        with pytest.raises(TypeError, match=r"kernel softmax_xent.softmax_xent, argument 1: expected a C-contiguous "
                                            r"int64 array, got an int32 array"):
            kernels.softmax_xent(on("gpu", numpy.zeros((4, 3), "float32")), labels, on("gpu", numpy.zeros(2, "int64")))
    assert not ON_STANDIN or done["launches"] == 0


@pytest.mark.gpu
def test_a_kernel_wrapper_passes_an_array_where_its_launch_reads_nothing():
    """No kernel argument is None (CuPy 13 and 14 pass it differently): unused ones get an array."""
    from gpunet.backend import cuda_wrappers as kernels

    host = rng(1).standard_normal((70, 3)).astype("float32")
    dy = on("gpu", host)
    grad_bias = on("gpu", numpy.zeros(3, "float32"))
    dz = kernels.bias_act_backward(dy, None, None, None, grad_bias)  # no activation: z and y unread
    assert dz is dy
    assert_within(gn.to_numpy(grad_bias), host.sum(axis=0), sum_atol(host, 0), "grad_bias")
    assert kernels.bias_act_backward(dy, None, None, None) is dy  # no bias: the scratch stands in for it
    assert_within(gn.to_numpy(kernels.activation_backward(None, dy, dy, "tanh")), host * (1 - host * host),
                  elementwise_atol(numpy.abs(host) * (1 + host * host), 3), "tanh backward")  # 3 roundings


@pytest.mark.gpu
def test_the_gemm_choices_are_keyed_by_the_kernel_source_and_its_constants(monkeypatch):
    from gpunet.backend import cublaslt
    from gpunet.backend.cupy_ops import CupyOps
    from gpunet.backend.gemm_dispatch import source_hash

    version = CupyOps()._gemm_dispatch().key.split("|")[-1]
    flags = cuda_kernels.DEFINE_FLAGS  # (both GEMM families: gemm, and gemm16 in mixed precision)
    assert version == source_hash(cuda_kernels.source("gemm"), *flags, cuda_kernels.source("gemm16"), *flags,
                                  f"cublaslt={cublaslt.available()}")
    monkeypatch.setattr(cublaslt, "available", lambda flipped=not cublaslt.available(): flipped)
    assert CupyOps()._gemm_dispatch().key.split("|")[-1] != version  # measured afresh once nvmath comes or goes
    monkeypatch.undo()
    retiled = tuple(f"-DTILE_K={2 * cuda_kernels.TILE_K}" if f.startswith("-DTILE_K=") else f
                    for f in cuda_kernels.DEFINE_FLAGS)
    monkeypatch.setattr(cuda_kernels, "DEFINE_FLAGS", retiled)
    assert CupyOps()._gemm_dispatch().key.split("|")[-1] != version  # measured afresh for other tiles


def test_a_plain_product_backward_skips_the_epilogue_kernel(device):
    """No activation and no bias: dZ is dY, so no epilogue kernel runs (one product each for dW and dX)."""
    x, w, dy = (rng(i).standard_normal(s).astype("float32") for i, s in enumerate(((70, 33), (20, 33), (70, 20))))
    grad_w = numpy.zeros((20, 33), "float32")
    want_dx = REFERENCE.linear_act_backward(x, w, x @ w.T, None, dy, None, grad_w)
    got_w = on(device, numpy.zeros((20, 33), "float32"))
    with gpu_standin.counting() if device == "gpu" and ON_STANDIN else contextlib.nullcontext({}) as launched:
        got_dx = ops_for_device(device).linear_act_backward(*(on(device, a) for a in (x, w, x @ w.T)), None,
                                                            on(device, dy), None, got_w)
    dx_atol, dw_atol, _ = linear_backward_atol(x, w, dy, numpy.zeros_like(dy, dtype="float64"))
    assert_within(gn.to_numpy(got_dx), want_dx, dx_atol, "dx")
    assert_within(gn.to_numpy(got_w), grad_w, dw_atol, "dW")
    if launched:
        assert launched["raw_launches"] == 0 and launched["launches"] == 2, launched


@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh", "gelu", "gelu_tanh"])
def test_a_nan_passes_through_every_activation_as_on_the_cpu(device, activation):
    """A NaN must reach the loss on every device, or a GPU run diverges later than the CPU's."""
    x = numpy.array([[numpy.nan, -1.0, 2.0]], "float32")
    ops = ops_for_device(device)
    assert numpy.isnan(gn.to_numpy(ops.activation(activation, on(device, x)))[0, 0])
    fused = ops.linear(on(device, x), on(device, numpy.eye(3, dtype="float32")), on(device, numpy.zeros(3, "float32")),
                       activation)
    assert numpy.isnan(gn.to_numpy(fused)[0, 0])


@pytest.mark.gpu
def test_col2im_refuses_columns_of_the_wrong_shape():
    """Read through strides, columns of the wrong shape would run past their buffer: refused first."""
    cols = on("gpu", numpy.zeros((5, 9), "float32"))
    with pytest.raises(ValueError, match=r"col2im: columns of shape \(5, 9\) for an input of shape \(1, 1, 4, 4\); "
                                         r"expected \(4, 9\)"):
        ops_for_device("gpu").col2im(cols, (1, 1, 4, 4), (3, 3), (1, 1), (0, 0))
