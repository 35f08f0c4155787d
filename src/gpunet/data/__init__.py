"""Data: IDX files, MNIST, the embedded sample, preprocessing and batching."""
from gpunet.data.datasets import DATASETS, TEXT_DATASETS, Dataset, load_dataset, load_mnist_sample, split
from gpunet.data.idx import read_idx, write_idx
from gpunet.data.mnist import MNIST_FILES, download_file, load_mnist
from gpunet.data.pipeline import apply_preprocess, image_preprocess, minibatches, random_shift, text_preprocess
from gpunet.data.text import CharWindows, TextDataset, consecutive_windows, decode, encode, load_shakespeare

__all__ = [
    "CharWindows", "DATASETS", "TEXT_DATASETS", "TextDataset", "consecutive_windows", "decode", "encode",
    "load_shakespeare", "text_preprocess", "Dataset", "MNIST_FILES", "apply_preprocess", "download_file", "image_preprocess",
    "load_dataset", "load_mnist", "load_mnist_sample", "minibatches", "random_shift", "read_idx",
    "split", "write_idx",
]
