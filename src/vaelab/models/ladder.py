"""The Ladder VAE (Sønderby et al. 2016): a hierarchy of stochastic layers whose posterior is inferred
top-down, sharing the generative path.

Generative model, as the bottom-up VAE's: p(z_L) p(z_{L-1}|z_L) ... p(z_1|z_2) p(x|z_1), every
conditional a diagonal Gaussian given by an MLP of the layer above.

Inference (Sønderby et al. 2016, eqs. 17-21): a deterministic bottom-up pass d_1 = f_1(x),
d_l = f_l(d_{l-1}) gives each layer a data-dependent estimate N(mû_l, σ̂²_l). The top posterior is
that estimate, q(z_L|x) = N(mû_L, σ̂²_L); below it, with z_{l+1} drawn first,

    q(z_l | x, z_{l+1}) = N(μ_q, σ_q²),   σ_q⁻² = σ̂_l⁻² + σ_p⁻²,   μ_q = (mû_l σ̂_l⁻² + μ_p σ_p⁻²) σ_q²,

the precision-weighted combination of the bottom-up estimate and the prior p(z_l | z_{l+1}) = N(μ_p, σ_p²).
q and p of a layer are both conditioned on the draw above, not on z_l itself, so each layer's KL is in
closed form (``prior_depends_on_z`` stays False) and the ELBO keeps its per-dimension KLs.

Layers are listed bottom-up (the contract's order); draws are made top-down. Sizes: ``latent_dim``
is z_1's, ``upper_latent`` z_2..z_L's (empty: each half the one below: 64-32-16-8-4 for 5 layers,
the paper's MNIST model). ``hidden`` are the widths of f_1 (and, mirrored, of p(x|z_1)); the blocks
f_l for l >= 2 and the top-down MLPs of p(z_l | z_{l+1}) have ``upper_hidden`` widths, or by default
two layers each halving the width per level (512-256-128-64-32 from ``hidden = [512, 512]``, the paper's).
Batch normalisation, which the paper also uses, is left out: it would make a datapoint's bound depend
on its batch, and evaluation must not.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..config import DataSpec, ModelConfig
from ..distributions import Distribution, build_likelihood
from ..distributions.likelihoods import LIKELIHOODS
from ..distributions.normal import DiagonalGaussian
from ..nets import build_decoder, build_encoder
from ..nets.base import ACTIVATIONS
from ..nets.mlp import mlp
from .base import (
    MODELS,
    LatentModelBase,
    ModelOutput,
    StochasticLayer,
    flat_draws,
    full_precision,
    layer_temperatures,
    repeat_rows,
)
from .priors import PRIORS
from .vae import gaussian


def precision_weighted(bottom_up: DiagonalGaussian, prior: DiagonalGaussian) -> DiagonalGaussian:
    """N(mû, σ̂²) * N(μ_p, σ_p²), renormalised: σ_q⁻² = σ̂⁻² + σ_p⁻², μ_q = w mû + (1 - w) μ_p with
    w = σ̂⁻² / σ_q⁻² = sigmoid(log σ_p² - log σ̂²) (the stable form of the paper's eq. 19-20)."""
    logvar = -torch.logaddexp(-bottom_up.logvar, -prior.logvar)
    w = torch.sigmoid(prior.logvar - bottom_up.logvar)
    return DiagonalGaussian(w * bottom_up.mu + (1 - w) * prior.mu, logvar)


def _default_widths(cfg: ModelConfig, level: int) -> list[int]:
    """Widths of the MLPs of level ``level`` (1 for the block above f_1): ``upper_hidden`` if given,
    else two layers of hidden[-1] / 2^level (at least 8)."""
    if cfg.upper_hidden is not None:
        return list(cfg.upper_hidden)
    base = cfg.hidden[-1] if cfg.hidden else 512
    return [max(8, base >> level)] * 2


@MODELS.register("ladder")
class LadderVAE(LatentModelBase):
    """Top-down inference over ``cfg.latent_dims`` Gaussian layers under the prior ``cfg.prior``.

    Parameter names: ``encoder`` (f_1: x -> d_1), ``blocks[i]`` (f_{i+2}: d_{i+1} -> d_{i+2}),
    ``heads[i]`` (d_{i+1} -> mû, log σ̂² of z_{i+1}), ``down[i]`` (z_{i+2} -> p(z_{i+1} | z_{i+2})),
    ``decoder`` (z_1 -> p(x | z_1)), ``top_prior``."""

    def __init__(self, cfg: ModelConfig, spec: DataSpec) -> None:
        super().__init__()
        self.config, self.spec = cfg, spec
        dims = cfg.latent_dims
        c = spec.shape[0]
        k = LIKELIHOODS.get(cfg.likelihood).num_params(c, cfg)
        d1 = cfg.hidden[-1] if cfg.hidden else 2 * dims[0]
        act = ACTIVATIONS.get(cfg.activation)
        self.likelihood = build_likelihood(cfg, c)
        self.encoder = build_encoder(cfg, spec.shape, spec.cond_dim, d1)
        self.encoder_act = act()
        widths = [d1]
        blocks = []
        for level in range(1, len(dims)):
            w = _default_widths(cfg, level)
            blocks.append(nn.Sequential(mlp([widths[-1], *w], cfg.activation), act()))
            widths.append(w[-1] if w else widths[-1])
        self.blocks = nn.ModuleList(blocks)
        self.heads = nn.ModuleList(nn.Linear(w, 2 * d) for w, d in zip(widths, dims, strict=True))
        self.down = nn.ModuleList(mlp([dims[i + 1], *_default_widths(cfg, i + 1), 2 * dims[i]], cfg.activation)
                                  for i in range(len(dims) - 1))
        self.decoder = build_decoder(cfg, dims[0], spec.cond_dim, (k, *spec.shape[1:]))
        self.top_prior = PRIORS.get(cfg.prior)(cfg, spec, dims[-1])
        self._names = ("z",) if len(dims) == 1 else tuple(f"z{i + 1}" for i in range(len(dims)))

    @property
    def latent_dims(self) -> tuple[int, ...]:
        return self.config.latent_dims

    def prior(self) -> Distribution:
        return self.top_prior(self)

    def bottom_up(self, x: torch.Tensor, c: torch.Tensor | None = None) -> list[DiagonalGaussian]:
        """The deterministic pass's estimate N(mû_l, σ̂²_l) of every layer, bottom-up (batch (B,))."""
        d = self.encoder_act(self.encoder(x, c))
        estimates = [gaussian(self.heads[0](d))]
        for block, head in zip(self.blocks, self.heads[1:], strict=True):
            d = block(d)
            estimates.append(gaussian(head(d)))
        return estimates

    def top_posterior(self, x: torch.Tensor, c: torch.Tensor | None = None) -> DiagonalGaussian:
        """q(z_L | x): the top layer's bottom-up estimate (what the VampPrior mixes)."""
        return self.bottom_up(x, c)[-1]

    def _conditional_prior(self, level: int, z_above: torch.Tensor) -> DiagonalGaussian:
        """p(z_{level+1} | z_{level+2}) (0-based ``level``) at the draw above."""
        return gaussian(self.down[level](z_above))

    def encode(self, x: torch.Tensor, c: torch.Tensor | None = None) -> list[Distribution]:
        """Posteriors bottom-up, each layer given the posterior means of the layers above."""
        est = self.bottom_up(x, c)
        qs: list[DiagonalGaussian] = [est[-1]]
        for level in reversed(range(len(est) - 1)):
            qs.append(precision_weighted(est[level], self._conditional_prior(level, qs[-1].mean)))
        return list(reversed(qs))

    def decode(self, z: torch.Tensor, c: torch.Tensor | None = None) -> Distribution:
        return self.decode_layers([z], c)

    def decode_layers(self, zs: Sequence[torch.Tensor], c: torch.Tensor | None = None) -> Distribution:
        """P(X | z_l, ..., z_L) for codes of the top ``len(zs)`` layers (bottom-up); the layers below
        take their prior's mean (the generative chain is Markov: the lowest given code decides)."""
        z, start = zs[0], len(self.latent_dims) - len(zs)
        for level in reversed(range(start)):
            z = self._conditional_prior(level, z).mean
        return self.likelihood(full_precision(self.decoder(z, c)))

    def forward(
        self, x: torch.Tensor, c: torch.Tensor | None = None, *, generator: torch.Generator | None = None, k: int = 1
    ) -> ModelOutput:
        est = self.bottom_up(x, c)
        q_top = est[-1]
        z = q_top.rsample(generator, sample_shape=() if k == 1 else (k,))  # (B, L) or (k, B, L)
        qs, ps, zs = [q_top], [self.prior()], [z]
        for level in reversed(range(len(est) - 1)):  # top-down: z_{l+1} first, then q and p of z_l given it
            p = self._conditional_prior(level, zs[-1])  # batch like the draw above
            q = precision_weighted(est[level], p)
            ps.append(p)
            qs.append(q)
            zs.append(q.rsample(generator))
        qs.reverse(), ps.reverse(), zs.reverse()
        px = self.likelihood(full_precision(self.decoder(flat_draws(zs[0], k), repeat_rows(c, k))))
        layers = [StochasticLayer(n, q, p, z) for n, q, p, z in zip(self._names, qs, ps, zs, strict=True)]
        return ModelOutput(px, layers, k)

    @torch.no_grad()
    def sample(
        self, n: int, c: torch.Tensor | None = None, *, generator: torch.Generator | None = None,
        temperature: float | Sequence[float] = 1.0, mean: bool = True,
    ) -> torch.Tensor:
        """Ancestral sampling top-down, each layer's spread scaled by its temperature (bottom-up order)."""
        temps = layer_temperatures(temperature, len(self.latent_dims))
        z = self.prior().sample_n(n, generator, temps[-1])
        for level in reversed(range(len(self.down))):
            z = self._conditional_prior(level, z).sample_n(1, generator, temps[level])[0]
        px = self.likelihood(full_precision(self.decoder(z, c)))
        return px.mean if mean else px.sample(generator)
