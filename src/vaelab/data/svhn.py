"""SVHN, Street View House Numbers (Netzer et al. 2011), cropped-digit format: 32x32 colour digits.

Files ``train_32x32.mat`` (73,257), ``test_32x32.mat`` (26,032) and, optionally, ``extra_32x32.mat``
(531,131; appended to train when ``data.svhn_extra`` is true). Each is a MATLAB (v5) file with
``X`` uint8 (32, 32, 3, N) and ``y`` (N, 1) where label 10 stands for the digit 0.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from ..config import DataConfig
from ..errors import DataError
from ..safeio import CHUNK, BoundedInflater, check_declared, open_regular
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


_MI_MATRIX, _MI_COMPRESSED = 14, 15


class _Slice(io.RawIOBase):
    """At most ``n`` bytes of ``fh`` from its current position."""

    def __init__(self, fh: BinaryIO, n: int) -> None:
        self.fh, self.left = fh, n

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        size = self.left if size < 0 else min(size, self.left)
        data = self.fh.read(size) if size else b""
        self.left -= len(data)
        return data


def check_mat_sizes(fh: BinaryIO, size: int, name: str) -> None:
    """Walk the top-level data elements of a MATLAB v5 file before scipy reads it. A compressed
    element (a zlib stream holding one variable) has the size its inner tag declares checked against
    the limits (bytes, and ratio to its compressed size; see :mod:`vaelab.safeio`), then is
    decompressed in a stream, discarding the output, to make sure it holds no more than declared.
    scipy then allocates only what was checked. Other versions (v4, v7.3 HDF5) are left to scipy:
    they are not compressed this way."""
    head = fh.read(128)
    endian = {b"IM": "<", b"MI": ">"}.get(head[126:128]) if len(head) == 128 else None
    pos = 128
    while endian is not None and pos + 8 <= size:
        fh.seek(pos)
        mdtype, nbytes = struct.unpack(endian + "II", fh.read(8))
        if mdtype not in (_MI_MATRIX, _MI_COMPRESSED) or pos + 8 + nbytes > size:
            break  # not something this check understands, or truncated: scipy reports it
        if mdtype == _MI_COMPRESSED:
            where = f"{name} (compressed variable at byte {pos})"
            src = BoundedInflater(_Slice(fh, nbytes), where, DataError, 8, wbits=15)  # type: ignore[arg-type]
            inner = src.read(8)
            if len(inner) < 8:
                raise DataError(f"{where}: truncated compressed variable")
            declared = struct.unpack(endian + "II", inner)[1] + 8
            check_declared(where, declared, nbytes, DataError, "declares a variable of")
            src.cap = declared + 8  # MATLAB pads the last sub-element to 8 bytes
            while src.read(CHUNK):
                pass
        pos += 8 + nbytes
    fh.seek(0)


def read_svhn_mat(path: Path) -> ImageSet:
    """One ``*_32x32.mat`` file -> uint8 images (N, 3, 32, 32) and labels 0..9."""
    from scipy.io import loadmat, whosmat  # scipy is slow to import; only SVHN needs it

    fh, size = open_regular(path, DataError, "data file")
    with fh:
        try:
            check_mat_sizes(fh, size, str(path))
            mat = loadmat(fh, variable_names=("X", "y"))
            missing = [k for k in ("X", "y") if k not in mat]
            have = sorted(name for name, _, _ in whosmat(fh)) if missing else []
        except NotImplementedError as e:  # MATLAB v7.3 files are HDF5
            raise DataError(f"{path}: unsupported MATLAB file version ({e}); save it as v5/v7") from None
        except DataError:
            raise
        except MemoryError:
            raise DataError(f"{path}: not enough memory to read it") from None
        except Exception as e:  # scipy's parser of untrusted bytes: MatReadError, ValueError, zlib.error, ...
            raise DataError(f"{path}: not a readable MATLAB .mat file ({type(e).__name__}: {e})") from None
    if missing:
        raise DataError(f"{path}: missing variable(s) {', '.join(missing)} (an SVHN file holds X and y); has {have}")
    x, y = np.asarray(mat["X"]), np.asarray(mat["y"]).reshape(-1)
    if x.ndim != 4 or x.shape[2] != 3 or x.dtype != np.uint8:
        raise DataError(f"{path}: X must be uint8 of shape (H, W, 3, N), got {x.dtype} {x.shape}")
    if y.shape[0] != x.shape[3]:
        raise DataError(f"{path}: {y.shape[0]} labels in y for {x.shape[3]} images in X")
    try:
        labels = y.astype(np.int64)
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: y must hold integer labels ({e})") from None
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
