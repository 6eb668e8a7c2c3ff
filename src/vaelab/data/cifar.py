"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009): 32x32 colour images, 50k train / 10k test.

Both distributed versions are read, straight from the ``.tar.gz`` (no extraction) or from its
extracted folder:

* binary (``cifar-10-binary.tar.gz`` -> ``cifar-10-batches-bin/``; ``cifar-100-binary.tar.gz`` ->
  ``cifar-100-binary/``): fixed-size records of 1 label byte (CIFAR-100: coarse then fine label) and
  3072 pixel bytes (1024 red, 1024 green, 1024 blue, each 32x32 row-major);
* python (``cifar-10-python.tar.gz`` -> ``cifar-10-batches-py/``; ``cifar-100-python.tar.gz`` ->
  ``cifar-100-python/``): pickled dicts ``{data: uint8 (N, 3072), labels | fine_labels: [...]}``,
  read through a restricted unpickler that builds numpy arrays and plain containers and nothing else.

CIFAR-100 uses the 100 fine labels. The binary archive is the one downloaded (it holds no pickles).
"""

from __future__ import annotations

import io
import math
import pickle
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import DataConfig
from ..errors import DataError
from ..safeio import check_declared, human, limits, open_regular, read_exactly, read_regular
from .base import ImageSet
from .registry import DatasetSpec, register_dataset
from .sources import RemoteFile

try:
    from lzma import LZMAError as lzma_error
except ImportError:  # pragma: no cover - Python built without lzma
    lzma_error = OSError
bz2_error = OSError  # bz2 reports corrupted data as OSError

PIXELS = 3 * 32 * 32
_URL = "https://www.cs.toronto.edu/~kriz/"


# ---------------------------------------------------------------- restricted unpickling
# Everything a pickled numpy array or a plain dict/list/bytes needs, across numpy 1.x and 2.x and
# pickle protocols 2-5 (protocol 2 written by Python 3 encodes bytes through _codecs.encode).
_ALLOWED_GLOBALS = frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }
)


# A batch's arrays are stored verbatim in its pickle, and a list of N small ints takes about 2 bytes
# per int there and 8 as int64: what a real batch builds is at most a few times its pickle's size. A
# pickle that would build more (one row referenced a million times through the memo) is refused.
OUTPUT_FACTOR = 8
OUTPUT_SLACK = 1 << 20
MAX_DEPTH = 8  # a CIFAR batch is a dict of arrays and lists: two levels


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that refuses every global outside numpy's array machinery: a CIFAR batch is a
    dict of arrays, lists and bytes, so a pickle asking for anything else is not one (and may be
    an attack: unpickling arbitrary objects runs arbitrary code). ``budget``: the most bytes one
    array may declare (``_reconstruct`` allocates the shape it is given before any data is read)."""

    def __init__(self, file: io.BufferedIOBase, name: str, budget: int | None = None) -> None:
        # latin1: the original files were written by Python 2; this is numpy's advice for its arrays.
        super().__init__(file, encoding="latin1")
        self.name = name
        self.budget = budget

    def find_class(self, module: str, name: str):  # type: ignore[override]
        if (module, name) not in _ALLOWED_GLOBALS:
            raise DataError(f"{self.name}: refusing to unpickle {module}.{name} (only numpy arrays and plain "
                            "containers are allowed in a CIFAR batch)")
        found = super().find_class(module, name)
        if name != "_reconstruct" or self.budget is None:
            return found

        def reconstruct(subtype, shape, dtype):  # the array is allocated here, from the declared shape
            try:
                n = math.prod(int(v) for v in shape) * np.dtype(dtype).itemsize
            except Exception as e:
                raise DataError(f"{self.name}: malformed array in the pickle ({type(e).__name__}: {e})") from None
            if n > self.budget:
                raise DataError(f"{self.name}: the pickle declares an array of {human(n)}, more than a batch of its "
                                f"size holds ({human(self.budget)})")
            return found(subtype, shape, dtype)

        return reconstruct

    def persistent_load(self, pid: object) -> object:
        raise DataError(f"{self.name}: refusing a pickle with persistent ids")


