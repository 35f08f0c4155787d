"""Activation memory per precision (issue 30, item 5): gpunet.summary.saved_bytes counts what a forward keeps
for the backward, each array's memory once; in bf16 and fp16 the recipes' mlp, cnn and rnn keep at most 0.6 of
what they keep in fp32 (the rnn's LSTM keeps its 16-bit input and states h, and its backward recomputes the cell;
bench/precision_memory.py prints the table at the recipes' batch sizes)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy
import pytest

import gpunet as gn
from gpunet.backend import precision
from gpunet.recipes import RECIPES
from gpunet.summary import saved_bytes
from tests.support.arrays import on, rng


def test_saved_bytes_counts_each_kept_array_once():
    model = gn.models.mlp((20, 12, 8, 4))  # Dense-ReLU-Dense-ReLU-Dense
    model.forward(rng().standard_normal((16, 20)).astype("float32"))
    # the input (kept by the first Dense), each hidden layer's output (kept by its fused ReLU and, the same array,
    # by the next Dense), and the logits (the last Dense's output): float32
    assert saved_bytes(model) == 16 * (20 + 12 + 8 + 4) * 4


@pytest.mark.parametrize("name", ["mlp", "cnn", "rnn"])  # (the rnn: its LSTM recomputes its cell in the backward)
@pytest.mark.parametrize("kind", ["bf16", "fp16"])
def test_sixteen_bit_training_keeps_at_most_six_tenths_of_the_activation_memory(name, kind, device):
    recipe = RECIPES[name]
    classes = 65 if recipe.kind == "text" else 10
    gn.manual_seed(0)
    model = recipe.build(SimpleNamespace(num_classes=classes, x_train=None)).to(device).train()
    shape = (4, *recipe.input_shape)
    x = rng().integers(0, classes, shape) if recipe.kind == "text" else rng().standard_normal(shape).astype("float32")
    model.forward(on(device, x))
    full = saved_bytes(model)
    with precision.using(kind):
        model.forward(on(device, x))
    assert saved_bytes(model) <= 0.6 * full, f"{name} in {kind}: {saved_bytes(model)} of {full} bytes"
