"""Bounded reading of untrusted files: every reader of a data file or a checkpoint goes through here.

* Only regular files are read: a FIFO (which would block forever), a device (``/dev/zero`` never
  ends), a socket or a directory is refused before it is opened for reading.
* A file larger than :func:`limits`'s ``max_bytes`` is refused before it is read (a 20 GB sparse
  file costs no disk but would cost 20 GB of memory).
* Decompressed data is streamed with a cap derived from what the format's header declares, and a
  declared size is checked against ``max_bytes`` and against the compressed size (deflate can expand
  1 KB to 1 MB: a 4 MB file of zeros would otherwise become 4 GB) before anything is allocated.

Both limits can be raised through the environment, for genuine data sets larger than the defaults:
``VAELAB_MAX_BYTES`` (e.g. ``16G``) and ``VAELAB_MAX_RATIO``.
"""

from __future__ import annotations

import json
import math
import os
import stat
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from .errors import VaelabError

DEFAULT_MAX_BYTES = 4 << 30  # the most bytes one file may hold, or decompress to
DEFAULT_MAX_RATIO = 100  # beyond RATIO_FREE bytes, decompressed / compressed may not exceed this
RATIO_FREE = 64 << 20  # small outputs are never refused for their ratio (a blank test image compresses 1000x)
CHUNK = 1 << 20
#: the most bytes of a JSON or TOML file vaelab reads (an export's config.json, a config file, an
#: evaluation result: a few KB each); the suffix decides, so no caller can forget it
MAX_JSON_BYTES = 1 << 20
JSON_SUFFIXES = frozenset({".json", ".toml"})

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MB": 1 << 20,
          "MIB": 1 << 20, "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30, "T": 1 << 40, "TB": 1 << 40, "TIB": 1 << 40}


@dataclass(frozen=True)
class Limits:
    max_bytes: int = DEFAULT_MAX_BYTES
    max_ratio: float = DEFAULT_MAX_RATIO


def _parse_size(text: str) -> int:
    t = text.strip().upper().replace("_", "")
    num = t.rstrip("KMGTIB")
    unit = t[len(num):]
    if unit not in _UNITS:
        raise ValueError(text)
    value = float(num) * _UNITS[unit]
    if not value >= 1:
        raise ValueError(text)
    return int(value)


def limits() -> Limits:
    """The limits in force: the defaults, or ``$VAELAB_MAX_BYTES`` / ``$VAELAB_MAX_RATIO``."""
    from .errors import ConfigError

    max_bytes, ratio = DEFAULT_MAX_BYTES, float(DEFAULT_MAX_RATIO)
    raw = os.environ.get("VAELAB_MAX_BYTES")
    if raw:
        try:
            max_bytes = _parse_size(raw)
        except ValueError:
            raise ConfigError(f"$VAELAB_MAX_BYTES={raw!r}: expected a size such as 8G or 500M") from None
    raw = os.environ.get("VAELAB_MAX_RATIO")
    if raw:
        try:
            ratio = float(raw)
            if not ratio >= 1 or ratio != ratio or ratio == float("inf"):
                raise ValueError(raw)
        except ValueError:
            raise ConfigError(f"$VAELAB_MAX_RATIO={raw!r}: expected a number >= 1") from None
    return Limits(max_bytes, ratio)


def human(n: int | float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} bytes"  # pragma: no cover


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _kind(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def too_big(name: str, size: int, what: str = "holds") -> str:
    lim = limits().max_bytes
    return (f"{name}: {what} {human(size)}, more than the {human(lim)} vaelab reads from one file "
            "(set VAELAB_MAX_BYTES, e.g. VAELAB_MAX_BYTES=16G, to allow more)")


def _size_error(p: Path, size: int, max_bytes: int | None) -> str | None:
    """Why a file of ``size`` bytes at ``p`` is not read, or None: past ``max_bytes`` when given, else
    past :data:`MAX_JSON_BYTES` for a .json/.toml file, else past :func:`limits`'s ``max_bytes``."""
    if max_bytes is None and p.suffix.lower() in JSON_SUFFIXES:
        max_bytes = MAX_JSON_BYTES
    if max_bytes is not None:
        if size <= max_bytes:
            return None
        kind = p.suffix.lstrip(".").upper() or "such a"
        return f"{p}: holds {human(size)}, more than the {human(max_bytes)} vaelab reads from a {kind} file"
    return too_big(str(p), size) if size > limits().max_bytes else None


def open_regular(path: str | os.PathLike[str], error: type[VaelabError], what: str = "file",
                 max_bytes: int | None = None) -> tuple[BinaryIO, int]:
    """Open ``path`` for reading if it is a regular file within the size limit: (file object, size).

    The limit is ``max_bytes`` when given, :data:`MAX_JSON_BYTES` for a .json or .toml file, else
    :func:`limits`'s. The file is stat'ed before it is opened (opening a FIFO for reading blocks until
    a writer comes), opened non-blocking, and stat'ed again through the descriptor, so a file swapped
    in between is refused too. Errors are ``error`` (DataError, CheckpointError, ...) naming the file."""
    p = Path(path)
    try:
        st = os.stat(p)
    except OSError as e:
        raise error(f"{p}: cannot read {what}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{p}: is {_kind(st.st_mode)}, not a regular file; vaelab reads {what}s only from regular files")
    if (why := _size_error(p, st.st_size, max_bytes)) is not None:
        raise error(why)
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise error(f"{p}: cannot read {what}: {e.strerror or e}") from None
    try:
        st2 = os.fstat(fd)
        if not stat.S_ISREG(st2.st_mode) or (st2.st_dev, st2.st_ino) != (st.st_dev, st.st_ino):
            raise error(f"{p}: changed while it was being opened; not reading it")
        if (why := _size_error(p, st2.st_size, max_bytes)) is not None:
            raise error(why)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return open(fd, "rb", closefd=True), st2.st_size
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | os.PathLike[str], error: type[VaelabError], what: str = "file",
                 max_bytes: int | None = None) -> bytes:
    """The bytes of a regular file within the size limit (see :func:`open_regular`)."""
    fh, size = open_regular(path, error, what, max_bytes)
    with fh:
        try:
            return read_exactly(fh, size, allow_short=True)
        except OSError as e:
            raise error(f"{path}: cannot read {what}: {e.strerror or e}") from None
        except MemoryError:
            raise error(f"{path}: not enough memory to read {human(size)}") from None


