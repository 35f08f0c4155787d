"""How much of each benchmark step is GEMM, and how fast the same GEMMs run in PyTorch:
`python3 bench/gemm_floor.py [rounds]`.

Records every numpy.matmul that one gpunet training step makes (the arrays themselves, so the
shapes, strides and transpositions are the step's own), then times, in alternating rounds on
the same machine: gpunet's step, PyTorch's step, those matmuls replayed in NumPy (OpenBLAS), and
the same matmuls in torch.matmul on the same memory (PyTorch's BLAS). Per model it prints:

- floor: NumPy's GEMMs alone / PyTorch's whole step, the best ratio gpunet could reach if
  everything but its GEMMs took no time (issue 18's targets are 0.8 and 0.9);
- gemm share: NumPy's GEMMs / gpunet's step;
- blas ratio: NumPy's GEMMs / the same GEMMs in PyTorch.
"""
from __future__ import annotations

import sys
import time

import numpy

from gpunet.benchmarks import steps
from gpunet.benchmarks.twins import import_torch

MODELS = ("mlp_steps", "lenet_steps", "lstm_lm_steps", "attention_block_steps")


def record_matmuls(step) -> list:
    """(a, b, out) of every numpy.matmul one call of step makes (the step's own arrays)."""
    calls, real = [], numpy.matmul

    def recording(a, b, out=None, **kwargs):
        calls.append((a, b, out))
        return real(a, b, out=out, **kwargs)
    numpy.matmul = recording
    try:
        step()
    finally:
        numpy.matmul = real
    return calls


def replay_numpy(calls):
    """The step's matmuls again; outputs land where the step's did (it overwrites them next time)."""
    def run():
        return [numpy.matmul(a, b, out=out) for a, b, out in calls]
    return run


def replay_torch(calls):
    torch = import_torch()
    pairs = [(torch.from_numpy(a), torch.from_numpy(b)) for a, b, _ in calls]  # the same memory and strides

    def run():
        return [torch.matmul(a, b) for a, b in pairs]
    return run


def per_call_ms(fn, n: int = 5) -> float:
    fn()
    time.sleep(0.3)  # OpenBLAS's workers stop spinning after about 0.1 s (bench/handover.py)
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e3


def measure(model: str, rounds: int) -> dict:
    ours, theirs = getattr(steps, model)()
    for _ in range(2):
        ours()
    calls = record_matmuls(ours)
    timed = {"gpunet step": ours, "torch step": theirs, "numpy gemms": replay_numpy(calls),
             "torch gemms": replay_torch(calls)}
    times: dict = {name: [] for name in timed}
    for _ in range(rounds):
        for name, fn in timed.items():
            times[name].append(per_call_ms(fn))
    medians = {name: float(numpy.median(t)) for name, t in times.items()}
    medians["calls"] = len(calls)
    return medians


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    print(f"{'model':24s} {'gpunet':>8s} {'torch':>8s} {'np gemm':>8s} {'pt gemm':>8s} {'ratio':>6s} "
          f"{'floor':>6s} {'share':>6s} {'blas':>6s}  (ms per step, medians of {rounds} rounds)")
    for model in MODELS:
        m = measure(model, rounds)
        print(f"{model:24s} {m['gpunet step']:8.2f} {m['torch step']:8.2f} {m['numpy gemms']:8.2f} "
              f"{m['torch gemms']:8.2f} {m['gpunet step'] / m['torch step']:6.3f} "
              f"{m['numpy gemms'] / m['torch step']:6.3f} {m['numpy gemms'] / m['gpunet step']:6.3f} "
              f"{m['numpy gemms'] / m['torch gemms']:6.3f}  ({m['calls']} matmuls)", flush=True)


if __name__ == "__main__":
    main()
