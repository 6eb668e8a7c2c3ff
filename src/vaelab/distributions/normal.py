"""Diagonal Gaussians: posteriors Q(z|X) = N(mu(X), diag sigma^2(X)), Gaussian priors (fixed,
learned or conditional on the layer above) and the standard normal N(0, I)."""

from __future__ import annotations

import math

import torch

from .base import Distribution, Noise, standard_normal, sum_event
from .kl import register_kl

LOG_2PI = math.log(2.0 * math.pi)


class DiagonalGaussian(Distribution):
    """N(mu, diag exp(logvar)) with a 1-D event (the latent vector). ``mu`` and ``logvar`` broadcast
    against each other and against the points scored (a learned prior has batch shape ())."""

    def __init__(self, mu: torch.Tensor, logvar: torch.Tensor, event_dims: int = 1) -> None:
        self.mu, self.logvar, self.event_dims = mu, logvar, event_dims

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    @property
    def mean(self) -> torch.Tensor:
        return self.mu

    def rsample(self, generator: Noise = None, sample_shape: tuple[int, ...] = ()) -> torch.Tensor:
        """Reparameterised draw z = mu + sigma * eps, eps ~ N(0, I) (Kingma & Welling 2014, Sec. 2.4);
        eps from ``generator`` (a ``torch.Generator`` or a :class:`~.base.NoiseSource`)."""
        shape = sample_shape + torch.broadcast_shapes(self.mu.shape, self.logvar.shape)
        eps = standard_normal(shape, generator, self.mu.dtype, self.mu.device)
        return self.mu + self.std * eps

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        with torch.no_grad():
            return self.rsample(generator)

    def sample_n(self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0) -> torch.Tensor:
        """n draws with the standard deviation scaled by ``temperature``: (n, *batch, L), no gradient."""
        with torch.no_grad():
            shape = (n, *torch.broadcast_shapes(self.mu.shape, self.logvar.shape))
            eps = torch.randn(shape, generator=generator, dtype=self.mu.dtype, device=self.mu.device)
            return self.mu + temperature * self.std * eps

    def log_prob_elements(self, x: torch.Tensor) -> torch.Tensor:
        return -0.5 * (LOG_2PI + self.logvar + (x - self.mu) ** 2 * torch.exp(-self.logvar))

    def kl_standard_normal_elements(self) -> torch.Tensor:
        """KL(N(mu, sigma^2) || N(0, 1)) per dimension: 1/2 (sigma^2 + mu^2 - 1 - log sigma^2)."""
        return 0.5 * (torch.exp(self.logvar) + self.mu**2 - 1.0 - self.logvar)

    def kl_standard_normal(self) -> torch.Tensor:
        """Doersch (2016) eq. 7: 1/2 (tr Sigma + mu^T mu - k - log det Sigma), per batch element."""
        return sum_event(self.kl_standard_normal_elements(), self.event_dims)

    def kl_elements(self, other: DiagonalGaussian) -> torch.Tensor:
        """KL(self || other) per dimension, broadcast over both batch shapes."""
        var_ratio = torch.exp(self.logvar - other.logvar)
        t = (self.mu - other.mu) ** 2 * torch.exp(-other.logvar)
        return 0.5 * (var_ratio + t - 1.0 - (self.logvar - other.logvar))

    def kl(self, other: DiagonalGaussian) -> torch.Tensor:
        """KL(self || other) between diagonal Gaussians, summed over the event."""
        return sum_event(self.kl_elements(other), self.event_dims)


class StandardNormal(DiagonalGaussian):
    """The prior P(z) = N(0, I) over a ``dim``-dimensional latent."""

    def __init__(self, dim: int, batch_shape: tuple[int, ...] = (), device: torch.device | None = None) -> None:
        zeros = torch.zeros((*batch_shape, dim), device=device)
        super().__init__(zeros, zeros, event_dims=1)
        self.dim = dim

    def log_prob(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        # Closed form without materialising mu/logvar of the right batch shape.
        terms = -0.5 * (LOG_2PI + x**2)
        if mask is not None:
            terms = terms * mask
        return terms.sum(-1)

    def sample_n(self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0) -> torch.Tensor:
        return temperature * torch.randn((n, self.dim), generator=generator, device=self.mu.device)


@register_kl(DiagonalGaussian, DiagonalGaussian)
def _kl_gaussians(q: DiagonalGaussian, p: DiagonalGaussian) -> torch.Tensor:
    if type(p) is StandardNormal:  # the common case, in fewer kernels (Doersch eq. 7)
        return q.kl_standard_normal_elements()
    return q.kl_elements(p)
