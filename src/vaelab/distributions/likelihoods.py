"""Decoder likelihood heads P(X|z): each turns the decoder's raw output (B, K, H, W) into a
:class:`Distribution` over images (B, C, H, W). Registered by name; ``num_params`` says how many
output channels K the decoder must produce for C image channels."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ModelConfig
from ..registry import Registry
from .base import Distribution
from .bernoulli import Bernoulli
from .gaussian import Gaussian


class LikelihoodHead(nn.Module):
    #: True when log_prob is a probability mass of 8-bit pixels, so NLL and bits/dim are exact.
    discrete: bool = False
    #: A short statement of what -log_prob means for this likelihood, printed by `evaluate`.
    meaning: str = ""

    def __init__(self, cfg: ModelConfig, channels: int) -> None:
        super().__init__()
        self.cfg, self.channels = cfg, channels

    @staticmethod
    def num_params(channels: int, cfg: ModelConfig) -> int:
        return channels

    def forward(self, h: torch.Tensor) -> Distribution:  # pragma: no cover - abstract
        raise TypeError("LikelihoodHead is abstract")


LIKELIHOODS: Registry[type[LikelihoodHead]] = Registry("likelihood")


@LIKELIHOODS.register("bernoulli")
class BernoulliHead(LikelihoodHead):
    meaning = (
        "Bernoulli log-likelihood: a true NLL (nats) for binarized pixels; on [0,1] grey levels it is a "
        "cross-entropy score, not a density of the 8-bit data"
    )

    def forward(self, h: torch.Tensor) -> Distribution:
        return Bernoulli(h, event_dims=3)


@LIKELIHOODS.register("gaussian")
class GaussianHead(LikelihoodHead):
    """N(x | f(z), sigma^2 I) with sigma a fixed hyper-parameter (Doersch 2016, Sec. 2.4.3)."""

    meaning = "Gaussian density of continuous pixel values (nats); not a probability of 8-bit data"

    def __init__(self, cfg: ModelConfig, channels: int) -> None:
        super().__init__(cfg, channels)
        self.register_buffer("log_sigma", torch.tensor(math.log(cfg.sigma)), persistent=False)

    def forward(self, h: torch.Tensor) -> Distribution:
        return Gaussian(h, self.log_sigma, event_dims=3)


@LIKELIHOODS.register("gaussian-learned")
class LearnedGaussianHead(LikelihoodHead):
    """N(x | f(z), sigma^2 I) with one learned sigma per channel (the "sigma-VAE" of Rybkin et al. 2021),
    initialised at ``cfg.sigma`` and kept above 1e-3 for stability."""

    meaning = "Gaussian density (learned sigma) of continuous pixel values (nats); not a probability of 8-bit data"

    def __init__(self, cfg: ModelConfig, channels: int) -> None:
        super().__init__(cfg, channels)
        self.log_sigma = nn.Parameter(torch.full((channels, 1, 1), math.log(cfg.sigma)))

    def forward(self, h: torch.Tensor) -> Distribution:
        return Gaussian(h, self.log_sigma.clamp(min=math.log(1e-3)), event_dims=3)


def build_likelihood(cfg: ModelConfig, channels: int) -> LikelihoodHead:
    """The head named by ``cfg.likelihood`` for images of ``channels`` channels."""
    return LIKELIHOODS.get(cfg.likelihood)(cfg, channels)
