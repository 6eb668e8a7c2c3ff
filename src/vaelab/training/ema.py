"""An exponential moving average of a model's weights (``train.ema``; vdvae's ``ema_rate``, Child 2021):
after every applied optimizer step, for each trained parameter theta,

    theta_ema <- decay * theta_ema + (1 - decay) * theta,

starting from the initial weights; parameters that are not trained and buffers are copied as they are.
The average is what a trained run is evaluated and sampled with (:class:`~vaelab.runs.run.Run` loads
it in place of the raw weights), validated with during training, and saved in every checkpoint
(``ema/`` tensors, safetensors like the rest), so a resumed run continues it bit for bit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from ..runs.validate import compare_tensors


class EMA:
    """The moving average of ``model``'s state (its names, shapes, dtypes and device), from its
    current weights."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"an EMA decay is in (0, 1), got {decay!r}")
        self.decay = decay
        self.tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module, skip: torch.Tensor | None = None) -> None:
        """One step of the average towards ``model``'s weights, after an applied update; or, with
        ``skip`` (a 0-d tensor, 1 where the step's update was skipped: decided on the device, see
        :class:`~vaelab.training.step.StepGuard`), one that is a no-op where ``skip`` is 1, with nothing
        read by the host. Both compute the same bits."""
        for name, v in model.state_dict(keep_vars=True).items():
            avg = self.tensors[name]
            if isinstance(v, nn.Parameter) and v.requires_grad and avg.is_floating_point():
                new = avg.mul(self.decay).add_(v.detach(), alpha=1.0 - self.decay)
            else:
                new = v.detach()
            avg.copy_(new if skip is None else torch.where(skip > 0, avg, new))

    def state(self) -> dict[str, torch.Tensor]:
        """The averaged tensors, on the CPU (for a checkpoint)."""
        return {k: v.detach().cpu() for k, v in self.tensors.items()}

    def load(self, tensors: Mapping[str, torch.Tensor], source: str) -> None:
        """Continue from a checkpoint's ``ema/`` tensors (checked: the names, shapes and dtypes of the
        model's state)."""
        compare_tensors({k: (tuple(v.shape), v.dtype) for k, v in self.tensors.items()}, tensors, source)
        with torch.no_grad():
            for k, v in self.tensors.items():
                v.copy_(tensors[k])

    @contextlib.contextmanager
    def applied_to(self, model: nn.Module) -> Iterator[nn.Module]:
        """``model`` holding the averaged weights inside the block (validation); its own weights are
        put back, bit for bit, on leaving it."""
        current = model.state_dict()
        saved = {k: v.detach().clone() for k, v in current.items()}
        with torch.no_grad():
            for k, v in current.items():
                v.copy_(self.tensors[k])
        try:
            yield model
        finally:
            with torch.no_grad():
                for k, v in current.items():
                    v.copy_(saved[k])
