"""Input checks shared by layers: errors name the layer, the expectation and what came."""
from __future__ import annotations


def check_float_input(layer, x, dtype) -> None:
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
