"""The evidence lower bound, written once, and its importance-weighted tightening.

ELBO (Kingma & Welling 2014, eq. 3; Doersch 2016, eq. 5):

    log P(X) >= E_{Q(z|X)}[log P(X|z)] - KL(Q(z|X) || P(z))

estimated with one reparameterised z per X, with the KL in closed form (Doersch eq. 7).

IWAE bound (Burda et al. 2016, eq. 8): L_k = E[log (1/k) sum_i P(X, z_i) / Q(z_i|X)], z_i ~ Q(z|X);
L_1 = ELBO, L_k <= L_{k+1} <= log P(X), and -L_k with large k is the standard NLL estimate.

All functions return one value per datapoint (sums over its dimensions); reduce over the batch
yourself (mean), and report nats per datapoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ELBOTerms:
    """Per-datapoint terms of the ELBO: each (B,) except ``kl_per_dim`` (B, L)."""

    log_px_z: torch.Tensor  # single-sample estimate of E_Q[log P(X|z)]
    kl: torch.Tensor  # KL(Q(z|X) || P(z)), closed form
    kl_per_dim: torch.Tensor

    @property
    def elbo(self) -> torch.Tensor:
        return self.log_px_z - self.kl

    def loss(self, beta: float = 1.0, free_bits: float = 0.0) -> torch.Tensor:
        """Scalar to minimise: -(E[log P(X|z)] - beta * KL), mean over the batch.

        beta != 1 is the beta-VAE (Higgins et al. 2017); ``free_bits`` > 0 stops penalising each latent
        dimension's batch-mean KL below that many nats (Kingma et al. 2016, eq. 15)."""
        if free_bits > 0:
            kl = self.kl_per_dim.mean(0).clamp(min=free_bits).sum()
        else:
            kl = self.kl.mean()
        return -(self.log_px_z.mean() - beta * kl)


def elbo(
    model: nn.Module,
    x: torch.Tensor,
    c: torch.Tensor | None = None,
    *,
    mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> ELBOTerms:
    """The ELBO's terms for a batch x (B, C, H, W). ``c``: condition; ``mask``: which elements of x
    the likelihood scores (a conditional model scores only the unobserved part)."""
    out = model(x, c, generator=generator)
    kl_d = out.posterior.kl_standard_normal_elements()  # (B, L)
    return ELBOTerms(out.likelihood.log_prob(x, mask), kl_d.sum(-1), kl_d)


def log_importance_weights(
    model: nn.Module,
    x: torch.Tensor,
    k: int,
    c: torch.Tensor | None = None,
    *,
    mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    posterior=None,
) -> torch.Tensor:
    """log w_i = log P(X|z_i) + log P(z_i) - log Q(z_i|X) for k draws z_i ~ Q(z|X): shape (k, B)."""
    q = posterior if posterior is not None else model.encode(x, c)
    z = q.rsample(generator, sample_shape=(k,))  # (k, B, L)
    b = x.shape[0]
    zf = z.reshape(k * b, -1)
    cf = None if c is None else c.expand(k, *c.shape).reshape(k * b, *c.shape[1:])
    px = model.decode(zf, cf)
    xf = x.expand(k, *x.shape).reshape(k * b, *x.shape[1:])
    mf = None if mask is None else mask.expand(k, *mask.shape).reshape(k * b, *mask.shape[1:])
    log_px_z = px.log_prob(xf, mf).view(k, b)
    log_pz = model.prior().log_prob(z)  # (k, B)
    log_qz = q.log_prob(z)  # (k, B)
    return log_px_z + log_pz - log_qz


@torch.no_grad()
def iwae_bound(
    model: nn.Module,
    x: torch.Tensor,
    k: int,
    c: torch.Tensor | None = None,
    *,
    mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    chunk: int = 512,
) -> torch.Tensor:
    """L_k per datapoint (B,), computed in chunks of ``chunk`` samples with a streaming logsumexp,
    so memory stays bounded for k in the thousands."""
    q = model.encode(x, c)
    acc = torch.full((x.shape[0],), -math.inf, device=x.device)
    done = 0
    while done < k:
        m = min(chunk, k - done)
        lw = log_importance_weights(model, x, m, c, mask=mask, generator=generator, posterior=q)
        acc = torch.logaddexp(acc, torch.logsumexp(lw, dim=0))
        done += m
    return acc - math.log(k)


def iwae_loss(
    model: nn.Module,
    x: torch.Tensor,
    k: int,
    c: torch.Tensor | None = None,
    *,
    mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Training objective of the IWAE: -L_k, mean over the batch (differentiable)."""
    lw = log_importance_weights(model, x, k, c, mask=mask, generator=generator)
    return -(torch.logsumexp(lw, dim=0) - math.log(k)).mean()
