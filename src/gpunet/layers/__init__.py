"""Layers with explicit forward/backward; names and layouts follow PyTorch."""
from gpunet.layers.activations import GELU, Identity, ReLU, Sigmoid, Softmax, Tanh
from gpunet.layers.conv import AvgPool2D, Conv2D, MaxPool2D
from gpunet.layers.base import Composite, Layer, Sequential, build_layer
from gpunet.layers.dense import Dense
from gpunet.layers.dropout import Dropout
from gpunet.layers.norm import BatchNorm1d, BatchNorm2d, LayerNorm
from gpunet.layers.shape import Flatten

__all__ = [
    "AvgPool2D", "BatchNorm1d", "BatchNorm2d", "Composite", "Conv2D", "MaxPool2D", "Dense", "Dropout", "Flatten", "GELU", "Identity",
    "Layer", "LayerNorm", "ReLU", "Sequential", "Sigmoid", "Softmax", "Tanh", "build_layer",
]
