"""The real-CuPy tier (scripts/real_cupy_tier.sh) runs here, in .venv-realcupy, where the real
cupy-cuda13x wheel is installed. Its checks run in subprocesses: the suite's conftest puts the
CuPy stand-in in sys.modules, and these must import the real package.

In an interpreter without that wheel (the main suite's), only test_walker.py is collected: the
tier's other files are left out, and the report's header says so."""
from __future__ import annotations

from importlib import metadata

from tests.real_cupy import summary

WHEEL = "cupy-cuda13x"


def _wheel_version() -> str | None:
    try:
        return metadata.version(WHEEL)
    except metadata.PackageNotFoundError:
        return None


collect_ignore_glob = [] if _wheel_version() else ["test_real_*.py"]


def pytest_report_header(config):
    version = _wheel_version()
    if version:
        return f"real-CuPy tier: {WHEEL} {version} in this interpreter (checks run in subprocesses)"
    return f"real-CuPy tier: not collected ({WHEEL} is not installed here; bash scripts/real_cupy_tier.sh runs it)"


def pytest_terminal_summary(terminalreporter):
    if summary.LINES:
        terminalreporter.section("real CuPy, no GPU: what was checked")
        for line in summary.LINES:
            terminalreporter.write_line(line)
