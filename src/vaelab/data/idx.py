"""Reader for the IDX format of the MNIST family (LeCun et al.), gzipped or raw.

Layout: two zero bytes, a type code, the number of dimensions, then one big-endian int32 per
dimension, then the data in big-endian order.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..safeio import CHUNK, BoundedInflater, check_declared, limits, open_regular, read_exactly

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
    """Read a file (a regular file within the size limit), transparently gunzipping ``*.gz`` with the
    output capped by the byte limit; errors name the file."""
    path = Path(path)
    fh, size = open_regular(path, DataError, "data file")
    with fh:
        try:
            if fh.read(2) == b"\x1f\x8b":
                fh.seek(0)
                src = BoundedInflater(fh, str(path), DataError, limits().max_bytes)
                parts = []
                while block := src.read(CHUNK):
                    parts.append(block)
                return b"".join(parts)
            if path.suffix == ".gz":
                raise DataError(f"{path}: named .gz but is not gzip data")
            fh.seek(0)
            return read_exactly(fh, size, allow_short=True)
        except OSError as e:
            raise DataError(f"{path}: cannot read: {e.strerror or e}") from None


def _header(data: bytes, name: str) -> tuple[np.dtype, tuple[int, ...], int]:
    """(dtype, shape, header length) from the first bytes of an IDX file (at least 4)."""
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
    return np.dtype(_IDX_TYPES[data[2]]), shape, header


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse IDX bytes into a numpy array (native byte order)."""
    dtype, shape, header = _header(data, name)
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
    """Read an IDX file (``.gz`` or raw) into a numpy array.

    Memory stays within what the header declares: the header is read first (from the start of the
    decompressed stream for ``.gz``), the declared size is checked against the file's size (raw) or
    against the byte limit and the compression ratio (gzip, see :mod:`vaelab.safeio`), and only then
    is the data read, with decompression capped at the declared size."""
    path = Path(path)
    name = str(path)
    fh, size = open_regular(path, DataError, "data file")
    with fh:
        try:
            gz = fh.read(2) == b"\x1f\x8b"
            fh.seek(0)
            if not gz and path.suffix == ".gz":
                raise DataError(f"{path}: named .gz but is not gzip data")
            src = BoundedInflater(fh, name, DataError, limits().max_bytes) if gz else fh
            head = src.read(4)
            if len(head) == 4 and head[:2] == b"\0\0" and head[2] in _IDX_TYPES:
                head += src.read(4 * head[3])
            dtype, shape, header = _header(head, name)
            expected = header + math.prod(shape) * dtype.itemsize
            if gz:
                check_declared(name, expected, size, DataError, f"declares shape {tuple(shape)}, i.e.")
                src.cap = expected  # type: ignore[union-attr]
            elif size < expected:  # raw: the file's size is known without reading it
                raise DataError(f"{name}: truncated: header declares shape {tuple(shape)} ({expected} bytes) "
                                f"but the file has {size} bytes")
            elif size > expected:
                raise DataError(f"{name}: {size - expected} unexpected trailing bytes after shape {tuple(shape)}")
            body = read_exactly(src, expected - header, allow_short=True)
            if len(body) < expected - header:
                raise DataError(f"{name}: truncated: header declares shape {tuple(shape)} ({expected} bytes) "
                                f"but the {'decompressed ' if gz else ''}file has {header + len(body)} bytes")
            if gz and not src.at_end():  # type: ignore[union-attr]
                raise DataError(f"{name}: unexpected trailing bytes after shape {tuple(shape)}")
        except OSError as e:
            raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
        except MemoryError:
            raise DataError(f"{path}: not enough memory for shape {tuple(shape)}") from None
    try:
        arr = np.frombuffer(body, dtype=dtype).reshape(shape)
    except ValueError as e:  # e.g. a zero-size shape whose other dimensions overflow numpy's limits
        raise DataError(f"{name}: declared shape {tuple(shape)} is not a valid array shape ({e})") from None
    return arr.astype(dtype.newbyteorder("="), copy=True)


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
