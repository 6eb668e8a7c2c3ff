"""Reader for the IDX format of the MNIST family (LeCun et al.), gzipped or raw.

Layout: two zero bytes, a type code, the number of dimensions, then one big-endian int32 per
dimension, then the data in big-endian order.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from ..errors import DataError

# type code -> big-endian numpy dtype
_IDX_TYPES: dict[int, str] = {
    0x08: ">u1",
    0x09: ">i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


def read_bytes(path: str | os.PathLike[str]) -> bytes:
    """Read a file, transparently gunzipping ``*.gz``; errors name the file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: corrupted or truncated gzip data ({e})") from None
    if path.suffix == ".gz":
        raise DataError(f"{path}: named .gz but is not gzip data")
    return raw


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse IDX bytes into a numpy array (native byte order)."""
    if len(data) < 4:
        raise DataError(f"{name}: too short for an IDX header ({len(data)} bytes)")
    zero1, zero2, code, ndim = data[0], data[1], data[2], data[3]
    if zero1 != 0 or zero2 != 0 or code not in _IDX_TYPES:
        raise DataError(
            f"{name}: wrong magic number {data[:4].hex()} (an IDX file starts with 0000 then a type code "
            f"in {{08,09,0b,0c,0d,0e}})"
        )
    if ndim == 0:
        raise DataError(f"{name}: IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{name}: truncated IDX header (needs {header} bytes, file has {len(data)})")
    shape = struct.unpack(">" + "I" * ndim, data[4:header])
    dtype = np.dtype(_IDX_TYPES[code])
    count = math.prod(shape)  # exact: np.prod would wrap around in int64 for huge declared shapes
    expected = header + count * dtype.itemsize
    if len(data) < expected:
        raise DataError(
            f"{name}: truncated: header declares shape {tuple(shape)} ({expected} bytes) "
            f"but the file has {len(data)} bytes"
        )
    if len(data) > expected:
        raise DataError(
            f"{name}: {len(data) - expected} unexpected trailing bytes after shape {tuple(shape)}"
        )
    try:
        arr = np.frombuffer(data, dtype=dtype, count=count, offset=header).reshape(shape)
    except ValueError as e:  # e.g. a zero-size shape whose other dimensions overflow numpy's limits
        raise DataError(f"{name}: declared shape {tuple(shape)} is not a valid array shape ({e})") from None
    return arr.astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (``.gz`` or raw) into a numpy array."""
    return parse_idx(read_bytes(path), str(path))


def write_idx(path: str | os.PathLike[str], array: np.ndarray, compress: bool | None = None) -> None:
    """Write an array as IDX (gzipped when ``path`` ends in .gz). Used by tests and exporters."""
    path = Path(path)
    arr = np.asarray(array)
    inv = {np.dtype(v).newbyteorder("="): k for k, v in _IDX_TYPES.items()}
    code = inv.get(arr.dtype.newbyteorder("="))
    if code is None:
        raise DataError(f"{path}: dtype {arr.dtype} cannot be stored as IDX")
    payload = bytes([0, 0, code, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    payload += arr.astype(np.dtype(_IDX_TYPES[code]), copy=False).tobytes()
    if compress if compress is not None else path.suffix == ".gz":
        payload = gzip.compress(payload)
    path.write_bytes(payload)
