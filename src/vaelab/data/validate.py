"""Checks on data before it reaches a model: every problem is a :class:`DataError` that names the
data set or file and, for bad values, the index of the first offending element.

Every likelihood in vaelab is given float intensities in [0, 1] (k/255 for 8-bit pixels; the
Bernoulli likelihood needs exactly that range). Loaders hold uint8 images (``ImageSet``); the one
that accepts float arrays (``npz:``/``npy:``, :func:`vaelab.data.arrays.to_uint8`) refuses NaN/Inf
and values outside [0, 1] (a mean/std-normalised array, say) instead of clipping them. The training
loop checks the splits (:func:`check_splits`) and the float tensor it trains on
(:func:`check_model_input`) once more before the first step.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import DataError
from .base import DataSplits


def _first(mask: np.ndarray) -> tuple[int, ...]:
    """Index of the first True element of ``mask`` (C order)."""
    flat = int(np.argmax(mask.reshape(-1)))
    return tuple(int(i) for i in np.unravel_index(flat, mask.shape))


def check_finite(values: np.ndarray | torch.Tensor, source: str) -> None:
    """Refuse NaN and infinities, naming the first bad element's index and value."""
    arr = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    if arr.dtype.kind not in "fc":
        return
    bad = ~np.isfinite(arr)
    if bad.any():
        idx = _first(bad)
        raise DataError(
            f"{source}: {int(bad.sum())} non-finite value(s); the first is {arr[idx].item()!r} at index {list(idx)}"
        )


def check_range(values: np.ndarray | torch.Tensor, source: str, low: float = 0.0, high: float = 1.0,
                what: str = "") -> None:
    """Refuse values outside [low, high] (after :func:`check_finite`), naming the first one."""
    arr = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    if arr.size == 0:
        return
    bad = (arr < low) | (arr > high)
    if bad.any():
        idx = _first(bad)
        raise DataError(
            f"{source}: values must lie in [{low:g}, {high:g}]{what}; found {int(bad.sum())} outside "
            f"(range {arr.min().item()!r}..{arr.max().item()!r}); the first is {arr[idx].item()!r} at index {list(idx)}"
        )


def check_model_input(x: torch.Tensor, likelihood: str, source: str) -> None:
    """The float tensor a model is trained on must lie in the support its likelihood is given:
    finite intensities in [0, 1]."""
    check_finite(x, source)
    check_range(x, source, 0.0, 1.0, f" for the {likelihood!r} likelihood")


def check_splits(data: DataSplits) -> None:
    """The splits of one data set agree: same image shape, labels within the class count."""
    shape = data.train.shape
    for name in ("train", "val", "test"):
        s = getattr(data, name)
        if len(s) and s.shape != shape:
            raise DataError(
                f"{s.source or data.name}: {name} images have shape {s.shape}, the training images {shape}"
            )
        if s.labels is not None and len(s) and data.num_classes is not None:
            lab = s.labels
            if int(lab.min()) < 0 or int(lab.max()) >= data.num_classes:
                bad = ((lab < 0) | (lab >= data.num_classes)).nonzero()[0].item()
                raise DataError(
                    f"{s.source or data.name}: {name} label {int(lab[bad])} at index {bad} is outside "
                    f"0..{data.num_classes - 1}"
                )
