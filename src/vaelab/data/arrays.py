"""``npz:PATH`` and ``npy:PATH``: images already in numpy arrays (never unpickled: allow_pickle=False).

Images: (N, H, W), (N, H, W, C) or (N, C, H, W); uint8 (or any integer type within 0..255), or float
in [0, 1] (rounded to the nearest k/255: the 8-bit likelihoods need 8-bit data). The channel axis is
the one of axes 1 and 3 that is <= 4 while the other is not; when both or neither are, it is the one
that leaves a square image, and NHWC when that too is a tie.

``npz`` keys (the first present wins):

* split: ``train_<k>``/``test_<k>`` or ``<k>_train``/``<k>_test`` (Keras' ``x_train``, ``y_train``...),
  with ``<k>`` an image key (``images``, ``x``, ``X``, ``data``) or a label key (``labels``, ``y``, ``Y``);
* unsplit: an image key and optionally a label key; the test split is then a seeded 10% hold-out
  (likewise when only train keys exist, and always for ``npy``, which holds images only).
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..config import DataConfig
from ..errors import DataError, DatasetNotFoundError
from ..safeio import CHUNK, check_declared, open_regular
from .base import ImageSet
from .folder import TEST_FRACTION, holdout
from .registry import SOURCES

IMAGE_KEYS = ("images", "x", "X", "data")
LABEL_KEYS = ("labels", "y", "Y")


def _channel_first(a: np.ndarray, name: str) -> np.ndarray:
    """(N, H, W) / (N, H, W, C) / (N, C, H, W) -> (N, C, H, W)."""
    if a.ndim == 3:
        return a[:, None]
    if a.ndim != 4:
        raise DataError(f"{name}: images must be (N, H, W), (N, H, W, C) or (N, C, H, W), got shape {a.shape}")
    _, d1, d2, d3 = a.shape
    small1, small3 = d1 <= 4, d3 <= 4
    if small3 and not small1:
        return a.transpose(0, 3, 1, 2)
    if small1 and not small3:
        return a
    if d1 == d2:  # (N, H, H, C): square if the last axis holds the channels
        return a.transpose(0, 3, 1, 2)
    if d2 == d3:
        return a
    raise DataError(f"{name}: cannot tell the channel axis of shape {a.shape}; store (N, C, H, W) or (N, H, W, C)")


def to_uint8(a: np.ndarray, name: str) -> np.ndarray:
    """Integer pixels 0..255 or float intensities in [0, 1] -> uint8; errors name the first bad element."""
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if np.issubdtype(a.dtype, np.integer):
        bad = (a < 0) | (a > 255)
        if bad.any():
            i = tuple(int(v) for v in np.argwhere(bad)[0])
            raise DataError(f"{name}: integer pixels must lie in 0..255; element {list(i)} is {a[i]}")
        return a.astype(np.uint8)
    if np.issubdtype(a.dtype, np.floating):
        bad = ~np.isfinite(a) | (a < 0) | (a > 1)
        if bad.any():
            i = tuple(int(v) for v in np.argwhere(bad)[0])
            raise DataError(f"{name}: float pixels must be finite and in [0, 1]; element {list(i)} (image {i[0]}) "
                            f"is {a[i]}")
        return np.floor(a * 255.0 + 0.5).astype(np.uint8)
    raise DataError(f"{name}: unsupported pixel dtype {a.dtype}")


def _grey(a: np.ndarray) -> np.ndarray:
    """(N, 3, H, W) uint8 -> (N, 1, H, W) luma, ITU-R 601 (as Pillow's convert('L'))."""
    a = a.astype(np.uint32)
    y = (a[:, 0] * 299 + a[:, 1] * 587 + a[:, 2] * 114 + 500) // 1000
    return y.astype(np.uint8)[:, None]


def make_images(images: np.ndarray, labels: np.ndarray | None, name: str, cfg: DataConfig,
                label_name: str = "labels") -> ImageSet:
    x = to_uint8(_channel_first(np.asarray(images), name), name)
    if cfg.grayscale and x.shape[1] == 3:
        x = _grey(x)
    lab, num_classes = None, None
    if labels is not None:
        lab = np.asarray(labels)
        if lab.ndim == 2 and lab.shape[1] == 1:
            lab = lab[:, 0]
        if lab.ndim != 1 or not (np.issubdtype(lab.dtype, np.integer) or lab.dtype == np.bool_):
            raise DataError(f"{label_name}: labels must be a 1-D integer array, got {lab.dtype} {lab.shape}")
        if lab.shape[0] != x.shape[0]:
            raise DataError(f"{label_name}: {lab.shape[0]} labels for {x.shape[0]} images in {name}")
        if lab.size and lab.min() < 0:
            raise DataError(f"{label_name}: negative label {lab.min()}")
        lab = lab.astype(np.int64)
        num_classes = int(lab.max()) + 1 if lab.size else None
    return ImageSet.from_numpy(x, lab, source=name, num_classes=num_classes)


def _find(keys: list[str], names: tuple[str, ...], split: str | None) -> str | None:
    for n in names:
        for k in ((n,) if split is None else (f"{split}_{n}", f"{n}_{split}")):
            if k in keys:
                return k
    return None


def _open(path: str) -> tuple[Path, BinaryIO, int]:
    p = Path(path).expanduser()
    if not p.exists() and not p.is_symlink():
        raise DatasetNotFoundError(f"{p}: no such file")
    fh, size = open_regular(p, DataError, "data file")
    return p, fh, size


def read_npy_stream(fh: BinaryIO, name: str, available: int | None, compressed: int | None) -> np.ndarray:
    """One ``.npy`` array from ``fh``, never allocating more than its header declares, and refusing a
    declaration beyond the bytes that are there (``available``: the bytes after the magic string, for
    a file or a zip member whose size is known), beyond the byte limit, or (``compressed``: the size of
    the compressed member) beyond the compression ratio limit. Object arrays (which need pickle) are
    refused: nothing here unpickles."""
    fmt = np.lib.format
    try:
        start = fh.tell() if fh.seekable() else 0
        version = fmt.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(fh)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
        used = (fh.tell() - start) if fh.seekable() else None
    except DataError:
        raise
    except Exception as e:  # numpy's header parser of untrusted bytes: ValueError, EOFError, SyntaxError...
        raise DataError(f"{name}: not a readable .npy array ({type(e).__name__}: {e})") from None
    if dtype.hasobject:
        raise DataError(f"{name}: not a readable .npy array: it holds Python objects (dtype {dtype}), which only "
                        "pickle can load, and vaelab never unpickles; store numeric arrays")
    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    what = f"declares an array of shape {tuple(shape)} {dtype}, i.e."
    if available is not None and used is not None and nbytes > available - used:
        raise DataError(f"{name}: truncated: {what} {nbytes} bytes, but {max(available - used, 0)} are there")
    check_declared(name, nbytes, compressed, DataError, what)
    try:
        arr = np.empty(count, dtype=dtype)
    except (MemoryError, ValueError) as e:
        raise DataError(f"{name}: cannot hold an array of shape {tuple(shape)} {dtype} ({type(e).__name__})") from None
    view = memoryview(arr.view(np.uint8)) if nbytes else memoryview(b"")
    done = 0
    while done < nbytes:
        block = fh.read(min(CHUNK, nbytes - done))
        if not block:
            raise DataError(f"{name}: truncated: {what} {nbytes} bytes, but only {done} follow the header")
        view[done : done + len(block)] = block
        done += len(block)
    return arr.reshape(shape, order="F" if fortran else "C")


def read_npz(path: str, cfg: DataConfig) -> dict[str, ImageSet]:
    p, fh, size = _open(path)
    with fh:
        if fh.read(6) == b"\x93NUMPY":
            raise DataError(f"{p}: is a single .npy array, not an .npz archive; use npy:{path}")
        fh.seek(0)
        try:
            zf = zipfile.ZipFile(fh)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            raise DataError(f"{p}: not an .npz file (a zip archive of .npy arrays, as numpy.savez writes): {e}; "
                            "for a single array use npy:PATH, for a folder of images folder:PATH") from None
        with zf:
            try:
                infos = {(i.filename[:-4] if i.filename.endswith(".npy") else i.filename): i for i in zf.infolist()}
            except Exception as e:  # pragma: no cover - infolist only lists what ZipFile parsed
                raise DataError(f"{p}: not a readable .npz file ({type(e).__name__}: {e})") from None
            keys = list(infos)

            def get(k: str) -> np.ndarray:
                info = infos[k]
                compressed = None if info.compress_type == zipfile.ZIP_STORED else info.compress_size
                check_declared(f"{p}:{k}", info.file_size, compressed, DataError, "declares a member of")
                try:
                    with zf.open(info) as m:
                        return read_npy_stream(m, f"{p}:{k}", info.file_size, compressed)
                except DataError:
                    raise
                except Exception as e:  # the zip reader on untrusted bytes: bad CRC, zlib.error, encryption...
                    raise DataError(f"{p}:{k}: cannot read array ({type(e).__name__}: {e})") from None

            def one(split: str | None) -> ImageSet | None:
                ik = _find(keys, IMAGE_KEYS, split)
                if ik is None:
                    return None
                lk = _find(keys, LABEL_KEYS, split)
                return make_images(get(ik), None if lk is None else get(lk), f"{p}:{ik}", cfg,
                                   f"{p}:{lk}")

            train, test = one("train"), one("test")
            if train is None:
                train = one(None)
            if train is None:
                raise DataError(
                    f"{p}: no image array; expected a key among {', '.join(IMAGE_KEYS)} (or train_/test_ "
                    f"versions); the file has {', '.join(keys) or 'no arrays'}"
                )
    if test is None:
        return holdout(train, TEST_FRACTION, cfg.seed)
    if train.num_classes is not None and test.num_classes is not None:
        n = max(train.num_classes, test.num_classes)
        train = ImageSet(train.images, train.labels, train.source, n)
        test = ImageSet(test.images, test.labels, test.source, n)
    return {"train": train, "test": test}


def read_npy(path: str, cfg: DataConfig) -> dict[str, ImageSet]:
    p, fh, size = _open(path)
    with fh:
        if fh.read(4) == b"PK\x03\x04":
            raise DataError(f"{p}: is an .npz (zip) archive, not a single .npy array; use npz:{path}")
        fh.seek(0)
        try:
            a = read_npy_stream(fh, str(p), size, None)
        except OSError as e:
            raise DataError(f"{p}: cannot read: {e.strerror or e}") from None
        if fh.read(1):
            raise DataError(f"{p}: not a readable .npy array: unexpected bytes after the array")
    return holdout(make_images(a, None, str(p), cfg), TEST_FRACTION, cfg.seed)


SOURCES.add("npz", read_npz)
SOURCES.add("npy", read_npy)
