"""The training precision: "fp32", or mixed precision "bf16" / "fp16".

In mixed precision the parameters, their gradients and the optimizer's state stay float32 (master
weights), and so do softmax, the losses, normalisation statistics and reductions; the operands of
every matrix product (Dense, the convolutions' im2col GEMMs, attention, the recurrent layers) are
rounded to the 16-bit format, to nearest even, and multiplied and summed in float32. That is what a
tensor core computes (a product of two 16-bit numbers is exact in float32; the sum is float32), so
the CPU, rounding at the same points with NumPy, is the GPU's reference. Which arrays a layer keeps
for its backward in 16 bits is said per layer in docs/precision.md.

The precision is a setting of the running thread, as torch.autocast's: `with precision.using("bf16"):`
(gn.fit enters it for its steps and evaluations), read by the ops with current().
"""
from __future__ import annotations

import contextlib
import threading

PRECISIONS = ("fp32", "bf16", "fp16")
_state = threading.local()


def check(name, where: str) -> str:
    if name not in PRECISIONS:
        raise ValueError(f"{where}: precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    return name


def current() -> str:
    """The precision of this thread's ops: "fp32" unless inside using(). (Its 16-bit dtype:
    gpunet.backend.ops.sixteen_bit_dtype.)"""
    return getattr(_state, "name", "fp32")


@contextlib.contextmanager
def using(name: str):
    """Run the ops of this thread in precision `name` until the block ends."""
    check(name, "precision.using")
    before = current()
    _state.name = name
    try:
        yield
    finally:
        _state.name = before
