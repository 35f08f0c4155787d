"""Sequence layers: float64 gradient checks (long sequences and the causal mask included) and
float32 parity with PyTorch's unrolled cells and torch.nn.MultiheadAttention, on every device."""
from __future__ import annotations

import numpy
import pytest
import torch

import gpunet as gn
from gpunet import layers as L
from tests.support.arrays import on, rng
from tests.support.gradcheck import check_layer, numeric_gradient
from tests.support.reference import assert_matches_torch
from tests.support.tolerance import assert_within, gamma, layer_atol

GRADCHECK_CASES = {
    "positional_embedding": (lambda: L.PositionalEmbedding(7, 6, std=0.5), (2, 5, 6)),
    "rnn": (lambda: L.RNN(3, 4), (2, 6, 3)),
    "rnn_long": (lambda: L.RNN(3, 4), (2, 50, 3)),
    "lstm": (lambda: L.LSTM(3, 5), (2, 6, 3)),
    "lstm_long": (lambda: L.LSTM(3, 4), (2, 60, 3)),
    "lstm_no_bias": (lambda: L.LSTM(3, 4, bias=False), (2, 5, 3)),
    "gru": (lambda: L.GRU(3, 5), (2, 6, 3)),
    "gru_long": (lambda: L.GRU(3, 4), (2, 50, 3)),
    "gru_no_bias": (lambda: L.GRU(3, 4, bias=False), (2, 5, 3)),
    "attention": (lambda: L.MultiHeadAttention(8, 2), (2, 5, 8)),
    "attention_causal": (lambda: L.MultiHeadAttention(8, 2, causal=True), (2, 5, 8)),
    "attention_causal_long": (lambda: L.MultiHeadAttention(4, 2, causal=True), (1, 52, 4)),
    "transformer_block": (lambda: L.TransformerBlock(8, 2, mlp_ratio=2, dropout=0.2), (2, 5, 8)),
}


@pytest.mark.parametrize("case", sorted(GRADCHECK_CASES))
def test_gradients_match_finite_differences(case):
    make, shape = GRADCHECK_CASES[case]
    check_layer(make(), rng(3).standard_normal(shape))


def test_embedding_gradient_with_repeated_ids():
    ids = numpy.array([[1, 4, 1], [0, 4, 4]])
    check_layer(L.Embedding(6, 3), ids, input_grad=False)


@pytest.mark.parametrize("make", [lambda: gn.models.char_rnn(7, 4, 5, cell="gru"),
                                  lambda: gn.models.transformer(7, context=6, d_model=8, num_heads=2, dropout=0.1)],
                         ids=["char_rnn", "transformer"])
def test_model_gradients_match_finite_differences(make):
    check_layer(make(), rng(1).integers(0, 7, (2, 6)), input_grad=False, count=8)


@pytest.mark.parametrize("cls", [L.RNN, L.LSTM, L.GRU])
def test_initial_state_gradient_matches_finite_differences(cls):
    layer = cls(3, 4).to(dtype="float64")
    x = rng(1).standard_normal((2, 7, 3))
    parts = [rng(2 + i).standard_normal((2, 4)) for i in range(2 if cls is L.LSTM else 1)]
    state = tuple(parts) if cls is L.LSTM else parts[0]
    dy = rng(5).standard_normal((2, 7, 4))

    def objective():
        return float((layer.forward(x, state) * dy).sum())

    objective()
    layer.backward(dy)
    analytic = layer.state_grad if cls is L.LSTM else (layer.state_grad,)
    for part, grad in zip(parts, analytic):
        idx = [(0, 0), (1, 3), (0, 2)]
        # float64 central differences (eps 1e-6): within 1e-10 relative here, see tests/support/gradcheck.py
        numpy.testing.assert_allclose([grad[i] for i in idx], numeric_gradient(objective, part, idx), rtol=1e-6)


