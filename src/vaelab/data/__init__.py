"""Data: readers for each format, the data set registry and its resolution order."""

from .base import DataSplits, ImageSet, binarize, to_float
from .idx import read_idx, write_idx
from .registry import DATASETS, SOURCES, DatasetSpec, load_data, load_splits, register_dataset
from .sources import RemoteFile, candidate_dirs, locate

# Each module registers its data sets / sources on import.
from . import arrays, cifar, folder, shards, svhn  # noqa: E402, F401  isort: skip

__all__ = [
    "DATASETS",
    "SOURCES",
    "DataSplits",
    "DatasetSpec",
    "ImageSet",
    "RemoteFile",
    "binarize",
    "candidate_dirs",
    "load_data",
    "load_splits",
    "locate",
    "read_idx",
    "register_dataset",
    "to_float",
    "write_idx",
]
