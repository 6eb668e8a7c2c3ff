"""IDX reading, the data set registry's resolution order, downloads and the offline error."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_mnist

from vaelab import DataConfig, DataError, DatasetNotFoundError, load_data
from vaelab.data import RemoteFile, locate, read_idx, write_idx
from vaelab.data import sources as sources_mod


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32, np.float32, np.float64])
def test_idx_round_trip(tmp_path, gz, dtype):
    a = (np.arange(2 * 3 * 4) - 5).reshape(2, 3, 4).astype(dtype)
    if dtype == np.uint8:
        a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    p = tmp_path / ("a.idx.gz" if gz else "a.idx")
    write_idx(p, a)
    b = read_idx(p)
    assert b.dtype == a.dtype.newbyteorder("=") and np.array_equal(a, b)


def test_idx_errors_name_the_file(tmp_path):
    good = tmp_path / "x-idx3-ubyte"
    write_idx(good, np.zeros((3, 4, 4), np.uint8))
    raw = good.read_bytes()
    cases = {
        "truncated": raw[:-5],
        "magic": b"\x01\x02" + raw[2:],
        "header": raw[:6],
        "trailing": raw + b"\x00\x00",
    }
    for name, data in cases.items():
        p = tmp_path / f"{name}-idx3-ubyte"
        p.write_bytes(data)
        with pytest.raises(DataError, match=str(p)):
            read_idx(p)
    bad_gz = tmp_path / "bad.gz"
    bad_gz.write_bytes(gzip.compress(raw)[:-10])
    with pytest.raises(DataError, match="gzip"):
        read_idx(bad_gz)


def test_load_data_split_is_seeded_and_disjoint(mnist_dir):
    cfg = DataConfig(name="mnist", data_dir=str(mnist_dir), val_size=40, download=False)
    a, b = load_data(cfg), load_data(cfg)
    assert len(a.train) == 200 and len(a.val) == 40 and len(a.test) == 60
    assert torch.equal(a.val.images, b.val.images)
    c = load_data(DataConfig(name="mnist", data_dir=str(mnist_dir), val_size=40, download=False, seed=1))
    assert not torch.equal(a.val.images, c.val.images)
    # train and val partition the original training set
    full = torch.cat([a.train.images, a.val.images]).flatten(1)
    assert len({tuple(r.tolist()) for r in full}) == len(full) or full.shape[0] == 240
    assert a.shape == (1, 28, 28) and a.num_classes == 10


def test_binarization_modes(mnist_dir):
    base = DataConfig(name="mnist", data_dir=str(mnist_dir), val_size=40, download=False)
    fixed = load_data(DataConfig(**{**base.__dict__, "binarize": "fixed"}))
    assert set(fixed.train.images.unique().tolist()) <= {0, 255}
    dyn = load_data(DataConfig(**{**base.__dict__, "binarize": "dynamic"}))
    # training data stays grey (binarized afresh each pass by the loop); evaluation data is fixed
    assert len(set(dyn.train.images.unique().tolist())) > 2
    assert set(dyn.test.images.unique().tolist()) <= {0, 255}
    again = load_data(DataConfig(**{**base.__dict__, "binarize": "dynamic"}))
    assert torch.equal(dyn.test.images, again.test.images)


def test_resolution_order(tmp_path, monkeypatch):
    first = write_mnist(tmp_path / "a" / "mnist", n_train=50, n_test=10)
    second = write_mnist(tmp_path / "b" / "mnist", n_train=60, n_test=10)
    monkeypatch.setenv("VAELAB_DATA", str(second.parent))
    cfg = DataConfig(name="mnist", val_size=5, download=False)
    assert len(load_data(cfg).train) == 55  # $VAELAB_DATA
    cfg = DataConfig(name="mnist", data_dir=str(first.parent), val_size=5, download=False)
    assert len(load_data(cfg).train) == 45  # --data-dir wins
    cfg = DataConfig(name="mnist", data_dir=str(first), val_size=5, download=False)
    assert len(load_data(cfg).train) == 45  # the folder itself also works
    raw = write_mnist(tmp_path / "c", n_train=30, n_test=10, gz=False)
    assert len(load_data(DataConfig(name="mnist", data_dir=str(raw), val_size=5, download=False)).train) == 25


def test_offline_error_lists_every_place(tmp_path, monkeypatch):
    monkeypatch.setenv("VAELAB_DATA", str(tmp_path / "env"))
    with pytest.raises(DatasetNotFoundError) as e:
        load_data(DataConfig(name="kmnist", download=False))
    msg = str(e.value)
    for place in (tmp_path / "env", tmp_path / "env" / "kmnist", Path("/usr/share/datasets/kmnist"),
                  sources_mod.cache_root() / "kmnist"):
        assert str(place) in msg
    assert "download: disabled" in msg
    # an explicit --data-dir is the one place searched: the error names it alone, on one line
    with pytest.raises(DatasetNotFoundError, match=f"^--data-dir {tmp_path / 'mine'}: no such folder") as e:
        load_data(DataConfig(name="kmnist", data_dir=str(tmp_path / "mine"), download=False))
    assert "\n" not in str(e.value)


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a):  # quiet
        pass


@pytest.fixture
def http_root(tmp_path):
    root = tmp_path / "www"
    root.mkdir()

    def handler(*a, **k):
        return _Handler(*a, directory=str(root), **k)

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield root, f"http://127.0.0.1:{srv.server_address[1]}/"
    srv.shutdown()
    srv.server_close()


def test_download_from_local_server_with_checksums(http_root, tmp_path):
    root, url = http_root
    write_mnist(root, n_train=30, n_test=10)
    files = tuple(
        RemoteFile(p.name, (url + "missing/" + p.name, url + p.name), hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(root.iterdir())
    )
    got = locate("tiny", files, data_dir=None, download=True)
    cache = sources_mod.cache_root() / "tiny"
    assert all(p.parent == cache and p.read_bytes() == (root / p.name).read_bytes() for p in got.values())
    # second call finds the cached copies
    assert locate("tiny", files, download=False) == got


def test_download_checksum_mismatch_leaves_nothing(http_root):
    root, url = http_root
    (root / "f.bin").write_bytes(b"hello")
    bad = RemoteFile("f.bin", (url + "f.bin",), sha256="0" * 64)
    with pytest.raises(DatasetNotFoundError, match="SHA-256 mismatch"):
        locate("bad", (bad,), download=True)
    folder = sources_mod.cache_root() / "bad"
    assert not folder.exists()  # no file, no .part, not even the empty cache folder left behind


def test_download_unreachable_lists_urls():
    f = RemoteFile("x.gz", ("http://127.0.0.1:9/x.gz",), sha256=None)
    with pytest.raises(DatasetNotFoundError, match="127.0.0.1:9"):
        locate("nowhere", (f,), download=True)
    assert not (sources_mod.cache_root() / "nowhere").exists()  # no empty folder left behind


def test_label_count_mismatch(tmp_path):
    d = write_mnist(tmp_path / "m", n_train=30, n_test=10)
    write_idx(d / "t10k-labels-idx1-ubyte.gz", np.zeros(9, np.uint8))
    with pytest.raises(DataError, match="9 labels for 10 images"):
        load_data(DataConfig(name="mnist", data_dir=str(d), val_size=5, download=False))
