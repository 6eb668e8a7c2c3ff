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
        _FOUND.clear()
        return fn

    return deco


_FOUND: dict[tuple[type, type], KLFn | None] = {}  # lookups, cached per pair of types


def closed_form_kl(q: Distribution, p: Distribution) -> KLFn | None:
    """The registered closed form for (type(q), type(p)), following both MROs; None if there is none."""
    key = (type(q), type(p))
    if key not in _FOUND:
        _FOUND[key] = next((_CLOSED[(qt, pt)] for qt in key[0].__mro__ for pt in key[1].__mro__
                            if (qt, pt) in _CLOSED), None)
    return _FOUND[key]


@dataclass
class KL:
    """KL(q || p) of one layer: ``total`` (*batch,) and, in closed form, ``per_dim`` (*batch, L)."""

    total: torch.Tensor
    per_dim: torch.Tensor | None  # None for the Monte Carlo estimate (it does not split by dimension)
    closed_form: bool


def kl_divergence(q: Distribution, p: Distribution, z: torch.Tensor, *, closed_form: bool = True) -> KL:
    """KL(q || p) per datapoint: the closed form if registered (and ``closed_form`` allows it), else
    log q(z) - log p(z) at the draw z. ``closed_form=False`` is for a prior whose parameters depend on z
    itself (see :class:`vaelab.models.base.StochasticLayer`), where a closed form is not this layer's term."""
    fn = closed_form_kl(q, p) if closed_form else None
    if fn is not None:
        per_dim = fn(q, p)
        return KL(per_dim.sum(-1), per_dim, True)
    return KL(monte_carlo_kl(q, p, z), None, False)


def monte_carlo_kl(q: Distribution, p: Distribution, z: torch.Tensor) -> torch.Tensor:
    """The Monte Carlo estimate log q(z) - log p(z), whatever the pair (tests compare it with the closed form)."""
    return q.log_prob(z) - p.log_prob(z)
