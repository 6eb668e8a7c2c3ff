"""A trained run, opened once: its checkpoint, config, data description, model and condition, with
the data loaded lazily per split. Every command that reads a run (evaluate, sample, reconstruct,
interpolate, manifold, encode, complete) goes through :class:`Run`, which also opens a folder
written by ``vaelab export`` (:mod:`.pretrained`) in place of a run directory."""

from __future__ import annotations

import copy
import dataclasses
import os
from functools import cached_property
from pathlib import Path
from typing import Any

from torch import nn

from ..conditioning import Condition, build_condition
from ..config import DataConfig, DataSpec, RunConfig
from ..data import DataSplits, ImageSet, load_data
from ..devices import resolve_device
from ..errors import CheckpointError, ConfigError
from ..models import build_model, own_model
from ..pipeline import BatchPipeline
from .checkpoint import Checkpoint, load_checkpoint, load_model_state, use_weights
from .pretrained import WEIGHTS_FILE, is_export, load_pretrained
from .rundir import RunDir

SPLITS = ("train", "val", "test")


class Run:
    """A run directory, one checkpoint file, or an exported model folder, opened for use: the model is
    in eval mode, with the moving average of the weights where the run kept one (``train.ema``;
    :attr:`weights` says which: ``ema`` or ``trained``)."""

    def __init__(self, path: str | os.PathLike[str], which: str = "best", *, data_dir: str | None = None,
                 device: str = "cpu", model: nn.Module | None = None) -> None:
        p = Path(path)
        if is_export(p):  # a folder written by `vaelab export`: weights only, no checkpoint
            self._open_export(p, which, data_dir, device)
            return
        if p.is_dir():
            self.dir = RunDir.of(p)
            self.checkpoint = self.dir.checkpoint(which)
        elif p.exists():
            self.checkpoint = p
            self.dir = RunDir.of(p.parent.parent if p.parent.name == "checkpoints" else p.parent)
        else:
            raise CheckpointError(f"{p}: no such run directory or checkpoint file")
        ckpt = load_checkpoint(self.checkpoint, model)
        self.config: RunConfig = ckpt.config
        self.spec: DataSpec = ckpt.spec
        self.state: dict[str, Any] = ckpt.state
        self.device = resolve_device(device)
        self.model: nn.Module = _model_for(ckpt, model, self.checkpoint).to(self.device)
        # a run trained with train.ema is used with its moving average (so are its export and pictures)
        load_model_state(self.model, use_weights(ckpt), str(self.checkpoint))
        self.weights = "ema" if ckpt.ema is not None else "trained"
        self.model.eval()
        self.condition: Condition = build_condition(self.config.model.condition, self.spec)
        self.pipeline = BatchPipeline(self.condition, self.config.data.binarize)
        self.data_dir = data_dir

    def _open_export(self, p: Path, which: str, data_dir: str | None, device: str) -> None:
        """An exported folder (``vaelab export``) opened like a run: the same config, data description,
        model and condition; outputs (eval/, pictures) go into the folder; the data still come from
        the config's data source (``data_dir`` says where it is on this machine)."""
        if which not in ("best", "latest"):
            raise ConfigError(f"{p}: an exported model holds one set of weights; --checkpoint {which!r} does not apply")
        pre = load_pretrained(p)
        self.dir = RunDir.of(p)
        self.checkpoint = p / WEIGHTS_FILE
        self.config, self.spec = pre.config, pre.spec
        self.state = dict(pre.trained)
        self.weights = "exported"
        self.device = resolve_device(device)
        self.model = pre.build(self.device)
        self.condition = build_condition(self.config.model.condition, self.spec)
        self.pipeline = BatchPipeline(self.condition, self.config.data.binarize)
        self.data_dir = data_dir

    @classmethod
    def of(cls, run: Run | str | os.PathLike[str], which: str = "best", *, data_dir: str | None = None,
           device: str = "auto") -> Run:
        """``run`` itself if already opened (with ``data_dir`` applied; its model stays where it is),
        else the run at that path, its model on ``device`` (``auto``: a GPU when one is visible)."""
        if isinstance(run, Run):
            if data_dir is None or data_dir == run.data_dir:
                return run
            other = copy.copy(run)  # the same model and condition, data from elsewhere
            other.data_dir = data_dir
            other.__dict__.pop("splits", None)
            return other
        return cls(run, which, data_dir=data_dir, device=device)

    @property
    def root(self) -> Path:
        return self.dir.root

    @property
    def data_config(self) -> DataConfig:
        d = self.config.data
        return d if self.data_dir is None else dataclasses.replace(d, data_dir=self.data_dir)

    @cached_property
    def splits(self) -> DataSplits:
        return load_data(self.data_config)

    def data(self, split: str = "test", limit: int | None = None, start: int = 0) -> ImageSet:
        """Images (uint8) of a split, loaded on first use; ``limit`` images from ``start``."""
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
        s: ImageSet = getattr(self.splits, split)
        if start or limit is not None:
            end = len(s) if limit is None else start + limit
            if start < 0 or end > len(s):
                raise ConfigError(f"images {start}..{end - 1} requested, the {split} split has {len(s)}")
            s = s.subset(slice(start, end))
        return s

    def __repr__(self) -> str:
        return f"Run({str(self.root)!r}, checkpoint={self.checkpoint.name!r}, model={self.config.model.model!r})"


def load_run(path: str | os.PathLike[str], which: str = "best", *, data_dir: str | None = None,
             device: str = "cpu", model: nn.Module | None = None) -> Run:
    """Open a run directory (``which`` = best | latest) or a checkpoint file; the model in eval mode on
    ``device`` (default the CPU, where your own tensors are; ``auto`` takes a GPU when one is visible).
    ``model``: for a run trained from a module of your own (``train(..., model=...)``), a fresh module of
    the same kind, into which the weights are loaded; the returned :class:`Run` goes to every
    ``*_run`` function (``sample_run(run, ...)``, ``evaluate_run(run, ...)``)."""
    return Run(path, which, data_dir=data_dir, device=device, model=model)


def _model_for(ckpt: Checkpoint, model: nn.Module | None, path: Path) -> nn.Module:
    """The module a checkpoint's weights go into: the user's own (checked against the checkpoint's
    model settings and data), or the registered model its config names."""
    if model is not None:
        own_model(model, ckpt.spec, f"{path}: model=")
        if model.config != ckpt.config.model:
            raise ConfigError(f"{path}: model=: {type(model).__name__}.config differs from the model settings the run "
                              "was trained with (its config.json [model])")
        return model
    return build_model(ckpt.config.model, ckpt.spec)
