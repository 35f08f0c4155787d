"""Ready models built only from gpunet layers."""
from gpunet.models.mlp import mlp
from gpunet.models.perceptron import Perceptron

__all__ = ["Perceptron", "mlp"]
