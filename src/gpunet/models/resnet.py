"""A small residual network (He et al. 2016, the CIFAR-style ResNet) for 28x28 single-channel images,
built as a gn.Model graph.

    stem:    conv 3x3 (width) - BN - ReLU
    stage s: blocks[s] basic blocks of width * 2**s channels; the first block of every stage after the
             first halves the map (stride 2): 28x28 -> 14x14 -> 7x7 for three stages
    block:   conv 3x3 - BN - ReLU - conv 3x3 - BN, plus the shortcut, then ReLU; the shortcut is the
             block's input, or a projection (conv 1x1 with the block's stride - BN) where the shape changes
    head:    global average pooling (an AvgPool2D over the whole last map), Flatten, [Dropout], Dense

Convolutions have no bias: the batch norm after each has a shift that does the bias's work (a bias
before batch norm has a gradient of zero up to rounding, which Adam scales up to full-size steps).
Weights are Kaiming-normal for ReLU (as torchvision's ResNet); with zero_init_residual the last
batch norm of each residual branch starts at zero scale, so every block starts as its shortcut
(Goyal et al. 2017).

Layer names (parameters are keyed "<layer>.<param>", as torch's state_dict of the same graph):
"stem_conv", "stem_bn", "stem_relu"; per block "stage{s}_block{b}_conv1", "_bn1", "_relu1", "_conv2",
"_bn2", "_proj_conv", "_proj_bn" (a projection only), "_add", "_relu"; then "pool", "flatten",
"dropout" (with dropout > 0) and "head". Stages and blocks count from 0.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from gpunet.backend.ops import pooled_size
from gpunet.layers import Add, AvgPool2D, BatchNorm2d, Conv2D, Dense, Dropout, Flatten, Input, Layer, Model, ReLU
from gpunet.layers.base import check_name

L = TypeVar("L", bound=Layer)


def _named(layer: L, name: str) -> L:
    """layer, named: what `Layer(..., name=name)` does (the constructors' signatures, which type checkers
    read, do not show the name= that the layers' metaclass takes)."""
    layer.name = check_name(name, type(layer).__name__)
    return layer


def _conv(c_in: int, c_out: int, kernel: int, stride: int, name: str) -> Conv2D:
    return _named(Conv2D(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False, init="kaiming_normal",
                         init_activation="relu"), name)


def _block(x, c_in: int, c_out: int, stride: int, name: str, zero_init_residual: bool):
    """One basic block on the symbolic value x: its output value."""
    h = _conv(c_in, c_out, 3, stride, f"{name}_conv1")(x)
    h = _named(BatchNorm2d(c_out), f"{name}_bn1")(h)
    h = _named(ReLU(), f"{name}_relu1")(h)
    h = _conv(c_out, c_out, 3, 1, f"{name}_conv2")(h)
    last_bn = _named(BatchNorm2d(c_out), f"{name}_bn2")
    if zero_init_residual:
        last_bn.params["weight"][...] = 0.0
    h = last_bn(h)
    shortcut = x
    if stride != 1 or c_in != c_out:  # the shape changes: a projection shortcut
        shortcut = _conv(c_in, c_out, 1, stride, f"{name}_proj_conv")(x)
        shortcut = _named(BatchNorm2d(c_out), f"{name}_proj_bn")(shortcut)
    return _named(ReLU(), f"{name}_relu")(_named(Add(), f"{name}_add")([h, shortcut]))


def resnet(num_classes: int = 10, in_channels: int = 1, width: int = 16, blocks: int | Sequence[int] = (1, 1, 1),
           input_size: int | tuple[int, int] = 28, dropout: float = 0.0, zero_init_residual: bool = False) -> Model:
    """A residual network of len(blocks) stages (blocks: basic blocks per stage, or one count for three
    stages) of width, 2*width, 4*width... channels, for in_channels x input_size images (NCHW); logits out.

    resnet() is stem 16 and three stages of one block (16, 32, 64 channels at 28x28, 14x14, 7x7): 8
    convolutions of 3x3 and two projections; about 78,000 parameters."""
    stages = [blocks] * 3 if isinstance(blocks, int) else [int(b) for b in blocks]
    if not stages or any(b < 1 for b in stages):
        raise ValueError(f"resnet: blocks must be one or more positive counts (blocks per stage), got {blocks!r}")
    if width < 1 or num_classes < 1 or in_channels < 1:
        raise ValueError(f"resnet: width, num_classes and in_channels must be positive, got {width}, "
                         f"{num_classes}, {in_channels}")
    size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    x = Input((in_channels, *size))
    h = _conv(in_channels, width, 3, 1, "stem_conv")(x)
    h = _named(ReLU(), "stem_relu")(_named(BatchNorm2d(width), "stem_bn")(h))
    c_in = width
    for s, count in enumerate(stages):
        c_out = width * 2 ** s
        for b in range(count):
            stride = 2 if s > 0 and b == 0 else 1
            if stride == 2:
                size = pooled_size(size, (3, 3), (2, 2), (1, 1))
            h = _block(h, c_in, c_out, stride, f"stage{s}_block{b}", zero_init_residual)
            c_in = c_out
    h = _named(Flatten(), "flatten")(_named(AvgPool2D(size), "pool")(h))  # global average pooling
    if dropout:
        h = _named(Dropout(dropout), "dropout")(h)
    y = _named(Dense(c_in, num_classes, init="xavier_uniform"), "head")(h)
    return Model(inputs=x, outputs=y)

