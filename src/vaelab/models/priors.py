"""Priors P(z_top) for the top stochastic layer, selectable per model (``model.prior``).

A prior is a module (its parameters are the model's, trained by the same objective) whose
``forward(model)`` returns the prior distribution; it is given the model so that the VampPrior can
run the model's own encoder on its pseudo-inputs.

* ``standard``: N(0, I) (Kingma & Welling 2014); the KL is in closed form.
* ``mog``: a mixture of K learned diagonal Gaussians with learned weights (Tomczak & Welling 2018,
  Sec. 3.1); the KL is the Monte Carlo estimate log q(z) - log p(z).
* ``vamp``: the VampPrior (Tomczak & Welling 2018, Sec. 3.2), p(z) = 1/K sum_k q(z | u_k), the
  model's posterior at K learned pseudo-inputs u_k. As in the paper, the pseudo-inputs are the
  output of a linear layer applied to the identity (one free vector per component) through a
  hardtanh into the pixel range [0, 1]; the free vectors start at N(0.05, 0.01^2), inside the
  hardtanh's linear range, so gradients reach them from the first step. A conditional model also
  learns a pseudo-condition per component (same parameterisation), so its prior stays independent of
  the condition like the CVAE's N(0, I). With several stochastic layers, the path from u_k to the top
  layer passes through the lower layers' posterior means (the deterministic code ``encode`` gives).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..config import DataSpec, ModelConfig
from ..distributions import Distribution, GaussianMixture, StandardNormal
from ..registry import Registry
from .base import device_of

if TYPE_CHECKING:
    from .vae import VAE

PSEUDO_INIT = (0.05, 0.01)  # mean, std of the pseudo-inputs' free parameters (inside hardtanh's range)


class StandardPrior(nn.Module):
    """P(z) = N(0, I): no parameters (a one-layer VAE's checkpoint holds only its networks)."""

    def __init__(self, cfg: ModelConfig, spec: DataSpec, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, model: VAE) -> Distribution:
        return StandardNormal(self.dim, device=device_of(model))


class MixturePrior(nn.Module):
    """P(z) = sum_j pi_j N(mu_j, diag sigma_j^2), with pi, mu and sigma learned."""

    def __init__(self, cfg: ModelConfig, spec: DataSpec, dim: int) -> None:
        super().__init__()
        k = cfg.prior_components
        self.logits = nn.Parameter(torch.zeros(k))  # uniform weights to start
        self.mu = nn.Parameter(torch.randn(k, dim))  # spread like N(0, I) (drawn from the seeded RNG)
        self.logvar = nn.Parameter(torch.zeros(k, dim))

    def forward(self, model: VAE) -> Distribution:
        return GaussianMixture(self.logits, self.mu, self.logvar)


class VampPrior(nn.Module):
    """P(z) = 1/K sum_k q(z | u_k): the variational mixture of posteriors at K pseudo-inputs."""

    def __init__(self, cfg: ModelConfig, spec: DataSpec, dim: int) -> None:
        super().__init__()
        k = cfg.prior_components
        mean, std = PSEUDO_INIT
        self.pseudo_inputs = nn.Parameter(torch.randn(k, *spec.shape) * std + mean)  # (K, C, H, W)
        self.pseudo_conditions = (nn.Parameter(torch.randn(k, spec.cond_dim) * std + mean)
                                  if spec.cond_dim else None)  # (K, cond_dim)
        self.register_buffer("uniform", torch.zeros(k), persistent=False)  # log-weights, normalised later
        self._cache: dict[bool, Distribution] | None = None  # set inside fixed_weights()

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The pseudo-inputs (and pseudo-conditions) as the encoder sees them: in [0, 1]."""
        c = self.pseudo_conditions
        return F.hardtanh(self.pseudo_inputs, 0.0, 1.0), None if c is None else F.hardtanh(c, 0.0, 1.0)

    def forward(self, model: VAE) -> Distribution:
        # Evaluation calls the model once per chunk of draws (thousands of times for -L_5000) with fixed
        # weights, where the prior is the same each time: inside fixed_weights(model) it is computed once
        # (per autocast state: the encoder may run in bf16), not once per call.
        key = torch.is_autocast_enabled(self.uniform.device.type)
        if self._cache is not None and key in self._cache:
            return self._cache[key]
        u, c = self.inputs()
        q = model.top_posterior(u, c)  # batch (K,), event (L_top,)
        prior = GaussianMixture(self.uniform, q.mu, q.logvar)
        if self._cache is not None:
            self._cache[key] = prior
        return prior


@contextlib.contextmanager
def fixed_weights(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block ``model``'s weights do not change (an evaluation without gradients): a prior
    that depends only on them (the VampPrior's mixture at its pseudo-inputs) is computed at its first
    use and re-used after it. Leaving the block forgets it."""
    priors = [m for m in model.modules() if isinstance(m, VampPrior)]
    for p in priors:
        p._cache = {}
    try:
        yield model
    finally:
        for p in priors:
            p._cache = None


#: name -> prior module class taking (ModelConfig, DataSpec, top latent size)
PRIORS: Registry[Callable[[ModelConfig, DataSpec, int], nn.Module]] = Registry("prior")
PRIORS.add("standard", StandardPrior)
PRIORS.add("mog", MixturePrior)
PRIORS.add("vamp", VampPrior)
