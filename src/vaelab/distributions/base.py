"""Distributions as objects: ``log_prob`` (summed over the event), ``sample``, ``mean``, ``mode``.

Every distribution has a batch shape and an event of ``event_dims`` trailing dimensions (for an
image likelihood, (C, H, W)). ``log_prob`` returns one number per batch element: the sum over the
event's dimensions. An optional ``mask`` (broadcastable to the elementwise terms) restricts the sum,
e.g. to the unobserved pixels of a conditional model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class NoiseSource(Protocol):
    """Where a reparameterised draw may take its standard-normal noise from besides a
    ``torch.Generator``: any object that hands out N(0, I) tensors of the shapes asked for (e.g. noise
    drawn beforehand, or common random numbers shared between two models)."""

    def randn(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor: ...


Noise = torch.Generator | NoiseSource | None


def standard_normal(shape: tuple[int, ...], noise: Noise, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """N(0, I) of ``shape`` from a generator (None: the global one) or from a :class:`NoiseSource`."""
    if noise is None or isinstance(noise, torch.Generator):
        return torch.randn(shape, generator=noise, dtype=dtype, device=device)
    return noise.randn(shape, dtype, device)


class Distribution(ABC):
    event_dims: int

    @abstractmethod
    def log_prob_elements(self, x: torch.Tensor) -> torch.Tensor:
        """Elementwise log-density/mass terms, shape (*batch, *event) (or event without channels)."""

    def log_prob(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """log p(x), summed over the event dimensions: shape (*batch,)."""
        terms = self.log_prob_elements(x)
        if mask is not None:
            terms = terms * mask
        return terms.flatten(start_dim=terms.dim() - self.event_dims).sum(-1)

    @abstractmethod
    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A draw (not differentiable)."""

    @property
    @abstractmethod
    def mean(self) -> torch.Tensor: ...

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample_n(self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0) -> torch.Tensor:
        """n draws, (n, *batch, *event), with the spread scaled by ``temperature`` (what a prior must offer)."""
        raise TypeError(f"{type(self).__name__} cannot serve as a prior: it does not define sample_n "
                        "(n draws with the spread scaled by a temperature)")

    def numel(self) -> int:
        """How many numbers parameterise this distribution (memory a caller must budget for)."""
        return sum(v.numel() for v in vars(self).values() if isinstance(v, torch.Tensor))


def sum_event(t: torch.Tensor, event_dims: int) -> torch.Tensor:
    return t.flatten(start_dim=t.dim() - event_dims).sum(-1) if event_dims else t
