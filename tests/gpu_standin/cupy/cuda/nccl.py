"""cupy.cuda.nccl for the stand-in: `available` is False by default, as on a machine whose CuPy came
with its [ctk] extra, which ships no NCCL (CuPy 14's cupy/cuda/nccl.py sets it when libnccl fails
to load). GPUNET_STANDIN_NCCL=1, or setting `available`, gives the stand-in's NCCL
(cupyx.distributed's NCCLBackend over a TCP store: tests/gpu_standin/cupyx/distributed)."""
from __future__ import annotations

import os

available = os.environ.get("GPUNET_STANDIN_NCCL", "").strip() == "1"
NCCL_VERSION = 22903  # what get_version() reports: 2.29.3


def get_version() -> int:
    if not available:
        raise RuntimeError("NCCL is not available")
    return NCCL_VERSION
