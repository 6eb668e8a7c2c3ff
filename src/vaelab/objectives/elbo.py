"""The evidence lower bound, written once for every latent-variable model, and its importance-weighted
tightening. It knows nothing of a model's structure: it reads the model's output, a likelihood
P(X|z) and a list of stochastic layers (q, p, z) (see :mod:`vaelab.models.base`).

ELBO (Kingma & Welling 2014, eq. 3; Doersch 2016, eq. 5), summed over layers l:

    log P(X) >= E_Q[log P(X|z)] - sum_l KL(Q(z_l | .) || P(z_l | .))

with each KL in closed form where a formula is registered for its pair of distributions (Doersch
eq. 7 for Gaussians) and the Monte Carlo estimate log q(z_l) - log p(z_l) at the layer's draw otherwise.
A closed form is this layer's term of E_q[log w] only when the layer's prior does not depend on its own
draw: in a bottom-up hierarchy p(z1 | z2) is evaluated at z2 ~ q(z2 | z1), which was drawn from z1, so
that layer's KL is the Monte Carlo term (the model says so: ``StochasticLayer.prior_depends_on_z``). A
top-down model conditions q(z_l | x, z_{l+1}) and p(z_l | z_{l+1}) on the draw above, and keeps the closed form.

IWAE bound (Burda et al. 2016, eq. 8): L_k = E[log (1/k) sum_i w_i], with

    log w_i = log P(X|z_i) + sum_l log p(z_l,i) - sum_l log q(z_l,i),   z_i ~ Q;

L_1 = ELBO, L_k <= L_{k+1} <= log P(X), and -L_k with large k is the standard NLL estimate.

All functions return one value per datapoint (sums over its dimensions); reduce over the batch
yourself (mean), and report nats per datapoint.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from ..distributions import kl_divergence
from ..models.base import ModelOutput, repeat_rows

if TYPE_CHECKING:
    from ..conditioning import Batch
    from ..config import TrainConfig


def _per_datapoint(t: torch.Tensor, event: int) -> torch.Tensor:
    """Average out leading draw dimensions: (k, B, *event) -> (B, *event)."""
    while t.dim() > 1 + event:
        t = t.mean(0)
    return t


@dataclass
class LayerKL:
    """KL(q || p) of one stochastic layer, per datapoint."""

    name: str
    dim: int  # the layer's latent size
    kl: torch.Tensor  # (B,)
    kl_per_dim: torch.Tensor | None  # (B, L) in closed form; None for a Monte Carlo estimate
    closed_form: bool


@dataclass
class ELBOTerms:
    """Per-datapoint terms of the ELBO: each (B,) except per-dimension KLs (B, L) and ``log_w`` (k, B)."""

    log_px_z: torch.Tensor  # estimate of E_Q[log P(X|z)] (mean over the k draws)
    layers: list[LayerKL]
    log_w: torch.Tensor | None = None  # log importance weights of the k draws (IWAE objective when k > 1)

    @property
    def kl(self) -> torch.Tensor:
        """sum_l KL(q_l || p_l) per datapoint (0 for a model without latent variables)."""
        if not self.layers:
            return torch.zeros_like(self.log_px_z)
        total = self.layers[0].kl
        for layer in self.layers[1:]:
            total = total + layer.kl
        return total

    @property
    def kl_per_dim(self) -> torch.Tensor:
        """The closed-form layers' KL per dimension, concatenated bottom-up: (B, sum L)."""
        parts = [layer.kl_per_dim for layer in self.layers if layer.kl_per_dim is not None]
        return torch.cat(parts, -1) if parts else self.log_px_z.new_zeros(self.log_px_z.shape[0], 0)

    @property
    def elbo(self) -> torch.Tensor:
        return self.log_px_z - self.kl

    def loss(self, beta: float | torch.Tensor = 1.0, free_bits: float = 0.0, free_bits_per: str = "dim",
             balance: bool | torch.Tensor = False) -> torch.Tensor:
        """Scalar to minimise: -(E[log P(X|z)] - beta * sum_l gamma_l KL_l), mean over the batch.

        beta != 1 is the beta-VAE (Higgins et al. 2017), applied to every layer; ``free_bits`` > 0 stops
        penalising a batch-mean KL below the allowance (Kingma et al. 2016, eq. 15): with
        ``free_bits_per`` "dim" each latent dimension's KL below ``free_bits`` nats (a layer whose KL is
        a Monte Carlo estimate is one group of ``dim * free_bits`` nats); with "group" each layer's KL
        below ``free_bits`` nats. ``balance`` (True, or a 0-d bool tensor when beta is a tensor)
        weighs the layers by :func:`kl_balance_coefficients` (NVAE's KL balancing); else gamma_l = 1.
        With k > 1 draws the loss is the IWAE objective -L_k instead (Burda et al. 2016), where beta
        and free bits have no meaning."""
        if self.log_w is not None and self.log_w.shape[0] > 1:
            return -iwae_estimate([self.log_w]).mean()
        if not self.layers:
            return -self.log_px_z.mean()
        kls = [self._penalised_kl(layer, free_bits, free_bits_per) for layer in self.layers]
        if balance is not False and len(kls) > 1:
            gamma = kl_balance_coefficients(self.layers)  # (L,), no gradient
            if isinstance(balance, torch.Tensor):  # decided by a tensor: no data-dependent Python branch
                gamma = torch.where(balance, gamma, torch.ones_like(gamma))
            kls = [g * kl for g, kl in zip(gamma.unbind(), kls, strict=True)]
        kl = kls[0]
        for term in kls[1:]:
            kl = kl + term
        return -(self.log_px_z.mean() - beta * kl)

    @staticmethod
    def _penalised_kl(layer: LayerKL, free_bits: float, per: str = "dim") -> torch.Tensor:
        """A layer's batch-mean KL as the loss sees it: with free bits, each dimension's (``per`` dim;
        for a Monte Carlo KL, the layer's against ``dim * free_bits``) or the layer's (``per`` group)
        KL below the allowance is not penalised."""
        if free_bits <= 0:
            return layer.kl.mean()
        if per == "group":
            return layer.kl.mean().clamp(min=free_bits)
        if layer.kl_per_dim is not None:
            return layer.kl_per_dim.mean(0).clamp(min=free_bits).sum()
        return layer.kl.mean().clamp(min=free_bits * layer.dim)


