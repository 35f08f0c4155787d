"""Recurrent layers over whole sequences, with backpropagation through time.

Batch-first (B, T, F) -> (B, T, H). The parameters are those of torch.nn.RNNCell, LSTMCell and
GRUCell: weight_ih (G*H, F), weight_hh (G*H, H), bias_ih and bias_hh (G*H,), gate blocks in
torch's order (LSTM i, f, g, o; GRU r, z, n), so weights move both ways (torch.nn.LSTM's
weight_ih_l0 etc. are the same arrays under other names).

The input projection of all time steps is one GEMM before the loop, and the weight gradients
one GEMM each after it (after an Embedding that absorbs the layer: one GEMM over the table's
rows, gathered per token, and the gates' gradient summed per id; see forward_embedded); only
h @ W_hh and the cell's pointwise work run per step, on time-major buffers whose per-step slices
are contiguous. The LSTM's step is one op
(Ops.lstm_step and its backward), which a GPU runs as one launch: product and cell fused.
GRU and RNN keep a product and a cell launch per step.

In mixed precision (docs/precision.md) every product's operands are rounded to the 16-bit format:
the input projection's and the weight gradients' inside the ops, the per-step ones here (W_hh once a
sequence, h or the gates' gradient each step), since Ops.matmul and lstm_step take operands as given.
The time-major input is kept in 16 bits (only W_ih's gradient reads it), and so are the LSTM's states
h (only W_hh's gradient reads them); the RNN's and GRU's h, which their cells' backwards read, and their
gates stay float32. The LSTM keeps no more than that: its backward first re-runs its steps from the kept
input and h (and the initial c), the same ops on the same values, so the cell's float32 gates, c and tanh(c)
come out bit for bit as the forward computed them (LSTM.recompute_cell; docs/precision.md).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from types import SimpleNamespace
from typing import NamedTuple

from gpunet import init as initialisers
from gpunet.backend import Array, ops_for, precision
from gpunet.layers.base import Layer, register
from gpunet.layers.checks import check_float_input, check_last_dim, check_ndim


class EmbeddedIds(NamedTuple):
    """A recurrent layer's input given as ids into an embedding table (Embedding absorbing it)."""

    ids: Array  # (T, B), time-major
    weight: Array  # the table, (num_embeddings, input_size)


