"""Conditions: what a (conditional) model is given besides z. A condition turns a batch of images
and labels into (x, c, mask): the images the encoder sees, the condition vector fed to both
networks (None when unconditional), and which elements of x the likelihood scores (None: all).

The unconditional VAE is the condition ``none``; the conditional VAE registers more (labels,
partial observations) without touching the model, the objective or the training loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ModelConfig
from .registry import Registry


@dataclass
class Batch:
    x: torch.Tensor  # (B, C, H, W) in [0, 1]
    c: torch.Tensor | None = None  # (B, cond_dim)
    mask: torch.Tensor | None = None  # broadcastable to x; 1 where the likelihood scores x


class Condition:
    """Base class: unconditional."""

    def __init__(self, cfg: ModelConfig, num_classes: int | None = None) -> None:
        self.cfg = cfg
        self.num_classes = num_classes

    @property
    def dim(self) -> int:
        return 0

    def __call__(
        self, x: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator | None = None
    ) -> Batch:
        return Batch(x)


CONDITIONS: Registry[type[Condition]] = Registry("condition")
CONDITIONS.add("none", Condition)


def build_condition(cfg: ModelConfig, num_classes: int | None = None) -> Condition:
    return CONDITIONS.get(cfg.condition)(cfg, num_classes)
