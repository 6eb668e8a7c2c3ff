"""The data set registry: names (``mnist``, ``fashion-mnist``, ...) and ``prefix:ARG`` sources
(``folder:PATH``, ``npz:PATH``) map to loaders that return uint8 :class:`ImageSet` splits."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import DataConfig
from ..errors import ConfigError, DataError
from ..registry import Registry
from .base import DataSplits, ImageSet, split_validation
from .idx import read_idx
from .sources import RemoteFile, locate

# A loader gets the located files and the data config; it returns at least "train" and "test".
Loader = Callable[[dict[str, Path], DataConfig], dict[str, ImageSet]]


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    files: tuple[RemoteFile, ...]
    loader: Loader
    description: str = ""


DATASETS: Registry[DatasetSpec] = Registry("data set")
PYTHON_PREFIX = "python"  # data.name of data given from Python ("python:arrays", "python:dataset", "python:NAME")
# "prefix:ARG" sources: the function gets ARG and the config and returns the splits directly.
SOURCES: Registry[Callable[[str, DataConfig], dict[str, ImageSet]]] = Registry("data source")


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    DATASETS.add(spec.name, spec)
    return spec


# ---------------------------------------------------------------- MNIST family (IDX files)
_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _idx_files(mirrors: tuple[str, ...], sha: dict[str, tuple[str, int]]) -> tuple[RemoteFile, ...]:
    return tuple(
        RemoteFile(
            name=f"{stem}.gz",
            urls=tuple(m + f"{stem}.gz" for m in mirrors),
            sha256=sha[stem][0],
            size=sha[stem][1],
            alternatives=(stem,),
        )
        for stem in _IDX_FILES
    )


def read_idx_pair(images_path: Path, labels_path: Path, num_classes: int) -> ImageSet:
    """Read an IDX images file (N, H, W) uint8 and its IDX labels file (N,), checking they agree."""
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{images_path}: expected uint8 images of shape (N, H, W), got {images.dtype} {images.shape}")
    if labels.ndim != 1:
        raise DataError(f"{labels_path}: expected a 1-D label vector, got shape {labels.shape}")
    if labels.shape[0] != images.shape[0]:
        raise DataError(
            f"{labels_path}: {labels.shape[0]} labels for {images.shape[0]} images in {images_path.name}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{labels_path}: labels outside 0..{num_classes - 1}")
    return ImageSet.from_numpy(images, labels, source=str(images_path), num_classes=num_classes)


def _load_idx(files: dict[str, Path], cfg: DataConfig) -> dict[str, ImageSet]:
    f = {stem: files[f"{stem}.gz"] for stem in _IDX_FILES}
    return {
        "train": read_idx_pair(f["train-images-idx3-ubyte"], f["train-labels-idx1-ubyte"], 10),
        "test": read_idx_pair(f["t10k-images-idx3-ubyte"], f["t10k-labels-idx1-ubyte"], 10),
    }


register_dataset(
    DatasetSpec(
        "mnist",
        _idx_files(
            ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
            {
                "train-images-idx3-ubyte": ("440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609", 9912422),
                "train-labels-idx1-ubyte": ("3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c", 28881),
                "t10k-images-idx3-ubyte": ("8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6", 1648877),
                "t10k-labels-idx1-ubyte": ("f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6", 4542),
            },
        ),
        _load_idx,
        "handwritten digits (LeCun et al.), 28x28 grey, 60k/10k",
    )
)
register_dataset(
    DatasetSpec(
        "fashion-mnist",
        _idx_files(
            ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
            {
                "train-images-idx3-ubyte": ("3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84", 26421880),
                "train-labels-idx1-ubyte": ("a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845", 29515),
                "t10k-images-idx3-ubyte": ("346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073", 4422102),
                "t10k-labels-idx1-ubyte": ("67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5", 5148),
            },
        ),
        _load_idx,
        "Zalando clothing images (Xiao et al. 2017), 28x28 grey, 60k/10k",
    )
)
register_dataset(
    DatasetSpec(
        "kmnist",
        _idx_files(
            ("http://codh.rois.ac.jp/kmnist/dataset/kmnist/",),
            {
                "train-images-idx3-ubyte": ("51467d22d8cc72929e2a028a0428f2086b092bb31cfb79c69cc0a90ce135fde4", 18165135),
                "train-labels-idx1-ubyte": ("e38f9ebcd0f3ebcdec7fc8eabdcdaef93bb0df8ea12bee65224341c8183d8e17", 29497),
                "t10k-images-idx3-ubyte": ("edd7a857845ad6bb1d0ba43fe7e794d164fe2dce499a1694695a792adfac43c5", 3041136),
                "t10k-labels-idx1-ubyte": ("20bb9a0ef54c7db3efc55a92eef5582c109615df22683c380526788f98e42a1c", 5120),
            },
        ),
        _load_idx,
        "Kuzushiji-MNIST, cursive Japanese characters (Clanuwat et al. 2018), 28x28 grey, 60k/10k",
    )
)


# ---------------------------------------------------------------- entry point
def load_splits(cfg: DataConfig) -> dict[str, ImageSet]:
    """The raw splits of the configured data set (at least ``train`` and ``test``)."""
    if ":" in cfg.name:
        prefix, arg = cfg.name.split(":", 1)
        if prefix == PYTHON_PREFIX:
            raise DataError(f"data {cfg.name!r} was given from Python (vaelab.train(cfg, run, data=...)) and is not "
                            "stored with the run: pass the same data again to resume it, or evaluate the model on "
                            "it with vaelab.evaluate_model(run.model, vaelab.ImageSet(...))")
        return SOURCES.get(prefix)(arg, cfg)
    if cfg.name not in DATASETS and ("/" in cfg.name or "\\" in cfg.name or Path(cfg.name).exists()):
        p = Path(cfg.name).expanduser()
        how = (f"folder:{cfg.name}" if p.is_dir() else
               f"npz:{cfg.name}" if p.suffix.lower() == ".npz" else f"npy:{cfg.name}" if p.suffix.lower() == ".npy"
               else f"npz:{cfg.name} (arrays), npy:{cfg.name} or folder:FOLDER (images)")
        raise ConfigError(f"unknown data set {cfg.name!r}: to read a file or folder, say what it holds, e.g. --data {how}; "
                          f"registered data sets: {', '.join(DATASETS.names())}")
    spec = DATASETS.get(cfg.name)
    files = locate(spec.name, spec.files, cfg.data_dir, cfg.download)
    return spec.loader(files, cfg)


def load_data(cfg: DataConfig) -> DataSplits:
    """Load, hold out a seeded validation split, apply limits and fixed binarization."""
    return finish_splits(load_splits(cfg), cfg)


def finish_splits(raw: dict[str, ImageSet], cfg: DataConfig) -> DataSplits:
    """The splits a loader returned (``train``, ``test`` and optionally ``val``), as training uses
    them: the seeded validation hold-out (unless ``val`` was given), limits, fixed binarization.
    Shared by the registered data sets and data given from Python (:mod:`.python`)."""
    train, test = raw["train"], raw["test"]
    if len(train) == 0:
        raise DataError(f"{train.source}: the training split is empty")
    given_val = raw.get("val")
    if cfg.limit_train is not None:
        train = train.subset(slice(0, cfg.limit_train + (0 if given_val is not None else cfg.val_size)))
    if cfg.limit_test is not None:
        test = test.subset(slice(0, cfg.limit_test))
    if given_val is not None:
        val = given_val
    else:
        train, val = split_validation(train, cfg.val_size, cfg.seed) if cfg.val_size else (train, train.subset(slice(0, 0)))
    if cfg.binarize == "fixed":
        if not isinstance(train, ImageSet):
            raise DataError(f"{train.source}: binarize = 'fixed' draws the whole training set once, and this one is "
                            "streamed (larger than the memory budget); use binarize = 'dynamic', or a larger budget")
        train, val, test = (_binarize_fixed(s, cfg.seed + i) for i, s in enumerate((train, val, test)))
    elif cfg.binarize == "dynamic":
        # Evaluation data is binarized once (seeded) so that numbers are comparable between runs.
        val, test = _binarize_fixed(val, cfg.seed + 1), _binarize_fixed(test, cfg.seed + 2)
    return DataSplits(train, val, test, cfg.name, {"source": train.source})


def _binarize_fixed(s: ImageSet, seed: int) -> ImageSet:
    g = torch.Generator().manual_seed(10_007 + seed)
    prob = s.images.to(torch.float32) / 255.0
    bits = torch.bernoulli(prob, generator=g).to(torch.uint8) * 255
    return ImageSet(bits, s.labels, s.source, s.num_classes)
