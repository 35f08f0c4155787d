"""Prints gpunet/PyTorch ratios of median times for each benchmark group after the run."""
from __future__ import annotations


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    groups = {}
    for bench in session.benchmarks:
        side = "torch" if "torch" in bench.name else "gpunet"
        groups.setdefault(bench.group, {})[side] = bench.stats.median
    terminalreporter.write_sep("-", "gpunet / PyTorch (median time ratio; below 1 means gpunet is faster)")
    for group, sides in sorted(groups.items()):
        if "gpunet" in sides and "torch" in sides:
            terminalreporter.write_line(f"{group}: gpunet {sides['gpunet'] * 1e3:.3f} ms, PyTorch "
                                        f"{sides['torch'] * 1e3:.3f} ms, ratio {sides['gpunet'] / sides['torch']:.3f}")
