"""`gpunet bench`: gpunet and PyTorch timed side by side, in one process, on one device.

Method: each pair is built, its first results checked to agree, then warmed up (JIT and
kernel compilation happen there); then gpunet and PyTorch alternate for `repeats` rounds of
about ROUND_SECONDS each (many calls of a fast op, one of a slow one), each after a pause of
SETTLE_SECONDS, synchronising the GPU before every clock read. A row reports the median
seconds per call of both, the spread (p10-p90 over rounds, relative to the median) and their
ratio; rate rows add GFLOP/s or GB/s and the share of the roofline measured in the same run
(the plain BLAS GEMM, or a device-to-device copy).

precision (`--precision bf16|fp16`) applies to the model rows (gpunet.benchmarks.steps says how each
side runs it); the kernel and dispatch rows run in fp32 whatever it is, and every row names its own.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy

from gpunet.benchmarks import REPEATS, TINY_REPEATS, kernels, steps
from gpunet.benchmarks.report import format_time
from gpunet.parity_bound import UNIT_16


# Rounds this long keep the handover between the libraries' thread pools a small part of a round.
ROUND_SECONDS = 0.25
# Before each round, a pause that lets the other library's idle worker threads park. OpenBLAS's
# workers spin on the cores for about 0.1 s after their last GEMM; one untimed call did not outlast
# that, so PyTorch's rounds after gpunet's shared the cores with spinning OpenBLAS threads and its
# short steps read up to 4x slower (bench/handover.py; bench/RESULTS.md, 2026-12-07).
SETTLE_SECONDS = 0.3


@dataclass
class Case:
    name: str
    group: str  # "kernel", "dispatch" or "model"
    build: object  # () -> Pair


@dataclass
class Pair:
    ours: object
    theirs: object
    work: float = 0.0  # FLOPs or bytes per call, for the rate column
    unit: str = ""  # "GFLOP/s" or "GB/s"
    roofline: object = None  # zero-argument call doing the same work at the ceiling rate
    samples: int = 0  # samples per call, for samples/s of model rows
    check: object = None  # (ours' result, theirs') -> None or raise; None compares losses
    precision: str = "fp32"  # the model steps' and the gemm16 rows' (the other kernel pairs' is fp32)


@dataclass
class Result:
    name: str
    group: str
    gpunet_s: float
    torch_s: float
    ratio: float
    gpunet_spread: float
    torch_spread: float
    rate: float | None = None
    unit: str = ""
    roofline_rate: float | None = None
    percent_of_roofline: float | None = None
    samples_per_s: float | None = None
    extra: dict = field(default_factory=dict)
    precision: str = "fp32"


TINY_BATCH = 4


def cases(device: str = "cpu", tiny: bool = False, precision: str = "fp32") -> list[Case]:
    """Every benchmark, in report order; tiny shrinks every size to check the harness quickly, and
    its names say the sizes it runs (a tiny run is never mistaken for the full-size one). The model
    steps run in precision, the kernels in fp32 (in bf16/fp16 the gemm16 rows add the Dense product in it)."""
    def model(names, make, batch, tiny_sizes):
        name, tiny_name = names
        if tiny:
            return Case(tiny_name, "model", lambda: _model(make, device, TINY_BATCH, precision, **tiny_sizes))
        return Case(name, "model", lambda: _model(make, device, batch, precision))
    b = TINY_BATCH
    return kernels.kernel_cases(Case, Pair, device, tiny, precision) + [
        model(("mlp-784-300-100-10-b128", f"mlp-784-300-100-10-b{b}"), steps.mlp_steps, 128, {}),
        model(("lenet-b64", f"lenet-b{b}"), steps.lenet_steps, 64, {}),
        model(("lstm-lm-b32-t64-h256", f"lstm-lm-b{b}-t8-h16"), steps.lstm_lm_steps, 32,
              dict(context=8, hidden=16, embedding=8)),
        model(("attention-block-b16-t128-d256-h4", f"attention-block-b{b}-t8-d16-h2"), steps.attention_block_steps, 16,
              dict(context=8, d_model=16, heads=2)),
        model(("transformer-2x-b16-t128-d256", f"transformer-2x-b{b}-t8-d16"), steps.transformer_steps, 16,
              dict(context=8, d_model=16, heads=2)),
    ]


def _model(make, device, batch, precision="fp32", **sizes) -> Pair:
    ours, theirs = make(batch=batch, device=device, precision=precision, **sizes)
    return Pair(ours, theirs, samples=batch, precision=precision)


def run(device: str = "cpu", only=None, tiny: bool = False, repeats: int | None = None, log=print,
        precision: str = "fp32", skipped: list | None = None):
    """Measure the selected cases; returns their Results in report order. A model PyTorch cannot run in
    precision (steps.TorchUnsupported) goes into skipped as (name, reason), or raises without it."""
    sync = synchroniser(device)
    results = []
    everything = cases(device, tiny, precision)
    selected = [c for c in everything if not only or any(word in c.name for word in only)]
    if not selected:
        raise ValueError(f"--only {','.join(only)} matches no benchmark; names: {', '.join(c.name for c in everything)}")
    for case in selected:
        pair = case.build()
        try:
            check_agreement(case.name, pair)
        except steps.TorchUnsupported as exc:
            if skipped is None:
                raise
            skipped.append((case.name, str(exc)))
            continue
        rounds = repeats or (TINY_REPEATS if tiny else REPEATS)
        inner = 1 if tiny else None  # tiny checks the harness: one call a round, no pauses
        ours_t, theirs_t = _alternate(pair.ours, pair.theirs, sync, rounds, inner)
        result = _summarise(case, pair, ours_t, theirs_t, sync, rounds, inner)
        log(f"  {case.name}: gpunet {format_time(result.gpunet_s)}, PyTorch {format_time(result.torch_s)}, "
            f"ratio {result.ratio:.2f}")
        results.append(result)
    _add_share_of_peak(results)
    return results


def _add_share_of_peak(results) -> None:
    """For GFLOP/s rows: the rate as a share of the fastest plain BLAS GEMM of this run."""
    peaks = [r.roofline_rate for r in results if r.unit == "GFLOP/s" and r.roofline_rate]
    for r in results:
        if peaks and r.unit == "GFLOP/s" and r.rate is not None:
            r.extra["percent_of_blas_peak"] = 100.0 * r.rate / max(peaks)
            r.extra["blas_peak_gflops"] = max(peaks)


def _alternate(ours, theirs, sync, rounds, inner):
    """Warm both up, then alternate timed rounds of the two."""
    calls = {fn: _calls_per_round(fn, sync, inner) for fn in (ours, theirs)}
    times = {ours: [], theirs: []}
    for _ in range(rounds):
        for fn in (ours, theirs):
            times[fn].append(_round(fn, calls[fn], sync, settle=inner is None))
    return numpy.array(times[ours]), numpy.array(times[theirs])


def _calls_per_round(fn, sync, inner) -> int:
    """Warm fn up (compilation, allocator pools, caches); inner=None sizes rounds to ROUND_SECONDS."""
    for _ in range(2):
        fn()
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return inner or max(1, min(5000, int(ROUND_SECONDS / max(time.perf_counter() - start, 1e-7))))


def _round(fn, calls: int, sync, settle: bool = False) -> float:
    """Seconds per call over one round."""
    if settle:
        time.sleep(SETTLE_SECONDS)  # the other library's worker threads park
    if calls > 1:
        fn()  # untimed: wakes this library's own workers
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - start) / calls


def _summarise(case, pair, ours_t, theirs_t, sync, rounds, inner) -> Result:
    med_ours, med_theirs = float(numpy.median(ours_t)), float(numpy.median(theirs_t))
    result = Result(case.name, case.group, med_ours, med_theirs, med_ours / med_theirs,
                    _spread(ours_t), _spread(theirs_t), unit=pair.unit, precision=pair.precision)
    if pair.work:
        result.rate = pair.work / med_ours / 1e9
        if pair.roofline is not None:
            calls = _calls_per_round(pair.roofline, sync, inner)
            roof_t = [_round(pair.roofline, calls, sync, settle=inner is None) for _ in range(rounds)]
            result.roofline_rate = pair.work / float(numpy.median(roof_t)) / 1e9
            result.percent_of_roofline = 100.0 * result.rate / result.roofline_rate
    if pair.samples:
        result.samples_per_s = pair.samples / med_ours
        result.extra["torch_samples_per_s"] = pair.samples / med_theirs
    return result


def _spread(times) -> float:
    low, high = numpy.percentile(times, [10, 90])
    return float((high - low) / numpy.median(times))


def agreement(precision: str) -> tuple[int, float]:
    """(losses compared, their relative tolerance): a check that both sides compute the same step, not a
    parity bound. fp32: the first two losses within 1e-3. bf16: within 2 u16 (u16 = 2^-8), as the loss of
    two roundings of the same products to bf16 may differ (PyTorch's autocast also rounds the products'
    outputs). fp16: the first loss alone, within 2 u16 (2^-11): whether a step's scaled gradients overflow
    differs between the two (autocast keeps the weight gradients in fp16, gpunet in float32: at batch 4
    PyTorch's GradScaler skips the mlp's first step and gpunet's does not), and a skipped step changes the
    next loss."""
    if precision == "fp32":
        return 2, 1e-3
    return (1 if precision == "fp16" else 2), 2 * UNIT_16[precision]


def check_agreement(name, pair):
    n, tolerance = agreement(pair.precision)
    try:
        if pair.check is not None:
            pair.check(pair.ours(), pair.theirs())
            return
        for ours, theirs in steps.first_losses(pair.ours, pair.theirs, n=n):
            if not abs(ours - theirs) <= tolerance * max(1.0, abs(theirs)):
                raise RuntimeError(f"gpunet's loss is {ours} but PyTorch's {theirs}"
                                   + (f" (in {pair.precision})" if pair.precision != "fp32" else ""))
    except steps.TorchUnsupported:
        raise
    except RuntimeError as exc:
        raise RuntimeError(f"benchmark {name}: {exc}; timing them would compare different computations") from None


def synchroniser(device):
    if device != "gpu":
        return lambda: None
    import cupy
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False  # float32 on both sides (cuDNN allows TF32 by default)
    torch.backends.cudnn.allow_tf32 = False

    def sync():
        cupy.cuda.get_current_stream().synchronize()
        torch.cuda.synchronize()
    return sync
