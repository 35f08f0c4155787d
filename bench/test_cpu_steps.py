"""CPU training steps, gpunet beside PyTorch in the same run: `pytest bench/ --benchmark-only`.

Each pair is checked to compute the same losses before it is timed; the ratio of medians is
printed at the end (bench/conftest.py)."""
from __future__ import annotations

import pytest

from gpunet.benchmarks import steps

torch = pytest.importorskip("torch")
torch.set_num_threads(torch.get_num_threads())

CASES = {
    "mlp-784-300-100-10-b128": (steps.mlp_steps, 200),
    "lenet-b64": (steps.lenet_steps, 40),
    "conv-b64-c1-6-28px-k5-p2": (lambda: steps.conv_steps(64, 1, 6, 28, 5, 2), 50),
    "conv-b64-c6-16-14px-k5": (lambda: steps.conv_steps(64, 6, 16, 14, 5, 0), 50),
    "conv-b32-c32-64-14px-k3-p1": (lambda: steps.conv_steps(32, 32, 64, 14, 3, 1), 30),
    "lstm-lm-b32-t64-f64-h256-v65": (steps.lstm_lm_steps, 15),
    "attention-block-b16-t128-d256-h4": (steps.attention_block_steps, 10),
}
_built = {}


def pair(name):
    if name not in _built:
        make, _ = CASES[name]
        ours, theirs = make()
        for a, b in steps.first_losses(ours, theirs):
            assert abs(a - b) <= 1e-3 * max(1.0, abs(b)), (name, a, b)
        _built[name] = (ours, theirs)
    return _built[name]


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("side", ["gpunet", "torch"])
def test_step(benchmark, name, side):
    benchmark.group = name
    benchmark.name = f"{name}[{side}]"
    fn = pair(name)[0 if side == "gpunet" else 1]
    benchmark.pedantic(fn, rounds=CASES[name][1], iterations=1, warmup_rounds=5)
