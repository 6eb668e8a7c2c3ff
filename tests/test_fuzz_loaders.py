"""Hostile and dirty input: every data loader in the registry, fed random mutations of a valid tiny
file (truncation, byte flips, header edits, insertions, deletions, garbage), either loads or raises
vaelab.DataError, never another exception. Plus directed tests of dirty values (NaN/Inf, values
outside [0, 1], wrong shapes) that must name the file and the first bad index.

The fuzzed formats are found at test time: each registered data set name / source prefix is mapped
to a writer of a valid tiny file; a registered loader without a writer here fails
``test_every_registered_loader_is_fuzzed``.
"""

from __future__ import annotations

import gzip
import importlib
import io
import pickle
import shutil
import tarfile
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from vaelab.config import DataConfig
from vaelab.data import DATASETS, SOURCES, DataSplits, ImageSet, load_data, write_idx
from vaelab.data.idx import parse_idx
from vaelab.data.validate import check_finite, check_model_input, check_range, check_splits
from vaelab.errors import DataError


def _optional(module: str):
    try:
        return importlib.import_module(f"vaelab.data.{module}")
    except ImportError:
        return None


cifar, svhn, folder, arrays = (_optional(m) for m in ("cifar", "svhn", "folder", "arrays"))


# ---------------------------------------------------------------- writers of valid tiny files
# A writer fills a fresh folder and returns (data config, the file whose bytes are mutated).
Writer = Callable[[Path], tuple[DataConfig, Path]]


def _cfg(name: str, root: Path | None = None, **kw) -> DataConfig:
    return DataConfig(name=name, data_dir=None if root is None else str(root), download=False, val_size=2, **kw)


def _idx_writer(dataset: str, gz: bool) -> Writer:
    def write(root: Path) -> tuple[DataConfig, Path]:
        rng = np.random.default_rng(0)
        ext = ".gz" if gz else ""
        for split, n in (("train", 8), ("t10k", 4)):
            write_idx(root / f"{split}-images-idx3-ubyte{ext}", rng.integers(0, 256, (n, 6, 6), dtype=np.uint8))
            write_idx(root / f"{split}-labels-idx1-ubyte{ext}", rng.integers(0, 10, n, dtype=np.uint8))
        return _cfg(dataset, root), root / f"train-images-idx3-ubyte{ext}"

    return write


def _cifar_writer(variant_name: str, kind: str) -> Writer:
    def write(root: Path) -> tuple[DataConfig, Path]:
        v = getattr(cifar, variant_name)
        rng = np.random.default_rng(0)
        binary = kind != "python"
        members = v.bin_members if binary else v.py_members
        files: dict[str, bytes] = {}
        for names in members.values():
            for name in names:
                x = rng.integers(0, 256, (4, cifar.PIXELS), dtype=np.uint8)
                y = rng.integers(0, v.num_classes, 4, dtype=np.uint8)
                if binary:
                    labels = [y[:, None]] * v.label_bytes
                    files[name] = np.concatenate([*labels, x], axis=1).tobytes()
                else:
                    files[name] = pickle.dumps({b"data": x, v.label_key.encode(): [int(i) for i in y]}, protocol=2)
        folder_name = v.bin_dir if binary else v.py_dir
        if kind == "tar":
            stem = v.name.replace("cifar", "cifar-")
            path = root / f"{stem}-binary.tar.gz"
            with tarfile.open(path, "w:gz") as tar:
                for name, data in files.items():
                    info = tarfile.TarInfo(f"{folder_name}/{name}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
            return _cfg(v.name, root), path
        (root / folder_name).mkdir()
        for name, data in files.items():
            (root / folder_name / name).write_bytes(data)
        return _cfg(v.name, root), root / folder_name / members["train"][0]

    return write


def _svhn_writer(root: Path) -> tuple[DataConfig, Path]:
    import scipy.io

    rng = np.random.default_rng(0)
    for name, n in (("train_32x32.mat", 6), ("test_32x32.mat", 3)):
        scipy.io.savemat(root / name, {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8),
                                       "y": rng.integers(1, 11, (n, 1)).astype(np.uint8)})
    return _cfg("svhn", root), root / "train_32x32.mat"