class _Recurrent(Layer):
    """The sequence loop shared by the cells. A cell supplies _forward(ops, xs, hs, state), which
    runs the steps and returns the arrays its backward reads (saved with xs and hs; xs is the
    time-major input, or EmbeddedIds, which _input_projection reads either way), and
    _backward_steps(ops, saved, dys) -> (dgates_ih, dgates_hh), time-major. state holds the
    initial state's parts, arrays or 0 for zeros, for the cell to write into its buffers at step 0."""

    _forward: Callable[..., dict]  # each cell's
    blocks = 1  # gate blocks of size H in the weights
    state_parts = 1  # h, or (h, c) for the LSTM
    h_kept_in_16bit = False  # whether only products read the states h in backward (the LSTM's): 16 bits then

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True):
        if input_size < 1 or hidden_size < 1:
            raise ValueError(f"{type(self).__name__}: sizes must be positive, got {input_size}, {hidden_size}")
        super().__init__(input_size=input_size, hidden_size=hidden_size, bias=bias)
        bound = 1.0 / math.sqrt(hidden_size)  # torch's RNN initialisation, every parameter
        gates = self.blocks * hidden_size
        shapes: dict[str, tuple[int, ...]] = {"weight_ih": (gates, input_size), "weight_hh": (gates, hidden_size)}
        if bias:
            shapes.update(bias_ih=(gates,), bias_hh=(gates,))
        for name, shape in shapes.items():
            self.add_param(name, initialisers.uniform(shape, bound))
        self.final_state = None  # state after the last step of the last forward
        self.state_grad = None  # gradient w.r.t. the initial state, after a backward with a given state
        self._work: dict = {}  # work arrays kept between calls (see _buffer); what backward reads is saved

    def describe(self) -> str:
        c = self.config
        return f"{type(self).__name__}({c['input_size']}, {c['hidden_size']}, bias={c['bias']})"

    def forward(self, x: Array, state: Array | tuple[Array, Array] | None = None) -> Array:
        """x (B, T, F) -> (B, T, H). state: the initial h (B, H), or (h, c) for the LSTM; zeros if None."""
        w = self.params["weight_ih"]
        check_ndim(self, x, (3,), "(B, T, input_size)")
        check_last_dim(self, x, w.shape[1])
        check_float_input(self, x, w.dtype)
        ops = ops_for(x, w, op=f"{type(self).__name__}.forward")
        b, t, f = x.shape
        if precision.current() == "fp32":
            xs = self._buffer(ops, "xs", (t, b, f), x.dtype)
            xs[...] = x.transpose(1, 0, 2)
        else:  # kept in 16 bits (by _run): the float32 copy is not kept between calls either
            xs = ops.xp.ascontiguousarray(x.transpose(1, 0, 2))
        return self._run(ops, xs, b, t, state)

    def takes_embedded(self, ids, weight) -> bool:
        """Whether forward_embedded(ids, weight) may stand for forward(embedding of ids) and pays:
        fewer rows in the embedding table than tokens in the batch."""
        w = self.params["weight_ih"]
        return (ids.ndim == 2 and weight.ndim == 2 and weight.shape[1] == w.shape[1] and weight.dtype == w.dtype
                and weight.shape[0] < ids.size)

    def forward_embedded(self, ids, weight) -> Array:
        """forward(weight[ids]) for ids (B, T) checked by the Embedding that owns weight. The input
        projection of each table row is computed once and gathered per token, which replaces the
        per-token GEMM; in backward the gates' gradient is summed per id first (backprop_embedded)."""
        ops = ops_for(ids, weight, self.params["weight_ih"], op=f"{type(self).__name__}.forward")
        b, t = ids.shape
        return self._run(ops, EmbeddedIds(ops.xp.ascontiguousarray(ids.T), weight), b, t, None)

    def _run(self, ops, inputs, b, t, state):
        """The steps over time-major inputs: xs (T, B, F), or EmbeddedIds."""
        dtype = self.params["weight_ih"].dtype
        shape = (t + 1, b, self.config["hidden_size"])
        if self.h_kept_in_16bit and precision.current() != "fp32":  # the cell keeps a 16-bit copy instead
            hs = ops.xp.empty(shape, dtype=dtype)
        else:
            hs = self._buffer(ops, "hs", shape, dtype)
        initial = self._initial_state(ops, state, b, dtype)
        # the inputs (not ids) only feed products (the input projection, W_ih's gradient): in mixed precision one
        # 16-bit copy for both, kept for the backward
        kept = inputs if isinstance(inputs, EmbeddedIds) else ops.store_16bit(inputs)
        cell = self._forward(ops, kept, hs, initial)  # the cell's own arrays for its backward (hs: may replace it)
        self.save_for_backward(**{"xs": kept, "hs": hs, "state_given": state is not None, **cell})
        return ops.xp.ascontiguousarray(hs[1:].transpose(1, 0, 2))

    def backprop(self, dy, saved, need_dx):
        return self._backprop(dy, saved, need_dx, None)

    def backprop_embedded(self, dy, saved, grad_embedding) -> None:
        """The backward of forward_embedded: the parameter gradients, and the embedding weight's
        gradient written into grad_embedding."""
        self._backprop(dy, saved, False, grad_embedding)

    def _backprop(self, dy, saved, need_dx, grad_embedding):
        ops = ops_for(dy, self.params["weight_hh"], op=f"{type(self).__name__}.backward")
        dgi, dgh = self._backward_steps(ops, saved, ops.xp.ascontiguousarray(dy.transpose(1, 0, 2)))
        return self._weight_grads(ops, saved, dgi, dgh, need_dx, grad_embedding)

    def _initial_state(self, ops, state, batch, dtype):
        shape = (batch, self.config["hidden_size"])
        if state is None:
            return (0,) * self.state_parts  # the cell writes it into its state buffers: one fill each
        parts = (state,) if self.state_parts == 1 else tuple(state)
        if len(parts) != self.state_parts or any(tuple(p.shape) != shape for p in parts):
            raise ValueError(f"{self.describe()}: initial state must be {self.state_parts} array(s) of shape {shape}")
        return tuple(p.astype(dtype) for p in parts)  # copies: the state may live in our own buffers

    def release_work_arrays(self) -> None:
        self._work = {}  # the record of the call that filled them keeps them; the next call takes new ones

    def _buffer(self, ops, name, shape, dtype):
        """A work array kept between calls: fresh memory for every step costs page faults."""
        array = self._work.get(name)
        if array is None or array.shape != shape or array.dtype != dtype or not isinstance(array, ops.xp.ndarray):
            array = self._work[name] = ops.xp.empty(shape, dtype=dtype)
        return array

    def _input_projection(self, ops, inputs, with_hidden_bias):
        """W_ih x_t + b_ih (+ b_hh) for every step at once: (T, B, G*H)."""
        bias = self.params.get("bias_ih")
        if bias is not None and with_hidden_bias:
            bias = bias + self.params["bias_hh"]
        if isinstance(inputs, EmbeddedIds):
            return ops.linear(inputs.weight, self.params["weight_ih"], bias)[inputs.ids]
        t, b, f = inputs.shape  # (float32, or the 16-bit copy an LSTM's backward re-runs its steps from)
        shape, dtype = (t * b, self.blocks * self.config["hidden_size"]), self.params["weight_ih"].dtype
        out = self._buffer(ops, "x_gates", shape, dtype)
        return ops.linear(inputs.reshape(t * b, f), self.params["weight_ih"], bias, out=out).reshape(t, b, -1)

    def _weight_grads(self, ops, saved, dgi, dgh, need_dx, grad_embedding):
        t, b = dgi.shape[:2]
        g, hidden = self.grads, self.config["hidden_size"]
        shared = dgi is dgh  # RNN and LSTM: both biases get the same gradient; sum it once
        embedded = isinstance(saved.xs, EmbeddedIds)
        ops.linear_backward(saved.hs[:-1].reshape(t * b, hidden), self.params["weight_hh"], dgh.reshape(t * b, -1),
                            g["weight_hh"], None if shared and embedded else g.get("bias_hh"), need_dx=False)
        if embedded:  # the gates' gradient summed per id gives the shared bias gradient too: 65 rows, not T * B
            dxs = None
            self._embedded_grads(ops, saved.xs, dgi, g.get("bias_hh" if shared else "bias_ih"), grad_embedding)
        else:
            f = saved.xs.shape[2]
            dxs = ops.linear_backward(saved.xs.reshape(t * b, f), self.params["weight_ih"], dgi.reshape(t * b, -1),
                                      g["weight_ih"], None if shared else g.get("bias_ih"), need_dx)
        if shared and "bias_ih" in g:
            g["bias_ih"][...] = g["bias_hh"]
        return None if dxs is None else dxs.reshape(t, b, f).transpose(1, 0, 2)

    def _embedded_grads(self, ops, inputs, dgi, grad_bias, grad_embedding):
        """W_ih's, the embedding's and (into grad_bias) b_ih's gradients from the gates' gradient
        summed per id: a row per table entry instead of one per token."""
        per_id = self._buffer(ops, "dgates_per_id", (inputs.weight.shape[0], dgi.shape[-1]), dgi.dtype)
        ops.embedding_backward(inputs.ids, dgi, per_id)
        if grad_bias is not None:
            ops.xp.sum(per_id, axis=0, out=grad_bias)  # (from the float32 sums, not their rounded copy)
        per_id, weight, w_ih = ops.gemm_operands(per_id, inputs.weight, self.params["weight_ih"])
        ops.matmul(per_id.T, weight, out=self.grads["weight_ih"])
        ops.matmul(per_id, w_ih, out=grad_embedding)

    def _recurrent_grad(self, ops, saved, dgates_t, t, w_hh):
        """dh_{t-1} through w_hh (W_hh as the caller rounded it), or None at t = 0 when nobody needs the
        initial state's gradient."""
        if t == 0 and not saved.state_given:
            return None
        return ops.matmul(ops.gemm_operands(dgates_t)[0], w_hh)

    def _step_operands(self, ops, transposed):
        """W_hh as the per-step products take it, rounded once a sequence (transposed: W_hh^T, contiguous)."""
        w = self.params["weight_hh"]
        return ops.gemm_operands(ops.xp.ascontiguousarray(w.T) if transposed else w)[0]


