"""Your own data from Python: ``vaelab.train(cfg, run, data=...)`` with numpy arrays, tensors or a
``torch.utils.data.Dataset`` of images, checked by the same rules as the ``npz:`` source
(:mod:`.arrays`) and split by the same seeded rules.

What ``data`` may be:

* images: an array or tensor (N, H, W), (N, H, W, C) or (N, C, H, W) (the channel axis found as
  for ``npz:``), uint8 (or integers in 0..255) or floats in [0, 1] (rounded to k/255);
* ``(images, labels)``: with integer labels (N,);
* a ``torch.utils.data.Dataset`` whose items are an image (array, tensor or PIL image, as above
  without the N axis) or ``(image, label)``;
* :class:`TrainData` (or a dict with its fields): ``train`` plus optional ``val`` and ``test``, each
  any of the above, and the options for Datasets below.

Splits, as for an ``npz`` file: ``test`` given, or else a seeded 10% of ``train`` held out (arrays
and Datasets that fit the memory budget; a streamed Dataset gets no test split unless one is given);
``val`` given, or else ``data.val_size`` examples of ``train`` held out (seeded); ``data.val_size``
left unset holds out 10% of ``train``, at most 5000 (:func:`auto_val_size`: 54,000 -> 5,000, 1,617
-> 161), and the run records the number. So training from arrays gives exactly what training from
the same arrays saved with ``numpy.savez`` gives with the same ``data.val_size``.

The same forms are what :func:`vaelab.evaluate_run` (``data=``, split as training split them) and
:func:`vaelab.evaluate_model` (all of them as given, or a split of ``TrainData``) take.

A Dataset whose training split would take more than ``memory_budget`` bytes in memory (as training
holds it: uint8 plus a float32 copy, 5 bytes per pixel) is **streamed**: each step reads its batch
through a ``DataLoader`` (``workers`` processes; the order is the same seeded permutation as in
memory, so the result is the same). The cost: every epoch reads and converts every item again (in
Python, one ``__getitem__`` per image) and each epoch starts the workers afresh; memory holds a few
batches per worker. Validation and test splits are always read into memory (validation runs over
all of it every epoch). Exact resume holds when the Dataset returns the same item for the same index
every time (no random augmentation; a deterministic Dataset).

The run records the data's fingerprint (sizes, shapes, and a hash of the arrays, or of a streamed
Dataset's first items); the data are the user's and are not stored, so resuming needs the same data
passed again, and different data are refused. The run's ``data.name`` becomes ``python:arrays``
or ``python:dataset`` (or ``python:NAME`` with :attr:`TrainData.name`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..config import DEFAULT_VAL_SIZE, DataConfig, val_size_is_default
from ..errors import ConfigError, DataError
from ..safeio import _parse_size, human
from .arrays import _channel_first, make_images, to_uint8
from .base import DataSplits, ImageSet
from .folder import TEST_FRACTION, holdout
from .registry import PYTHON_PREFIX, finish_splits

DEFAULT_BUDGET = 2 << 30  # bytes a Dataset's training split may take in memory before it is streamed
BYTES_PER_PIXEL = 5  # training holds uint8 images and their float32 copy
FINGERPRINT_ITEMS = 64  # items of a streamed Dataset that its fingerprint reads


@dataclass
class TrainData:
    """Data given from Python, by split (see the module docstring for what each may be)."""

    train: Any
    val: Any = None
    test: Any = None
    num_classes: int | None = None  # class count (default: largest label + 1; needed to stream labelled items)
    memory_budget: int | str = DEFAULT_BUDGET  # bytes (or "512M", "4G"): a larger Dataset is streamed
    workers: int = 0  # DataLoader worker processes when streaming (0: read in the training process)
    name: str = ""  # the run's data.name becomes python:NAME (default python:arrays / python:dataset)


def _budget(v: int | str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise ConfigError(f"memory_budget must be a number of bytes or a size such as 4G, got {v!r}")
    if isinstance(v, int):
        if v < 0:
            raise ConfigError(f"memory_budget must be >= 0 bytes, got {v}")
        return v
    try:
        return _parse_size(v)
    except ValueError:
        raise ConfigError(f"memory_budget {v!r}: expected a size such as 512M or 4G") from None


def _to_numpy(a: Any, name: str) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    try:
        arr = np.asarray(a)
    except Exception as e:  # an object numpy cannot hold as an array
        raise DataError(f"{name}: not an image array ({type(a).__name__}: {e})") from None
    if arr.dtype == object:
        raise DataError(f"{name}: not an image array (numpy sees Python objects of type {type(a).__name__})")
    return arr


def _split_item(item: Any) -> tuple[Any, Any]:
    """A Dataset item -> (image, label or None)."""
    if isinstance(item, (tuple, list)):
        if len(item) != 2:
            raise DataError(f"a Dataset item must be an image or (image, label), got a {type(item).__name__} of "
                            f"{len(item)}")
        return item[0], item[1]
    return item, None


def _item_label(label: Any, name: str) -> int:
    v = _to_numpy(label, name)
    if v.size != 1 or not (np.issubdtype(v.dtype, np.integer) or v.dtype == np.bool_):
        raise DataError(f"{name}: a label must be one integer, got {v.dtype} of shape {v.shape}")
    return int(v.reshape(()))


def _images_of(items: list[Any], name: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Stack Dataset items into (N, ...) images (as given) and labels (or None)."""
    imgs, labels = [], []
    for k, item in enumerate(items):
        img, lab = _split_item(item)
        imgs.append(_to_numpy(img, f"{name}[{k}]"))
        labels.append(lab)
    if any((lab is None) != (labels[0] is None) for lab in labels):
        raise DataError(f"{name}: some items have a label and some do not")
    shapes = {a.shape for a in imgs}
    if len(shapes) > 1:
        raise DataError(f"{name}: items have different shapes {sorted(shapes)[:3]}; resize them to one size")
    lab = None if labels[0] is None else np.array([_item_label(v, f"{name} label") for v in labels], dtype=np.int64)
    return np.stack(imgs), lab


