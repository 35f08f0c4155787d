"""Ready models built only from gpunet layers."""
from gpunet.models.cnn import lenet, wide_cnn
from gpunet.models.mlp import mlp
from gpunet.models.perceptron import Perceptron
from gpunet.models.resnet import resnet
from gpunet.models.sequence import char_rnn, transformer

__all__ = ["Perceptron", "char_rnn", "lenet", "mlp", "resnet", "transformer", "wide_cnn"]
