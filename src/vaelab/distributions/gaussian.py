"""Gaussian likelihood N(x | f(z), sigma^2 I) for continuous pixels (Doersch 2016, Sec. 2.4.3:
sigma weighs the reconstruction against the KL: log P(X|z) = C - ||X - f(z)||^2 / (2 sigma^2))."""

from __future__ import annotations

import math

import torch

from .base import Distribution

LOG_2PI = math.log(2.0 * math.pi)


class Gaussian(Distribution):
    """Independent N(loc, exp(log_sigma)^2) per element; ``log_sigma`` broadcasts against ``loc``."""

    def __init__(self, loc: torch.Tensor, log_sigma: torch.Tensor, event_dims: int = 3) -> None:
        self.loc, self.log_sigma, self.event_dims = loc, log_sigma, event_dims

    def log_prob_elements(self, x: torch.Tensor) -> torch.Tensor:
        return -0.5 * LOG_2PI - self.log_sigma - 0.5 * ((x - self.loc) * torch.exp(-self.log_sigma)) ** 2

    @property
    def mean(self) -> torch.Tensor:
        return self.loc

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        with torch.no_grad():
            eps = torch.randn(self.loc.shape, generator=generator, dtype=self.loc.dtype, device=self.loc.device)
            return self.loc + torch.exp(self.log_sigma) * eps