def test_causal_attention_ignores_the_future():
    layer = L.MultiHeadAttention(8, 2, causal=True)
    x = rng().standard_normal((2, 9, 8)).astype("float32")
    later = x.copy()
    later[:, 5:] = rng(1).standard_normal((2, 4, 8))
    numpy.testing.assert_array_equal(layer.forward(x)[:, :5], layer.forward(later)[:, :5])


def test_attention_is_stable_for_huge_scores():
    layer = L.MultiHeadAttention(4, 1, causal=True)
    layer.params["in_proj_weight"][...] *= 1e4
    y = layer.forward(rng().standard_normal((1, 6, 4)).astype("float32"))
    assert numpy.isfinite(y).all()


# ------------------------------------------------------------------ parity with PyTorch (float32)

TORCH_CELLS = {L.RNN: torch.nn.RNNCell, L.LSTM: torch.nn.LSTMCell, L.GRU: torch.nn.GRUCell}


def unrolled(cell, x, state):
    """torch cells stepped over time: (B, T, F) -> outputs (B, T, H) and the final state."""
    outputs = []
    for t in range(x.shape[1]):
        state = cell(x[:, t], state)
        outputs.append(state[0] if isinstance(state, tuple) else state)
    return torch.stack(outputs, 1), state


@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "given_state"])
@pytest.mark.parametrize("cls", [L.RNN, L.LSTM, L.GRU], ids=["rnn", "lstm", "gru"])
def test_recurrent_layers_match_torch_cells(device, cls, with_state):
    b, t, f, h = 3, 11, 5, 7
    layer = cls(f, h).to(device)
    cell = TORCH_CELLS[cls](f, h)
    cell.load_state_dict({k: torch.from_numpy(gn.to_numpy(v)) for k, v in layer.params.items()})
    x = rng(1).standard_normal((b, t, f)).astype("float32")
    parts = [rng(2 + i).standard_normal((b, h)).astype("float32") for i in range(2 if cls is L.LSTM else 1)]
    t_parts = [torch.from_numpy(p).requires_grad_(True) for p in parts]
    t_state = (tuple(t_parts) if cls is L.LSTM else t_parts[0]) if with_state else None
    state = (tuple(on(device, p) for p in parts) if cls is L.LSTM else on(device, parts[0])) if with_state else None

    tx = torch.from_numpy(x).requires_grad_(True)
    ty, t_final = unrolled(cell, tx, t_state)
    dy = rng(4).standard_normal(ty.shape).astype("float32")
    ty.backward(torch.from_numpy(dy))
    y = layer.forward(on(device, x), state)
    dx = layer.backward(on(device, dy))

    assert_matches_torch(y, dx, layer.grads, ty, tx, cell, layer=layer, input_shape=x.shape)
    finals = layer.final_state if cls is L.LSTM else (layer.final_state,)
    t_finals = t_final if cls is L.LSTM else (t_final,)
    for ours, theirs in zip(finals, t_finals):
        want = theirs.detach().numpy()
        assert_within(gn.to_numpy(ours), want, layer_atol(layer, x.shape, want), "final state")
    if with_state:
        grads = layer.state_grad if cls is L.LSTM else (layer.state_grad,)
        for ours, theirs in zip(grads, t_parts):
            want = theirs.grad.numpy()
            assert_within(gn.to_numpy(ours), want, layer_atol(layer, x.shape, want), "initial state's gradient")


def test_lstm_weights_move_to_and_from_torch_nn_lstm():
    layer = L.LSTM(4, 6)
    module = torch.nn.LSTM(4, 6, batch_first=True)
    module.load_state_dict({f"{k}_l0": torch.from_numpy(v) for k, v in layer.params.items()})
    x = rng().standard_normal((2, 5, 4)).astype("float32")
    want = module(torch.from_numpy(x))[0].detach().numpy()
    assert_within(layer.forward(x), want, layer_atol(layer, x.shape, want), "output")
    back = L.LSTM(4, 6).load_state_dict({k[:-3]: v for k, v in module.state_dict().items()})
    numpy.testing.assert_array_equal(back.forward(x), layer.forward(x))


