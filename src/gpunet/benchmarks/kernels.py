"""Kernel-level and dispatch benchmarks of `gpunet bench`: each builds a Pair of gpunet and
PyTorch calls on the same data, plus the roofline call the rate is compared with."""
from __future__ import annotations

import numpy

import gpunet as gn
from gpunet.backend import ops_for_device, precision as precisions, to_device
from gpunet.benchmarks import steps
from gpunet.parity_bound import UNIT_16
from gpunet.benchmarks.twins import import_torch


def kernel_cases(case, pair, device: str, tiny: bool, precision: str = "fp32") -> list:
    """The kernel rows, in fp32; in bf16/fp16 also the Dense product in that precision (gemm16-*)."""
    gemm_sizes = (64,) if tiny else ((128, 512, 2048, 4096) if device == "cpu" else (128, 1024, 4096, 8192))
    xent = (64, 10) if tiny else ((4096, 1000) if device == "cpu" else (16384, 32000))
    conv = [(4, 2, 3, 8, 3, 1)] if tiny else [(64, 1, 6, 28, 5, 2), (64, 6, 16, 14, 5, 0), (32, 32, 64, 14, 3, 1)]
    out = []
    for n in gemm_sizes:
        out.append(case(f"gemm-{n}", "kernel", lambda n=n: _gemm(pair, device, n, epilogue=False)))
        out.append(case(f"gemm-bias-relu-{n}", "kernel", lambda n=n: _gemm(pair, device, n, epilogue=True)))
        if precision != "fp32":
            out.append(case(f"gemm16-bias-relu-{n}", "kernel", lambda n=n: _gemm16(pair, device, n, precision)))
    out.append(case(f"softmax-xent-{xent[0]}x{xent[1]}", "kernel", lambda: _softmax_xent(pair, device, *xent)))
    for shape in conv:
        b, c, o, s, k, p = shape
        out.append(case(f"conv2d-b{b}-c{c}-{o}-{s}px-k{k}", "kernel",
                        lambda shape=shape: pair(*steps.conv_steps(*shape, device=device))))
    unfold_shape = (4, 2, 6, 6) if tiny else (64, 6, 14, 14)
    n, c, h, _ = unfold_shape
    out.append(case(f"im2col-b{n}-c{c}-{h}px-k5", "kernel", lambda: _unfold(pair, device, unfold_shape)))
    out.append(case(f"col2im-b{n}-c{c}-{h}px-k5", "kernel", lambda: _fold(pair, device, unfold_shape)))
    out += [case("dispatch-add-1", "dispatch", lambda: _tiny_add(pair, device)),
            case("dispatch-matmul-64", "dispatch", lambda: _matmul64(pair, device)),
            case("dispatch-dense-64", "dispatch", lambda: _dense64(pair, device))]
    return out


def _arrays(device, *shapes, seed=0):
    """The same random float32 data as gpunet arrays on device and torch tensors on its twin."""
    torch = import_torch()
    r = numpy.random.default_rng(seed)
    host = [r.standard_normal(s).astype("float32") for s in shapes]
    ours = [to_device(h, device) for h in host]
    theirs = [torch.from_numpy(h).to(steps.torch_device(device)) for h in host]
    return ours, theirs


def _gemm(pair, device, n, epilogue):
    torch = import_torch()
    ops = ops_for_device(device)
    (a, b, bias), (ta, tb, tbias) = _arrays(device, (n, n), (n, n), (n,))
    out = ops.empty((n, n))
    plain = lambda: ops.xp.matmul(a, b.T, out=out)  # noqa: E731  the BLAS (cuBLAS) underneath
    if epilogue:
        ours = lambda: ops.linear(a, b, bias, "relu", out=out)  # noqa: E731
        theirs = lambda: torch.relu(torch.addmm(tbias, ta, tb.t()))  # noqa: E731
    else:
        ours = lambda: ops.matmul(a, b.T, out=out)  # noqa: E731
        theirs = lambda: torch.mm(ta, tb.t())  # noqa: E731
    return pair(ours, theirs, work=2.0 * n**3, unit="GFLOP/s", roofline=plain, check=_same_arrays)


