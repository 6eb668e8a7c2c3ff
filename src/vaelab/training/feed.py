"""Where a training epoch's batches come from, in the order the loop asks for them (a seeded
permutation of the training split, sharded by rank):

* :class:`MemoryFeed`: the whole training split in memory as float32 (on the device when it fits,
  else in pinned host memory, each batch copied over as it is used): batching is indexing.
* :class:`StreamFeed`: a Dataset too large for memory (:class:`vaelab.data.python.StreamedImages`),
  each batch read through a DataLoader; the same permutation, so the same batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from ..data import ImageSet, to_float
from ..data.validate import check_model_input
from ..devices import fits_on

Batches = Iterator[tuple[torch.Tensor, torch.Tensor | None]]


def _place(x: torch.Tensor, y: torch.Tensor | None, device: torch.device):
    """The training set on ``device`` when it fits (batching stays indexing there); otherwise in
    pinned host memory, each batch copied over as it is used. Returns (x, y, batches_move)."""
    if device.type == "cpu":
        return x, y, False
    if fits_on(device, x.numel() * x.element_size()):
        return x.to(device), None if y is None else y.to(device), False
    return x.pin_memory(), None if y is None else y.pin_memory(), True


def _slices(order: torch.Tensor, start: int, batch_size: int) -> list[torch.Tensor]:
    steps = math.ceil(len(order) / batch_size)
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(start, steps)]


class MemoryFeed:
    def __init__(self, train: ImageSet, device: torch.device, likelihood: str, source: str) -> None:
        x = to_float(train.images)  # the whole training set in memory: batching is indexing
        check_model_input(x, likelihood, source)
        self.x, self.y, self.moves = _place(x, train.labels, device)
        self.device = device

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def epoch(self, order: torch.Tensor, start: int, batch_size: int) -> Batches:
        """Float batches (B, C, H, W) on the device and their labels, from batch ``start`` of ``order``."""
        for idx in _slices(order, start, batch_size):
            idx = idx.to(self.x.device)
            x, y = self.x.index_select(0, idx), None if self.y is None else self.y.index_select(0, idx)
            if self.moves:  # pinned host memory -> the device, overlapping the copy with compute
                x = x.to(self.device, non_blocking=True)
                y = None if y is None else y.to(self.device, non_blocking=True)
            yield x, y


class StreamFeed:
    def __init__(self, train, device: torch.device, likelihood: str, source: str) -> None:
        self.train, self.device, self.likelihood, self.source = train, device, likelihood, source

    def __len__(self) -> int:
        return len(self.train)

    def epoch(self, order: torch.Tensor, start: int, batch_size: int) -> Batches:
        pin = self.device.type == "cuda"
        for x, y in self.train.batches(_slices(order, start, batch_size), pin):
            x = to_float(x.to(self.device, non_blocking=pin))  # the same k/255 as in memory
            check_model_input(x, self.likelihood, self.source)
            yield x, None if y is None else y.to(self.device, non_blocking=pin)


def make_feed(train, device: torch.device, likelihood: str, source: str) -> MemoryFeed | StreamFeed:
    return MemoryFeed(train, device, likelihood, source) if isinstance(train, ImageSet) else StreamFeed(
        train, device, likelihood, source)
