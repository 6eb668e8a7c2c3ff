"""Shared by the benchmarks: train with vaelab while a reference loop runs one epoch after each of
vaelab's epochs, so both are timed on the same machine state."""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Callable, Sequence

import vaelab


def train_interleaved(
    cfg: vaelab.RunConfig, data: vaelab.DataSplits, reference_epoch: Callable[[], float], run: str | None = None,
    between: Callable[[], None] | None = None,
) -> tuple[vaelab.TrainResult, list[float], list[float]]:
    """Returns vaelab's result, its per-epoch training seconds and the reference's. ``between`` runs
    after each pair of epochs (other measurements that should see the same machine state)."""
    ours: list[float] = []
    ref: list[float] = []
    last = {"t": 0.0}

    def after_epoch(row: dict) -> None:
        ours.append(row["elapsed_s"] - last["t"])  # vaelab's own training time, validation excluded
        last["t"] = row["elapsed_s"]
        ref.append(reference_epoch())
        if between is not None:
            between()

    with tempfile.TemporaryDirectory() as tmp:
        res = vaelab.train(cfg, run or f"{tmp}/run", data=data, callbacks=[after_epoch])
    return res, ours, ref


def steady_median(epochs: Sequence[float]) -> float:
    """The median of the epochs after the first, which holds the warm-up (kernel decisions, a compiled
    variant's compile time); of all of them when there are only two."""
    return statistics.median(epochs[1:] if len(epochs) > 2 else epochs)
