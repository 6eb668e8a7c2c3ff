"""SVHN, Street View House Numbers (Netzer et al. 2011), cropped-digit format: 32x32 colour digits.

Files ``train_32x32.mat`` (73,257), ``test_32x32.mat`` (26,032) and, optionally, ``extra_32x32.mat``
(531,131; appended to train when ``data.svhn_extra`` is true). Each is a MATLAB (v5) file with
``X`` uint8 (32, 32, 3, N) and ``y`` (N, 1) where label 10 stands for the digit 0.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..config import DataConfig
from ..errors import DataError
from .base import ImageSet
from .registry import DatasetSpec, register_dataset
from .sources import RemoteFile, locate

_URL = "http://ufldl.stanford.edu/housenumbers/"
TRAIN = RemoteFile(
    "train_32x32.mat", (_URL + "train_32x32.mat",),
    "435e94d69a87fde4fd4d7f3dd208dfc32cb6ae8af2240d066de1df7508d083b8", 182040794,
)
TEST = RemoteFile(
    "test_32x32.mat", (_URL + "test_32x32.mat",),
    "cdce80dfb2a2c4c6160906d0bd7c68ec5a99d7ca4831afa54f09182025b6a75b", 64275384,
)
EXTRA = RemoteFile(
    "extra_32x32.mat", (_URL + "extra_32x32.mat",),
    "a133a4beb38a00fcdda90c9489e0c04f900b660ce8a316a5e854838379a71eb3", 1329278602,
)


def read_svhn_mat(path: Path) -> ImageSet:
    """One ``*_32x32.mat`` file -> uint8 images (N, 3, 32, 32) and labels 0..9."""
    from scipy.io import loadmat, whosmat  # scipy is slow to import; only SVHN needs it

    try:
        mat = loadmat(str(path), variable_names=("X", "y"))
    except NotImplementedError as e:  # MATLAB v7.3 files are HDF5
        raise DataError(f"{path}: unsupported MATLAB file version ({e}); save it as v5/v7") from None
    except Exception as e:  # scipy's parser of untrusted bytes: MatReadError, ValueError, zlib.error, ...
        raise DataError(f"{path}: not a readable MATLAB .mat file ({type(e).__name__}: {e})") from None
    missing = [k for k in ("X", "y") if k not in mat]
    if missing:
        have = sorted(name for name, _, _ in whosmat(str(path)))
        raise DataError(f"{path}: missing variable(s) {', '.join(missing)} (an SVHN file holds X and y); has {have}")
    x, y = np.asarray(mat["X"]), np.asarray(mat["y"]).reshape(-1)
    if x.ndim != 4 or x.shape[2] != 3 or x.dtype != np.uint8:
        raise DataError(f"{path}: X must be uint8 of shape (H, W, 3, N), got {x.dtype} {x.shape}")
    if y.shape[0] != x.shape[3]:
        raise DataError(f"{path}: {y.shape[0]} labels in y for {x.shape[3]} images in X")
    labels = y.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() > 10):
        raise DataError(f"{path}: labels outside 0..10 (min {labels.min()}, max {labels.max()})")
    labels[labels == 10] = 0  # SVHN writes the digit 0 as class 10
    return ImageSet.from_numpy(x.transpose(3, 2, 0, 1), labels, source=str(path), num_classes=10)


def _load(files: dict[str, Path], cfg: DataConfig) -> dict[str, ImageSet]:
    train = read_svhn_mat(files[TRAIN.name])
    if cfg.svhn_extra:
        extra = read_svhn_mat(locate("svhn", (EXTRA,), cfg.data_dir, cfg.download)[EXTRA.name])
        assert train.labels is not None and extra.labels is not None
        train = ImageSet(
            torch.cat([train.images, extra.images]), torch.cat([train.labels, extra.labels]),
            f"{train.source} + {extra.source}", 10,
        )
    return {"train": train, "test": read_svhn_mat(files[TEST.name])}


register_dataset(
    DatasetSpec(
        "svhn",
        (TRAIN, TEST),
        _load,
        "Street View House Numbers (Netzer et al. 2011), 32x32 colour digits, 73k/26k (+531k extra)",
    )
)
