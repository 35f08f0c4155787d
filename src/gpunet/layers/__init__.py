"""Layers with explicit forward/backward; names and layouts follow PyTorch."""
from gpunet.layers.activations import GELU, Identity, ReLU, Sigmoid, Softmax, Tanh
from gpunet.layers.attention import MultiHeadAttention
from gpunet.layers.base import LAYER_TYPES, Composite, Layer, build_layer, register
from gpunet.layers.sequential import Sequential
from gpunet.layers.conv import AvgPool2D, Conv2D, MaxPool2D
from gpunet.layers.conv1d import Conv1D
from gpunet.layers.dense import Dense
from gpunet.layers.dropout import Dropout
from gpunet.layers.graph import Input
from gpunet.layers.merge import Add, Concatenate, Multiply
from gpunet.layers.model import Model
from gpunet.layers.embedding import Embedding, PositionalEmbedding
from gpunet.layers.norm import BatchNorm1d, BatchNorm2d, LayerNorm
from gpunet.layers.recurrent import GRU, LSTM, RNN
from gpunet.layers.shape import Flatten
from gpunet.layers.transformer import TransformerBlock

__all__ = [
    "LAYER_TYPES", "Add", "AvgPool2D", "BatchNorm1d", "BatchNorm2d", "Composite", "Concatenate", "Conv1D", "Conv2D", "Dense", "Dropout",
    "Embedding", "Flatten", "GELU", "GRU", "Identity", "Input", "LSTM", "Layer", "LayerNorm", "MaxPool2D", "Model",
    "MultiHeadAttention", "Multiply", "PositionalEmbedding", "RNN", "ReLU", "Sequential", "Sigmoid", "Softmax", "Tanh",
    "TransformerBlock", "build_layer", "register",
]
