"""Training on data given from Python: arrays, tensors and Datasets give exactly what the same
images in an npz file give; a Dataset over the memory budget is streamed, batch by batch, with the
same result; the same validation and one-line errors as the file sources; resume needs the same data."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

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
    with pytest.raises(DataError, match=r"given from Python .* vaelab.evaluate_run\(run, data=...\)"):
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


def _small(tiny_cfg):
    """tiny_cfg with data.val_size left unset (as a newcomer's DataConfig is)."""
    return tiny_cfg.replace(data=vaelab.DataConfig(name="mnist"), train=replace(tiny_cfg.train, epochs=1))


def test_a_small_data_set_trains_with_the_default_val_size(tiny_cfg, tmp_path, digits):
    """1,797 digits (or 240 here) from Python hold out 10% for validation when val_size is unset;
    MNIST-sized data still hold out 5,000, and the registered data sets keep their 5,000."""
    from vaelab.data.python import auto_val_size

    x, y, _, _ = digits
    res = vaelab.train(_small(tiny_cfg), tmp_path / "run", data=(x, y))  # 240 - 24 test = 216 -> 21 held out
    assert res.config.data.val_size == 21 and len(res.history) == 1
    assert auto_val_size(54_000) == 5000 and auto_val_size(1617) == 161 and auto_val_size(5) == 1
    assert vaelab.DataConfig().val_size == 5000 == vaelab.DataConfig(name="mnist").val_size
    # the run records the number; resuming with val_size still unset takes it
    more = vaelab.train(_small(tiny_cfg).replace(train=replace(tiny_cfg.train, epochs=2)), tmp_path / "run", data=(x, y))
    assert more.config.data.val_size == 21 and len(more.history) == 2


def test_a_val_size_too_large_is_said_in_python_words(tiny_cfg, tmp_path, digits):
    x, y, _, _ = digits
    cfg = _small(tiny_cfg).replace(data=vaelab.DataConfig(name="mnist", val_size=5000))
    with pytest.raises(DataError, match=r"data.val_size = 5000 leaves no training data \(216 examples\); .*"
                                        r"DataConfig\(val_size=21\)") as e:
        vaelab.train(cfg, tmp_path / "run", data=(x, y))
    assert "--val-size" not in str(e.value)


def test_evaluate_takes_the_data_train_took(tiny_cfg, tmp_path, digits):
    x, y, xt, yt = digits
    cfg = _small(tiny_cfg)
    vaelab.train(cfg, tmp_path / "run", data=(x, y))
    res = vaelab.evaluate_run(tmp_path / "run", data=(x, y), k=2, progress=False)
    assert res.n == 24 and Path(res.extra["written"]).exists()  # the test split training held out
    assert vaelab.evaluate_run(tmp_path / "run", data={"train": (x, y)}, k=2, progress=False, split="val").n == 21
    with pytest.raises(DataError, match="are not the data the run was trained on"):
        vaelab.evaluate_run(tmp_path / "run", data=(x[::-1].copy(), y), k=2, progress=False)
    # evaluate_model: arrays, (images, labels), a Dataset, TrainData's split, as well as an ImageSet
    model = vaelab.load_run(tmp_path / "run").model
    for data in (xt, (xt, yt), Images(xt, yt), torch.from_numpy(xt), TrainData(x, test=xt)):
        assert vaelab.evaluate_model(model, data, k=2, progress=False).n == 60
    with pytest.raises(DataError, match=r"no test split was given .*evaluate_run\(run, data=...\)"):
        vaelab.evaluate_model(model, TrainData(x), k=2, progress=False)


def test_overwrite_starts_a_run_afresh(tiny_cfg, tmp_path, digits):
    """A notebook cell run twice: overwrite=True trains anew (even with another configuration),
    removing only vaelab's files; a folder of other things and resume=True are refused."""
    x, y, _, _ = digits
    cfg, run = _small(tiny_cfg), tmp_path / "run"
    first = vaelab.train(cfg, run, data=(x, y))
    vaelab.evaluate_run(run, data=(x, y), k=2, progress=False)
    (run / "notes.txt").write_text("mine")
    other = cfg.replace(model=replace(cfg.model, latent_dim=3))
    again = vaelab.train(other, run, data=(x, y), overwrite=True)
    assert again.config.model.latent_dim == 3 and len(again.history) == 1 and again.state.step == first.state.step
    assert len(vaelab.load_run(run).model.state_dict()) and not (run / "eval").exists()
    assert (run / "notes.txt").read_text() == "mine" and len((run / "metrics.jsonl").read_text().splitlines()) == 1
    with pytest.raises(ConfigError, match="cannot also resume"):
        vaelab.train(cfg, run, data=(x, y), overwrite=True, resume=True)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("x")
    with pytest.raises(ConfigError, match="holds no vaelab run"):
        vaelab.train(cfg, tmp_path / "mine", data=(x, y), overwrite=True)
    assert (tmp_path / "mine" / "thesis.tex").exists()