def _npz_writer(root: Path) -> tuple[DataConfig, Path]:
    rng = np.random.default_rng(0)
    path = root / "d.npz"
    np.savez(path, x_train=rng.random((8, 5, 5)).astype(np.float32), y_train=rng.integers(0, 3, 8),
             x_test=rng.integers(0, 256, (3, 5, 5), dtype=np.uint8), y_test=rng.integers(0, 3, 3))
    return _cfg(f"npz:{path}"), path


def _npy_writer(root: Path) -> tuple[DataConfig, Path]:
    path = root / "d.npy"
    np.save(path, np.random.default_rng(0).random((12, 5, 5, 3)).astype(np.float32))
    return _cfg(f"npy:{path}"), path


def _folder_writer(root: Path) -> tuple[DataConfig, Path]:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / "imgs" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)).save(root / "imgs" / c / f"{i}.png")
    return _cfg(f"folder:{root / 'imgs'}", image_size=4), root / "imgs" / "a" / "0.png"


def _shards_writer(root: Path) -> tuple[DataConfig, Path]:
    """A WebDataset tar shard: key.png + key.cls per sample."""
    from PIL import Image

    rng = np.random.default_rng(0)
    path = root / "train-000.tar"
    with tarfile.open(path, "w") as tf:
        for i in range(8):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)).save(buf, "PNG")
            for name, data in ((f"{i:04d}.png", buf.getvalue()), (f"{i:04d}.cls", str(i % 2).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return _cfg(f"shards:{path}", image_size=4), path


@dataclass(frozen=True)
class Format:
    covers: str  # the registered data set name, or "prefix:" for a source
    write: Writer


FORMATS: dict[str, Format] = {
    "idx-raw": Format("mnist", _idx_writer("mnist", gz=False)),
    "idx-gz": Format("fashion-mnist", _idx_writer("fashion-mnist", gz=True)),
    "idx-kmnist": Format("kmnist", _idx_writer("kmnist", gz=False)),
}
if cifar is not None:
    FORMATS |= {
        "cifar10-bin": Format("cifar10", _cifar_writer("CIFAR10", "bin")),
        "cifar10-python": Format("cifar10", _cifar_writer("CIFAR10", "python")),
        "cifar10-tar": Format("cifar10", _cifar_writer("CIFAR10", "tar")),
        "cifar100-bin": Format("cifar100", _cifar_writer("CIFAR100", "bin")),
        "cifar100-python": Format("cifar100", _cifar_writer("CIFAR100", "python")),
    }
if svhn is not None:
    FORMATS["svhn-mat"] = Format("svhn", _svhn_writer)
if arrays is not None:
    FORMATS |= {"npz": Format("npz:", _npz_writer), "npy": Format("npy:", _npy_writer)}
if folder is not None:
    FORMATS["folder-png"] = Format("folder:", _folder_writer)
    FORMATS["shards-tar"] = Format("shards:", _shards_writer)


def test_every_registered_loader_is_fuzzed():
    covered = {f.covers for f in FORMATS.values()}
    registered = set(DATASETS.names()) | {f"{p}:" for p in SOURCES.names()}
    assert registered - covered == set(), "add a writer of a valid tiny file to FORMATS for these loaders"


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_valid_tiny_files_load(name, tmp_path):
    cfg, _ = FORMATS[name].write(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = load_data(cfg)
    assert len(data.train) > 0 and data.train.images.dtype == torch.uint8


# ---------------------------------------------------------------- mutations
_op = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0.0, 1.0)),
    st.tuples(st.just("flip"), st.floats(0.0, 1.0), st.integers(1, 255)),
    st.tuples(st.just("header"), st.integers(0, 63), st.integers(0, 255)),
    st.tuples(st.just("header32"), st.integers(0, 15), st.sampled_from([0, 1, 2**31 - 1, 2**32 - 1, 255, 10**6])),
    st.tuples(st.just("insert"), st.floats(0.0, 1.0), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), st.floats(0.0, 1.0), st.integers(1, 64)),
    st.tuples(st.just("garbage"), st.binary(max_size=256)),
)