def test_embedding_matches_torch(device):
    layer = L.Embedding(11, 5).to(device)
    module = torch.nn.Embedding(11, 5)
    module.load_state_dict({"weight": torch.from_numpy(gn.to_numpy(layer.params["weight"]))})
    ids = rng().integers(0, 11, (4, 6))
    ty = module(torch.from_numpy(ids))
    dy = rng(1).standard_normal(ty.shape).astype("float32")
    ty.backward(torch.from_numpy(dy))
    y = layer.forward(on(device, ids))
    layer.backward(on(device, dy))
    numpy.testing.assert_array_equal(gn.to_numpy(y), ty.detach().numpy())
    abs_sums = numpy.zeros((11, 5))  # each row a sum of the dy rows of its id, in any order: 2 gamma_n of |dy|'s sums
    numpy.add.at(abs_sums, ids.ravel(), numpy.abs(dy.reshape(-1, 5)))
    assert_within(gn.to_numpy(layer.grads["weight"]), module.weight.grad.numpy(), 2 * gamma(ids.size) * abs_sums,
                  "weight gradient")


def test_embedding_rejects_bad_ids():
    layer = L.Embedding(5, 3)
    with pytest.raises(ValueError, match=r"Embedding\(num_embeddings=5.*id 5 is out of range \[0, 5\)"):
        layer.forward(numpy.array([[0, 5]]))
    with pytest.raises(TypeError, match="expected integer ids, got float32"):
        layer.forward(numpy.zeros((1, 2), dtype="float32"))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_attention_matches_torch_multihead_attention(device, causal):
    b, t, d, heads = 3, 13, 16, 4
    layer = L.MultiHeadAttention(d, heads, causal=causal).to(device)
    module = torch.nn.MultiheadAttention(d, heads, batch_first=True)
    module.load_state_dict({k: torch.from_numpy(gn.to_numpy(v)) for k, v in layer.params.items()})
    mask = torch.triu(torch.ones(t, t, dtype=torch.bool), 1) if causal else None
    x = rng(1).standard_normal((b, t, d)).astype("float32")
    tx = torch.from_numpy(x).requires_grad_(True)
    ty = module(tx, tx, tx, attn_mask=mask, need_weights=False)[0]
    dy = rng(2).standard_normal(ty.shape).astype("float32")
    ty.backward(torch.from_numpy(dy))
    y = layer.forward(on(device, x))
    dx = layer.backward(on(device, dy))
    assert_matches_torch(y, dx, layer.grads, ty, tx, module, layer=layer, input_shape=x.shape)


def test_attention_checks_its_input():
    with pytest.raises(ValueError, match="d_model 10 must be a positive multiple of num_heads 4"):
        L.MultiHeadAttention(10, 4)
    with pytest.raises(ValueError, match=r"expected input of shape \(B, T, d_model\)"):
        L.MultiHeadAttention(8, 2).forward(numpy.zeros((3, 8), dtype="float32"))


def test_transformer_block_matches_torch(device):
    from gpunet.benchmarks.twins import torch_twin
    block = L.TransformerBlock(16, 4).to(device)
    twin = torch_twin(gn.Sequential(block.to("cpu")))
    block.to(device)
    x = rng(1).standard_normal((2, 9, 16)).astype("float32")
    tx = torch.from_numpy(x).requires_grad_(True)
    ty = twin(tx)
    dy = rng(2).standard_normal(ty.shape).astype("float32")
    ty.backward(torch.from_numpy(dy))
    y = block.forward(on(device, x))
    dx = block.backward(on(device, dy))
    assert_matches_torch(y, dx, block.grads, ty, tx, twin, layer=block, input_shape=x.shape, strip=len("0."))
