"""How far two float32 implementations of one training step may drift apart: a bound from the
lengths of the sums the step runs, not from what one machine happens to give.

Two backends (NumPy's BLAS and Numba on the CPU, cuBLAS and gpunet's kernels on a GPU, or two CPUs
with other BLAS kernels) sum in different orders, blocked or not, with FMA or not. For a sum of K
terms each order's result is within gamma_K * sum|terms| of the exact one (gamma_K = K u / (1 - K u),
u = 2^-24 for float32; Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., sec. 3.1).
That worst case assumes every rounding error has the same sign; with rounding errors independent
and of mean zero the error is within LAMBDA * sqrt(K) * u * sum|terms| except with probability
2 exp(-LAMBDA^2 / 2) (Higham and Mary, SIAM J. Sci. Comput. 41(5), 2019, thm. 2.4), 3e-8 per
element for LAMBDA = 6. And sum|terms| <= sqrt(K) * ||terms||_2, which for the terms of a layer
with weights of random sign is the size of the largest output the relative difference divides by.
So one reduction moves a normwise relative difference (parity.relative_difference) by at most
2 * LAMBDA * K * u between two implementations (each errs by up to half of it), and a step's
differences add along its path: the forward sums of every layer, then the backward's.

Elementwise functions (exp, tanh, erf, rsqrt) are within a few ulps on every backend (CUDA's are
within 2 ulps, C Programming Guide table 13; NumPy's and Numba's use the C library's): PER_FUNCTION
ulps each, far below one reduction's share. The softmax cross-entropy at the end sums over the
classes (and the batch, for the mean).
"""
from __future__ import annotations

import math

LAMBDA = 6.0  # a bound exceeded with probability 2 exp(-LAMBDA^2/2) = 3e-8 per element
UNIT_ROUNDOFF = {"float32": 2.0**-24, "float64": 2.0**-53}
PER_FUNCTION = 4  # ulps of an elementwise function, on any backend


def step_bound(layers, input_shape: tuple, classes: int, dtype: str = "float32") -> float:
    """The bound on parity's per-step relative differences (loss, activations, gradients) of two
    implementations that start the step from the same parameters and optimizer state."""
    shape, total = tuple(input_shape), 0
    for layer in layers:
        length, shape = reduction_path(layer, shape)
        total += length + PER_FUNCTION
    rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
    total += 2 * (classes + rows)  # the softmax cross-entropy's sums, forward and backward
    return 2 * LAMBDA * total * UNIT_ROUNDOFF[dtype]