def mutate(data: bytes, ops: list[tuple]) -> bytes:
    b = bytearray(data)
    for op in ops:
        kind, *a = op
        pos = int(a[0] * len(b)) if kind in ("truncate", "flip", "insert", "delete") else 0
        if kind == "truncate":
            del b[pos:]
        elif kind == "flip" and b:
            b[min(pos, len(b) - 1)] ^= a[1]
        elif kind == "header" and a[0] < len(b):
            b[a[0]] = a[1]
        elif kind == "header32" and 4 * a[0] + 4 <= len(b):  # a big- or little-endian size field
            order = "big" if a[0] % 2 else "little"
            b[4 * a[0] : 4 * a[0] + 4] = a[1].to_bytes(4, order)
        elif kind == "insert":
            b[pos:pos] = a[1]
        elif kind == "delete":
            del b[pos : pos + a[1]]
        elif kind == "garbage":
            b = bytearray(a[0])
    return bytes(b)


_templates: dict[str, tuple[Path, DataConfig, Path, bytes]] = {}


def _template(name: str, base: Path) -> tuple[Path, DataConfig, Path, bytes]:
    """Write each format's valid files once; each example restores them and mutates one file."""
    if name not in _templates:
        root = base / name
        root.mkdir()
        cfg, target = FORMATS[name].write(root)
        _templates[name] = (root, cfg, target, target.read_bytes())
    return _templates[name]


def _load_or_data_error(cfg: DataConfig) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # folder: unreadable images are skipped with a warning
        try:
            data = load_data(cfg)
        except DataError as e:
            assert str(e)  # a message, naming the problem
            return
    assert isinstance(data, DataSplits) and data.train.images.dtype == torch.uint8


@pytest.fixture(scope="module")
def fuzz_root():
    d = Path(tempfile.mkdtemp(prefix="vaelab-fuzz-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)
    _templates.clear()


@pytest.mark.parametrize("name", sorted(FORMATS))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(_op, min_size=1, max_size=4), inside=st.booleans())
def test_mutated_files_load_or_raise_data_error(name, fuzz_root, ops, inside):
    root, cfg, target, good = _template(name, fuzz_root)
    if target.suffix == ".gz" and inside:  # a valid gzip of mutated content (IDX, tar)
        bad = gzip.compress(mutate(gzip.decompress(good), ops))
    else:
        bad = mutate(good, ops)
    try:
        target.write_bytes(bad)
        _load_or_data_error(cfg)
    finally:
        target.write_bytes(good)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=200))
def test_random_bytes_to_the_idx_parser(data):
    try:
        arr = parse_idx(data, "fuzz")
    except DataError:
        return
    assert isinstance(arr, np.ndarray)


@settings(max_examples=100, deadline=None)
@given(shape=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=6), extra=st.binary(max_size=64))
@example(shape=[2**16] * 4, extra=b"")  # 2**64 elements: a product that wraps to 0 in int64
def test_idx_headers_declaring_any_shape(shape, extra):
    """Huge or overflowing declared shapes are refused by size, never allocated or mis-parsed."""
    header = bytes([0, 0, 0x08, len(shape)]) + b"".join(s.to_bytes(4, "big") for s in shape)
    try:
        arr = parse_idx(header + extra, "fuzz")
    except DataError:
        return
    assert arr.shape == tuple(shape) and arr.size == len(extra)


