"""The math of the sequence layers' ops (recurrent cells, attention softmax, embedding
gradients), as functions of the array module `xp` (numpy or cupy).

Ops exposes each as a method of the same name and arguments (less xp), which a backend may
override with a fused kernel; these functions are the reference every backend falls back to.
Recurrent cells work on one time step of a batch, (B, G*H) gate blocks in PyTorch's order;
`out=` buffers are written in place so a layer can keep all time steps in one preallocated
array for backpropagation through time.
"""
from __future__ import annotations

import math


# ---------------------------------------------------------------- LSTM
def lstm_cell(xp, x_gates, h_gates, c_prev, acts_out, h_out, c_out, tanh_c_out):
    """One LSTM step from the pre-activation gates x_gates + h_gates (B, 4H), in the order
    i, f, g, o of torch.nn.LSTMCell. acts_out receives the activated gates (for backward)."""
    xp.add(x_gates, h_gates, out=acts_out)
    v = acts_out.reshape(acts_out.shape[0], 4, -1)
    # sigmoid(x) = (1 + tanh(x / 2)) / 2: one tanh pass covers all four gates
    v[:, :2] *= 0.5
    v[:, 3] *= 0.5
    xp.tanh(acts_out, out=acts_out)
    for block in (v[:, :2], v[:, 3]):
        block *= 0.5
        block += 0.5
    i, f, g, o = v[:, 0], v[:, 1], v[:, 2], v[:, 3]
    xp.multiply(f, c_prev, out=c_out)
    c_out += i * g
    xp.tanh(c_out, out=tanh_c_out)
    xp.multiply(o, tanh_c_out, out=h_out)


def lstm_cell_backward(xp, dh, dc, acts, c_prev, tanh_c, dgates_out):
    """Writes the pre-activation gradient (B, 4H) from dh and dc (w.r.t. the step's h and c);
    dc is overwritten with the gradient w.r.t. c_prev."""
    v = acts.reshape(acts.shape[0], 4, -1)
    d = dgates_out.reshape(v.shape)
    i, f, g, o = v[:, 0], v[:, 1], v[:, 2], v[:, 3]
    dc += dh * o * (1 - tanh_c * tanh_c)
    xp.multiply(dh * tanh_c, o * (1 - o), out=d[:, 3])
    xp.multiply(dc * g, i * (1 - i), out=d[:, 0])
    xp.multiply(dc * c_prev, f * (1 - f), out=d[:, 1])
    xp.multiply(dc * i, 1 - g * g, out=d[:, 2])
    dc *= f


# ---------------------------------------------------------------- GRU
def gru_cell(xp, gi, gh, h_prev, h_out):
    """One GRU step, torch.nn.GRUCell: gi = W_ih x + b_ih and gh = W_hh h + b_hh, (B, 3H) in
    order r, z, n. gi is overwritten with the activated gates r, z, n."""
    v = gi.reshape(gi.shape[0], 3, -1)
    w = gh.reshape(v.shape)
    v[:, :2] += w[:, :2]
    v[:, :2] *= 0.5
    xp.tanh(v[:, :2], out=v[:, :2])
    v[:, :2] *= 0.5
    v[:, :2] += 0.5
    r, z, n = v[:, 0], v[:, 1], v[:, 2]
    n += r * w[:, 2]
    xp.tanh(n, out=n)
    xp.subtract(h_prev, n, out=h_out)  # h = n + z (h_prev - n) = (1 - z) n + z h_prev
    h_out *= z
    h_out += n


def gru_cell_backward(xp, dh, acts, gh, h_prev, dgi_out, dgh_out):
    """Writes the gradients of gi and gh (B, 3H) from dh; returns the part of the gradient
    w.r.t. h_prev that does not pass through W_hh (dh * z)."""
    v = acts.reshape(acts.shape[0], 3, -1)
    r, z, n = v[:, 0], v[:, 1], v[:, 2]
    di, dg = dgi_out.reshape(v.shape), dgh_out.reshape(v.shape)
    dn = dh * (1 - z) * (1 - n * n)
    di[:, 2] = dn
    xp.multiply(dn, r, out=dg[:, 2])
    xp.multiply(dn * gh.reshape(v.shape)[:, 2], r * (1 - r), out=di[:, 0])
    xp.multiply(dh * (h_prev - n), z * (1 - z), out=di[:, 1])
    dg[:, :2] = di[:, :2]
    return dh * z


