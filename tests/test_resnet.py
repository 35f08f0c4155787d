"""gn.models.resnet (issue 29 item 7): its graph, its gradients (float64 finite differences, the PyTorch
twin, the stand-in GPU against the CPU), checkpoints, the `resnet` recipe through the CLI, and the
launches of one training step on the stand-in against a budget counted layer by layer."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy
import pytest

import gpunet as gn
from gpunet.layers import Add, BatchNorm2d, Conv2D
from gpunet.recipes import recipe
from tests.support.arrays import ON_STANDIN, rng


def tiny(**kwargs):
    """Three stages of one block on 8x8 images (8x8, 4x4, 2x2 maps): every kind of node of the recipe's
    model, two projections included, in a few hundred parameters."""
    gn.manual_seed(0)
    return gn.models.resnet(**{"width": 2, "blocks": 1, "input_size": 8, **kwargs})


def test_default_graph_names_and_shapes():
    model = gn.models.resnet()
    assert isinstance(model, gn.Model) and model.input_shapes == [(1, 28, 28)]
    assert model.forward(rng().random((3, 1, 28, 28), dtype=numpy.float32)).shape == (3, 10)
    convs = {name: layer for name, layer in model._children.items() if isinstance(layer, Conv2D)}
    assert list(convs) == ["stem_conv", "stage0_block0_conv1", "stage0_block0_conv2", "stage1_block0_conv1",
                           "stage1_block0_conv2", "stage1_block0_proj_conv", "stage2_block0_conv1",
                           "stage2_block0_conv2", "stage2_block0_proj_conv"]
    assert [convs[n].params["weight"].shape[0] for n in convs] == [16, 16, 16, 32, 32, 32, 64, 64, 64]
    assert convs["stage1_block0_proj_conv"].kernel == (1, 1) and convs["stage1_block0_proj_conv"].stride == (2, 2)
    assert all("bias" not in conv.params for conv in convs.values())  # the batch norms' shifts replace them
    assert sum(isinstance(layer, BatchNorm2d) for layer in model.layers) == 9
    assert sum(isinstance(layer, Add) for layer in model.layers) == 3
    assert model["pool"].kernel == (7, 7) and model["head"].params["weight"].shape == (10, 64)
    assert model.num_params() == 77_754


def test_blocks_widths_and_sizes():
    model = gn.models.resnet(num_classes=5, in_channels=3, width=4, blocks=(2, 1), input_size=(12, 10))
    x = rng().random((2, 3, 12, 10), dtype=numpy.float32)
    assert model.forward(x).shape == (2, 5)
    names = list(model._children)
    assert "stage0_block1_conv2" in names and "stage0_block0_proj_conv" not in names  # same shape: identity
    assert "stage1_block0_proj_conv" in names and model["pool"].kernel == (6, 5)
    assert "dropout" in gn.models.resnet(dropout=0.2)._children
    for bad in ((), (1, 0), 0):
        with pytest.raises(ValueError, match="blocks"):
            gn.models.resnet(blocks=bad)


def test_zero_init_residual_starts_each_block_as_its_shortcut():
    model = tiny(zero_init_residual=True)
    assert all(not model[f"stage{s}_block0_bn2"].params["weight"].any() for s in range(3))
    assert model["stem_bn"].params["weight"].all() and model["stage1_block0_proj_bn"].params["weight"].all()


def test_gradients_against_finite_differences_and_torch():
    """float64 central differences of the input gradient and every parameter's (batch norm in training
    mode, both shortcut kinds, the fan-out sums), and the PyTorch twin in float32."""
    torch = pytest.importorskip("torch")
    model = tiny()
    x = rng(1).standard_normal((4, 1, 8, 8))
    twin = gn.export.to_torch(model)
    assert isinstance(twin, torch.nn.Module)
    gn.testing.check_layer(model, x, torch_module=twin, gpu=False)


@pytest.mark.gpu
def test_gpu_matches_cpu():
    """The stand-in GPU (or a real one) against the CPU in float32 (the finite differences, checked above
    in full, on a sample of 16 elements a tensor here)."""
    gn.testing.check_layer(tiny(), rng(2).standard_normal((3, 1, 8, 8)), gpu=True, max_elements=16)


def test_save_load_round_trip(tmp_path):
    model = tiny()
    x = rng(3).random((5, 1, 8, 8), dtype=numpy.float32)
    opt = gn.optim.Adam(model, lr=1e-2)
    for _ in range(2):  # moves the weights and the batch norms' running statistics
        _, grad = gn.losses.softmax_cross_entropy(model.forward(x), numpy.arange(5))
        model.backward(grad)
        opt.step()
    gn.save(model, tmp_path / "r.safetensors")
    back = gn.load(tmp_path / "r.safetensors")
    assert isinstance(back, gn.Model) and list(back._children) == list(model._children)
    assert back["stage2_block0_proj_bn"].buffers["num_batches_tracked"] == 2
    model.eval(), back.eval()
    numpy.testing.assert_array_equal(back.forward(x), model.forward(x))


def test_recipe_builds_the_model():
    r = recipe("resnet")
    model = r.build(SimpleNamespace(num_classes=10))
    assert isinstance(model, gn.Model) and model.input_shapes == [r.input_shape]
    assert r.kind == "image" and r.dataset == "mnist-sample"


def test_train_command(tmp_path, capsys):
    from gpunet.cli import main

    out = tmp_path / "run"
    assert main(["train", "--model", "resnet", "--steps", "2", "--batch-size", "8", "--device", "cpu",
                 "--val-fraction", "0.02", "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out  # the summary lists the graph's nodes
    size = recipe("resnet").build(SimpleNamespace(num_classes=10)).num_params()
    assert "stage2_block0_add: Add()" in text and f"{size:,}" in text
    assert json.loads((out / "history.json").read_text())[-1]["step"] == 2
    assert isinstance(gn.load(out / "model.safetensors"), gn.Model)


# Launches of one eager training step (forward, softmax cross-entropy, backward, Adam), counted on the
# stand-in, layer by layer as they are today (the GEMM path: cuBLAS, whose Dense forward takes one more
# launch than the fused kernel). The count depends on the graph, not on widths, batch or image size.
FORWARD = {"conv": 3,    # im2col, the GEMM, the epilogue that lays the output out as NCHW
           "bn": 1,      # batch_norm_forward: the statistics, the running ones and the batch count, y and xhat
           "relu": 1, "add": 1, "pool": 2, "dense": 2}
BACKWARD = {"conv": 4,   # dY's layout, the weight-gradient GEMM, the input-gradient GEMM, col2im
            "first_conv": 2,  # no input gradient for the stem
            "bn": 1,     # batch_norm_backward: the parameters' gradients and the input's
            "relu": 1, "add": 0,
            "fan_out": 1,  # each block's input feeds the branch and the shortcut: the gradients' sum
            "pool": 3, "dense": 3}
LOSS_AND_ADAM = 2  # softmax cross-entropy, one fused kernel; Adam on the flat buffers, one launch


def launch_budget(blocks: list[int]) -> int:
    """The launches one step of resnet(blocks=blocks) may take: each layer kind's launches (above) times
    how many the graph has. resnet(): 9 convolutions and batch norms, 7 ReLUs, 3 adds -> 111, of
    which batch norm takes 18 (one launch each way; 279 when it was CuPy array ops, 372 the step)."""
    n = sum(blocks)
    convs, relus, adds = 1 + 2 * n + (len(blocks) - 1), 1 + 2 * n, n
    bns = convs
    forward = (convs * FORWARD["conv"] + bns * FORWARD["bn"] + relus * FORWARD["relu"] + adds * FORWARD["add"]
               + FORWARD["pool"] + FORWARD["dense"])
    backward = ((convs - 1) * BACKWARD["conv"] + BACKWARD["first_conv"] + bns * BACKWARD["bn"]
                + relus * BACKWARD["relu"] + adds * (BACKWARD["add"] + BACKWARD["fan_out"])
                + BACKWARD["pool"] + BACKWARD["dense"])
    return forward + backward + LOSS_AND_ADAM


@pytest.mark.gpu
@pytest.mark.skipif(not ON_STANDIN, reason="counts launches on the CuPy stand-in")
@pytest.mark.parametrize("gemm", ["cublas", "fused"])
def test_recipe_step_launch_budget(gemm):
    """The recipe's own model (28x28 images; batch 2: the count does not depend on it; two blocks a stage
    since round 7, so launch_budget([2, 2, 2]) = 183: the same per-layer counts, 24 launches more per
    identity block than one block a stage's 111), and the tiny two-block model against the same budget."""
    from tests.test_launch_budgets import mnist_batch, step_counts

    gn.manual_seed(0)
    r = recipe("resnet")
    counts = step_counts(r.build(SimpleNamespace(num_classes=10)), *mnist_batch(r.input_shape, 2), gemm)
    budget = launch_budget([r.arch["blocks"]] * 3)
    assert counts["launches"] <= budget and counts["d2h"] == 0 and counts["h2d"] == 0, counts
    deeper = step_counts(tiny(blocks=2), *mnist_batch((1, 8, 8), 2), gemm)
    assert deeper["launches"] <= launch_budget([2, 2, 2]) == 183, deeper


@pytest.mark.gpu
def test_parity_in_lockstep(monkeypatch):
    """`gpunet parity --model resnet --lockstep`: the recipe's model, node by node, every step within the
    float32 bound of gpunet.parity_bound (our fused GEMM on the stand-in, as tests/test_parity.py does)."""
    from gpunet import parity
    from gpunet.backend import ops_for_device
    from tests.test_parity import assert_within_bound

    if ON_STANDIN:
        monkeypatch.setattr(ops_for_device("gpu"), "gemm_mode", "fused")
    report = parity.compare("resnet", steps=2, devices=("cpu", "gpu"), batch_size=4, lockstep=True)
    assert "stage2_block0_add" in parity.format_report(report)
    assert_within_bound(report)
