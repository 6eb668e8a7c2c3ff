"""A mixture of diagonal Gaussians over a 1-D event: the learned priors of Tomczak & Welling (2018)
(a mixture of K learned Gaussians; the VampPrior, the encoder's posteriors at K pseudo-inputs).

    p(z) = sum_j pi_j N(z; mu_j, diag sigma_j^2),   log p(z) = logsumexp_j [log pi_j + log N(z; mu_j, sigma_j^2)].

No closed-form KL against a posterior exists, so the objective uses the Monte Carlo estimate
log q(z) - log p(z) (:func:`vaelab.distributions.monte_carlo_kl`).
"""

from __future__ import annotations

import torch

from .base import Distribution
from .normal import LOG_2PI


class GaussianMixture(Distribution):
    """sum_j softmax(logits)_j N(mu_j, diag exp(logvar_j)); ``logits`` (K,), ``mu`` and ``logvar`` (K, L).
    Batch shape (): it scores points of any leading shape (..., L)."""

    event_dims = 1

    def __init__(self, logits: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> None:
        self.logits, self.mu, self.logvar = logits, mu, logvar

    @property
    def components(self) -> int:
        return self.mu.shape[0]

    def log_prob_elements(self, x: torch.Tensor) -> torch.Tensor:
        raise TypeError("a mixture's log-density does not factorise over dimensions: use log_prob")

    def component_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log N(x; mu_j, sigma_j^2) for every component: (..., L) -> (..., K).

        Expanded as a quadratic form, -1/2 [x^2 . (1/sigma^2) - 2 x . (mu/sigma^2) + sum mu^2/sigma^2
        + sum log sigma^2 + L log 2 pi], so the cost is two (N, L) x (L, K) products and memory
        N x K, not N x K x L: a VampPrior with K = 500 scores 5,000 importance draws per image."""
        # The products stay in the parameters' precision (float32) under bf16/fp16 autocast: a prior's
        # log-density is a reduction, like the likelihood's and the KL's.
        with torch.autocast(x.device.type, enabled=False):
            prec = torch.exp(-self.logvar)  # (K, L)
            const = (self.mu**2 * prec + self.logvar).sum(-1) + self.mu.shape[-1] * LOG_2PI  # (K,)
            flat = x.reshape(-1, x.shape[-1]).to(prec.dtype)  # (N, L)
            quad = (flat**2) @ prec.T - 2.0 * flat @ (self.mu * prec).T  # (N, K)
            return (-0.5 * (quad + const)).reshape(*x.shape[:-1], -1)

    def log_prob(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is not None:
            raise TypeError("a mixture prior cannot score a masked latent vector")
        log_pi = torch.log_softmax(self.logits, dim=-1)  # (K,)
        return torch.logsumexp(self.component_log_prob(x) + log_pi, dim=-1)  # stable over K

    @property
    def weights(self) -> torch.Tensor:
        return torch.softmax(self.logits, dim=-1)

    @property
    def mean(self) -> torch.Tensor:
        return (self.weights[:, None] * self.mu).sum(0)  # (L,)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.sample_n(1, generator)[0]

    def sample_n(self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0) -> torch.Tensor:
        """n draws (n, L): a component j ~ pi, then z = mu_j + temperature * sigma_j * eps (no gradient)."""
        with torch.no_grad():
            j = torch.multinomial(self.weights.float(), n, replacement=True, generator=generator)  # (n,)
            eps = torch.randn((n, self.mu.shape[-1]), generator=generator, dtype=self.mu.dtype, device=self.mu.device)
            return self.mu[j] + temperature * torch.exp(0.5 * self.logvar[j]) * eps
