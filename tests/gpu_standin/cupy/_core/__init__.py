"""cupy._core for the stand-in: the compute type of float products (what gpunet sets through
set_compute_type: devices.configure_tf32). Matmul, dot and tensordot read it (cupy._ndarray)."""
from cupy._core._routines_linalg import get_compute_type, set_compute_type  # noqa: F401
from cupy._ndarray import ndarray  # noqa: F401
