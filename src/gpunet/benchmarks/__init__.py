"""Side-by-side measurements of gpunet and PyTorch (PyTorch is imported only here, on demand)."""
