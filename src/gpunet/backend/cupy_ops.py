"""GPU backend: CuPy (cuBLAS for plain GEMM) with gpunet's own kernels from kernels/*.cu for
GEMM with a fused epilogue, im2col/col2im, max pooling, fused softmax cross-entropy, the LSTM
cell, the attention softmax, layer and batch normalisation, activations, the optimizer updates and 16-bit casts,
each launched through its wrapper (cuda_wrappers.py, cuda_wrappers_sequence.py, cuda_precision.py);
the Dense product's paths and their dispatch are the mixin CupyGemmPaths (cupy_gemm.py).

In mixed precision (gpunet.backend.precision) Dense and convolution products, forward and backward, run
as CupyGemmPaths.product16 (gpunet's 16-bit GEMM, cublasGemmEx or cuBLAS on the rounded values), their
backward epilogues write dz in 16 bits (gemm16.cu); the other products round their operands as in the
base Ops (gemm_operands: one cast launch per operand). Attention runs its fused kernels on the 16-bit
copy of q, k and v it keeps (kernels/attention.cu's _bf16 and _f16 kernels round where the base rounds).

Each override takes the kernel path only for what the kernel handles (float32, contiguous, not empty:
its @kernel_or_fallback names the arguments the kernel needs so, kernel_guard.py) and otherwise falls
back to the base Ops, which is written against cupy as well: an empty input never reaches a launch
(CuPy would round a grid of no blocks up to one, running over memory the op does not own) and gets
the base Ops' result, the NumPy one (empty outputs, zero gradients). A product with
a bias or activation runs as the fused kernel, as cuBLAS plus a separate epilogue, or (with
nvmath-python, for a bias with or without ReLU) as cuBLASLt's fused epilogue, whichever agreed
with the fused kernel and was fastest when first timed for its size class (gemm_dispatch.py);
GPUNET_GEMM=fused|cublas|cublaslt forces one.

Errors found on the device (a label out of range in the fused softmax cross-entropy, an embedding
id out of range) are kept in device flags, so a step never waits for the GPU, and raised by
check_errors, which gn.losses.item calls where the host reads the loss.
"""
from __future__ import annotations

import math

from gpunet.backend import activations, cublaslt, cuda_precision, cuda_wrappers as kernels, precision, sequence_ops
from gpunet.backend import cuda_wrappers_sequence as sequence_kernels
from gpunet.backend.cuda_kernels import ACTIVATION_CODES
from gpunet.backend.cuda_wrappers import NO_RANGE_ERROR
from gpunet.validate import env_choice
from gpunet.backend.devices import configure_tf32, cupy_status
from gpunet.backend.gemm_dispatch import agreeing
from gpunet.backend.cupy_gemm import CupyGemmPaths
from gpunet.backend.kernel_guard import float32_contiguous, kernel_or_fallback
from gpunet.backend.ops import Ops, id_range_error, is_16bit, label_range_error, pooled_size, sixteen_bit_dtype


# embed_backward's kernel lets each of the V rows of the gradient scan all N ids: up to V * N of
# this (a character vocabulary and a few thousand tokens) that costs less than the two launches
# and the atomics of a scatter-add; past it the base's scatter-add runs.
EMBEDDING_SCAN_LIMIT = 1 << 22