class StreamedImages:
    """The training split of a Dataset too large for memory: indices into it, read batch by batch.
    Stands where an :class:`ImageSet` would (``len``, ``shape``, ``subset``, ``source``)."""

    labels = None  # labels come with each batch

    def __init__(self, dataset: Dataset, indices: np.ndarray, shape: tuple[int, int, int], labelled: bool,
                 num_classes: int | None, source: str, workers: int, grey: bool) -> None:
        self.dataset, self.indices, self._shape = dataset, indices, shape
        self.labelled, self.num_classes, self.source, self.workers, self.grey = labelled, num_classes, source, workers, grey

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self._shape

    @property
    def images(self) -> torch.Tensor:
        raise DataError(f"{self.source}: is streamed (larger than the memory budget); it has no images in memory")

    def subset(self, index: torch.Tensor | slice) -> StreamedImages:
        idx = self.indices[index.numpy() if isinstance(index, torch.Tensor) else index]
        return StreamedImages(self.dataset, idx, self._shape, self.labelled, self.num_classes, self.source, self.workers, self.grey)

    def materialize(self) -> ImageSet:
        """These images in memory (the validation split of a streamed Dataset)."""
        return _Collate(self)(self._items(self.indices.tolist()), as_set=True)

    def _items(self, idx: list[int]) -> list[tuple[int, Any]]:
        return [(i, self.dataset[i]) for i in idx]

    def batches(self, positions: list[torch.Tensor], pin: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """uint8 images (B, C, H, W) and labels (B,) of each batch of ``positions`` (into this split), in
        order, read through a DataLoader with ``workers`` processes."""
        sampler = [self.indices[p.numpy()].tolist() for p in positions]
        loader = DataLoader(_Indexed(self.dataset), batch_sampler=sampler, num_workers=self.workers,
                            collate_fn=_Collate(self), pin_memory=pin)
        return iter(loader)


class _Indexed(Dataset):
    """Items with their index, so a batch's errors can name the item."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __getitem__(self, i: int) -> tuple[int, Any]:
        return i, self.dataset[i]


class _Collate:
    """Items -> (uint8 images (B, C, H, W), labels (B,) or None), each item checked as ``npz:`` arrays
    are (shape, range, channel axis); errors name the item (``dataset[i]``). Picklable, for workers."""

    def __init__(self, s: StreamedImages) -> None:
        self.shape, self.labelled, self.num_classes = s.shape, s.labelled, s.num_classes
        self.source, self.grey = s.source, s.grey

    def __call__(self, items: list[tuple[int, Any]], as_set: bool = False):
        imgs, labels = [], []
        for i, item in items:
            name = f"{self.source}[{i}]"
            img, lab = _split_item(item)
            a = to_uint8(_channel_first(_to_numpy(img, name)[None], name), name)[0]
            if self.grey and a.shape[0] == 3:
                from .arrays import _grey

                a = _grey(a[None])[0]
            if a.shape != self.shape:
                raise DataError(f"{name}: image of shape {a.shape}, the first item's is {self.shape}")
            if (lab is None) == self.labelled:
                raise DataError(f"{name}: {'has no' if lab is None else 'has a'} label, unlike the first item")
            if lab is not None:
                v = _item_label(lab, f"{name} label")
                if v < 0 or (self.num_classes is not None and v >= self.num_classes):
                    raise DataError(f"{name}: label {v} is outside 0..{(self.num_classes or 1) - 1}")
                labels.append(v)
            imgs.append(a)
        x = torch.from_numpy(np.stack(imgs)) if imgs else torch.zeros((0, *self.shape), dtype=torch.uint8)
        y = torch.tensor(labels, dtype=torch.int64) if self.labelled else None
        if as_set:
            return ImageSet(x, y, self.source, self.num_classes)
        return x, y


def _is_pair(v: Any) -> bool:
    return (isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], (np.ndarray, torch.Tensor))
            and (v[1] is None or isinstance(v[1], (np.ndarray, torch.Tensor, list))))


def _part(value: Any, split: str, data: TrainData, cfg: DataConfig, streamable: bool) -> ImageSet | StreamedImages:
    """One split as an ImageSet (arrays, tensors, a Dataset that fits) or StreamedImages (a larger Dataset)."""
    if isinstance(value, Dataset):
        return _dataset(value, split, data, cfg, streamable)
    if _is_pair(value):
        images, labels = value
    elif isinstance(value, (np.ndarray, torch.Tensor)):
        images, labels = value, None
    else:
        raise DataError(f"{split} data: expected images (an array or tensor), (images, labels), or a "
                        f"torch.utils.data.Dataset; got a {type(value).__name__}")
    name = f"{split} images"
    return make_images(_to_numpy(images, name), None if labels is None else _to_numpy(labels, f"{split} labels"),
                       name, cfg, f"{split} labels")


def _dataset(ds: Dataset, split: str, data: TrainData, cfg: DataConfig, streamable: bool) -> ImageSet | StreamedImages:
    name = f"{split} Dataset"
    try:
        n = len(ds)  # type: ignore[arg-type]
    except TypeError:
        raise DataError(f"{name}: a {type(ds).__name__} has no len(); vaelab needs a map-style Dataset "
                        "(with __len__ and __getitem__)") from None
    if n == 0:
        return ImageSet(torch.zeros((0, 1, 1, 1), dtype=torch.uint8), None, name)
    img0, lab0 = _split_item(ds[0])
    a0 = to_uint8(_channel_first(_to_numpy(img0, f"{name}[0]")[None], f"{name}[0]"), f"{name}[0]")
    shape = a0.shape[1:]
    if cfg.grayscale and shape[0] == 3:
        shape = (1, *shape[1:])
    need = n * math.prod(shape) * BYTES_PER_PIXEL
    classes = data.num_classes
    if classes is None and hasattr(ds, "classes"):
        try:
            classes = len(ds.classes)  # torchvision's convention
        except TypeError:
            classes = None
    if streamable and need > _budget(data.memory_budget):
        if lab0 is not None and classes is None:
            raise DataError(f"{name}: its items are labelled and it is streamed ({human(need)} in memory, more than the "
                            "memory budget), so its class count cannot be read off the labels: give num_classes")
        return StreamedImages(ds, np.arange(n), tuple(int(v) for v in shape), lab0 is not None, classes, name,
                              data.workers, cfg.grayscale)
    images, labels = _images_of([ds[i] for i in range(n)], name)
    s = make_images(images, labels, name, cfg, f"{name} labels")
    return s if classes is None or labels is None else ImageSet(s.images, s.labels, s.source, classes)


def as_train_data(data: Any) -> TrainData:
    if isinstance(data, TrainData):
        return data
    if isinstance(data, Mapping):
        unknown = set(data) - {f.name for f in dataclasses.fields(TrainData)}
        if unknown or "train" not in data:
            raise ConfigError(f"data: a dict needs a 'train' entry and may have val, test, num_classes, memory_budget, "
                              f"workers, name; got {sorted(data)}")
        return TrainData(**data)
    return TrainData(train=data)


def is_python_data(data: Any) -> bool:
    """Whether ``data`` given to ``train`` is data from Python (anything but loaded ``DataSplits``)."""
    return data is not None and not isinstance(data, DataSplits)


def python_splits(data: Any, cfg: DataConfig) -> tuple[DataSplits, DataConfig]:
    """``data`` as the splits training uses, and the data config naming it (``python:...``)."""
    d = as_train_data(data)
    if d.train is None:
        raise DataError("data: no training images (train is None)")
    _budget(d.memory_budget)
    if isinstance(d.workers, bool) or not isinstance(d.workers, int) or d.workers < 0:
        raise ConfigError(f"workers must be an integer >= 0, got {d.workers!r}")
    if d.num_classes is not None and (isinstance(d.num_classes, bool) or not isinstance(d.num_classes, int)
                                      or d.num_classes < 1):
        raise ConfigError(f"num_classes must be an integer >= 1 (or None), got {d.num_classes!r}")
    kind = "dataset" if isinstance(d.train, Dataset) else "arrays"
    if cfg.name.startswith(f"{PYTHON_PREFIX}:") and not d.name:
        name = cfg.name
    else:
        name = f"{PYTHON_PREFIX}:{d.name or kind}"
    cfg = dataclasses.replace(cfg, name=name)
    train = _part(d.train, "train", d, cfg, streamable=True)
    raw: dict[str, Any] = {"train": train}
    for split in ("val", "test"):
        v = getattr(d, split)
        if v is not None:
            raw[split] = _part(v, split, d, cfg, streamable=False)
    if "test" not in raw:
        if isinstance(train, StreamedImages):
            raw["test"] = train.subset(slice(0, 0)).materialize()
        else:
            raw.update(holdout(train, TEST_FRACTION, cfg.seed))  # as an npz file without a test split
    if "val" not in raw:
        cfg = dataclasses.replace(cfg, val_size=_val_size(cfg, len(raw["train"]), raw["train"].source))
    _agree_classes(raw, d.num_classes)
    splits = finish_splits(raw, cfg)
    if isinstance(splits.val, StreamedImages):  # held out of a streamed train: read into memory
        splits = dataclasses.replace(splits, val=splits.val.materialize())
    info = {**splits.info, "source": f"{kind} given from Python", "fingerprint": fingerprint(splits)}
    return dataclasses.replace(splits, info=info), cfg


def auto_val_size(n: int) -> int:
    """The validation hold-out of ``n`` training images when ``data.val_size`` is left unset: 10%, at
    most :data:`~vaelab.config.DEFAULT_VAL_SIZE` (5000; so 54,000 images hold out 5,000), at least one
    of two or more."""
    return min(int(DEFAULT_VAL_SIZE), n // 10) or (1 if n > 1 else 0)


def _val_size(cfg: DataConfig, n: int, source: str) -> int:
    """``data.val_size`` for ``n`` training images given from Python: the one set, or else
    :func:`auto_val_size`; one that leaves no training data is an error in Python's words."""
    if val_size_is_default(cfg):
        return auto_val_size(n)
    if cfg.val_size >= n:
        raise DataError(f"{source}: data.val_size = {cfg.val_size} leaves no training data ({n} examples); hold "
                        f"out fewer, e.g. DataConfig(val_size={auto_val_size(n)}), or leave val_size unset (10% of "
                        "the training images, at most 5000), or give a val split (TrainData(train=..., val=...))")
    return cfg.val_size


def check_python_run(checkpoint: Path) -> None:
    """Refuse to resume, without data, a run trained on data given from Python (read from the
    checkpoint's header only)."""
    if not checkpoint.exists():
        return
    from ..runs.checkpoint import read_config

    name = read_config(checkpoint).data.name
    if name.startswith(f"{PYTHON_PREFIX}:"):
        raise DataError(f"{checkpoint.parent.parent}: was trained on data given from Python ({name}), which is not "
                        "stored with the run: resume it with the same data, vaelab.train(cfg, run, data=...)")


def _agree_classes(raw: dict[str, Any], given: int | None) -> None:
    """One class count for every split (the largest, as for npz train/test files), or the one given."""
    counts = [s.num_classes for s in raw.values() if s.num_classes is not None]
    n = given if given is not None else (max(counts) if counts else None)
    if n is None:
        return
    for k, s in raw.items():
        if isinstance(s, ImageSet):
            if s.labels is not None and len(s) and int(s.labels.max()) >= n:
                raise DataError(f"{s.source}: label {int(s.labels.max())} is outside 0..{n - 1} (num_classes = {n})")
            raw[k] = ImageSet(s.images, s.labels, s.source, n if s.labels is not None else s.num_classes)
        else:
            s.num_classes = n


def fingerprint(splits: DataSplits) -> str:
    """A short hash of what the splits hold: sizes and shapes, the bytes of in-memory images and
    labels, and the first items of a streamed split (reading all of it would take an epoch)."""
    h = hashlib.sha256()
    for name in ("train", "val", "test"):
        s = getattr(splits, name)
        h.update(f"{name}:{len(s)}:{tuple(s.shape) if len(s) else ()}:{s.num_classes};".encode())
        if isinstance(s, StreamedImages):
            x, y = _Collate(s)(s._items(s.indices[:FINGERPRINT_ITEMS].tolist()))
        else:
            x, y = s.images, s.labels
        h.update(x.numpy().tobytes())
        if y is not None:
            h.update(y.numpy().astype(np.int64).tobytes())
    return h.hexdigest()[:16]


def as_image_set(data: Any, split: str = "test") -> ImageSet:
    """What :func:`vaelab.evaluate_model` evaluates: an :class:`ImageSet` as it is; loaded
    :class:`DataSplits` or :class:`TrainData` (a dict with its fields): their ``split``; anything else
    ``train`` takes (arrays, tensors, ``(images, labels)``, a Dataset): all of it, checked and made
    uint8 as training reads it (no split is held out)."""
    if isinstance(data, ImageSet):
        return data
    if isinstance(data, DataSplits):
        return getattr(data, split)
    if isinstance(data, (TrainData, Mapping)):
        d = as_train_data(data)
        part = getattr(d, split, None) if split in ("train", "val", "test") else None
        if part is None:
            raise DataError(f"data: no {split} split was given (TrainData.{split} is None); pass the images to "
                            f"evaluate, or evaluate a run on its {split} split as training held it out with "
                            "vaelab.evaluate_run(run, data=...)")
        d = dataclasses.replace(d, train=part, val=None, test=None)
    else:
        d = TrainData(train=data)
    cfg = DataConfig(name=f"{PYTHON_PREFIX}:{d.name or 'arrays'}")
    s = _part(d.train, split, d, cfg, streamable=False)
    if not isinstance(s, ImageSet):  # pragma: no cover - streamable=False reads into memory
        raise DataError(f"{split} data: could not be read into memory")
    if d.num_classes is not None and s.labels is not None:
        _agree_classes(raw := {split: s}, d.num_classes)
        s = raw[split]
    return s


def run_splits(data: Any, run_cfg: DataConfig, trained_fingerprint: str | None, where: str) -> DataSplits:
    """``data`` (any form ``train`` takes) split as the run trained on them was split (its recorded
    ``data`` config: seed, ``val_size``, limits), refused when their fingerprint is not the run's."""
    if not run_cfg.name.startswith(f"{PYTHON_PREFIX}:"):
        raise ConfigError(f"{where}: was trained on {run_cfg.name!r}, not on data given from Python; evaluate it "
                          "without data=, or evaluate the model on your images with vaelab.evaluate_model(model, images)")
    splits, _ = python_splits(data, run_cfg)  # named as the run's data (python:...) unless TrainData.name says
    got = splits.info.get("fingerprint")
    if trained_fingerprint and got != trained_fingerprint:
        raise DataError(f"{where}: the data given now ({splits.describe()}; fingerprint {got}) are not the data the "
                        f"run was trained on (fingerprint {trained_fingerprint}); pass the same arrays or Dataset "
                        "that vaelab.train was given")
    return splits
