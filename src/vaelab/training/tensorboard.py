"""TensorBoard logging of a run (``train.log = "tensorboard"``, ``vaelab train --log tensorboard``),
as one :class:`~vaelab.training.callbacks.Callback`, into ``RUN/tb/`` through
``torch.utils.tensorboard`` (the ``tensorboard`` package: ``pip install 'vaelab[tensorboard]'``):

* the config, as text (``config``), at the start;
* every epoch: each number of the metrics row as ``epoch/<name>`` (train_loss, val_elbo, val_kl, ...),
  and a grid of samples from the prior (``samples``), at the epoch's last step;
* every ``train.log_every`` steps: ``step/loss``, ``step/grad_norm``, ``step/rec``, ``step/kl``
  (per datapoint), ``step/beta``, ``step/lr``, and the sample grid.

Samples are drawn with a fixed seed of their own (the same z every time, so the grids show the model
change), never from the generators training uses. A resumed run purges events past its checkpoint.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from ..conditioning import LabelCondition, build_condition
from ..errors import ConfigError
from .callbacks import Callback, RunInfo, StepInfo

GRID = 64  # samples in a grid (8 per class for a label-conditioned model)


def require_tensorboard() -> Any:
    """``torch.utils.tensorboard.SummaryWriter``, or a one-line error saying how to install it."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("train.log = 'tensorboard' needs the tensorboard package: "
                          "pip install 'vaelab[tensorboard]' (or pip install tensorboard)") from None
    return SummaryWriter


class TensorBoardLogger(Callback):
    """Scalars, sample grids and the config of a run in TensorBoard event files.

    ``log_dir``: default ``RUN/tb``; ``every``: per-step scalars and grids every so many steps
    (0: per epoch only); ``samples``: images per grid (0: none); ``seed``: of the grids' draws."""

    def __init__(self, log_dir: str | Path | None = None, every: int = 100, samples: int = GRID, seed: int = 0) -> None:
        self.writer_cls = require_tensorboard()
        self.log_dir, self.every, self.samples, self.seed = log_dir, every, samples, seed
        self.writer: Any = None

    def on_start(self, run: RunInfo) -> None:
        self.model = run.model
        self.writer = self.writer_cls(str(self.log_dir or run.run_dir / "tb"),
                                      purge_step=run.step + 1 if run.step else None)
        text = json.dumps(run.config.to_dict(), indent=2, sort_keys=True)
        self.writer.add_text("config", "    " + text.replace("\n", "\n    "), run.step)  # markdown code block
        self.condition = build_condition(run.config.model.condition, run.spec)

    def on_step(self, step: StepInfo) -> None:
        if self.every and step.step % self.every == 0:
            for k, v in step.scalars.items():
                self.writer.add_scalar(f"step/{k}", v, step.step)
            self._samples(step.step)

    def on_epoch(self, row: dict[str, Any]) -> None:
        step = int(row["step"])
        for k, v in row.items():
            if k not in ("epoch", "step") and isinstance(v, (int, float)) and math.isfinite(v):
                self.writer.add_scalar(f"epoch/{k}", v, step)
        if not (self.every and step % self.every == 0):  # not drawn already at this step
            self._samples(step)
        self.writer.flush()

    def on_end(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    @torch.no_grad()
    def _samples(self, step: int) -> None:
        """A grid of draws from the prior (rows of classes for a label-conditioned model). Models
        conditional on a partial observation, or without latent variables, have no grid."""
        m = self.model
        if not self.samples or not m.latent_dims:
            return
        c = None
        n = self.samples
        device = next(m.parameters()).device
        if isinstance(self.condition, LabelCondition):
            per = max(1, self.samples // self.condition.dim)
            c = self.condition.encode_labels(torch.arange(self.condition.dim).repeat_interleave(per)).to(device)
            n = c.shape[0]
        elif m.spec.cond_dim:
            return
        was_training = m.training
        m.eval()
        try:
            g = torch.Generator(device=device).manual_seed(self.seed)
            imgs = m.sample(n, c, generator=g).float().clamp(0, 1).cpu()  # (n, C, H, W)
        finally:
            m.train(was_training)
        if imgs.shape[1] not in (1, 3):
            imgs = imgs[:, :1]
        self.writer.add_images("samples", imgs, step, dataformats="NCHW")
