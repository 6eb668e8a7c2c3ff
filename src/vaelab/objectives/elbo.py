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

from ..distributions import StandardNormal
from ..models.vae import repeat_rows


@dataclass
class ELBOTerms:
    """Per-datapoint terms of the ELBO: each (B,) except ``kl_per_dim`` (B, L) and ``log_w`` (k, B)."""

    log_px_z: torch.Tensor  # estimate of E_Q[log P(X|z)] (mean over the k draws)
    kl: torch.Tensor  # KL(Q(z|X) || P(z)), closed form
    kl_per_dim: torch.Tensor
    log_w: torch.Tensor | None = None  # log importance weights of the k draws, when k > 1

    @property
    def elbo(self) -> torch.Tensor:
        return self.log_px_z - self.kl

    def loss(self, beta: float = 1.0, free_bits: float = 0.0) -> torch.Tensor:
        """Scalar to minimise: -(E[log P(X|z)] - beta * KL), mean over the batch.

        beta != 1 is the beta-VAE (Higgins et al. 2017); ``free_bits`` > 0 stops penalising each latent
        dimension's batch-mean KL below that many nats (Kingma et al. 2016, eq. 15).
        With k > 1 draws the loss is the IWAE objective -L_k instead (Burda et al. 2016), where beta
        and free bits have no meaning."""
        if self.log_w is not None:
            k = self.log_w.shape[0]
            return -(torch.logsumexp(self.log_w, dim=0) - math.log(k)).mean()
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
    k: int = 1,
) -> ELBOTerms:
    """The ELBO's terms for a batch x (B, C, H, W). ``c``: condition; ``mask``: which elements of x
    the likelihood scores (a conditional model scores only the unobserved part). ``k`` > 1 draws k z
    per x (through the model's forward, so DistributedDataParallel sees it) and also returns their
    log importance weights, from which ``loss()`` is the IWAE objective."""
    out = model(x, c, generator=generator) if k == 1 else model(x, c, generator=generator, k=k)
    kl_d = out.posterior.kl_standard_normal_elements()  # (B, L)
    if k == 1:
        return ELBOTerms(out.likelihood.log_prob(x, mask), kl_d.sum(-1), kl_d)
    log_w, log_px_z = _log_weights(out.posterior, out.z, out.likelihood, x, mask)
    return ELBOTerms(log_px_z.mean(0), kl_d.sum(-1), kl_d, log_w)


def _log_weights(q, z: torch.Tensor, px, x: torch.Tensor, mask: torch.Tensor | None):
    """log w = log P(X|z) + log P(z) - log Q(z|X) for z (k, B, L) and a likelihood over the k*B
    sample-major rows: returns (log w, log P(X|z)), each (k, B)."""
    k, b = z.shape[:2]
    log_px_z = px.log_prob(repeat_rows(x, k), repeat_rows(mask, k)).view(k, b)
    log_pz = StandardNormal(z.shape[-1]).log_prob(z)  # (k, B)
    return log_px_z + log_pz - q.log_prob(z), log_px_z


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
    """log w_i = log P(X|z_i) + log P(z_i) - log Q(z_i|X) for k draws z_i ~ Q(z|X): shape (k, B).
    ``posterior``: Q(z|X) when already computed (chunked evaluation reuses it)."""
    q = posterior if posterior is not None else model.encode(x, c)
    z = q.rsample(generator, sample_shape=(k,))  # (k, B, L)
    px = model.decode(z.flatten(0, 1), repeat_rows(c, k))
    return _log_weights(q, z, px, x, mask)[0]


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
    return elbo(model, x, c, mask=mask, generator=generator, k=k).loss()
