"""A stand-in for nvmath-python (the part gpunet uses: nvmath.linalg.advanced.Matmul with cuBLASLt's
bias epilogues), over the CuPy stand-in, so the cuBLASLt path of the GEMM dispatch runs in CI.
It follows nvmath's documented rules strictly (see linalg/advanced), computes with stand-in array
ops (a graph capture records them) and runs nothing of NVIDIA's."""