@register("RNN")
class RNN(_Recurrent):
    """Elman RNN: h_t = tanh(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)."""

    def _forward(self, ops, xs, hs, state):
        hs[0] = state[0]
        pre = self._input_projection(ops, xs, with_hidden_bias=True)
        w_hh_t = self._step_operands(ops, transposed=True)
        for t in range(len(hs) - 1):
            pre[t] += ops.matmul(ops.gemm_operands(hs[t])[0], w_hh_t)
            ops.activation("tanh", pre[t], out=hs[t + 1])
        self.final_state = hs[-1].copy()
        return {}

    def _backward_steps(self, ops, saved, dys):
        hs, dpre = saved.hs, self._buffer(ops, "dpre", dys.shape, dys.dtype)
        w_hh = self._step_operands(ops, transposed=False)
        dh = None
        for t in range(len(dys) - 1, -1, -1):
            dh_t = dys[t] if dh is None else dys[t] + dh
            dpre[t] = ops.activation_backward("tanh", None, hs[t + 1], dh_t)
            dh = self._recurrent_grad(ops, saved, dpre[t], t, w_hh)
        self.state_grad = dh
        return dpre, dpre


@register("LSTM")
class LSTM(_Recurrent):
    """Long short-term memory, gates i, f, g, o as torch.nn.LSTMCell; state (h, c).

    In fp32 the forward keeps the cell's activated gates, c and tanh(c) (float32) for the backward. In mixed
    precision it keeps only the 16-bit input and h, which the weight gradients read anyway (and the initial c,
    when given); the backward re-runs the steps from them, in the forward's precision, to get the cell's arrays
    again: the same ops on the same values, so bit for bit the forward's, at the cost of a second forward of the
    layer. recompute_cell = False keeps the cell's arrays in mixed precision too (tests compare the two)."""

    blocks = 4
    state_parts = 2
    h_kept_in_16bit = True
    recompute_cell = True

    def _forward(self, ops, xs, hs, state):
        keep = precision.current() == "fp32" or not self.recompute_cell
        if keep:  # the whole sequence's cell arrays, for the backward
            cs = self._buffer(ops, "cs", hs.shape, hs.dtype)
            tanh_c = self._buffer(ops, "tanh_c", hs[1:].shape, hs.dtype)
        else:  # only the current step's (c alternates between two buffers): the backward re-runs the steps
            c_pair = self._buffer(ops, "c_pair", (2, *hs.shape[1:]), hs.dtype)
            cs = _Ring(c_pair[0], c_pair[1])
            tanh_c = _Ring(self._buffer(ops, "tanh_c_step", hs.shape[1:], hs.dtype))
        hs[0], cs[0] = state
        x_gates = self._input_projection(ops, xs, with_hidden_bias=True)
        gates = (self._buffer(ops, "gates", x_gates.shape, x_gates.dtype) if keep  # activated
                 else _Ring(self._buffer(ops, "gates_step", x_gates.shape[1:], x_gates.dtype)))
        self._steps(ops, x_gates, lambda t: ops.gemm_operands(hs[t])[0], hs, cs, gates, tanh_c)
        self.final_state = (hs[-1].copy(), cs[len(hs) - 1].copy())
        # h feeds only products (W_hh's gradient): 16 bits in mixed precision (the cell's arrays: float32)
        if keep:
            return {"gates": gates, "cs": cs, "tanh_c": tanh_c, "hs": ops.store_16bit(hs)}
        return {"hs": ops.store_16bit(hs), "c0": state[1], "precision": precision.current()}

    def _steps(self, ops, x_gates, h_operand, hs, cs, gates, tanh_c):
        """The cell over the sequence from the input projection x_gates (T, B, 4H): step t multiplies
        h_operand(t) (h_t, rounded in mixed precision) by W_hh, reads cs[t] and writes gates[t], hs[t + 1],
        cs[t + 1] and tanh_c[t] (a sequence's buffers, or _Rings holding only the current step's)."""
        w_hh_t = self._step_operands(ops, transposed=True)
        for t in range(len(x_gates)):  # on a GPU one launch a step: h @ W_hh^T fused with the cell
            ops.lstm_step(x_gates[t], w_hh_t, h_operand(t), cs[t], gates[t], hs[t + 1], cs[t + 1], tanh_c[t])

    def _recomputed_cell(self, ops, saved):
        """The activated gates, c and tanh(c) of the forward that kept only saved.hs (16-bit), saved.xs and
        saved.c0: its steps again, in its precision, from the same operands (the rounded input and h_t)."""
        with precision.using(saved.precision):
            x_gates = self._input_projection(ops, saved.xs, with_hidden_bias=True)
            h = ops.gemm_operands(saved.hs)[0]  # each step's operand: the 16-bit h_t's values, all at once
            xp, dtype = ops.xp, x_gates.dtype
            cs = xp.empty(saved.hs.shape, dtype=dtype)
            cs[0] = saved.c0
            cell = SimpleNamespace(gates=xp.empty(x_gates.shape, dtype=dtype), cs=cs,
                                   tanh_c=xp.empty(cs[1:].shape, dtype=dtype))
            h_out = _Ring(xp.empty(cs.shape[1:], dtype=dtype))  # (h itself: kept)
            self._steps(ops, x_gates, h.__getitem__, h_out, cell.cs, cell.gates, cell.tanh_c)
        return cell

    def _backward_steps(self, ops, saved, dys):
        cell = saved if hasattr(saved, "gates") else self._recomputed_cell(ops, saved)
        dgates = self._buffer(ops, "dgates", cell.gates.shape, cell.gates.dtype)  # all steps': for the weights
        dc = self._buffer(ops, "dc", dys.shape[1:], dys.dtype)
        w_hh, last = self._step_operands(ops, transposed=False), len(dys) - 1
        for t in range(last, -1, -1):  # on a GPU one launch a step: dgates[t + 1] @ W_hh fused with the cell
            ops.lstm_step_backward(dys[t], None if t == last else ops.gemm_operands(dgates[t + 1])[0], w_hh, dc,
                                   cell.gates[t], cell.cs[t], cell.tanh_c[t], dgates[t])
        dh = self._recurrent_grad(ops, saved, dgates[0], 0, w_hh) if len(dys) else None
        self.state_grad = None if dh is None else (dh, dc.copy())  # dc is a work buffer
        return dgates, dgates


