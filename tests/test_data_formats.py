"""Every data format besides IDX: CIFAR-10/100 (binary and python, archive and folder), SVHN .mat,
folders of images, npz/npy arrays; their errors; and download through the registry's resolution."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import importlib.util
import io
import os
import pickle
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from vaelab import DataConfig, DataError, DatasetNotFoundError, load_data
from vaelab.data import DATASETS, load_splits
from vaelab.data import sources as sources_mod
from vaelab.data.cifar import restricted_loads

# ---------------------------------------------------------------- writers for tiny files


def cifar_arrays(n: int, seed: int, classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(n, 3, 32, 32) uint8 images whose three channels differ (catches channel-order bugs)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    x[:, 0, 0, 0], x[:, 1, 0, 0], x[:, 2, 0, 0] = 10, 20, 30
    return x, rng.integers(0, classes, n).astype(np.uint8)


def _cifar_batches(hundred: bool, n: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    names = ("train", "test") if hundred else tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
    return {nm: cifar_arrays(n, i, 100 if hundred else 10) for i, nm in enumerate(names)}


def _binary_record(x: np.ndarray, y: np.ndarray, hundred: bool) -> bytes:
    labels = [(y // 5)[:, None], y[:, None]] if hundred else [y[:, None]]  # CIFAR-100: coarse, fine
    return np.concatenate([*labels, x.reshape(len(x), -1)], axis=1).astype(np.uint8).tobytes()


def _python_batch(x: np.ndarray, y: np.ndarray, hundred: bool) -> bytes:
    # as the originals: bytes keys, a list of labels; protocol 2 like Python 2's cPickle
    d = {b"batch_label": b"training batch", b"data": x.reshape(len(x), -1),
         b"fine_labels" if hundred else b"labels": [int(v) for v in y]}
    if hundred:
        d[b"coarse_labels"] = [int(v) // 5 for v in y]
    return pickle.dumps(d, protocol=2)


def write_cifar(root: Path, *, hundred: bool = False, python: bool = False, tar: bool = True,
                n: int = 8) -> tuple[Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """A tiny CIFAR data set under ``root`` in the official layout; returns (path, arrays)."""
    batches = _cifar_batches(hundred, n)
    stem = "cifar-100" if hundred else "cifar-10"
    folder = (f"{stem}-python" if hundred else f"{stem}-batches-py") if python else \
        (f"{stem}-binary" if hundred else f"{stem}-batches-bin")
    files = {}
    for nm, (x, y) in batches.items():
        if python:
            files[f"{folder}/{nm}"] = _python_batch(x, y, hundred)
        else:
            files[f"{folder}/{nm}.bin"] = _binary_record(x, y, hundred)
    root.mkdir(parents=True, exist_ok=True)
    if tar:
        path = root / f"{stem}-{'python' if python else 'binary'}.tar.gz"
        with tarfile.open(path, "w:gz") as t:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
        return path, batches
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root / folder, batches


def _expected(batches, hundred: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    tr = [v for k, v in batches.items() if "test" not in k]
    te = batches["test" if hundred else "test_batch"]
    return (np.concatenate([b[0] for b in tr]), np.concatenate([b[1] for b in tr]), te[0], te[1])


def _cfg(name: str, **kw) -> DataConfig:
    return DataConfig(name=name, download=False, val_size=0, **kw)


# ---------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("hundred", [False, True])
@pytest.mark.parametrize("python", [False, True])
@pytest.mark.parametrize("tar", [True, False])
def test_cifar_every_version_reads_the_same_pixels(tmp_path, hundred, python, tar):
    path, batches = write_cifar(tmp_path / "d", hundred=hundred, python=python, tar=tar)
    name = "cifar100" if hundred else "cifar10"
    raw = load_splits(_cfg(name, data_dir=str(tmp_path / "d")))
    xtr, ytr, xte, yte = _expected(batches, hundred)
    assert raw["train"].images.shape == (len(xtr), 3, 32, 32) and raw["train"].num_classes == (100 if hundred else 10)
    assert np.array_equal(raw["train"].images.numpy(), xtr) and np.array_equal(raw["test"].images.numpy(), xte)
    assert np.array_equal(raw["train"].labels.numpy(), ytr)  # CIFAR-100: the fine labels
    assert np.array_equal(raw["test"].labels.numpy(), yte)
    if not tar:  # --data-dir may also be the extracted folder itself
        again = load_splits(_cfg(name, data_dir=str(path)))
        assert torch.equal(again["test"].images, raw["test"].images)


def test_cifar_from_the_registry_resolution_order(tmp_path, monkeypatch):
    write_cifar(tmp_path / "env" / "cifar10", n=4)
    monkeypatch.setenv("VAELAB_DATA", str(tmp_path / "env"))
    d = load_data(DataConfig(name="cifar10", download=False, val_size=4))
    assert d.shape == (3, 32, 32) and len(d.train) == 16 and len(d.val) == 4 and len(d.test) == 4


def test_cifar_wrong_size_batch_names_file(tmp_path):
    folder, _ = write_cifar(tmp_path, tar=False, n=3)
    (folder / "data_batch_3.bin").write_bytes((folder / "data_batch_3.bin").read_bytes()[:-100])
    with pytest.raises(DataError, match=r"data_batch_3\.bin.*3073-byte"):
        load_splits(_cfg("cifar10", data_dir=str(folder)))
    (folder / "data_batch_3.bin").unlink()
    with pytest.raises(DataError, match=r"missing data_batch_3\.bin"):
        load_splits(_cfg("cifar10", data_dir=str(folder)))


def test_cifar_tar_errors(tmp_path):
    (tmp_path / "cifar-10-binary.tar.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(DataError, match="cifar-10-binary.tar.gz"):
        load_splits(_cfg("cifar10", data_dir=str(tmp_path)))
    path, _ = write_cifar(tmp_path / "b", hundred=True, n=2)  # a CIFAR-100 archive renamed as CIFAR-10
    os.replace(path, tmp_path / "b" / "cifar-10-binary.tar.gz")
    with pytest.raises(DataError, match=r"not a complete cifar10 archive: missing data_batch_1\.bin, data_batch_2\.bin"):
        load_splits(_cfg("cifar10", data_dir=str(tmp_path / "b")))


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    evil = pickle.dumps({b"data": _Evil(marker)}, protocol=2)
    with pytest.raises(DataError, match=r"refusing to unpickle (posix|os|nt)\.system"):
        restricted_loads(evil, "evil")
    assert not marker.exists()
    # a python-version batch that hides an object is refused with the member named
    folder, _ = write_cifar(tmp_path / "d", python=True, tar=False, n=2)
    (folder / "test_batch").write_bytes(evil)
    with pytest.raises(DataError, match="test_batch: refusing"):
        load_splits(_cfg("cifar10", data_dir=str(folder)))
    assert not marker.exists()
    # arrays from every protocol are fine
    for proto in (2, 4, 5):
        out = restricted_loads(pickle.dumps({"a": np.arange(6, dtype=np.uint8).reshape(2, 3)}, protocol=proto), "ok")
        assert out["a"].shape == (2, 3)
    with pytest.raises(DataError, match="not a readable CIFAR python batch"):
        restricted_loads(b"\x80\x02garbage", "junk")


# ---------------------------------------------------------------- download through the registry


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a):
        pass


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a, **k: _Quiet(*a, directory=str(root), **k))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{srv.server_address[1]}/"
    srv.shutdown()
    srv.server_close()


def _point_cifar10_at(monkeypatch, url: str, sha: str) -> None:
    spec = DATASETS.get("cifar10")
    remote = dataclasses.replace(spec.files[0], urls=(url,), sha256=sha, size=None)
    monkeypatch.setitem(DATASETS._items, "cifar10", dataclasses.replace(spec, files=(remote,)))
    monkeypatch.setattr(sources_mod, "SYSTEM_ROOT", Path("/nonexistent-vaelab-test"))


def test_cifar_download_verifies_checksum(server, monkeypatch):
    root, url = server
    path, batches = write_cifar(root, n=4)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    _point_cifar10_at(monkeypatch, url + path.name, sha)
    raw = load_splits(DataConfig(name="cifar10", download=True))
    cached = sources_mod.cache_root() / "cifar10" / "cifar-10-binary.tar.gz"
    assert cached.read_bytes() == path.read_bytes()
    assert np.array_equal(raw["test"].images.numpy(), batches["test_batch"][0])
    assert load_splits(DataConfig(name="cifar10", download=False))["test"].images.shape[0] == 4  # cached now


def test_cifar_download_checksum_mismatch_leaves_nothing(server, monkeypatch):
    root, url = server
    path, _ = write_cifar(root, n=2)
    _point_cifar10_at(monkeypatch, url + path.name, "0" * 64)
    with pytest.raises(DatasetNotFoundError, match="SHA-256 mismatch"):
        load_splits(DataConfig(name="cifar10", download=True))
    folder = sources_mod.cache_root() / "cifar10"
    assert not folder.exists()  # no file, no .part, not even the empty cache folder left behind


# ---------------------------------------------------------------- SVHN


def write_svhn(folder: Path, n: int, seed: int, name: str = "train_32x32.mat", **override) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    y = rng.integers(1, 11, (n, 1)).astype(np.uint8)  # 1..10, 10 = digit 0
    folder.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(folder / name, {"X": x, "y": y, **override})
    return x, y


def test_svhn_reads_mat_files_and_maps_label_10_to_0(tmp_path):
    d = tmp_path / "svhn"
    x, y = write_svhn(d, 12, 0)
    write_svhn(d, 5, 1, "test_32x32.mat")
    raw = load_splits(_cfg("svhn", data_dir=str(d)))
    imgs, labels = raw["train"].images.numpy(), raw["train"].labels.numpy()
    assert imgs.shape == (12, 3, 32, 32) and raw["test"].images.shape == (5, 3, 32, 32)
    assert np.array_equal(imgs[3], x[..., 3].transpose(2, 0, 1))
    assert np.array_equal(labels, np.where(y[:, 0] == 10, 0, y[:, 0])) and labels.max() <= 9
    write_svhn(d, 7, 2, "extra_32x32.mat")
    assert len(load_splits(_cfg("svhn", data_dir=str(d), svhn_extra=True))["train"]) == 19


def test_svhn_errors_name_file_and_problem(tmp_path):
    d = tmp_path / "svhn"
    write_svhn(d, 4, 1, "test_32x32.mat")
    scipy.io.savemat(d / "train_32x32.mat", {"images": np.zeros((32, 32, 3, 2), np.uint8)})
    with pytest.raises(DataError, match=r"train_32x32\.mat: missing variable\(s\) X, y.*\['images'\]"):
        load_splits(_cfg("svhn", data_dir=str(d)))
    write_svhn(d, 4, 0, y=np.ones((3, 1), np.uint8))
    with pytest.raises(DataError, match=r"train_32x32\.mat: 3 labels in y for 4 images"):
        load_splits(_cfg("svhn", data_dir=str(d)))
    (d / "train_32x32.mat").write_bytes(b"this is not a MATLAB file at all" * 10)
    with pytest.raises(DataError, match=r"train_32x32\.mat: not a readable MATLAB"):
        load_splits(_cfg("svhn", data_dir=str(d)))
    write_svhn(d, 4, 0)
    with pytest.raises(DatasetNotFoundError, match="extra_32x32.mat"):
        load_splits(_cfg("svhn", data_dir=str(d), svhn_extra=True))


# ---------------------------------------------------------------- folders of images


def photos() -> list[np.ndarray]:
    """The two sample photographs scikit-learn ships (china.jpg, flower.jpg), or photo-like
    synthetic images (smooth gradients, shapes, noise) when scikit-learn is not installed."""
    spec = importlib.util.find_spec("sklearn")  # located, not imported: importing scikit-learn is slow
    if spec is not None and spec.origin is not None:
        folder = Path(spec.origin).parent / "datasets" / "images"
        return [np.asarray(Image.open(folder / n).convert("RGB")) for n in ("china.jpg", "flower.jpg")]
    else:
        rng = np.random.default_rng(0)
        yy, xx = np.mgrid[0:427, 0:640] / 640.0
        out = []
        for k in range(2):
            img = np.stack([np.sin(3 * xx + k), np.cos(4 * yy - k), xx * yy], -1) * 100 + 120
            img[100 + 50 * k : 250, 200:400] = (200, 60 * k, 90)
            out.append(np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8))
        return out


@pytest.fixture
def photo_folder(tmp_path) -> Path:
    """Crops of real photographs in class sub-folders, mixed sizes, formats and modes, plus junk."""
    root = tmp_path / "photos"
    china, flower = photos()
    fmts = ["png", "jpg", "bmp", "gif", "webp"]
    for cls, img in (("china", china), ("flower", flower)):
        (root / cls).mkdir(parents=True)
        for i in range(10):
            top, left, h, w = 13 * i, 21 * i, 120 + 9 * i, 90 + 17 * i  # mixed sizes and aspect ratios
            crop = Image.fromarray(img[top : top + h, left : left + w])
            if i == 3:
                crop = crop.convert("L")
            if i == 4:
                crop = crop.convert("RGBA")
            fmt = fmts[i % len(fmts)]
            crop.save(root / cls / f"{i}.{fmt}")
    (root / "china" / "notes.txt").write_text("not an image")
    (root / "flower" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    return root


def test_folder_of_photos(photo_folder):
    with pytest.warns(UserWarning, match=r"skipped 2 of 22 files"):
        d = load_data(DataConfig(name=f"folder:{photo_folder}", image_size=32, val_size=2, seed=3))
    assert d.shape == (3, 32, 32) and d.num_classes == 2
    assert len(d.train) + len(d.val) + len(d.test) == 20 and len(d.test) == 2  # the 10% hold-out
    labels = torch.cat([d.train.labels, d.val.labels, d.test.labels])
    assert sorted(labels.tolist()) == [0] * 10 + [1] * 10  # sub-folders, sorted: china=0, flower=1
    assert d.train.images.float().std() > 20  # real content, not blank
    with pytest.warns(UserWarning):
        again = load_data(DataConfig(name=f"folder:{photo_folder}", image_size=32, val_size=2, seed=3))
    assert torch.equal(again.test.images, d.test.images)  # seeded hold-out
    with pytest.warns(UserWarning):
        other = load_data(DataConfig(name=f"folder:{photo_folder}", image_size=32, val_size=2, seed=4))
    assert not torch.equal(other.test.images, d.test.images)
    with pytest.warns(UserWarning):
        grey = load_splits(DataConfig(name=f"folder:{photo_folder}", image_size=16, grayscale=True))
    assert grey["train"].images.shape[1:] == (1, 16, 16)


def test_folder_default_size_grey_and_unlabelled(tmp_path):
    root = tmp_path / "flat"
    (root / "deeper" / "still").mkdir(parents=True)
    china, _ = photos()
    for i in range(5):
        Image.fromarray(china[40 * i : 40 * i + 100, :150]).convert("L").save(root / f"{i}.png")
    Image.fromarray(china[:80, :80]).convert("L").save(root / "deeper" / "still" / "x.png")
    raw = load_splits(DataConfig(name=f"folder:{root}"))
    assert raw["train"].images.shape[1:] == (1, 64, 64)  # all grey -> one channel; default size 64
    assert raw["train"].labels is None and len(raw["train"]) + len(raw["test"]) == 6


def test_folder_resize_rule_centre_crops():
    from vaelab.data.folder import resize_crop

    img = Image.new("RGB", (300, 100), (0, 0, 0))
    img.paste((255, 255, 255), (100, 0, 200, 100))  # white centre third
    out = np.asarray(resize_crop(img, 10))
    assert out.shape == (10, 10, 3) and out.min() > 200  # the centre square, scaled to 10x10


def test_folder_errors_name_the_folder(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="no such folder"):
        load_splits(DataConfig(name=f"folder:{tmp_path / 'nope'}"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty.*the folder is empty"):
        load_splits(DataConfig(name=f"folder:{tmp_path / 'empty'}"))
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.txt").write_text("hello")
    (junk / "b.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"junk: none of its 2 files is an image"):
        load_splits(DataConfig(name=f"folder:{junk}"))


# ---------------------------------------------------------------- npz / npy arrays


@pytest.mark.parametrize("layout", ["nhw", "nhwc", "nchw"])
def test_npz_layouts(tmp_path, layout):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (20, 3, 12, 12), dtype=np.uint8)
    arr = {"nhw": x[:, 0], "nhwc": x.transpose(0, 2, 3, 1), "nchw": x}[layout]
    np.savez(tmp_path / "a.npz", images=arr, labels=np.arange(20) % 4)
    raw = load_splits(DataConfig(name=f"npz:{tmp_path / 'a.npz'}"))
    want = x[:, :1] if layout == "nhw" else x
    got = torch.cat([raw["train"].images, raw["test"].images])
    assert len(raw["test"]) == 2 and raw["train"].num_classes == 4
    assert sorted(map(tuple, got.flatten(1).tolist())) == sorted(map(tuple, want.reshape(20, -1).tolist()))


def test_npz_split_keys_float_and_npy(tmp_path):
    rng = np.random.default_rng(1)
    xtr = rng.integers(0, 256, (10, 8, 8, 3)).astype(np.float32) / 255  # float in [0, 1]
    xte = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "k.npz", x_train=xtr, y_train=np.arange(10) % 3, x_test=xte, y_test=np.array([0, 1, 4, 1]))
    raw = load_splits(DataConfig(name=f"npz:{tmp_path / 'k.npz'}"))
    assert np.array_equal(raw["train"].images.numpy(), np.rint(xtr * 255).astype(np.uint8).transpose(0, 3, 1, 2))
    assert np.array_equal(raw["test"].images.numpy(), xte.transpose(0, 3, 1, 2))
    assert raw["train"].num_classes == raw["test"].num_classes == 5
    np.save(tmp_path / "i.npy", xte)
    raw = load_splits(DataConfig(name=f"npy:{tmp_path / 'i.npy'}", grayscale=True))
    assert raw["train"].images.shape[1:] == (1, 8, 8) and raw["train"].labels is None


def test_array_errors(tmp_path):
    x = np.full((5, 4, 4), 0.5, np.float32)
    x[3, 1, 2] = 1.5
    np.savez(tmp_path / "range.npz", images=x)
    with pytest.raises(DataError, match=r"range\.npz:images.*element \[3, 0, 1, 2\] \(image 3\) is 1\.5"):
        load_splits(DataConfig(name=f"npz:{tmp_path / 'range.npz'}"))
    x[3, 1, 2] = np.nan
    np.save(tmp_path / "nan.npy", x)
    with pytest.raises(DataError, match=r"nan\.npy.*image 3\) is nan"):
        load_splits(DataConfig(name=f"npy:{tmp_path / 'nan.npy'}"))
    np.savez(tmp_path / "lab.npz", images=np.zeros((5, 4, 4), np.uint8), labels=np.zeros(4, np.int64))
    with pytest.raises(DataError, match=r"lab\.npz:labels: 4 labels for 5 images"):
        load_splits(DataConfig(name=f"npz:{tmp_path / 'lab.npz'}"))
    np.savez(tmp_path / "keys.npz", pixels=np.zeros((5, 4, 4), np.uint8))
    with pytest.raises(DataError, match=r"keys\.npz: no image array.*has pixels"):
        load_splits(DataConfig(name=f"npz:{tmp_path / 'keys.npz'}"))
    np.save(tmp_path / "amb.npy", np.zeros((5, 6, 7, 8), np.uint8))
    with pytest.raises(DataError, match="cannot tell the channel axis"):
        load_splits(DataConfig(name=f"npy:{tmp_path / 'amb.npy'}"))
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match=r"obj\.npy: not a readable"):
        load_splits(DataConfig(name=f"npy:{tmp_path / 'obj.npy'}"))
    with pytest.raises(DatasetNotFoundError, match="no such file"):
        load_splits(DataConfig(name=f"npz:{tmp_path / 'missing.npz'}"))