# ---------------------------------------------------------------- dirty values, directed
@pytest.mark.skipif(arrays is None, reason="no npz/npy loader registered")
@pytest.mark.parametrize(
    ("values", "expect"),
    [
        ("gaussian", r"\[0, 1\].*element \[\d+, \d+, \d+(, \d+)?\]"),
        ("nan", r"element \[3, 0, 1, 2\]"),
        ("inf", r"element \[5, 0, 0, 0\]"),
        ("int", r"0\.\.255; element \[1, 0, 2, 2\] is 300"),
    ],
)
def test_dirty_array_values_are_refused_naming_the_file_and_first_bad_index(tmp_path, values, expect):
    rng = np.random.default_rng(0)
    x = rng.random((8, 1, 4, 4)).astype(np.float32)
    if values == "gaussian":  # mean/std-normalised data: not intensities in [0, 1]
        x = (x - x.mean()) / x.std()
    elif values == "nan":
        x[3, 0, 1, 2] = np.nan
    elif values == "inf":
        x[5, 0, 0, 0] = np.inf
    else:
        x = rng.integers(0, 256, (8, 1, 4, 4))
        x[1, 0, 2, 2] = 300
    path = tmp_path / "dirty.npz"
    np.savez(path, x=x)
    with pytest.raises(DataError, match=expect) as e:
        load_data(_cfg(f"npz:{path}"))
    assert str(path) in str(e.value)


@pytest.mark.skipif(arrays is None, reason="no npz/npy loader registered")
@pytest.mark.parametrize("shape", [(10,), (4, 5), (2, 3, 4, 5, 6), (0, 0, 0)])
def test_wrong_array_shapes_are_refused(tmp_path, shape):
    path = tmp_path / "bad.npy"
    np.save(path, np.zeros(shape, dtype=np.uint8))
    with pytest.raises(DataError) as e:
        load_data(_cfg(f"npy:{path}"))
    assert str(path) in str(e.value)


@pytest.mark.skipif(arrays is None, reason="no npz/npy loader registered")
def test_object_arrays_are_never_unpickled(tmp_path):
    path = tmp_path / "obj.npz"
    np.savez(path, x=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(DataError, match="obj.npz"):
        load_data(_cfg(f"npz:{path}"))


def test_check_model_input_names_the_source_and_first_bad_index():
    x = torch.rand(4, 1, 3, 3)
    check_model_input(x, "bernoulli", "train set")
    x[2, 0, 1, 1] = 1.5
    with pytest.raises(DataError, match=r"train set: .*\[0, 1\] for the 'bernoulli' likelihood.*\[2, 0, 1, 1\]"):
        check_model_input(x, "bernoulli", "train set")
    x[1, 0, 0, 2] = float("nan")
    with pytest.raises(DataError, match=r"train set: 1 non-finite .*nan at index \[1, 0, 0, 2\]"):
        check_model_input(x, "bernoulli", "train set")
    check_finite(np.arange(4), "ints are always finite")
    with pytest.raises(DataError, match=r"index \[0\]"):
        check_range(np.array([-1.0, 0.5]), "v")


def test_check_splits_refuses_disagreeing_splits():
    def s(shape, labels=None):
        return ImageSet(torch.zeros(shape, dtype=torch.uint8), labels, "x", 3)

    good = s((4, 1, 5, 5), torch.tensor([0, 1, 2, 0]))
    check_splits(DataSplits(good, s((0, 1, 5, 5)), good, "ok"))
    with pytest.raises(DataError, match=r"test images have shape \(1, 6, 6\), the training images \(1, 5, 5\)"):
        check_splits(DataSplits(good, good, s((2, 1, 6, 6)), "bad"))
    with pytest.raises(DataError, match=r"val label 7 at index 1 is outside 0..2"):
        check_splits(DataSplits(good, s((2, 1, 5, 5), torch.tensor([0, 7])), good, "bad"))
