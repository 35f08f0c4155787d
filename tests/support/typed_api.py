"""Code a user would write against the public API, type-checked by mypy in tests/test_packaging.py
(never run): the hints must accept it. test_packaging also checks that misuse is refused."""
from __future__ import annotations

from pathlib import Path

import numpy

import gpunet as gn


def train_and_save(folder: Path) -> float:
    dev: gn.Device = gn.device("auto")
    model: gn.Sequential = gn.models.mlp((784, 32, 10), dropout=0.1)
    model.to(dev)
    optimizer = gn.optim.Adam(model, lr=1e-3, betas=(0.9, 0.999))
    schedule = gn.optim.CosineLR(optimizer, t_max=100, warmup=10)
    x = dev.xp.asarray(numpy.zeros((4, 784), dtype=numpy.float32))
    y = dev.xp.asarray(numpy.zeros(4, dtype=numpy.int64))
    loss, grad = gn.losses.softmax_cross_entropy(model.forward(x), y)
    model.backward(grad)
    optimizer.step()
    schedule.step()
    gn.optim.clip_grad_norm(model, 1.0)
    path: Path = gn.save(model, folder / "m.safetensors")
    same: gn.layers.Layer = gn.load(path, device="cpu")
    same.eval()
    images: numpy.ndarray = gn.data.read_idx(folder / "images.idx")
    (train_x, train_y), _ = gn.data.load_mnist(folder, download=False)
    history: gn.History = gn.fit(model, (train_x, train_y), optimizer=gn.optim.SGD(model, 0.1, momentum=0.9),
                                 steps=10, out_dir=folder / "run")
    del images, same, history
    return gn.losses.item(loss)


def layers() -> list[gn.layers.Layer]:
    return [gn.layers.Dense(4, 3, bias=False), gn.layers.Conv2D(1, 6, 5, padding=2), gn.layers.MaxPool2D(2),
            gn.layers.LSTM(8, 16), gn.layers.MultiHeadAttention(16, 4, causal=True), gn.layers.LayerNorm(16),
            gn.layers.Embedding(65, 16), gn.layers.Dropout(0.1), gn.layers.BatchNorm2d(6)]