def read_exactly(fh: BinaryIO, n: int, allow_short: bool = False) -> bytes:
    """Read ``n`` bytes in chunks (never asking the OS for more than is there); fewer at EOF when
    ``allow_short``, else EOFError."""
    parts, left = [], n
    while left > 0:
        block = fh.read(min(CHUNK, left))
        if not block:
            if allow_short:
                break
            raise EOFError(f"{left} bytes missing")
        parts.append(block)
        left -= len(block)
    return b"".join(parts)


def check_declared(name: str, declared: int, compressed: int | None, error: type[VaelabError],
                   what: str = "declares") -> None:
    """Refuse a declared (decompressed) size beyond the byte limit, or, when it came from ``compressed``
    bytes, beyond ``max_ratio`` times them (above :data:`RATIO_FREE`): a decompression bomb."""
    lim = limits()
    if declared > lim.max_bytes:
        raise error(too_big(name, declared, what))
    if compressed is not None and declared > RATIO_FREE and declared > lim.max_ratio * max(compressed, 1):
        raise error(
            f"{name}: {what} {human(declared)} from {human(compressed)} of compressed data (more than "
            f"{lim.max_ratio:g} times as much): refusing what looks like a decompression bomb "
            "(set VAELAB_MAX_RATIO to allow it if the file is genuine)"
        )


class BoundedInflater:
    """Streaming gzip/zlib decompression of ``fh`` that never holds more than ``cap`` output bytes.

    ``read(n)`` returns exactly n bytes (fewer only at the end of the data); asking past ``cap``
    raises ``error``. Concatenated gzip members are decompressed in turn, as gzip does."""

    def __init__(self, fh: BinaryIO, name: str, error: type[VaelabError], cap: int, wbits: int = 31) -> None:
        self.fh, self.name, self.error, self.cap, self.wbits = fh, name, error, cap, wbits
        self.d = zlib.decompressobj(wbits)
        self.buf = bytearray()
        self.out = 0  # bytes returned so far
        self.compressed = 0
        self.eof = False
        self.kind = "gzip" if wbits > 16 else "zlib"

    def _read(self) -> bytes:
        data = self.fh.read(CHUNK)
        self.compressed += len(data)
        return data

    def _fill(self, want: int) -> None:
        while len(self.buf) < want and not self.eof:
            if self.d.eof:  # a member ended: another may follow (as `gzip.decompress` allows), or padding
                data = self.d.unused_data or self._read()
                if not data.strip(b"\0"):
                    self.eof = True
                    break
                self.d = zlib.decompressobj(self.wbits)
            elif self.d.unconsumed_tail:
                data = self.d.unconsumed_tail
            else:
                data = self._read()
                if not data:
                    raise self.error(f"{self.name}: corrupted or truncated {self.kind} data")
            try:
                self.buf += self.d.decompress(data, min(want - len(self.buf), CHUNK))
            except zlib.error as e:
                raise self.error(f"{self.name}: corrupted or truncated {self.kind} data ({e})") from None

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes (fewer only at the end of the data); data running past ``cap`` is an error."""
        self._fill(min(n, self.cap - self.out + 1))
        if self.out + len(self.buf) > self.cap:
            raise self.error(f"{self.name}: decompresses to more than the {human(self.cap)} its header declares")
        out = bytes(self.buf[:n])
        del self.buf[:n]
        self.out += len(out)
        return out

    def at_end(self) -> bool:
        """Whether the data ends here (decompresses at most one more byte to find out)."""
        self._fill(1)
        return not self.buf


def json_loads(data: str | bytes, name: str, error: type[VaelabError], what: str = "JSON") -> Any:
    """``json.loads`` of untrusted text; malformed or too deeply nested input is ``error`` naming it."""
    try:
        return json.loads(data)
    except RecursionError:
        raise error(f"{name}: {what} nested too deeply to be read") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise error(f"{name}: not valid {what} ({e})") from None


def finite_json(obj: Any) -> Any:
    """``obj`` with every NaN or infinity replaced by None, so that it is strict JSON (``json.dumps``
    would write ``NaN``/``-Infinity``, which most JSON parsers reject)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def dumps_json(obj: Any, **kw: Any) -> str:
    """Strict JSON (non-finite numbers as null; see :func:`finite_json`)."""
    return json.dumps(finite_json(obj), allow_nan=False, **kw)