def kl_balance_coefficients(layers: list[LayerKL]) -> torch.Tensor:
    """NVAE's KL balancing coefficients (Vahdat & Kautz 2020, Appendix A; ``kl_balancer`` in their
    code): gamma_l proportional to (E_batch |KL_l| + 0.01) / size_l, normalised to average 1 (so they
    sum to the number of layers), without gradient. A layer that holds much KL per latent unit is
    penalised more, one that holds little less, so that no group is switched off early in the warm-up.
    Returns (L,) in the layers' order."""
    kl = torch.stack([layer.kl.detach().abs().mean() for layer in layers]) + 0.01  # (L,)
    # each size filled where the KL is (a tensor made from a list would be copied from the host: a wait on a GPU)
    size = torch.stack([kl.new_full((), float(layer.dim)) for layer in layers])
    gamma = kl / size
    return gamma / gamma.mean()


def elbo_terms(
    out: ModelOutput, x: torch.Tensor, mask: torch.Tensor | None = None, *, weights: bool | None = None
) -> ELBOTerms:
    """The ELBO's terms from a model's output for the batch x (B, C, H, W). ``mask``: which elements of
    x the likelihood scores. ``weights`` (default: when k > 1): also the log importance weights (k, B)."""
    k, b = out.k, x.shape[0]
    log_px_z = out.likelihood.log_prob(repeat_rows(x, k), repeat_rows(mask, k))  # (B,) or (k*B,)
    if k > 1:
        log_px_z = log_px_z.view(k, b)
    layers = []
    for layer in out.layers:
        kl = kl_divergence(layer.q, layer.p, layer.z, closed_form=not layer.prior_depends_on_z)  # (B,) / (k, B), per dim (..., L) in closed form
        per_dim = None if kl.per_dim is None else _per_datapoint(kl.per_dim, 1)
        layers.append(LayerKL(layer.name, layer.z.shape[-1], _per_datapoint(kl.total, 0), per_dim, kl.closed_form))
    log_w = None
    if weights or (weights is None and k > 1):
        log_w = log_px_z.view(k, b)
        for layer in out.layers:
            log_w = log_w + (layer.p.log_prob(layer.z) - layer.q.log_prob(layer.z)).view(k, b)
    return ELBOTerms(_per_datapoint(log_px_z, 0), layers, log_w)


