"""CUDA C sources of gpunet's kernels, one file per family; compiled lazily by CupyOps."""
