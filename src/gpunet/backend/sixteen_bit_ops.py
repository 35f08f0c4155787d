"""The 16-bit ops of Ops (which inherits them): float32 to and from bf16 and fp16, the operands of a
matrix product in the running precision (gemm_operands: every GEMM op of Ops, ConvOps and the layers
calls it right before its product), and the activations a layer keeps for its backward in 16 bits
(store_16bit). Written against `xp` like the rest; CupyOps runs each cast as one kernel
(cuda_precision.py), NumpyOps as one Numba pass (cpu_precision_kernels.py). What each layer keeps in which
precision: docs/precision.md."""
from __future__ import annotations

import threading

import numpy

from gpunet.backend import precision


class SixteenBitOps:
    def gemm_operands(self, *arrays):
        """The operands of a matrix product in the running precision (gpunet.backend.precision): as they are in
        fp32; rounded to bf16 or fp16 and back in mixed precision (float32 arrays holding 16-bit values, which a
        float32 product multiplies exactly and sums in float32, as a tensor core does). A 16-bit array (an
        activation kept by store_16bit) becomes its float32 values (from_16bit, exact) in any precision; None
        stays None, and so does an array of another dtype (float64)."""
        kind = precision.current()
        if kind == "fp32" and not any(is_16bit(a) for a in arrays):
            return arrays
        return tuple(self.from_16bit(a) if is_16bit(a) else
                     self.round_16bit(a, kind) if kind != "fp32" and a is not None and a.dtype == numpy.float32
                     else a for a in arrays)

    def gemm_operands16(self, *arrays):
        """The operands of a matrix product as arrays of the running mixed precision's 16-bit dtype, for a
        kernel that loads 16 bits (CupyOps' product16): a float32 array cast to nearest even (the values
        gemm_operands gives, as 16-bit arrays), a 16-bit one as it is, None as None."""
        kind = precision.current()
        return tuple(a if a is None or is_16bit(a) else self.to_16bit(a, kind) for a in arrays)

    def store_16bit(self, x, hand_on: bool = False):
        """x as kept for the backward when the backward only multiplies it (a GEMM rounds it anyway) or reads
        its sign (ReLU): in mixed precision its 16-bit array (to_16bit), half the memory at no extra error;
        in fp32 (or for an array not float32, or None) x itself.

        hand_on: x is a layer's output (a ReLU's) that the next layer may keep too, as the input of its product:
        the next store_16bit of this thread, if it is of x's memory as it is (C-contiguous, the same address and
        size: x or a reshape of it), returns this 16-bit copy instead of making a second one of the same values.
        Any other next call forgets it; until then x is referenced here. (A layer never writes into an output it
        handed on, or an fp32 backward that kept it would read the change too.)"""
        kind = precision.current()
        if kind == "fp32" or x is None or x.dtype != numpy.float32:
            return x
        last, _HANDED_ON.last = getattr(_HANDED_ON, "last", None), None
        if last is not None and last[1] == kind and _same_memory(last[0], x):
            return last[2].reshape(x.shape)
        kept = self.to_16bit(x, kind)
        if hand_on:
            self.hand_on_16bit(x, kept)
        return kept

    def hand_on_16bit(self, x, kept):
        """Hands kept, the running precision's 16-bit copy of the float32 output x made with it (CupyOps.dropout's),
        on to the next store_16bit of this thread, as store_16bit(x, hand_on=True) hands on the copy it makes."""
        _HANDED_ON.last = (x, precision.current(), kept)

    def stored_float32(self, x):
        """What store_16bit kept, as float32: a 16-bit array through from_16bit (exact), anything else as it is."""
        return self.from_16bit(x) if is_16bit(x) else x

    def to_16bit(self, x, kind):
        """float32 x rounded to nearest even into a new array of kind's 16-bit dtype (sixteen_bit_dtype)."""
        if x.dtype != numpy.float32:
            raise TypeError(f"to_16bit takes a float32 array, got {x.dtype}")
        dtype = sixteen_bit_dtype(kind)
        with numpy.errstate(over="ignore", invalid="ignore"):  # (Inf from 65520 on, NaN kept: as intended)
            return x.astype(dtype)

    def from_16bit(self, x):
        """A bfloat16 or float16 array as a new float32 array (exact)."""
        if x.dtype != numpy.float16 and not (x.dtype.name == "bfloat16" and x.dtype == sixteen_bit_dtype("bf16")):
            raise TypeError(f"from_16bit takes a bfloat16 or float16 array, got {x.dtype}")
        return x.astype(numpy.float32)

    def round_16bit(self, x, kind):
        """float32 x rounded to kind's 16-bit format and back: the float32 value a 16-bit store keeps."""
        return self.from_16bit(self.to_16bit(x, kind))


_HANDED_ON = threading.local()  # .last: (the float32 output, its kind, its 16-bit copy), see Ops.store_16bit


def _same_memory(a, b) -> bool:
    """Whether a and b are the same C-contiguous memory (one may be a reshape of the other)."""
    if a.size != b.size or a.dtype != b.dtype or not (a.flags.c_contiguous and b.flags.c_contiguous):
        return False
    return _address(a) == _address(b) and type(a) is type(b)


def _address(a) -> int:
    data = a.data
    return data.ptr if hasattr(data, "ptr") else a.__array_interface__["data"][0]  # (CuPy's, NumPy's)


def is_16bit(a) -> bool:
    """Whether a is an array of a 16-bit float dtype (float16, or ml_dtypes.bfloat16 by its name)."""
    return a is not None and a.dtype.itemsize == 2 and (a.dtype == numpy.float16 or a.dtype.name == "bfloat16")


def sixteen_bit_dtype(kind: str) -> numpy.dtype:
    """The dtype of a 16-bit kind, the one NumPy and CuPy 14 both use: "bf16" ml_dtypes.bfloat16, "fp16" float16."""
    if kind == "fp16":
        return numpy.dtype(numpy.float16)
    if kind == "bf16":
        import ml_dtypes  # (here, not at the top: importing it takes most of a second)

        return numpy.dtype(ml_dtypes.bfloat16)
    raise ValueError(f"the 16-bit kind must be 'bf16' or 'fp16', got {kind!r}")