def materialized_bytes(obj: object, limit: int, name: str) -> int:
    """Bytes that arrays built from ``obj`` would hold, counting a shared object once per reference
    (that is what ``np.asarray`` copies). Stops with a :class:`DataError` as soon as ``limit`` is
    passed, or when containers nest deeper than :data:`MAX_DEPTH` (a self-referencing list)."""
    total = 0
    stack: list[tuple[object, int]] = []  # iterators over containers, with their depth

    def visit(o: object, depth: int) -> None:
        nonlocal total
        if isinstance(o, np.ndarray):
            total += o.nbytes
            if o.dtype.hasobject:
                stack.append((iter(o.ravel()), depth + 1))
        elif isinstance(o, (bytes, bytearray, str)):
            total += len(o)
        elif isinstance(o, (list, tuple)):
            total += 8 * len(o)
            stack.append((iter(o), depth + 1))
        elif isinstance(o, dict):
            total += 16 * len(o)
            stack.append((iter([v for kv in o.items() for v in kv]), depth + 1))
        else:
            total += 8

    visit(obj, 0)
    while stack:
        it, depth = stack[-1]
        if depth > MAX_DEPTH:
            raise DataError(f"{name}: containers nested more than {MAX_DEPTH} deep (or referencing themselves); "
                            "not a CIFAR batch")
        for o in it:
            visit(o, depth)
            if total > limit:
                raise DataError(f"{name}: the pickle would build more than {human(limit)} of arrays from "
                                f"{human(max(1, (limit - OUTPUT_SLACK) // OUTPUT_FACTOR))} (an object referenced "
                                "many times over): refusing it")
            if stack[-1][0] is not it:
                break
        else:
            stack.pop()
    return total


def restricted_loads(data: bytes, name: str) -> object:
    """Unpickle a CIFAR batch: numpy arrays and plain containers only, and at most
    ``OUTPUT_FACTOR`` times the pickle's size of arrays (checked before anything is converted)."""
    budget = min(OUTPUT_FACTOR * len(data) + OUTPUT_SLACK, limits().max_bytes)
    try:
        obj = RestrictedUnpickler(io.BytesIO(data), name, budget).load()
    except DataError:
        raise
    except Exception as e:  # any malformed pickle: truncated, wrong opcodes, bad array state, too deep
        raise DataError(f"{name}: not a readable CIFAR python batch ({type(e).__name__}: {e})") from None
    materialized_bytes(obj, budget, name)
    return obj


# ---------------------------------------------------------------- the two formats
@dataclass(frozen=True)
class _Variant:
    """One data set: member file names per split in each format, label bytes and key, classes."""

    name: str
    bin_dir: str
    bin_members: dict[str, tuple[str, ...]]
    py_dir: str
    py_members: dict[str, tuple[str, ...]]
    label_bytes: int  # binary records: label bytes before the pixels; the last one is used
    label_key: str  # python dicts
    num_classes: int


