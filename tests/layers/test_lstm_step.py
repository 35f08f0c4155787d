"""The LSTM's time step as one op (Ops.lstm_step and lstm_step_backward), which a GPU runs as one
fused launch each way: the GPU layer against the CPU layer, forward and backward, for sizes
that are no multiple of the kernels' block, a single step, more hidden units than a block has
threads, and a state passed in and on from one call to the next; and the launch count per step."""
from __future__ import annotations

import numpy
import pytest

import gpunet as gn
from gpunet import layers as L
from gpunet.backend import ops_for_device
from gpunet.backend.cuda_kernels import THREADS
from tests import gpu_standin
from tests.support.arrays import ON_STANDIN, on, rng
from tests.support.tolerance import assert_within, layer_atol

SHAPES = {"H37_B3": (3, 5, 4, 37), "T1": (2, 1, 3, 5), "H_over_a_block": (2, 3, 4, THREADS + 44)}  # B, T, F, H


def twins(f, h):
    cpu = L.LSTM(f, h)
    gpu = L.LSTM(f, h)
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu.to("gpu")


def run(layer, device, xs, dy, state):
    """Forward over each x in xs, then backward of the last. A given state is the first call's,
    and each call's final state the next one's; without, every call starts from zeros."""
    for x in xs:
        y = layer.forward(on(device, x), state and tuple(on(device, gn.to_numpy(p)) for p in state))
        state = state and layer.final_state
    dx = layer.backward(on(device, dy))
    return [gn.to_numpy(a) for a in (y, dx, *layer.final_state, *layer.grads.values(), *(layer.state_grad or ()))]


@pytest.mark.gpu
@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "given_state"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_gpu_lstm_matches_the_cpu(shape, with_state):
    b, t, f, h = SHAPES[shape]
    cpu, gpu = twins(f, h)
    r = rng(7)
    xs = [r.standard_normal((b, t, f)).astype("float32") for _ in range(2)]
    dy = r.standard_normal((b, t, h)).astype("float32")
    state = tuple(r.standard_normal((b, h)).astype("float32") for _ in range(2)) if with_state else None
    want, got = run(cpu, "cpu", xs, dy, state), run(gpu, "gpu", xs, dy, state)
    assert len(got) == len(want) == 2 + 2 + 4 + (2 if with_state else 0)  # y, dx, (h, c), 4 grads, state grads
    # the state runs through both calls (with_state): the bound of one call over 2 t steps
    for ours, reference, what in zip(got, want, ("y", "dx", "h", "c", *cpu.grads, "h0 grad", "c0 grad")):
        assert_within(ours, reference, layer_atol(cpu, (b, 2 * t, f), reference), what)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_STANDIN, reason="counts launches on the CuPy stand-in")
def test_one_launch_per_time_step_each_way(monkeypatch):
    """A step more costs one forward and one backward launch, whatever the state (the recurrent
    product is fused with the cell). The input projection's GEMM is pinned to cuBLAS: measured
    dispatch may pick another path (another launch count) for another number of rows."""
    monkeypatch.setattr(ops_for_device("gpu"), "gemm_mode", "cublas")
    _, layer = twins(3, 7)

    def launches(t, with_state):
        x, dy = (on("gpu", rng(i).standard_normal(s).astype("float32")) for i, s in enumerate([(2, t, 3), (2, t, 7)]))
        state = tuple(on("gpu", numpy.zeros((2, 7), "float32")) for _ in range(2)) if with_state else None
        layer.forward(x, state), layer.backward(dy)  # warm: the work buffers
        with gpu_standin.counting() as counts:
            layer.forward(x, state)
            layer.backward(dy)
        return counts["launches"]

    for with_state in (False, True):
        assert launches(5, with_state) - launches(4, with_state) == 2
        assert launches(9, with_state) - launches(4, with_state) == 10
