"""Hooks into training, for experiment trackers (TensorBoard, MLflow, W&B) and anything else that
wants to watch a run: subclass :class:`Callback`, override what you need, pass instances to
``vaelab.train(cfg, run, callbacks=[...])``.

* ``on_start(run)``: once, after the run is opened (fresh or resumed), before the first step;
  ``run`` (:class:`RunInfo`) holds the run directory, the config, the data description, the model.
* ``on_step(step)``: after every optimizer step (:class:`StepInfo`: the step's loss, gradient norm,
  reconstruction and KL sums, the KL weight and the learning rate). These are the numbers the step
  already brought to the host, so the hook adds no synchronisation; and it is called only for
  callbacks that override it, so nothing is built per step when none does.
* ``on_epoch(row)``: after each epoch's validation, with the row written to ``metrics.jsonl``.
* ``on_checkpoint(ckpt)``: after a checkpoint is written (:class:`CheckpointInfo`: paths, step, best).
* ``on_end()``: when training stops, normally or by an error (close files and connections here).

Under ``torchrun`` callbacks run on rank 0 only (where the run directory is written). A plain
function (the older ``callbacks=[fn]`` form) is still accepted and called with each epoch's row on
every rank, as before. Callbacks observe; they must not change the model or draw from torch's global
random number generators (the samples a logger draws use their own seeded generator), so a run with
callbacks trains exactly as one without, and resumes exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..config import DataSpec, RunConfig
from .step import StepResult


@dataclass(frozen=True)
class RunInfo:
    run_dir: Path
    config: RunConfig
    spec: DataSpec
    model: nn.Module  # the model being trained (not a DDP wrapper); observe it, do not change it
    step: int  # optimizer steps already taken (> 0 when the run was resumed)
    epoch: int  # epochs already completed
    rank: int = 0
    world: int = 1


@dataclass(frozen=True)
class StepInfo:
    step: int  # optimizer steps taken, this one included (skipped non-finite steps count)
    epoch: int  # the epoch in progress, from 0
    batch: int  # batches of this epoch taken, this one included
    beta: float  # the KL weight of this step
    lr: float  # the learning rate of this step (the optimizer's first parameter group)
    result: StepResult  # loss (per datapoint), grad_norm, rec and kl (sums over the batch), n, applied

    @property
    def scalars(self) -> dict[str, float]:
        """The step's numbers per datapoint, ready for a tracker (non-finite values left out)."""
        r = self.result
        out = {"loss": r.loss, "grad_norm": r.grad_norm, "rec": r.rec / max(r.n, 1), "kl": r.kl / max(r.n, 1),
               "beta": self.beta, "lr": self.lr}
        return {k: float(v) for k, v in out.items() if math.isfinite(v)}


@dataclass(frozen=True)
class CheckpointInfo:
    paths: tuple[Path, ...]  # the files written (best before latest at an epoch's end)
    step: int
    epoch: int  # epochs completed
    best: bool  # whether this is a new best checkpoint (the validation ELBO improved)


class Callback:
    """Base class of training hooks: every method does nothing unless overridden."""

    def on_start(self, run: RunInfo) -> None:
        pass

    def on_step(self, step: StepInfo) -> None:
        pass

    def on_epoch(self, row: dict[str, Any]) -> None:
        pass

    def on_checkpoint(self, ckpt: CheckpointInfo) -> None:
        pass

    def on_end(self) -> None:
        pass


EpochCallback = Callable[[dict[str, Any]], None]
CallbackLike = Callback | EpochCallback


class CallbackList:
    """The callbacks of one training call, dispatched by rank (see the module docstring)."""

    def __init__(self, callbacks: Sequence[CallbackLike] = ()) -> None:
        self.objects = [cb for cb in callbacks if isinstance(cb, Callback)]
        self.functions = [cb for cb in callbacks if not isinstance(cb, Callback)]
        self.rank = 0
        self.started = False
        self._active: list[Callback] = []
        self._steppers: list[Callback] = []

    @property
    def wants_steps(self) -> bool:
        """Whether some callback on this process overrides ``on_step`` (else no StepInfo is built)."""
        return bool(self._steppers)

    def start(self, run: RunInfo) -> None:
        self.rank, self.started = run.rank, True
        self._active = self.objects if run.rank == 0 else []
        self._steppers = [cb for cb in self._active if type(cb).on_step is not Callback.on_step]
        for cb in self._active:
            cb.on_start(run)

    def on_step(self, step: StepInfo) -> None:
        for cb in self._steppers:
            cb.on_step(step)

    def on_epoch(self, row: dict[str, Any]) -> None:
        for fn in self.functions:
            fn(row)
        for cb in self._active:
            cb.on_epoch(row)

    def on_checkpoint(self, ckpt: CheckpointInfo) -> None:
        for cb in self._active:
            cb.on_checkpoint(ckpt)

    def end(self) -> None:
        """``on_end`` of every started callback (each one, even if another raises)."""
        active, self._active, self._steppers = self._active, [], []
        error: BaseException | None = None
        for cb in active:
            try:
                cb.on_end()
            except BaseException as e:  # noqa: BLE001 - the others still close; the first error is raised
                error = error or e
        if error is not None:
            raise error


def as_callback_list(callbacks: Sequence[CallbackLike] | CallbackList) -> CallbackList:
    return callbacks if isinstance(callbacks, CallbackList) else CallbackList(callbacks)
