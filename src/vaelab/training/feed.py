"""Where a training epoch's batches come from, in the order the loop asks for them (a seeded
permutation of the training split, sharded by rank):

* :class:`MemoryFeed`: the whole training split in memory as float32 (on the device when it fits,
  else in pinned host memory, each batch copied over as it is used): batching is indexing. A split
  whose float copy would pass :data:`FLOAT_BUDGET` (2 GiB: SVHN with its extra images, say) stays
  uint8 and each batch is converted as it is used.
* :class:`StreamFeed`: a prepared data set read from disk (:class:`vaelab.data.cache.MappedImages`,
  each batch gathered from its memory map between steps) or a Dataset too large for memory
  (:class:`vaelab.data.python.StreamedImages`, each batch read through a DataLoader); the same
  permutation, so the same batches, converted to float one batch at a time. On a GPU the batches
  come in pinned host memory, read one batch ahead, and are copied on a side stream one batch ahead.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from ..data import ImageSet, to_float
from ..data.cache import MappedImages
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


#: bytes the float32 copy of an in-memory training split may take; a larger split stays uint8 (a
#: quarter of the memory) and each batch is converted as it is used (the same k/255, the same bits)
FLOAT_BUDGET = 2 << 30


class MemoryFeed:
    def __init__(self, train: ImageSet, device: torch.device, likelihood: str, source: str) -> None:
        x = train.images
        self.convert = x.dtype == torch.uint8 and x.numel() * 4 > FLOAT_BUDGET
        if not self.convert:
            x = to_float(x)  # the whole training set as float: batching is indexing
            check_model_input(x, likelihood, source)
        # (uint8 k/255 lies in [0, 1] by construction: nothing to check)
        self.x, self.y, self.moves = _place(x, train.labels, device)
        self.device = device

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def epoch(self, order: torch.Tensor, start: int, batch_size: int) -> Batches:
        """Float batches (B, C, H, W) on the device and their labels, from batch ``start`` of ``order``.
        The epoch's order goes where the images are in one copy (a copy per batch would make every step
        wait for the GPU)."""
        for idx in _slices(order.to(self.x.device), start, batch_size):
            x, y = self.x.index_select(0, idx), None if self.y is None else self.y.index_select(0, idx)
            if self.moves:  # pinned host memory -> the device, overlapping the copy with compute
                x = x.to(self.device, non_blocking=True)
                y = None if y is None else y.to(self.device, non_blocking=True)
            yield (to_float(x) if self.convert else x), y


class StreamFeed:
    def __init__(self, train, device: torch.device, likelihood: str, source: str) -> None:
        self.train, self.device, self.likelihood, self.source = train, device, likelihood, source

    def __len__(self) -> int:
        return len(self.train)

    def _float(self, x: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = to_float(x)  # the same k/255 as in memory, one batch at a time
        if not isinstance(self.train, MappedImages):  # uint8 from a prepared file: in [0, 1] by construction
            check_model_input(x, self.likelihood, self.source)  # (and on a GPU the check would wait for it)
        return x, y

    def epoch(self, order: torch.Tensor, start: int, batch_size: int) -> Batches:
        pin = self.device.type == "cuda"
        if not pin and isinstance(self.train, MappedImages):
            # Read and converted to k/255 between steps, in this thread: ~1 ms a batch of 128 32x32
            # images. (A read-ahead thread, tried first, competes with the compute threads for the cores;
            # on this 2-core machine under load, epochs from the cache then ran up to 2-3x slower.)
            # Values k/255 of uint8 pixels lie in [0, 1] by construction: nothing to check.
            yield from self.train.batches(_slices(order, start, batch_size), False, as_float=True, ahead=False)
            return
        batches = self.train.batches(_slices(order, start, batch_size), pin)
        if not pin:
            for x, y in batches:
                yield self._float(x.to(self.device), None if y is None else y.to(self.device))
            return
        # A side stream copies batch i + 1 (pinned -> device) while the step computes on batch i.
        copy, compute = torch.cuda.Stream(self.device), torch.cuda.current_stream(self.device)

        def upload(x: torch.Tensor, y: torch.Tensor | None):
            with torch.cuda.stream(copy):
                return x.to(self.device, non_blocking=True), None if y is None else y.to(self.device, non_blocking=True)

        it = iter(batches)
        first = next(it, None)
        ahead = None if first is None else upload(*first)
        while ahead is not None:
            compute.wait_stream(copy)
            x, y = ahead
            x.record_stream(compute)  # its memory is not reused before the step has read it
            if y is not None:
                y.record_stream(compute)
            nxt = next(it, None)
            ahead = None if nxt is None else upload(*nxt)
            yield self._float(x, y)


def make_feed(train, device: torch.device, likelihood: str, source: str) -> MemoryFeed | StreamFeed:
    """Batches read from disk (a prepared data set) or through a DataLoader (a Dataset too large for
    memory) stream; anything else is in memory."""
    streamed = hasattr(train, "batches")
    return StreamFeed(train, device, likelihood, source) if streamed else MemoryFeed(train, device, likelihood, source)
