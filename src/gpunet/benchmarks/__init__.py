"""Side-by-side measurements of gpunet and PyTorch (PyTorch is imported only here, on demand)."""

# Timed rounds per side: the one place these are written (the runner and `gpunet bench --help` read them)
REPEATS = 5
TINY_REPEATS = 3
