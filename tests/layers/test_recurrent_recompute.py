"""The LSTM in mixed precision keeps only its 16-bit input and states h (and a given initial c) for the backward,
which re-runs the steps from them to get the cell's float32 gates, c and tanh(c) again (LSTM.recompute_cell;
docs/precision.md). The recompute is the forward's ops on the forward's values, so every result is bit for bit
that of the same layer keeping the cell's arrays (recompute_cell = False, what fp32 does): the output, the final
state, dx, every parameter gradient and the initial state's gradient; through the fused Embedding -> LSTM, stacked
layers, a layer shared by two calls (its records), a state handed on from call to call, a backward run outside
the forward's precision context, gradient accumulation and a CUDA graph's replays (the stand-in)."""
from __future__ import annotations

import contextlib

import numpy
import pytest

import gpunet as gn
from gpunet import layers as L
from gpunet.backend import precision
from gpunet.summary import saved_bytes
from tests.support.arrays import on, rng

KINDS = ["bf16", "fp16"]


def f32(*shape, seed=0):
    return rng(seed).standard_normal(shape).astype("float32")


def shared_model():
    a, b = gn.Input((5, 4)), gn.Input((5, 4))
    lstm = L.LSTM(4, 6)
    return gn.Model([a, b], L.Dense(6, 3)(L.Add()([lstm(a), lstm(b)])))


CASES = {  # make, input, state given (h, c), calls (the state handed on from each to the next)
    "lstm": (lambda: L.LSTM(5, 7), lambda: f32(3, 6, 5, seed=1), False, 1),
    "given_state_twice": (lambda: L.LSTM(5, 7), lambda: f32(3, 6, 5, seed=2), True, 2),
    "one_step": (lambda: L.LSTM(3, 4), lambda: f32(2, 1, 3, seed=3), True, 1),
    "embedding_lstm_fused": (lambda: gn.Sequential(L.Embedding(6, 5), L.LSTM(5, 7), L.Dense(7, 6)),
                             lambda: rng(4).integers(0, 6, (3, 8)), False, 1),
    "embedding_lstm_unfused": (lambda: gn.Sequential(L.Embedding(40, 5), L.LSTM(5, 7)),
                               lambda: rng(5).integers(0, 40, (2, 4)), False, 1),
    "stacked": (lambda: gn.models.char_rnn(12, embedding_dim=5, hidden_size=7, num_layers=2),
                lambda: rng(6).integers(0, 12, (4, 9)), False, 1),
    "shared": (shared_model, lambda: [f32(2, 5, 4, seed=7), f32(2, 5, 4, seed=8)], False, 1),
}


def lstms(model):
    return [layer for layer in model._subtree() if isinstance(layer, L.LSTM)]


def step(name, device, kind, recompute, backward_outside=False):
    make, inputs, with_state, calls = CASES[name]
    gn.manual_seed(3)
    model = make().to(device)
    for layer in lstms(model):
        layer.recompute_cell = recompute
    x = inputs()
    x = [on(device, a) for a in x] if isinstance(x, list) else on(device, x)
    state = (on(device, f32(x.shape[0], 7 if name != "one_step" else 4, seed=9)),
             on(device, f32(x.shape[0], 7 if name != "one_step" else 4, seed=10))) if with_state else None
    with precision.using(kind):
        for _ in range(calls):
            y = model.forward(x) if state is None else model.forward(x, state)
            state = state and model.final_state
        kept = [sorted(vars(layer._saved)) for layer in lstms(model) if not getattr(layer._saved, "absorbed", False)]
    dy = on(device, f32(*y.shape, seed=11))
    with contextlib.nullcontext() if backward_outside else precision.using(kind):
        dx = model.backward(dy)
    found = [y, *(dx if isinstance(dx, list) else [dx]), *model.grads.values()]
    for layer in lstms(model):
        found += [*layer.final_state, *(layer.state_grad or ())]
    return [None if a is None else gn.to_numpy(a).copy() for a in found], kept


def same_bits(a, b) -> bool:
    return len(a) == len(b) and all((p is None and q is None) or (p.dtype == q.dtype and p.tobytes() == q.tobytes())
                                    for p, q in zip(a, b))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_the_recomputed_cell_gives_every_result_bit_for_bit(device, name, kind):
    want, kept_cell = step(name, device, kind, recompute=False)
    got, kept = step(name, device, kind, recompute=True)
    assert same_bits(got, want), name
    assert all("gates" in k and "cs" in k and "tanh_c" in k for k in kept_cell)  # (the absorbed layer: its Embedding's)
    assert all("gates" not in k and "cs" not in k and "tanh_c" not in k for k in kept), kept


@pytest.mark.parametrize("name", ["given_state_twice", "embedding_lstm_fused"])
def test_a_backward_outside_the_precision_context_recomputes_in_the_forwards_precision(device, name):
    """The recompute runs in the precision the forward ran in, whatever the backward's context."""
    want, _ = step(name, device, "bf16", recompute=False, backward_outside=True)
    got, _ = step(name, device, "bf16", recompute=True, backward_outside=True)
    assert same_bits(got, want)


def test_fp32_keeps_the_cell_and_mixed_precision_only_its_16bit_input_and_states(device):
    """The bytes the layer keeps: fp32 its input, h, c (T + 1 each), the gates (4H) and tanh(c) in float32; bf16 and
    fp16 the input and h in 16 bits, and the initial c (float32) when one is given."""
    b, t, f, h = 3, 6, 5, 7
    layer = L.LSTM(f, h).to(device)
    x = on(device, f32(b, t, f))
    layer.forward(x)
    assert saved_bytes(layer) == 4 * (t * b * f + (t + 1) * b * h * 2 + t * b * 4 * h + t * b * h)
    for kind in KINDS:
        with precision.using(kind):
            layer.forward(x)
            assert saved_bytes(layer) == 2 * (t * b * f + (t + 1) * b * h)
            layer.forward(x, (on(device, f32(b, h, seed=1)), on(device, f32(b, h, seed=2))))
            assert saved_bytes(layer) == 2 * (t * b * f + (t + 1) * b * h) + 4 * b * h


FITS = [(1, False), (2, False), pytest.param(1, True, marks=pytest.mark.gpu)]


@pytest.mark.parametrize("accumulate, cuda_graph", FITS, ids=["plain", "accumulate2", "cuda_graph"])
def test_fit_in_mixed_precision_trains_as_with_the_cell_kept(monkeypatch, accumulate, cuda_graph):
    """gn.fit(precision="bf16"): three steps, the parameters after them bit for bit those of the layer that keeps its
    cell (eager); accumulated over two batches a step, or captured in a CUDA graph and replayed (the stand-in)."""
    device = "gpu" if cuda_graph else "cpu"
    ids = rng(12).integers(0, 12, (32, 7))

    def fit(recompute, graph):
        monkeypatch.setattr(L.LSTM, "recompute_cell", recompute)
        gn.manual_seed(9)
        model = gn.models.char_rnn(12, embedding_dim=4, hidden_size=8).to(device)
        said: list = []
        gn.fit(model, (ids[:, :-1], ids[:, 1:]), optimizer=gn.optim.Adam(model, lr=1e-2), steps=3, batch_size=8,
               progress=False, precision="bf16", accumulate=accumulate, cuda_graph=graph, log=said.append)
        assert not any("cuda graph: off" in line for line in said), said
        return [gn.to_numpy(p).copy() for p in model.params.values()]

    assert same_bits(fit(True, cuda_graph), fit(False, False))
