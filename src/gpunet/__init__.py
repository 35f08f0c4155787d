"""gpunet: a small, readable deep-learning library for NumPy (CPU) and CuPy (GPU)."""
import sys

from gpunet import data, export, init, layers, losses, models, optim
from gpunet import testing
from gpunet.training import callbacks, train
from gpunet.backend import Device, device, has_cupy, has_gpu, to_numpy
from gpunet.training.checkpoint import load, save
from gpunet.training.history import History
from gpunet.layers import Input, Model, Sequential
from gpunet.random import manual_seed
from gpunet.training.train import TrainingDiverged, evaluate, fit

# gn.train and gn.callbacks keep their module paths too (`from gpunet.callbacks import Callback`): they
# live in gpunet.training since the run has a folder of its own
sys.modules[__name__ + ".train"], sys.modules[__name__ + ".callbacks"] = train, callbacks

__version__ = "0.1.0"  # the one place it is written: pyproject.toml reads it (dynamic version)

__all__ = [
    "Device", "History", "Input", "Model", "Sequential", "TrainingDiverged", "callbacks", "data", "device", "evaluate", "export", "fit",
    "has_cupy", "has_gpu", "init", "layers", "load", "losses", "manual_seed", "models", "optim",
    "save", "testing", "to_numpy", "__version__",
]
