"""Ready models built only from gpunet layers."""
from gpunet.models.cnn import lenet, wide_cnn
from gpunet.models.mlp import mlp
from gpunet.models.perceptron import Perceptron

__all__ = ["Perceptron", "lenet", "mlp", "wide_cnn"]