class _Ring:
    """Stands for a sequence's buffer of which a step needs only its own slices: [t] is arrays[t % len(arrays)]."""

    def __init__(self, *arrays):
        self.arrays = arrays

    def __getitem__(self, t):
        return self.arrays[t % len(self.arrays)]

    def __setitem__(self, t, value):
        self[t][...] = value


@register("GRU")
class GRU(_Recurrent):
    """Gated recurrent unit, gates r, z, n as torch.nn.GRUCell:
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn)), h' = (1 - z) * n + z * h."""

    blocks = 3

    def _forward(self, ops, xs, hs, state):
        hs[0] = state[0]
        gi = self._input_projection(ops, xs, with_hidden_bias=False)
        gh = self._buffer(ops, "gh", gi.shape, gi.dtype)
        b_hh = self.params.get("bias_hh")
        w_hh_t = self._step_operands(ops, transposed=True)
        for t in range(len(hs) - 1):
            ops.matmul(ops.gemm_operands(hs[t])[0], w_hh_t, out=gh[t])
            if b_hh is not None:
                gh[t] += b_hh
            ops.gru_cell(gi[t], gh[t], hs[t], hs[t + 1])
        self.final_state = hs[-1].copy()
        return {"gi": gi, "gh": gh}

    def _backward_steps(self, ops, saved, dys):
        dgi = self._buffer(ops, "dgi", saved.gi.shape, saved.gi.dtype)
        dgh = self._buffer(ops, "dgh", saved.gh.shape, saved.gh.dtype)
        w_hh = self._step_operands(ops, transposed=False)
        dh = None
        for t in range(len(dys) - 1, -1, -1):
            dh_t = dys[t] if dh is None else dys[t] + dh
            direct = ops.gru_cell_backward(dh_t, saved.gi[t], saved.gh[t], saved.hs[t], dgi[t], dgh[t])
            through = self._recurrent_grad(ops, saved, dgh[t], t, w_hh)
            dh = direct if through is None else direct + through
        self.state_grad = dh if saved.state_given else None
        return dgi, dgh
