"""What mixed precision costs the CPU (issue 30, item 3): the median CPU time of one forward and backward in
fp32, and in bf16 and fp16 as a multiple of it, for four models (process time: run it with one thread,
OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 NUMBA_NUM_THREADS=1, as bench/RESULTS.md's CPU figures).

    python bench/precision_cpu_cost.py [--numpy-casts] [--repeats N]

--numpy-casts rounds with NumPy's and ml_dtypes' casts (the base Ops') instead of the Numba kernels of
gpunet.backend.cpu_precision_kernels: the same values, bit for bit, at NumPy's speed.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--numpy-casts", action="store_true", help="NumPy's casts, not gpunet's Numba kernels")
    parser.add_argument("--repeats", type=int, default=10, help="timed passes per model and precision (default 10)")
    args = parser.parse_args()
    import gpunet as gn
    from gpunet.backend import precision
    from gpunet.backend.numpy_ops import NumpyOps
    from gpunet.backend.sixteen_bit_ops import SixteenBitOps

    if args.numpy_casts:
        for name in ("round_16bit", "to_16bit", "from_16bit"):
            setattr(NumpyOps, name, getattr(SixteenBitOps, name))
    r = numpy.random.default_rng(0)
    cases = {
        "mlp 784-300-100-10 (batch 128)": (lambda: gn.models.mlp((784, 300, 100, 10)),
                                           r.standard_normal((128, 784)).astype("float32")),
        "wide_cnn (batch 64)": (lambda: gn.models.wide_cnn(10), r.standard_normal((64, 1, 28, 28)).astype("float32")),
        "char_rnn (32 x 64)": (lambda: gn.models.char_rnn(65), r.integers(0, 65, (32, 64))),
        "transformer (16 x 64)": (lambda: gn.models.transformer(65, context=64), r.integers(0, 65, (16, 64))),
    }
    print(f"| model | fp32 ms | bf16 | fp16 |  ({'NumPy casts' if args.numpy_casts else 'Numba kernels'})")
    for name, (make, x) in cases.items():
        row = []
        for kind in ("fp32", "bf16", "fp16"):
            gn.manual_seed(0)
            model = make()
            times = []
            with precision.using(kind):
                for _ in range(args.repeats + 2):  # two warm-up passes: Numba's compilation, buffers
                    began = time.process_time()
                    y = model.forward(x)
                    model.backward(numpy.ones_like(y) / y.size)
                    times.append(time.process_time() - began)
            row.append(statistics.median(times[2:]) * 1e3)
        print(f"| {name} | {row[0]:.1f} | {row[1] / row[0]:.2f}x | {row[2] / row[0]:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