# ---------------------------------------------------------------- attention
def attention_softmax(xp, scores, scale, causal):
    """softmax(scale * scores) over the last axis, in place, for (..., T, T) scores; with
    causal, query t sees keys 0..t only (masked entries come out exactly 0)."""
    scores *= scale
    if causal:
        t = scores.shape[-1]
        scores += xp.triu(xp.full((t, t), -xp.inf, dtype=scores.dtype), 1)
    scores -= scores.max(axis=-1, keepdims=True)
    xp.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    return scores


def attention_softmax_backward(xp, probs, dprobs, scale):
    """Gradient w.r.t. the unscaled scores, written over dprobs; masked entries give 0."""
    dprobs -= (dprobs * probs).sum(axis=-1, keepdims=True)
    dprobs *= probs
    dprobs *= scale
    return dprobs


def attention(xp, qkv, kept, causal, softmax, operands):
    """Multi-head scaled dot-product attention of qkv (B, T, 3, H, Dh), the input projection's
    output as it comes: (mixed (B, T, H, Dh), state), state for attention_backward. Heads and
    batch rows go through batched matmuls on strided views of qkv and of the output (each matrix
    has unit-stride rows, which BLAS reads and writes in place: no transposing copies).
    softmax(scores, scale, causal): the backend's attention_softmax (a kernel, or the one above);
    operands(*arrays): the backend's gemm_operands, the products' operands in the running precision
    (rounded to 16 bits in mixed precision: q, k and v once, the probabilities before they weigh v).
    kept: what the state keeps of qkv, qkv itself or (mixed precision) its 16-bit copy, whose values
    are the rounded q, k and v (operands turns it into them, exactly)."""
    q, k, v = operands(kept)[0].transpose(2, 0, 3, 1, 4)  # views, each (B, H, T, Dh)
    scale = 1.0 / math.sqrt(qkv.shape[-1])
    scores = xp.matmul(q, k.swapaxes(-1, -2))
    probs = softmax(scores, scale, causal)
    b, t, _, h, dh = qkv.shape
    mixed = xp.empty((b, t, h, dh), dtype=probs.dtype)
    xp.matmul(operands(probs)[0], v, out=mixed.transpose(0, 2, 1, 3))
    # (q, k, v): views of qkv, free; of a 16-bit copy they would keep its float32 values alive
    return mixed, (kept, probs, (q, k, v) if kept is qkv else ())


def attention_backward(xp, dmixed, state, softmax_backward, operands):
    """dqkv (B, T, 3, H, Dh) from the gradient of attention's output, dmixed (B, T, H, Dh);
    softmax_backward(probs, dprobs, scale) as attention's softmax; operands as attention's: every
    product's operands rounded in mixed precision, the softmax's backward on the float32 probabilities."""
    kept, probs, views = state
    q, k, v = views or operands(kept)[0].transpose(2, 0, 3, 1, 4)
    scale = 1.0 / math.sqrt(kept.shape[-1])
    dmixed = dmixed.transpose(0, 2, 1, 3)  # a view: (B, H, T, Dh)
    dqkv = xp.empty(kept.shape, dtype=dmixed.dtype)
    dq, dk, dv = dqkv.transpose(2, 0, 3, 1, 4)  # views, written by the matmuls
    probs_r, dmixed = operands(probs, dmixed)
    xp.matmul(probs_r.swapaxes(-1, -2), dmixed, out=dv)
    dprobs = xp.matmul(dmixed, v.swapaxes(-1, -2))
    dscores = operands(softmax_backward(probs, dprobs, scale))[0]
    xp.matmul(dscores, k, out=dq)
    xp.matmul(dscores.swapaxes(-1, -2), q, out=dk)
    return dqkv


# ---------------------------------------------------------------- embeddings
def embedding_backward(xp, ids, dy, grad_weight):
    """grad_weight = sum of dy rows per id (a scatter-add), written in place."""
    grad_weight[...] = 0
    xp.add.at(grad_weight, ids.reshape(-1), dy.reshape(-1, grad_weight.shape[1]))


def embed(ids, weight, position):
    """weight[ids], plus position[t] at position t of (B, T) ids when position is given."""
    y = weight[ids]
    if position is not None:
        y += position[: ids.shape[1]]
    return y


def position_backward(dy, grad_position):
    """grad_position (P, D) = dy (B, T, D) summed over its rows, zero past T, in place."""
    t = dy.shape[1]
    if t < grad_position.shape[0]:  # (a launch even when empty, on a GPU)
        grad_position[t:] = 0
    dy.sum(axis=0, out=grad_position[:t])
