"""Convolutional networks for 28x28 single-channel images."""
from __future__ import annotations

from gpunet.layers import BatchNorm2d, Conv2D, Dense, Dropout, Flatten, MaxPool2D, ReLU, Sequential


def lenet(num_classes: int = 10, in_channels: int = 1) -> Sequential:
    """LeNet-5 style: conv 5x5 (pad 2) 6, pool, conv 5x5 16, pool, 120, 84, classes; ReLU.
    Same layer indexes as the torch.nn.Sequential twin (conv at 0 and 3, dense at 7, 9, 11)."""
    return Sequential(
        Conv2D(in_channels, 6, 5, padding=2), ReLU(), MaxPool2D(2),
        Conv2D(6, 16, 5), ReLU(), MaxPool2D(2),
        Flatten(), Dense(16 * 5 * 5, 120), ReLU(), Dense(120, 84), ReLU(), Dense(84, num_classes))


def wide_cnn(num_classes: int = 10, in_channels: int = 1, width: int = 32, dropout: float = 0.25,
             conv_bias: bool = True) -> Sequential:
    """A wider CNN: two 3x3 conv-BN-ReLU pairs per stage, 2x2 pooling, dropout, dense head.
    conv_bias=False: the batch norm's shift replaces the conv bias, whose gradient is zero up to
    rounding (which Adam would scale up to full-size steps)."""
    w = width
    return Sequential(
        Conv2D(in_channels, w, 3, padding=1, bias=conv_bias), BatchNorm2d(w), ReLU(), MaxPool2D(2),
        Conv2D(w, 2 * w, 3, padding=1, bias=conv_bias), BatchNorm2d(2 * w), ReLU(), MaxPool2D(2),
        Flatten(), Dropout(dropout), Dense(2 * w * 7 * 7, 128), ReLU(), Dropout(dropout), Dense(128, num_classes))
