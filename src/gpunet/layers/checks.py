"""Input checks shared by layers: errors name the layer, the expectation and what came."""
from __future__ import annotations

from gpunet.backend import precision
from gpunet.backend.ops import is_16bit


def check_float_input(layer, x, dtype, sixteen_bit_copy: bool = False) -> None:
    """x of the layer's dtype. sixteen_bit_copy: the layer's input only feeds its products, so in mixed precision
    it may also be the 16-bit copy of a float32 input (what those products round it to: a layer norm before it
    may write that copy directly, Ops.layer_norm's for_product)."""
    if sixteen_bit_copy and dtype == "float32" and is_16bit(x) and precision.current() != "fp32":
        return
    if x.dtype != dtype:
        hint = " (raw images need preprocessing: float32 = uint8 / 255)" if x.dtype.kind in "ui" else ""
        raise TypeError(f"{layer.describe()}: expected {dtype} input, got {x.dtype}{hint}")


def check_last_dim(layer, x, size: int) -> None:
    if x.ndim < 1 or x.shape[-1] != size:
        raise ValueError(f"{layer.describe()}: expected input with last dimension {size}, got shape {tuple(x.shape)}")


def check_ndim(layer, x, ndims: tuple[int, ...], layout: str) -> None:
    if x.ndim not in ndims:
        raise ValueError(f"{layer.describe()}: expected input of shape {layout}, got shape {tuple(x.shape)}")


def check_channels_first(layer, x, channels: int, dtype, layout: str) -> None:
    """A convolution's input: the layout's rank, `channels` on axis 1, the weights' dtype."""
    check_ndim(layer, x, (layout.count(",") + 1,), layout)
    if x.shape[1] != channels:
        raise ValueError(f"{layer.describe()}: expected {channels} input channels, got shape {tuple(x.shape)}")
    check_float_input(layer, x, dtype)