def _gemm16(pair, device, n, precision):
    """A Dense product with a bias and ReLU in mixed precision: gpunet's linear in precision.using (on a GPU
    the GEMM dispatch's 16-bit path: gemm16, gemm16_tc, cublasGemmEx or cuBLAS on the rounded values)
    against torch.addmm under torch.autocast (cuBLAS's 16-bit GEMM on a GPU; its output is 16-bit, ours
    float32). The roofline is cuBLAS's float32 GEMM of the same size."""
    torch = import_torch()
    ops = ops_for_device(device)
    (a, b, bias), (ta, tb, tbias) = _arrays(device, (n, n), (n, n), (n,))
    out = ops.empty((n, n))
    dtype = getattr(torch, steps.AUTOCAST[precision])

    def ours():
        with precisions.using(precision):
            return ops.linear(a, b, bias, "relu", out=out)

    def theirs():
        with torch.autocast(steps.torch_device(device), dtype):
            return torch.relu(torch.addmm(tbias, ta, tb.t()))

    def check(got, want):  # torch rounds its output to 16 bits: within 2 units of that format, relative
        got, want = gn.to_numpy(got), want.detach().float().cpu().numpy()
        scale = max(1e-6, float(numpy.abs(want).max()))
        if got.shape != want.shape or float(numpy.abs(got - want).max()) > 2 * UNIT_16[precision] * scale:
            raise RuntimeError(f"gpunet and PyTorch disagree in {precision}: largest difference "
                               f"{float(numpy.abs(got - want).max()):.3g} of {scale:.3g}")
    return pair(ours, theirs, work=2.0 * n**3, unit="GFLOP/s", roofline=lambda: ops.xp.matmul(a, b.T, out=out),
                check=check, precision=precision)


def _softmax_xent(pair, device, rows, classes):
    """Forward and backward in one call: read the logits once, write the gradient once."""
    torch = import_torch()
    ops = ops_for_device(device)
    (logits,), (tlogits,) = _arrays(device, (rows, classes))
    labels_host = numpy.random.default_rng(1).integers(0, classes, rows)
    labels = to_device(labels_host, device)
    tlabels = torch.from_numpy(labels_host).to(steps.torch_device(device))
    tlogits.requires_grad_(True)
    copy_dst = ops.empty((rows, classes))

    def theirs():
        loss = torch.nn.functional.cross_entropy(tlogits, tlabels)
        return torch.autograd.grad(loss, tlogits)[0]
    return pair(lambda: ops.softmax_cross_entropy(logits, labels)[1], theirs, work=2.0 * 4 * rows * classes,
                unit="GB/s", roofline=lambda: ops.xp.copyto(copy_dst, logits), check=_same_arrays)


def _unfold(pair, device, shape):
    torch = import_torch()
    ops = ops_for_device(device)
    (x,), (tx,) = _arrays(device, shape)
    n, c, h, w = shape
    columns = ops.xp.empty((n * (h - 4) * (w - 4), c * 25), dtype="float32")

    def ours():
        columns[...] = ops.im2col(x, (5, 5), (1, 1), (0, 0))
        return columns

    def check(got, want):  # torch's unfold lays the same numbers out as (N, C*k*k, L)
        _same_arrays(gn.to_numpy(got).reshape(n, -1, c * 25).transpose(0, 2, 1), want)
    return pair(ours, lambda: torch.nn.functional.unfold(tx, 5), check=check)


def _fold(pair, device, shape):
    """col2im, the adjoint of im2col (torch.nn.functional.fold), from (N*L, C*25) columns."""
    torch = import_torch()
    ops = ops_for_device(device)
    n, c, h, w = shape
    length = (h - 4) * (w - 4)
    (cols,), (tcols,) = _arrays(device, (n * length, c * 25))
    tcols = tcols.reshape(n, length, c * 25).transpose(1, 2).contiguous()  # torch's (N, C*k*k, L)
    return pair(lambda: ops.col2im(cols, shape, (5, 5), (1, 1), (0, 0)),
                lambda: torch.nn.functional.fold(tcols, (h, w), 5), check=_same_arrays)


def _tiny_add(pair, device):
    (a, b), (ta, tb) = _arrays(device, (1,), (1,))
    return pair(lambda: gn.backend.ops_for(a, b, op="add").xp.add(a, b), lambda: ta + tb, check=_same_arrays)


def _matmul64(pair, device):
    (a, b), (ta, tb) = _arrays(device, (64, 64), (64, 64))
    return pair(lambda: gn.backend.ops_for(a, b, op="matmul").matmul(a, b), lambda: ta @ tb, check=_same_arrays)


def _dense64(pair, device):
    torch = import_torch()
    gn.manual_seed(0)
    layer = gn.layers.Dense(64, 64).to(device)
    twin = torch.nn.Linear(64, 64).to(steps.torch_device(device))
    twin.load_state_dict({k: torch.from_numpy(gn.to_numpy(v)) for k, v in layer.params.items()})
    (x,), (tx,) = _arrays(device, (64, 64))
    return pair(lambda: layer.forward(x), lambda: twin(tx), check=_same_arrays)


def _same_arrays(got, want):
    got = gn.to_numpy(got)
    want = want.detach().cpu().numpy()
    scale = max(1e-6, float(numpy.abs(want).max()))
    if got.shape != want.shape or not numpy.allclose(got, want, rtol=1e-3, atol=1e-4 * scale):
        raise RuntimeError(f"gpunet and PyTorch disagree (shapes {got.shape} and {want.shape}, largest difference "
                           f"{float(numpy.abs(got - want).max()) if got.shape == want.shape else 'n/a'})")