CIFAR10 = _Variant(
    "cifar10",
    "cifar-10-batches-bin",
    {"train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)), "test": ("test_batch.bin",)},
    "cifar-10-batches-py",
    {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
    1,
    "labels",
    10,
)
CIFAR100 = _Variant(
    "cifar100",
    "cifar-100-binary",
    {"train": ("train.bin",), "test": ("test.bin",)},
    "cifar-100-python",
    {"train": ("train",), "test": ("test",)},
    2,  # coarse label, fine label
    "fine_labels",
    100,
)


def parse_binary(data: bytes, name: str, v: _Variant) -> tuple[np.ndarray, np.ndarray]:
    """Records of ``label_bytes`` + 3072 bytes -> images (N, 3, 32, 32) uint8, labels (N,)."""
    rec = v.label_bytes + PIXELS
    if len(data) == 0 or len(data) % rec:
        raise DataError(
            f"{name}: {len(data)} bytes is not a whole number of {rec}-byte {v.name} records "
            f"({v.label_bytes} label byte(s) + {PIXELS} pixels); the file is truncated or not a {v.name} batch"
        )
    arr = np.frombuffer(data, dtype=np.uint8).reshape(-1, rec)
    labels = arr[:, v.label_bytes - 1].astype(np.int64)
    return arr[:, v.label_bytes :].reshape(-1, 3, 32, 32), labels


def parse_python(data: bytes, name: str, v: _Variant) -> tuple[np.ndarray, np.ndarray]:
    """A pickled batch dict -> images (N, 3, 32, 32) uint8, labels (N,)."""
    obj = restricted_loads(data, name)
    if not isinstance(obj, dict):
        raise DataError(f"{name}: expected a pickled dict, got {type(obj).__name__}")
    d = {k.decode("latin1") if isinstance(k, bytes) else k: val for k, val in obj.items()}
    if "data" not in d or v.label_key not in d:
        raise DataError(f"{name}: missing key(s) {sorted({'data', v.label_key} - set(d))}; has {sorted(map(str, d))}")
    try:
        images = np.asarray(d["data"])
        labels = np.asarray(d[v.label_key], dtype=np.int64).reshape(-1)
    except (ValueError, TypeError, OverflowError) as e:
        raise DataError(f"{name}: malformed 'data' or labels ({type(e).__name__}: {e})") from None
    if images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != PIXELS:
        raise DataError(f"{name}: 'data' must be uint8 of shape (N, {PIXELS}), got {images.dtype} {images.shape}")
    if labels.shape[0] != images.shape[0]:
        raise DataError(f"{name}: {labels.shape[0]} labels for {images.shape[0]} images")
    return images.reshape(-1, 3, 32, 32), labels


def _finish(parts: list[tuple[np.ndarray, np.ndarray]], source: str, v: _Variant) -> ImageSet:
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    if labels.size and (labels.min() < 0 or labels.max() >= v.num_classes):
        raise DataError(f"{source}: labels outside 0..{v.num_classes - 1} (max {labels.max()})")
    return ImageSet.from_numpy(images, labels, source=source, num_classes=v.num_classes)


def _read_members(
    read: Callable[[str], bytes], where: str, label: Callable[[str], str], v: _Variant, binary: bool
) -> dict[str, ImageSet]:
    """``read(member)`` gives a member's bytes, ``label(member)`` its name in messages."""
    members = v.bin_members if binary else v.py_members
    parse = parse_binary if binary else parse_python
    return {
        split: _finish([parse(read(n), label(n), v) for n in names], where, v) for split, names in members.items()
    }


MAX_MEMBERS = 10_000  # a CIFAR archive holds about 10 files; a million tiny headers are not one


def read_cifar_tar(path: Path, v: _Variant) -> dict[str, ImageSet]:
    """Read either version straight from its .tar.gz (members found by base name, any folder). Each
    member's declared size is checked against the limits before it is read (see :mod:`vaelab.safeio`)."""
    fh, size = open_regular(path, DataError, "data file")
    try:
        with fh, tarfile.open(fileobj=fh, mode="r:*") as tar:
            files: dict[str, tarfile.TarInfo] = {}
            for i, m in enumerate(tar):
                if i >= MAX_MEMBERS:
                    raise DataError(f"{path}: more than {MAX_MEMBERS} members; not a {v.name} archive")
                if m.isfile():
                    files[Path(m.name).name] = m
            # The version whose members are (most nearly) all there; report what that one lacks.
            miss_bin, miss_py = (
                [n for names in members.values() for n in names if n not in files]
                for members in (v.bin_members, v.py_members)
            )
            binary = len(miss_bin) <= len(miss_py)
            missing = miss_bin if binary else miss_py
            if missing:
                raise DataError(f"{path}: not a complete {v.name} archive: missing {', '.join(missing)}")

            def read(name: str) -> bytes:
                m = files[name]
                check_declared(f"{path}:{name}", m.size, size, DataError, "declares a member of")
                member = tar.extractfile(m)
                if member is None:  # pragma: no cover - isfile() members always extract
                    raise DataError(f"{path}: cannot read member {name}")
                data = read_exactly(member, m.size, allow_short=True)
                if len(data) != m.size:
                    raise DataError(f"{path}:{name}: truncated member ({len(data)} of {m.size} bytes)")
                return data

            return _read_members(read, str(path), lambda n: f"{path}:{n}", v, binary)
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma_error, bz2_error) as e:
        raise DataError(f"{path}: corrupted or truncated archive ({type(e).__name__}: {e})") from None


def read_cifar_dir(folder: Path, v: _Variant) -> dict[str, ImageSet]:
    """Read the extracted folder of either version (the format is told by the file names)."""
    binary = (folder / v.bin_members["test"][0]).is_file()
    members = v.bin_members if binary else v.py_members
    missing = [n for names in members.values() for n in names if not (folder / n).is_file()]
    if missing:
        raise DataError(f"{folder}: incomplete {v.name} folder: missing {', '.join(missing)}")

    def read(name: str) -> bytes:
        return read_regular(folder / name, DataError, "data file")

    return _read_members(read, str(folder), lambda n: str(folder / n), v, binary)


def read_cifar(path: Path, v: _Variant) -> dict[str, ImageSet]:
    """``path``: a .tar.gz of either version, or any file inside an extracted folder."""
    if path.is_dir():
        return read_cifar_dir(path, v)
    if path.name.endswith((".tar.gz", ".tgz", ".tar")):
        return read_cifar_tar(path, v)
    return read_cifar_dir(path.parent, v)


def _spec(v: _Variant, sha: dict[str, tuple[str, int]], description: str) -> DatasetSpec:
    stem = v.name.replace("cifar", "cifar-")  # cifar-10, cifar-100
    bin_tar, py_tar = f"{stem}-binary.tar.gz", f"{stem}-python.tar.gz"
    test_bin, test_py = v.bin_members["test"][0], v.py_members["test"][0]
    remote = RemoteFile(
        name=bin_tar,
        urls=(_URL + bin_tar,),
        sha256=sha[bin_tar][0],
        size=sha[bin_tar][1],
        # Accepted locally instead: the python archive, either extracted folder, or a folder that is
        # itself the extracted one (--data-dir .../cifar-10-batches-bin).
        alternatives=(py_tar, f"{v.bin_dir}/{test_bin}", f"{v.py_dir}/{test_py}", test_bin, test_py),
    )

    def loader(files: dict[str, Path], cfg: DataConfig) -> dict[str, ImageSet]:
        return read_cifar(files[bin_tar], v)

    return DatasetSpec(v.name, (remote,), loader, description)


CIFAR10_SHA = {
    "cifar-10-binary.tar.gz": ("c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd", 170052171),
    "cifar-10-python.tar.gz": ("6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce", 170498071),
}
CIFAR100_SHA = {
    "cifar-100-binary.tar.gz": ("58a81ae192c23a4be8b1804d68e518ed807d710a4eb253b1f2a199162a40d8ec", 168513733),
    "cifar-100-python.tar.gz": ("85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7", 169001437),
}

register_dataset(_spec(CIFAR10, CIFAR10_SHA, "CIFAR-10 (Krizhevsky 2009), 32x32 colour, 10 classes, 50k/10k"))
register_dataset(_spec(CIFAR100, CIFAR100_SHA, "CIFAR-100 (Krizhevsky 2009), 32x32 colour, 100 fine classes, 50k/10k"))