class CupyOps(CupyGemmPaths, Ops):
    name = "gpu"

    def __init__(self):
        cupy = cupy_status()[0]
        if cupy is None:
            raise RuntimeError(cupy_status()[1])
        self.xp = cupy
        self.gemm_mode = env_choice("GPUNET_GEMM")  # auto: whichever was measured faster
        self._dispatch = None  # made on first use: it asks the device for its name
        self._paths16 = None  # product16's paths, made on first use (it asks the device for its capability)
        self._lt = cublaslt.LtLinear() if cublaslt.available() else None  # cuBLASLt's epilogues (nvmath-python)
        self._paths: dict = {}  # (has a bias, activation) -> _linear_paths
        self.tf32 = configure_tf32(cupy)  # cuBLAS float32 mode: full float32 unless GPUNET_TF32=1
        # (what, bound) -> device (smallest, largest) value seen outside [0, bound): "label" for the labels of a
        # class count, "id" for the ids of an embedding vocabulary; made once per key
        self._range_errors = {}
        self._unchecked = set()  # keys whose flags were handed to a kernel since the last check

    def erf(self, x):
        from cupyx.scipy.special import erf

        return erf(x)

    @kernel_or_fallback("x", "out", nonempty="x")
    def activation(self, name, x, out=None):
        if name not in ACTIVATION_CODES:
            return super().activation(name, x, out)
        return kernels.activation_forward(x, name, out)

    def activation_backward(self, name, x, y, dy):
        # tanh and sigmoid need only y; relu and gelu always get x (the fallback gets y in x's place too)
        if name == "relu" and (x is None or x is y) and is_16bit(y) and y.flags.c_contiguous and dy.size and \
                float32_contiguous(dy):
            return cuda_precision.activation_backward16(y, dy, name)  # (a mixed-precision ReLU's 16-bit y)
        return self._activation_backward(name, y if x is None else x, y, dy)

    @kernel_or_fallback("x", "y", "dy", nonempty="dy", fallback=Ops.activation_backward)
    def _activation_backward(self, name, x, y, dy):
        if name not in ACTIVATION_CODES:
            return super().activation_backward(name, x, y, dy)
        return kernels.activation_backward(x, y, dy, name)

    @kernel_or_fallback("weight", "bias", "out")
    def linear(self, x, weight, bias=None, activation=None, out=None):
        empty = x.shape[0] == 0 or weight.shape[0] == 0  # (no inputs, K = 0, is fine: y = act(bias))
        if empty or x.shape[1] == 0 or (bias is None and activation is None and precision.current() == "fp32"):
            return super().linear(x, weight, bias, activation, out)  # cuBLAS (the base rounds in mixed precision)
        if precision.current() != "fp32" and (is_16bit(x) or float32_contiguous(x)):  # (x: an LSTM's 16-bit copy)
            return self.product16(*self.gemm_operands16(x, weight), bias, activation, out)
        if not float32_contiguous(x):
            return super().linear(x, weight, bias, activation, out)
        paths = self._linear_paths(bias, activation)
        args = (x, weight, bias, activation)
        mode = self.gemm_mode
        if mode == "auto":
            mode = self._gemm_dispatch().choose(x.shape[0], weight.shape[0], x.shape[1], activation,
                                                lambda: agreeing(paths, args, 1e-2 if self.tf32 else 1e-4, self.xp))
        return paths.get(mode, paths["fused"])(*args, out)  # (cublaslt forced or remembered, where it cannot run)

    @kernel_or_fallback("dy", "grad_weight", "grad_bias", nonempty="dy")
    def linear_act_backward(self, x, weight, z, y, dy, activation, grad_weight, grad_bias=None, need_dx=True):
        # x may be the forward's 16-bit copy, z and y a ReLU's 16-bit output (what a mixed-precision Dense keeps)
        kind, kept16 = precision.current(), [a for a in (z, y) if is_16bit(a)]
        if not ((is_16bit(x) or float32_contiguous(x)) and float32_contiguous(weight)
                and all(a is None or is_16bit(a) or float32_contiguous(a) for a in (z, y))):
            return super().linear_act_backward(x, weight, z, y, dy, activation, grad_weight, grad_bias, need_dx)
        if kind != "fp32" and x.shape[1] > 0 and dy.shape[1] > 0 and all(
                a.dtype == sixteen_bit_dtype(kind) and a.flags.c_contiguous for a in kept16):
            return self.linear_backward16(x, weight, z, y, dy, activation, grad_weight, grad_bias, need_dx, kind)
        if kept16:  # (fp32, or nothing to multiply): the base reads them as float32
            return super().linear_act_backward(x, weight, z, y, dy, activation, grad_weight, grad_bias, need_dx)
        if activation is None and grad_bias is None:
            dz = dy  # no activation to undo and no bias to sum: nothing for the kernel to do
        else:
            dz = kernels.bias_act_backward(dy, z, y, activation, grad_bias)  # (db summed from dz in float32)
        dz, x, weight = self.gemm_operands(dz, x, weight if need_dx else None)  # (the base's order)
        self.xp.matmul(dz.T, x, out=grad_weight)
        return self.xp.matmul(dz, weight) if need_dx else None

    @kernel_or_fallback("y_t", "bias", nonempty="y_t")
    def conv_epilogue(self, y_t, bias, activation):
        if not activations.from_output(activation):
            return super().conv_epilogue(y_t, bias, activation)
        return kernels.conv_bias_act(y_t, bias, activation)

    @kernel_or_fallback("x", "weight", "bias", nonempty="x")
    def conv2d_relu_pool(self, x, weight, bias, stride, padding, pool):
        y_t, cols, conv_hw = self.conv_gemm(x, weight, stride, padding)
        pooled, argmax = kernels.conv_relu_pool(y_t, bias, conv_hw, pool)
        return pooled, argmax, cols, (x.shape[0], weight.shape[0], *conv_hw)

    @kernel_or_fallback("dp", "pooled", "grad_bias", nonempty="dp", contiguous=("dp",))
    def conv2d_relu_pool_backward(self, dp, pooled, argmax, cols, x_shape, y_shape, weight, grad_weight, grad_bias,
                                  stride, padding, pool, need_dx=True):
        if argmax.dtype != self.xp.int32:
            return super().conv2d_relu_pool_backward(dp, pooled, argmax, cols, x_shape, y_shape, weight, grad_weight,
                                                     grad_bias, stride, padding, pool, need_dx)
        dy_t = kernels.conv_relu_pool_backward(dp, pooled, argmax, y_shape[2:], pool, grad_bias)
        return self._conv_gemms_backward(dy_t, cols, x_shape, weight, grad_weight, stride, padding, need_dx)

    @kernel_or_fallback("x", nonempty="x")
    def im2col(self, x, kernel, stride, padding):
        n, c, h, w = x.shape
        oh, ow = pooled_size((h, w), kernel, stride, padding)
        if oh * ow <= 0:
            return super().im2col(x, kernel, stride, padding)
        return kernels.im2col(x, kernel, stride, padding)

    def col2im(self, cols, x_shape, kernel, stride, padding):
        """cols in any layout: the kernel reads it through its strides (the conv backward's dY W
        is column-major), without a copy."""
        if cols.dtype != self.xp.float32 or math.prod(x_shape) == 0:
            return super().col2im(cols, x_shape, kernel, stride, padding)
        return kernels.col2im(cols, x_shape, kernel, stride, padding)

    @kernel_or_fallback("x", nonempty="x")
    def max_pool(self, x, kernel, stride):
        n, c, h, w = x.shape
        oh, ow = pooled_size((h, w), kernel, stride)
        if oh * ow <= 0:
            return super().max_pool(x, kernel, stride)
        return kernels.max_pool(x, kernel, stride)

    @kernel_or_fallback("dy", nonempty="dy", contiguous=("dy",))
    def max_pool_backward(self, dy, argmax, x_shape, kernel, stride):
        if argmax.dtype != self.xp.int32 or math.prod(x_shape) == 0:
            return super().max_pool_backward(dy, argmax, x_shape, kernel, stride)
        return kernels.max_pool_backward(dy, argmax, x_shape, kernel, stride)

    @kernel_or_fallback("logits", nonempty="logits")
    def softmax_cross_entropy(self, logits, labels):
        labels = self.xp.ascontiguousarray(labels, dtype=self.xp.int64)
        return kernels.softmax_xent(logits, labels, self._range_error_flags("label", logits.shape[1]))

    def check_labels(self, labels, classes):
        """Folds labels outside [0, classes) into the device flags (no host read: check_errors
        raises later) and returns the labels clipped into range, safe to index with."""
        return self._fold_out_of_range(labels, "label", classes)

    def _fold_out_of_range(self, values, what: str, bound: int):
        """values outside [0, bound) folded into the device flags of (what, bound), with no host read
        (check_errors raises later); returns values clipped into range, safe to index with."""
        if values.size == 0:
            return values
        xp = self.xp
        flags = self._range_error_flags(what, bound)
        bad = (values < 0) | (values >= bound)
        none_low, none_high = NO_RANGE_ERROR.tolist()
        wide = values.astype(xp.int64, copy=False)  # where(bad, int32 ids, 2**63 - 1) would wrap to -1
        flags[0] = xp.minimum(flags[0], xp.where(bad, wide, none_low).min())
        flags[1] = xp.maximum(flags[1], xp.where(bad, wide, none_high).max())
        return xp.clip(values, 0, bound - 1)

    def check_errors(self):
        """Raise the CPU's ValueError for a label (or an id) out of range flagged since the last check.

        Reads the flags of the class counts (vocabularies) used since then (a device-to-host copy, which waits
        for the GPU: the caller is about to read the loss anyway) and resets a flag it raises for.
        """
        while self._unchecked:
            what, bound = key = self._unchecked.pop()
            flags = self._range_errors[key]
            low, high = (int(v) for v in flags.get())
            if low <= high:  # some value was out of range
                flags.set(NO_RANGE_ERROR)
                raise (label_range_error if what == "label" else id_range_error)(low if low < 0 else high, bound)

    def _range_error_flags(self, what: str, bound: int):
        """The device flags for values of kind `what` ("label", "id") in [0, bound), marked as needing a check."""
        flags = self._range_errors.get((what, bound))
        if flags is None:
            flags = self._range_errors[(what, bound)] = self.xp.asarray(NO_RANGE_ERROR)
        self._unchecked.add((what, bound))
        return flags

    # an empty batch: every output is empty, nothing to do (the base's reshape cannot take one)
    @kernel_or_fallback("x_gates", "h_gates", "c_prev", "acts_out", "h_out", "c_out", "tanh_c_out",
                        nonempty="c_prev", if_empty=None)
    def lstm_cell(self, x_gates, h_gates, c_prev, acts_out, h_out, c_out, tanh_c_out):
        sequence_kernels.lstm_cell(x_gates, h_gates, c_prev, acts_out, h_out, c_out, tanh_c_out)

    @kernel_or_fallback("dh", "dc", "acts", "c_prev", "tanh_c", "dgates_out", nonempty="c_prev", if_empty=None)
    def lstm_cell_backward(self, dh, dc, acts, c_prev, tanh_c, dgates_out):
        sequence_kernels.lstm_cell_backward(dh, dc, acts, c_prev, tanh_c, dgates_out)

    @kernel_or_fallback("x_gates", "w_hh_t", "h_prev", "c_prev", "acts_out", "h_out", "c_out", "tanh_c_out",
                        nonempty="c_prev")
    def lstm_step(self, x_gates, w_hh_t, h_prev, c_prev, acts_out, h_out, c_out, tanh_c_out):
        sequence_kernels.lstm_step(x_gates, w_hh_t, h_prev, c_prev, acts_out, h_out, c_out, tanh_c_out)

    @kernel_or_fallback("dy", "dgates_next", "w_hh", "dc", "acts", "c_prev", "tanh_c", "dgates_out",
                        nonempty="c_prev")
    def lstm_step_backward(self, dy, dgates_next, w_hh, dc, acts, c_prev, tanh_c, dgates_out):
        sequence_kernels.lstm_step_backward(dy, dgates_next, w_hh, dc, acts, c_prev, tanh_c, dgates_out)

    @kernel_or_fallback("scores", nonempty="scores")
    def attention_softmax(self, scores, scale, causal):
        return sequence_kernels.attention_softmax(scores, scale, causal)

    @kernel_or_fallback("probs", "dprobs", nonempty="dprobs")
    def attention_softmax_backward(self, probs, dprobs, scale):
        return sequence_kernels.attention_softmax_backward(probs, dprobs, scale)

    @kernel_or_fallback("x", "weight", "bias", "running_mean", "running_var", nonempty="x")
    def batch_norm(self, x, weight, bias, running_mean, running_var, batches_tracked, training, momentum, eps):
        return sequence_kernels.batch_norm(x, weight, bias, running_mean, running_var, batches_tracked, training,
                                           momentum, eps)

    @kernel_or_fallback("dy", "xhat", "rstd", "weight", "grad_weight", "grad_bias", nonempty="dy")
    def batch_norm_backward(self, dy, xhat, rstd, weight, grad_weight, grad_bias, training):
        return sequence_kernels.batch_norm_backward(dy, xhat, rstd, weight, grad_weight, grad_bias, training)

    @kernel_or_fallback("x", "weight", "bias", nonempty="x")
    def layer_norm(self, x, weight, bias, eps, for_product=False):
        return sequence_kernels.layer_norm(x, weight, bias, eps, None, _y_kind(for_product))[:3]

    @kernel_or_fallback("x", "residual", "weight", "bias", nonempty="x")
    def add_layer_norm(self, x, residual, weight, bias, eps, for_product=False):
        if residual.shape != x.shape:
            return super().add_layer_norm(x, residual, weight, bias, eps, for_product)
        y, xhat, rstd, total = sequence_kernels.layer_norm(x, weight, bias, eps, residual, _y_kind(for_product))
        return total, y, xhat, rstd

    @kernel_or_fallback("dy", "xhat", "rstd", "weight", "grad_weight", "grad_bias", "residual", nonempty="dy",
                        contiguous=("dy",))
    def layer_norm_backward(self, dy, xhat, rstd, weight, grad_weight=None, grad_bias=None, residual=None):
        """One launch: dx (+ residual) and the parameters' gradients, summed on the device into
        grad_weight and grad_bias (new arrays when not given)."""
        if residual is not None and residual.shape != dy.shape:
            return super().layer_norm_backward(dy, xhat, rstd, weight, grad_weight, grad_bias, residual)
        if weight is not None:
            grad_weight = self.xp.empty_like(weight) if grad_weight is None else grad_weight
            grad_bias = self.xp.empty_like(weight) if grad_bias is None else grad_bias
        else:
            grad_weight = grad_bias = None
        return sequence_kernels.layer_norm_backward(dy, xhat, rstd, weight, grad_weight, grad_bias, residual), grad_weight, grad_bias

    fused_attention16 = True  # mixed precision's attention on the 16-bit kernels (False: the base's products)

    @kernel_or_fallback("qkv", nonempty="qkv")
    def attention(self, qkv, causal):
        kept = self.store_16bit(qkv)  # (fp32: qkv itself)
        if kept is not qkv and not self.fused_attention16:
            return sequence_ops.attention(self.xp, qkv, kept, causal, self.attention_softmax, self.gemm_operands)
        mixed, probs = sequence_kernels.attention(kept, causal)  # (16-bit kept: rounding where the base rounds)
        return mixed, (kept, probs, causal)

    @kernel_or_fallback("dmixed", contiguous=("dmixed",))
    def attention_backward(self, dmixed, state):
        qkv, probs, kept = state
        if isinstance(kept, tuple):  # the base's forward kept (q, k, v): its backward
            return super().attention_backward(dmixed, state)
        kind = precision.current()
        if kind != "fp32" and not is_16bit(qkv):  # (rounding as the running precision says, as the base's)
            qkv = self.to_16bit(qkv, kind)
        return sequence_kernels.attention_backward(qkv, probs, dmixed, bool(kept))  # kept: causal

    @kernel_or_fallback("x", nonempty="x")
    def to_16bit(self, x, kind):
        return cuda_precision.to_16bit(x, kind)

    @kernel_or_fallback(nonempty="x", contiguous=("x",))  # (x is 16-bit: no float32 to check)
    def from_16bit(self, x):
        if x.dtype.name not in ("bfloat16", "float16"):
            return super().from_16bit(x)  # (which refuses another dtype)
        return cuda_precision.from_16bit(x)

    @kernel_or_fallback("x", nonempty="x")
    def round_16bit(self, x, kind):
        return cuda_precision.round_16bit(x, kind)

    @kernel_or_fallback("param", "grad", "velocity", nonempty="param")
    def sgd_update(self, param, grad, velocity, lr, momentum, dampening, weight_decay, nesterov, first_step,
                   scalars=None):
        kernels.sgd_update(param, grad, velocity, lr, momentum, dampening, weight_decay, nesterov, first_step, scalars)

    @kernel_or_fallback("param", "grad", "exp_avg", "exp_avg_sq", nonempty="param")
    def adam_update(self, param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, decoupled, step,
                    scalars=None):
        kernels.adam_update(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, decoupled, step,
                            scalars)

    def clip_grad_norm(self, grads, max_norm):
        # (a list of arrays, not named arguments: the one guard kernel_or_fallback cannot state)
        if len(grads) != 1 or not float32_contiguous(*grads) or grads[0].size == 0:
            return super().clip_grad_norm(grads, max_norm)
        return kernels.clip_grad_norm(grads[0].reshape(-1), max_norm)

    def _embed_on_base(self, ids, weight, position=None):
        """embed's fallback: the base's, with integer ids out of range folded into the device flags
        first (CuPy's indexing would wrap a bad id around)."""
        if ids.dtype.kind in "iu":
            ids = self._fold_out_of_range(ids, "id", weight.shape[0])
        return super().embed(ids, weight, position)

    @kernel_or_fallback("weight", "position", nonempty="ids", fallback=_embed_on_base)
    def embed(self, ids, weight, position=None):
        """One launch, the positions' add included. An id out of range raises where the host next
        reads the loss (check_errors), as a label out of range does."""
        if ids.dtype.kind not in "iu" or (position is not None and (ids.ndim != 2 or ids.shape[1] > position.shape[0])):
            return self._embed_on_base(ids, weight, position)
        return sequence_kernels.embedding_forward(self.xp.ascontiguousarray(ids, dtype=self.xp.int64), weight,
                                                     position, self._range_error_flags("id", weight.shape[0]))

    @kernel_or_fallback("dy", "grad_weight", "grad_position", nonempty="dy", contiguous=("dy",))
    def embed_backward(self, ids, dy, grad_weight, grad_position=None):
        """One launch for both gradients, summed in a fixed order (no atomics) when the vocabulary
        is small enough for each of its rows to scan all the ids (EMBEDDING_SCAN_LIMIT)."""
        if ids.dtype.kind not in "iu" or ids.size * grad_weight.shape[0] > EMBEDDING_SCAN_LIMIT:
            return super().embed_backward(ids, dy, grad_weight, grad_position)
        sequence_kernels.embedding_backward(self.xp.ascontiguousarray(ids, dtype=self.xp.int64), dy, grad_weight,
                                               grad_position)

    def embedding_backward(self, ids, dy, grad_weight):
        import cupyx

        grad_weight[...] = 0
        if ids.size and grad_weight.size:
            cupyx.scatter_add(grad_weight, ids.reshape(-1), dy.reshape(-1, grad_weight.shape[1]))

    @kernel_or_fallback("x", "residual", nonempty="x")
    def dropout(self, x, p, stream, residual=None):
        """One launch, the residual add included: the mask is generated in the kernel (no host
        draw, no copy to the device) and not kept: the backward regenerates it (mask None). In mixed
        precision without a residual the same pass writes y's 16-bit copy, handed on to the next layer's
        store_16bit (a Dense's: its product's operand, without a cast of its own)."""
        if residual is not None and residual.shape != x.shape:
            return super().dropout(x, p, stream, residual)
        from gpunet import random

        kind = precision.current()
        args = (x, random.dropout_threshold(p), 1.0 / (1.0 - p), stream, residual, random.current().step_source)
        if kind == "fp32" or residual is not None:
            return kernels.dropout(*args), None
        y, y16 = kernels.dropout(*args, copy16=kind)
        self.hand_on_16bit(y, y16)
        return y, None

    @kernel_or_fallback("dy", nonempty="dy")
    def dropout_backward(self, dy, p, stream, mask):
        if mask is not None:
            return super().dropout_backward(dy, p, stream, mask)
        from gpunet import random

        return kernels.dropout(dy, random.dropout_threshold(p), 1.0 / (1.0 - p), stream, None,
                               random.current().step_source)


def _y_kind(for_product: bool) -> str:
    """The format a layer norm writes y in: the running 16-bit one where only a product reads y (Ops.layer_norm)."""
    return precision.current() if for_product else "fp32"
