"""KL(q || p) between a stochastic layer's posterior and prior: in closed form when a formula is
registered for the pair of types, otherwise the one-sample Monte Carlo estimate log q(z) - log p(z)
at the layer's reparameterised draw z (unbiased; its gradient is the reparameterised one).

Closed forms are registered per (q type, p type), as torch.distributions does; lookups follow each
class's MRO, so a subclass (StandardNormal) uses its parent's formula unless it has its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .base import Distribution

KLFn = Callable[[Distribution, Distribution], torch.Tensor]
_CLOSED: dict[tuple[type, type], KLFn] = {}


def register_kl(q_type: type, p_type: type) -> Callable[[KLFn], KLFn]:
    """Register ``fn(q, p) -> KL per event element`` (shape (*batch, *event)) for a pair of types."""

    def deco(fn: KLFn) -> KLFn:
        _CLOSED[(q_type, p_type)] = fn
        return fn

    return deco


def closed_form_kl(q: Distribution, p: Distribution) -> KLFn | None:
    for qt in type(q).__mro__:
        for pt in type(p).__mro__:
            fn = _CLOSED.get((qt, pt))
            if fn is not None:
                return fn
    return None


@dataclass
class KL:
    """KL(q || p) of one layer: ``total`` (*batch,) and, in closed form, ``per_dim`` (*batch, L)."""

    total: torch.Tensor
    per_dim: torch.Tensor | None  # None for the Monte Carlo estimate (it does not split by dimension)
    closed_form: bool


def kl_divergence(q: Distribution, p: Distribution, z: torch.Tensor) -> KL:
    """KL(q || p) per datapoint: the closed form if registered, else log q(z) - log p(z) at the draw z."""
    fn = closed_form_kl(q, p)
    if fn is not None:
        per_dim = fn(q, p)
        return KL(per_dim.sum(-1), per_dim, True)
    return KL(monte_carlo_kl(q, p, z), None, False)


def monte_carlo_kl(q: Distribution, p: Distribution, z: torch.Tensor) -> torch.Tensor:
    """The Monte Carlo estimate log q(z) - log p(z), whatever the pair (tests compare it with the closed form)."""
    return q.log_prob(z) - p.log_prob(z)
