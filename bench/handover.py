"""How long one library's idle threads slow the other after it: `python3 bench/handover.py`.

Runs 100 training steps of the MLP in one library, pauses, then times the other library's next
10 steps; for each pause, the median over 6 repeats, both ways round. OpenBLAS's workers spin
for about 0.1 s after a GEMM, which is why `gpunet bench` pauses before every timed round
(runner.SETTLE_SECONDS; bench/RESULTS.md, 2026-12-07).
"""
from __future__ import annotations

import time

import numpy

from gpunet.benchmarks import steps

PAUSES = (0.0, 0.02, 0.05, 0.1, 0.2, 0.4)


def _per_step_ms(step, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - start) / n * 1e3


def handover(first, then, repeats: int = 6) -> dict:
    """{pause: median ms of `then`'s first 10 steps after 100 of `first` and that pause}."""
    times = {pause: [] for pause in PAUSES}
    for _ in range(repeats):
        for pause in PAUSES:
            _per_step_ms(first, 100)
            time.sleep(pause)
            times[pause].append(_per_step_ms(then, 10))
    return {pause: float(numpy.median(v)) for pause, v in times.items()}


def main() -> None:
    ours, theirs = steps.mlp_steps()
    for _ in range(20):
        ours()
        theirs()
    for label, first, then in (("PyTorch after gpunet", ours, theirs), ("gpunet after PyTorch", theirs, ours)):
        medians = handover(first, then)
        print(f"{label}: " + ", ".join(f"{pause} s pause {ms:.2f} ms" for pause, ms in medians.items()))


if __name__ == "__main__":
    main()
