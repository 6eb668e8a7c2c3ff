"""Training on data given from Python: arrays, tensors and Datasets give exactly what the same
images in an npz file give; a Dataset over the memory budget is streamed, batch by batch, with the
same result; the same validation and one-line errors as the file sources; resume needs the same data."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import make_digits
from torch.utils.data import Dataset

import vaelab
from vaelab.data.python import TrainData
from vaelab.errors import CheckpointError, ConfigError, DataError
from vaelab.training import Callback


class Images(Dataset):
    """A map-style Dataset of (H, W, 1) uint8 images (and labels) that counts the items it returns."""

    def __init__(self, x, y=None, bad: int | None = None):
        self.x, self.y, self.bad, self.reads = x, y, bad, 0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.reads += 1
        img = self.x[i][..., None]
        if i == self.bad:
            img = np.full(img.shape, 2.0)  # out of [0, 1]
        return img if self.y is None else (img, int(self.y[i]))


@pytest.fixture(scope="module")
def digits():
    (x, y), (xt, yt) = make_digits(240, 0), make_digits(60, 1)
    return x, y.astype(np.int64), xt, yt.astype(np.int64)


def _cfg(tiny_cfg, name="mnist", epochs=2):  # a registered name: data given from Python replace it
    return tiny_cfg.replace(data=replace(tiny_cfg.data, name=name, data_dir=None),
                            train=replace(tiny_cfg.train, epochs=epochs))


def _weights(res):
    return {k: v.detach().clone() for k, v in res.model.state_dict().items()}


def _same(a, b):
    assert sorted(a) == sorted(b) and not [k for k in a if not torch.equal(a[k], b[k])]


def test_arrays_tensors_and_datasets_train_exactly_as_the_npz_file(tiny_cfg, tmp_path, digits):
    x, y, xt, yt = digits
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=xt, y_test=yt)
    ref = vaelab.train(_cfg(tiny_cfg, f"npz:{tmp_path / 'd.npz'}"), tmp_path / "npz")
    want, spec = _weights(ref), ref.spec
    given = {
        "uint8 arrays": {"train": (x, y), "test": (xt, yt)},
        "float NHWC tensors": {"train": (torch.from_numpy(x[..., None] / 255.0), torch.from_numpy(y)),
                               "test": (torch.from_numpy(xt[..., None] / 255.0), torch.from_numpy(yt))},
        "Dataset in memory": TrainData(Images(x, y), test=Images(xt, yt)),
        "Dataset streamed": TrainData(Images(x, y), test=Images(xt, yt), memory_budget=100_000, num_classes=10),
    }
    for i, (what, data) in enumerate(given.items()):
        res = vaelab.train(_cfg(tiny_cfg), tmp_path / f"run{i}", data=data)
        _same(want, _weights(res))
        assert res.spec == spec, what
        assert [r["val_elbo"] for r in res.history] == [r["val_elbo"] for r in ref.history], what
    assert res.config.data.name == "python:dataset"
    # one unsplit array: the test split is the same seeded 10% an npz file without one gets
    np.savez(tmp_path / "one.npz", x=x)
    a = vaelab.train(_cfg(tiny_cfg, f"npz:{tmp_path / 'one.npz'}", epochs=1), tmp_path / "one-npz")
    b = vaelab.train(_cfg(tiny_cfg, epochs=1), tmp_path / "one-arr", data=x)
    _same(_weights(a), _weights(b))


def test_a_dataset_over_the_memory_budget_is_streamed_batch_by_batch(tiny_cfg, tmp_path, digits):
    x, y, xt, yt = digits
    ds = Images(x, y)
    reads: list[int] = []

    class Watch(Callback):
        def on_step(self, step):
            reads.append(ds.reads)

    data = TrainData(ds, test=Images(xt, yt), memory_budget="100K", num_classes=10)
    streamed = vaelab.train(_cfg(tiny_cfg), tmp_path / "streamed", data=data, callbacks=[Watch()])
    # by the end of the first step: the first item (its shape), the validation split (40), the
    # fingerprint's first items (64) and the first batch (32); then each step reads its own batch and
    # no more: the 200 training images are never held at once
    assert reads[0] == 1 + 40 + 64 + 32 and len(reads) == 14
    assert max(b - a for a, b in zip(reads, reads[1:], strict=False)) <= 32
    assert ds.reads - reads[0] < 2 * 200  # two epochs of 200, nothing materialised besides
    in_memory = vaelab.train(_cfg(tiny_cfg), tmp_path / "memory", data=TrainData(Images(x, y), test=Images(xt, yt)))
    _same(_weights(in_memory), _weights(streamed))
    # with worker processes: the same batches, the same result
    workers = vaelab.train(_cfg(tiny_cfg), tmp_path / "workers", data=replace(data, train=Images(x, y), workers=2))
    _same(_weights(in_memory), _weights(workers))


def test_resume_needs_the_same_data_and_is_exact(tiny_cfg, tmp_path, digits):
    x, y, xt, yt = digits
    cfg = _cfg(tiny_cfg)
    full = vaelab.train(cfg, tmp_path / "full", data=(x, y))
    vaelab.train(cfg, tmp_path / "cut", data=(x, y), max_steps=5)
    with pytest.raises(CheckpointError, match="are not the data it was trained on"):
        vaelab.train(cfg, tmp_path / "cut", data=(x[::-1].copy(), y))
    with pytest.raises(DataError, match="was trained on data given from Python"):
        vaelab.train(cfg, tmp_path / "cut")
    resumed = vaelab.train(cfg, tmp_path / "cut", data=(x, y))
    _same(_weights(full), _weights(resumed))
    # the same for a streamed Dataset (deterministic: the same item for the same index)
    data = TrainData(Images(x, y), test=Images(xt, yt), memory_budget=0, num_classes=10)
    a = vaelab.train(cfg, tmp_path / "ds-full", data=data)
    vaelab.train(cfg, tmp_path / "ds-cut", data=data, max_steps=9)
    _same(_weights(a), _weights(vaelab.train(cfg, tmp_path / "ds-cut", data=data)))
    with pytest.raises(DataError, match="was given from Python"):
        vaelab.evaluate_run(tmp_path / "full", k=2, progress=False)


@pytest.mark.parametrize("data, message", [
    (np.full((10, 8, 8), np.nan), r"train images: float pixels must be finite and in \[0, 1\]; element \[0, 0, 0, 0\]"),
    (np.full((10, 8, 8), 1.5), r"element \[0, 0, 0, 0\] \(image 0\) is 1.5"),
    (np.full((10, 8, 8), 300), "integer pixels must lie in 0..255"),
    (np.zeros((10, 8)), r"images must be \(N, H, W\), \(N, H, W, C\) or \(N, C, H, W\)"),
    ((np.zeros((10, 8, 8), np.uint8), np.zeros(9, np.int64)), "9 labels for 10 images"),
    ((np.zeros((10, 8, 8), np.uint8), np.full(10, -1)), "negative label"),
    ("images.npz", "expected images .* got a str"),
    ({"train": np.zeros((4, 8, 8), np.uint8), "valid": None}, r"a dict needs a 'train' entry .* got \['train', 'valid'\]"),
    (TrainData(Images(np.zeros((10, 8, 8), np.uint8), bad=3)), r"train Dataset: float pixels .* \(image 3\) is 2.0"),
    (TrainData(Images(np.zeros((10, 8, 8), np.uint8), bad=3), memory_budget=0),
     r"train Dataset\[3\]: float pixels must be finite and in \[0, 1\]"),
    (TrainData(Images(np.zeros((10, 8, 8), np.uint8), np.zeros(10)), memory_budget=0), "give num_classes"),
    (TrainData(np.zeros((10, 8, 8), np.uint8), memory_budget="lots"), "expected a size such as 512M"),
])
def test_bad_data_is_one_line_naming_the_problem(tiny_cfg, tmp_path, data, message):
    cfg = _cfg(tiny_cfg, epochs=1).replace(data=replace(_cfg(tiny_cfg).data, val_size=2))
    with pytest.raises((DataError, ConfigError), match=message) as e:
        vaelab.train(cfg, tmp_path / "run", data=data)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()
