"""Shared fixtures: tiny data sets written by the tests, an isolated cache, a tiny config."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import settings

from vaelab import DataConfig, ModelConfig, RunConfig, TrainConfig
from vaelab.data import write_idx

# The property tests run on a fixed sequence of examples by default, so that `make test` gives
# everyone the same result; `make fuzz` (HYPOTHESIS_PROFILE=fuzz) explores new examples each run.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("fuzz", print_blob=True)
settings.register_profile("dev", print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _isolate(monkeypatch, tmp_path_factory):
    """No test reads the user's cache or $VAELAB_DATA; torch uses one thread for determinism."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.delenv("VAELAB_DATA", raising=False)
    torch.set_num_threads(1)


def make_digits(n: int, seed: int, size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """Tiny MNIST-like images: class k is a bright bar at a class-specific position, plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    imgs = rng.integers(0, 40, (n, size, size)).astype(np.uint8)
    for i, k in enumerate(labels):
        r = 2 + int(k) * (size - 4) // 10
        imgs[i, r : r + 2, 3 : size - 3] = 255
    return imgs, labels


def write_mnist(folder: Path, n_train: int = 240, n_test: int = 60, gz: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    x, y = make_digits(n_train, 0)
    write_idx(folder / f"train-images-idx3-ubyte{ext}", x)
    write_idx(folder / f"train-labels-idx1-ubyte{ext}", y)
    x, y = make_digits(n_test, 1)
    write_idx(folder / f"t10k-images-idx3-ubyte{ext}", x)
    write_idx(folder / f"t10k-labels-idx1-ubyte{ext}", y)
    return folder


@pytest.fixture
def mnist_dir(tmp_path: Path) -> Path:
    """A data root holding a tiny 'mnist' data set (IDX, gzipped) under DIR/mnist."""
    write_mnist(tmp_path / "data" / "mnist")
    return tmp_path / "data"


@pytest.fixture
def tiny_cfg(mnist_dir: Path) -> RunConfig:
    return RunConfig(
        data=DataConfig(name="mnist", data_dir=str(mnist_dir), val_size=40, download=False),
        model=ModelConfig(latent_dim=2, hidden=(32,)),
        # on the CPU wherever the tests run (they compare with CPU tensors); tests/test_devices.py and
        # the device-parametrised tests cover the GPU
        train=TrainConfig(epochs=2, batch_size=32, progress=False, threads=1, device="cpu"),
    )
