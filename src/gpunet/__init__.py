"""gpunet: a small, readable deep-learning library for NumPy (CPU) and CuPy (GPU)."""
from gpunet import callbacks, data, export, init, layers, losses, models, optim, train
from gpunet.backend import Device, device, has_cupy, has_gpu, to_numpy
from gpunet.checkpoint import load, save
from gpunet.history import History
from gpunet.layers import Sequential
from gpunet.random import manual_seed
from gpunet.train import TrainingDiverged, evaluate, fit

__version__ = "0.1.0"  # the one place it is written: pyproject.toml reads it (dynamic version)

__all__ = [
    "Device", "History", "Sequential", "TrainingDiverged", "callbacks", "data", "device", "evaluate", "export", "fit",
    "has_cupy", "has_gpu", "init", "layers", "load", "losses", "manual_seed", "models", "optim",
    "save", "to_numpy", "__version__",
]
