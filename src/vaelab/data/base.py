"""In-memory image data: every data set becomes uint8 images (N, C, H, W) plus optional labels.

Whole data sets are held as tensors (no per-sample Dataset objects): batching is indexing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import DataError


@dataclass(frozen=True)
class ImageSet:
    """A set of images. ``images`` is uint8 (N, C, H, W); ``labels`` int64 (N,) or None."""

    images: torch.Tensor
    labels: torch.Tensor | None = None
    source: str = ""  # where it came from, for messages
    num_classes: int | None = None

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(
                f"{self.source or 'images'}: expected uint8 images of shape (N, C, H, W), got "
                f"{self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels is not None and self.labels.shape != (self.images.shape[0],):
            raise DataError(
                f"{self.source or 'labels'}: {self.labels.shape[0] if self.labels.dim() else 0} labels "
                f"for {self.images.shape[0]} images"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    def subset(self, index: torch.Tensor | slice) -> ImageSet:
        return ImageSet(
            self.images[index],
            None if self.labels is None else self.labels[index],
            self.source,
            self.num_classes,
        )

    @staticmethod
    def from_numpy(
        images: np.ndarray, labels: np.ndarray | None = None, source: str = "", num_classes: int | None = None
    ) -> ImageSet:
        """Images as (N, H, W) grey or (N, C, H, W) uint8."""
        if images.ndim == 3:
            images = images[:, None]
        lab = None if labels is None else torch.from_numpy(np.asarray(labels, dtype=np.int64).copy())
        return ImageSet(torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)), lab, source, num_classes)


@dataclass(frozen=True)
class DataSplits:
    """Train / validation / test image sets after the seeded validation hold-out."""

    train: ImageSet
    val: ImageSet
    test: ImageSet
    name: str
    info: dict[str, str] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.train.shape

    @property
    def num_classes(self) -> int | None:
        return self.train.num_classes

    def describe(self) -> str:
        """What was loaded, in one line: the splits' sizes, the image shape, the labels, where from."""
        c, h, w = self.shape
        kind = {1: "grey", 3: "colour"}.get(c, f"{c} channels")
        labels = (f"{self.num_classes} classes" if self.num_classes else
                  "labelled" if self.train.labels is not None else "no labels")
        src = f" ({self.info['source']})" if self.info.get("source") else ""
        return (f"{self.name}: {len(self.train)} train / {len(self.val)} validation / {len(self.test)} test images, "
                f"{c}x{h}x{w} {kind}, {labels}{src}")


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 intensities k/255 in [0, 1]."""
    return images.to(torch.float32).div_(255.0)


def binarize(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Stochastic binarization: each pixel on with probability equal to its intensity."""
    return torch.bernoulli(x, generator=generator)


def split_validation(train: ImageSet, val_size: int, seed: int) -> tuple[ImageSet, ImageSet]:
    """Hold ``val_size`` examples out of ``train``, chosen by a seeded permutation."""
    n = len(train)
    if val_size >= n:
        raise DataError(f"{train.source}: val_size {val_size} leaves no training data ({n} examples); "
                        f"hold out fewer with --val-size (data.val_size), e.g. --val-size {max(0, n // 10)}")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    val_idx, train_idx = perm[:val_size].sort().values, perm[val_size:].sort().values
    return train.subset(train_idx), train.subset(val_idx)