def reduction_path(layer, shape: tuple | list) -> tuple[int, tuple]:
    """(the lengths of the sums a step of layer runs one after the other, forward then backward,
    on input of shape `shape`, or a list of shapes for several inputs; the output's shape). The backward's input
    and parameter gradients
    are computed side by side: the longer of the two counts."""
    kind, c = type(layer).__name__, layer.config
    several = bool(shape) and isinstance(shape[0], (tuple, list))  # the shapes of several inputs
    if kind == "Model":  # a graph: every node's path summed, more than its longest path from input to output
        batch = (shape[0] if several else shape)[0]
        total = sum(reduction_path(child, s)[0] + PER_FUNCTION for child, s in layer.calls(batch))
        return total, layer.output_shapes(batch)[0]
    if several:  # a merge layer (Add, Concatenate): elementwise or copies, no sums
        return 0, tuple(shape[0])
    rows = math.prod(shape[:-1])
    if kind == "Dense":
        return c["in_features"] + max(c["out_features"], rows), (*shape[:-1], c["out_features"])
    if kind in ("Conv2D", "Conv1D"):
        taps = math.prod(getattr(layer, "kernel", (c["kernel_size"],)))
        out = _conv_output(layer, shape)
        positions = shape[0] * math.prod(out[2:])
        return c["in_channels"] * taps + max(c["out_channels"] * taps, positions), out
    if kind in ("BatchNorm1d", "BatchNorm2d"):
        over = shape[0] * math.prod(shape[2:])
        return 4 * over, shape  # mean and variance, then the two sums of the backward
    if kind == "LayerNorm":
        return 4 * shape[-1] + rows, shape
    if kind in ("LSTM", "GRU", "RNN"):
        steps, hidden = shape[1], c["hidden_size"]
        # every step sums input and state; the state carries the last step's error into the next
        return steps * (c["input_size"] + hidden) * 2 + rows, (*shape[:-1], hidden)
    if kind == "MultiHeadAttention":
        d, heads, steps = c["d_model"], c["num_heads"], shape[1]
        # the projections, the scores, the weighted sum, the output projection; twice for backward
        return 2 * (3 * d + d // heads + steps) + rows, shape
    if kind == "Embedding":
        return math.prod(shape), (*shape, c["embedding_dim"])  # the backward sums each id's rows
    if kind == "PositionalEmbedding":
        return shape[0], shape
    if kind == "Softmax":
        return 2 * shape[-1], shape  # its sum over the classes, forward and backward
    if kind in ("Flatten",):
        return 0, (shape[0], math.prod(shape[1:]))
    if kind in ("MaxPool2D", "AvgPool2D"):
        return math.prod(layer.kernel), _pool_output(layer, shape)
    children = getattr(layer, "_children", None)
    if children:  # a composite (TransformerBlock, Sequential): its children in order, plus residual adds
        total = 0
        for child in children.values():
            length, shape = reduction_path(child, shape)
            total += length + PER_FUNCTION
        return total, shape
    return 0, shape  # an elementwise layer (activations, dropout)


def _pool_output(layer, shape):
    (kh, kw), (sh, sw) = layer.kernel, layer.stride
    return (*shape[:2], (shape[2] - kh) // sh + 1, (shape[3] - kw) // sw + 1)


def _conv_output(layer, shape):
    c = layer.config
    if len(shape) == 4:
        (kh, kw), (sh, sw), (ph, pw) = layer.kernel, layer.stride, layer.padding
        return (shape[0], c["out_channels"], (shape[2] + 2 * ph - kh) // sh + 1, (shape[3] + 2 * pw - kw) // sw + 1)
    k, s, p, d = c["kernel_size"], c["stride"], c["padding"], c["dilation"]
    return (shape[0], c["out_channels"], (shape[2] + 2 * p - d * (k - 1) - 1) // s + 1)


# Mixed precision (gpunet parity --precision): the same step in fp32 and in bf16 or fp16 on one device.
UNIT_16 = {"bf16": 2.0**-8, "fp16": 2.0**-11}  # 8 and 11 significant bits, rounding to nearest


def precision_bound(layers, input_shape: tuple, classes: int, operand_unit: float, upto: int | None = None) -> float:
    """The bound on the relative difference between a step in fp32 and the same step in mixed precision
    (the products' operands rounded to 16 bits, unit roundoff operand_unit, UNIT_16), both started from the
    same parameters and optimizer state on one device: of the activations of layers[:upto] (forward sums
    only), or with upto None of the whole step (loss and gradients: the forward's and the backward's sums).

    Rounding both operands of a product changes it by a factor (1 + d), |d| <= 2 u16 (+ u16^2), so a sum of
    K products moves by sum_k t_k d_k, at most 2 u16 sum|t_k|. The operands' rounding errors are independent
    and of mean zero (Higham and Mary's model), so by Hoeffding's inequality |sum_k t_k d_k| <= LAMBDA 2 u16
    ||t||_2 except with probability 2 exp(-LAMBDA^2/2), and ||t||_2 is the size of the largest output, as in
    step_bound: each product sum moves the relative difference by at most 2 LAMBDA u16 (no K: one rounding
    per term, not one per partial sum). Those add along the path like step_bound's sums, and the float32
    sums of each side add step_bound itself (both sides' own float32 rounding)."""
    return product_bound(layers, input_shape, operand_unit, upto) + step_bound(layers, input_shape, classes)


def product_bound(layers, input_shape: tuple, operand_unit: float, upto: int | None = None) -> float:
    """precision_bound's share of the rounded operands: 2 LAMBDA u16 per product sum on the path."""
    shape, products = tuple(input_shape), 0
    for layer in layers[:upto] if upto is not None else layers:
        forward, backward = product_sums(layer, shape)
        products += forward + (backward if upto is None else 0)
        shape = reduction_path(layer, shape)[1]
    return 2 * LAMBDA * products * operand_unit


def product_sums(layer, shape: tuple | list) -> tuple[int, int]:
    """(the matrix products a step of layer runs one after the other in its forward, in its backward) on
    input of shape `shape`: the sums whose operands mixed precision rounds (the backward's input and
    parameter gradients side by side: one)."""
    kind = type(layer).__name__
    several = bool(shape) and isinstance(shape[0], (tuple, list))
    if kind == "Model":
        batch = (shape[0] if several else shape)[0]
        counts = [product_sums(child, s) for child, s in layer.calls(batch)]
        return sum(f for f, _ in counts), sum(b for _, b in counts)
    if kind in ("Dense", "Conv2D", "Conv1D"):
        return 1, 1
    if kind in ("LSTM", "GRU", "RNN"):
        return shape[1] + 1, shape[1] + 1  # the input projection, then each step's state product, chained
    if kind == "MultiHeadAttention":
        return 4, 4  # the in-projection, the scores, the weighted sum, the out-projection
    children = getattr(layer, "_children", None)
    if children and not several:
        forward = backward = 0
        for child in children.values():
            f, b = product_sums(child, shape)
            forward, backward = forward + f, backward + b
            shape = reduction_path(child, shape)[1]
        return forward, backward
    return 0, 0