def elbo(
    model: nn.Module,
    x: torch.Tensor,
    c: torch.Tensor | None = None,
    *,
    mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    k: int = 1,
    weights: bool | None = None,
) -> ELBOTerms:
    """The ELBO's terms for a batch x (B, C, H, W). ``c``: condition; ``mask``: which elements of x
    the likelihood scores (a conditional model scores only the unobserved part). ``k`` > 1 draws k z
    per x (through the model's forward, so DistributedDataParallel sees it) and also returns their
    log importance weights, from which ``loss()`` is the IWAE objective."""
    return elbo_terms(model(x, c, generator=generator, k=k), x, mask, weights=weights)


def log_importance_weights(
    model: nn.Module,
    x: torch.Tensor,
    k: int,
    c: torch.Tensor | None = None,
    *,
    mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """log w_i = log P(X|z_i) + sum_l log p(z_l,i) - sum_l log q(z_l,i) for k draws: shape (k, B)."""
    log_w = elbo(model, x, c, mask=mask, generator=generator, k=k, weights=True).log_w
    assert log_w is not None
    return log_w


def iwae_estimate(log_w: Iterable[torch.Tensor]) -> torch.Tensor:
    """L_k = log (1/k) sum_i w_i per datapoint (B,) from the log importance weights of k draws, given
    in chunks (m_j, B) with sum_j m_j = k: a streaming logsumexp that holds one chunk at a time. The one
    computation of L_k: training's IWAE objective, :func:`iwae_bound` and ``vaelab evaluate`` use it."""
    acc, k = None, 0
    for lw in log_w:
        part = torch.logsumexp(lw, dim=0)
        acc, k = part if acc is None else torch.logaddexp(acc, part), k + lw.shape[0]
    if acc is None:
        raise ValueError("L_k needs at least one draw")
    return acc - math.log(k)


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
    """L_k per datapoint (B,), drawn in chunks of ``chunk`` draws (memory stays bounded for k in the
    thousands)."""
    return iwae_estimate(log_importance_weights(model, x, min(chunk, k - done), c, mask=mask, generator=generator)
                         for done in range(0, k, chunk))


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


class Objective(Protocol):
    """What a training step minimises: ``(loss, terms)`` for a batch."""

    def __call__(
        self, model: nn.Module, batch: Batch, *, generator: torch.Generator | None, beta: float
    ) -> tuple[torch.Tensor, ELBOTerms]: ...


@dataclass(frozen=True)
class ELBOObjective:
    """-ELBO (beta-weighted, with free bits) for k = 1; the IWAE objective -L_k for k > 1."""

    k: int = 1
    free_bits: float = 0.0
    free_bits_per: str = "dim"  # dim | group (see ELBOTerms.loss)
    # KL balancing while the KL weight is below its final value ``full_beta`` (the warm-up), as NVAE's
    # ``kl_balancer`` does while its KL coefficient is below 1
    kl_balance: bool = False
    full_beta: float = 1.0

    @classmethod
    def from_config(cls, t: TrainConfig) -> ELBOObjective:
        return cls(k=t.iwae_k, free_bits=t.free_bits, free_bits_per=t.free_bits_per, kl_balance=t.kl_balance,
                   full_beta=t.beta)

    def __call__(
        self, model: nn.Module, batch: Batch, *, generator: torch.Generator | None, beta: float = 1.0
    ) -> tuple[torch.Tensor, ELBOTerms]:
        terms = elbo(model, batch.x, batch.c, mask=batch.mask, generator=generator, k=self.k)
        # beta is a float, or a 0-d tensor (then the comparison is one too, and so is ``balance``)
        balance = self.kl_balance and beta < self.full_beta
        return terms.loss(beta, self.free_bits, self.free_bits_per, balance), terms
