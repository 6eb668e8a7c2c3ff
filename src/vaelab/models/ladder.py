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

from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from ..config import DataSpec, ModelConfig
from ..distributions import Distribution, build_likelihood
from ..distributions.likelihoods import LIKELIHOODS
from ..distributions.normal import DiagonalGaussian
from ..nets import build_decoder, build_encoder
from ..nets.base import hidden_activation
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
    w = σ̂⁻² / σ_q⁻² = sigmoid(log σ_p² - log σ̂²), and log σ_q² = log σ̂² - softplus(log σ̂² - log σ_p²)
    (the stable form of the paper's eq. 19-20, in operators ONNX has)."""
    logvar = bottom_up.logvar - F.softplus(bottom_up.logvar - prior.logvar)
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

    The generative path is one loop, top-down, over a state s: s = start(z_L); for each layer below,
    p(z_l | s) = down[l](s), z_l is drawn (from q, or p, or set), and s = update(s, z_l); the decoder
    reads the last s. Markov (Sønderby): start and update return z itself, so p(z_l | z_{l+1}) and
    p(x | z_1). With ``ladder_skip``: s is a deterministic state of width hidden[-1], start an MLP of
    z_L, update the residual h + f([h, z_l]), so every layer reaches the decoder.

    Parameter names: ``encoder`` (f_1: x -> d_1), ``blocks[i]`` (f_{i+2}: d_{i+1} -> d_{i+2}),
    ``heads[i]`` (d_{i+1} -> mû, log σ̂² of z_{i+1}), ``down[i]`` (state -> p(z_{i+1} | .)), with
    ``ladder_skip`` also ``start`` and ``merge[i]``, ``decoder`` (state -> p(x | .)), ``top_prior``."""

    def __init__(self, cfg: ModelConfig, spec: DataSpec) -> None:
        super().__init__()
        self.config, self.spec = cfg, spec
        dims = cfg.latent_dims
        c = spec.shape[0]
        k = LIKELIHOODS.get(cfg.likelihood).num_params(c, cfg)
        d1 = cfg.hidden[-1] if cfg.hidden else 2 * dims[0]

        def after(width: int) -> nn.Module:  # what follows a block's last linear layer: norm (if any), activation
            return nn.Sequential(*hidden_activation(width, cfg.activation, cfg.norm))
        self.likelihood = build_likelihood(cfg, c)
        # f_1: for an MLP, the widths of ``hidden`` with the last as d_1 (as deep as the VAE's features);
        # another registered encoder gives d_1 as its output layer
        f1 = replace(cfg, hidden=cfg.hidden[:-1]) if cfg.encoder == "mlp" and cfg.hidden else cfg
        self.encoder = build_encoder(f1, spec.shape, spec.cond_dim, d1)
        self.encoder_act = after(d1)
        widths = [d1]
        blocks = []
        for level in range(1, len(dims)):
            w = _default_widths(cfg, level)
            # an empty block (upper_hidden = []) only applies the activation again, as it always has
            end = after(w[-1]) if w else nn.Sequential(*hidden_activation(widths[-1], cfg.activation))
            blocks.append(nn.Sequential(mlp([widths[-1], *w], cfg.activation, cfg.norm), end))
            widths.append(w[-1] if w else widths[-1])
        self.blocks = nn.ModuleList(blocks)
        self.skip, self.residual = cfg.ladder_skip, cfg.ladder_posterior == "residual"
        state = [d1 if self.skip else dims[i + 1] for i in range(len(dims) - 1)]  # the state's width above layer i
        if self.residual:  # the top layer's estimate, and a delta network per layer below it
            self.heads = nn.ModuleList([nn.Linear(widths[-1], 2 * dims[-1])])
            self.posts = nn.ModuleList(mlp([state[i] + widths[i], widths[i], 2 * dims[i]], cfg.activation, cfg.norm)
                                       for i in range(len(dims) - 1))
            with torch.no_grad():  # q starts at the prior: a delta of zero
                for post in self.posts:
                    post[-1].weight.zero_()
                    post[-1].bias.zero_()
        else:
            self.heads = nn.ModuleList(nn.Linear(w, 2 * d) for w, d in zip(widths, dims, strict=True))
        if self.skip:  # a state of width d1 from the top layer down to the decoder
            self.start = mlp([dims[-1], d1, d1], cfg.activation, cfg.norm)
            self.merge = nn.ModuleList(mlp([d1 + dims[i], d1, d1], cfg.activation, cfg.norm) for i in range(len(dims) - 1))
            self.down = nn.ModuleList(mlp([d1, 2 * dims[i]], cfg.activation, cfg.norm) for i in range(len(dims) - 1))
            out_in = d1
        else:
            self.down = nn.ModuleList(mlp([dims[i + 1], *_default_widths(cfg, i + 1), 2 * dims[i]], cfg.activation, cfg.norm)
                                      for i in range(len(dims) - 1))
            out_in = dims[0]
        self.decoder = build_decoder(cfg, out_in, spec.cond_dim, (k, *spec.shape[1:]))
        self.top_prior = PRIORS.get(cfg.prior)(cfg, spec, dims[-1])
        self._names = ("z",) if len(dims) == 1 else tuple(f"z{i + 1}" for i in range(len(dims)))

    @property
    def latent_dims(self) -> tuple[int, ...]:
        return self.config.latent_dims

    def prior(self) -> Distribution:
        return self.top_prior(self)

    def features(self, x: torch.Tensor, c: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The deterministic bottom-up pass d_1 = f_1(x), d_l = f_l(d_{l-1}): [(B, width_l)], bottom-up."""
        d = [self.encoder_act(self.encoder(x, c))]
        for block in self.blocks:
            d.append(block(d[-1]))
        return d

    def top_posterior(self, x: torch.Tensor, c: torch.Tensor | None = None) -> DiagonalGaussian:
        """q(z_L | x): the top layer's bottom-up estimate (what the VampPrior mixes)."""
        return gaussian(self.heads[-1](self.features(x, c)[-1]))

    def _posteriors(self, x: torch.Tensor, c: torch.Tensor | None
                    ) -> tuple[DiagonalGaussian, Callable[[int, DiagonalGaussian, torch.Tensor], DiagonalGaussian]]:
        """q(z_L | x), and the posterior of each lower layer as a function of (level, its prior, the
        state above): the precision-weighted product with the layer's bottom-up estimate, or the
        residual form N(mu_p + dmu, exp(logvar_p + dlogvar)) with the deltas from [state, d_l]."""
        d = self.features(x, c)
        q_top = gaussian(self.heads[-1](d[-1]))
        if self.residual:
            def q(level: int, p: DiagonalGaussian, s: torch.Tensor) -> DiagonalGaussian:
                f = d[level].to(s.dtype).expand(*s.shape[:-1], d[level].shape[-1])
                delta = gaussian(self.posts[level](torch.cat([s, f], -1)))
                return DiagonalGaussian(p.mu + delta.mu, p.logvar + delta.logvar)
        else:
            est = [gaussian(head(f)) for head, f in zip(self.heads, d, strict=True)]

            def q(level: int, p: DiagonalGaussian, s: torch.Tensor) -> DiagonalGaussian:
                return precision_weighted(est[level], p)
        return q_top, q

    def _top_down(self, z_top: torch.Tensor, choose: Callable[[int, DiagonalGaussian, torch.Tensor], torch.Tensor]
                  ) -> tuple[torch.Tensor, list[DiagonalGaussian]]:
        """The generative loop from z_top down: ``choose(level, p, s)`` gives z of layer ``level``
        (0-based) from its prior p at the state s above (a draw from q or p, p's mean, or a given code).
        Returns the decoder's input and the priors of the layers below the top, bottom-up."""
        s = self.start(z_top) if self.skip else z_top
        priors = []
        for level in reversed(range(len(self.down))):
            p = gaussian(self.down[level](s))
            z = choose(level, p, s)
            s = s + self.merge[level](torch.cat([s, z.to(s.dtype)], -1)) if self.skip else z
            priors.append(p)
        return s, priors[::-1]

    def _decode_state(self, s: torch.Tensor, c: torch.Tensor | None) -> Distribution:
        return self.likelihood(full_precision(self.decoder(s, c)))

    def encode(self, x: torch.Tensor, c: torch.Tensor | None = None) -> list[Distribution]:
        """Posteriors bottom-up, each layer given the posterior means of the layers above."""
        q_top, posterior = self._posteriors(x, c)
        qs: dict[int, DiagonalGaussian] = {}

        def posterior_mean(level: int, p: DiagonalGaussian, s: torch.Tensor) -> torch.Tensor:
            qs[level] = posterior(level, p, s)
            return qs[level].mean

        self._top_down(q_top.mean, posterior_mean)
        return [*(qs[i] for i in range(len(self.down))), q_top]

    def decode(self, z: torch.Tensor, c: torch.Tensor | None = None) -> Distribution:
        return self.decode_layers([z], c)

    def decode_layers(self, zs: Sequence[torch.Tensor], c: torch.Tensor | None = None) -> Distribution:
        """P(X | z_l, ..., z_L) for codes of the top ``len(zs)`` layers (bottom-up); the layers below
        take their prior's mean."""
        first = len(self.latent_dims) - len(zs)
        s, _ = self._top_down(zs[-1], lambda level, p, s: zs[level - first] if level >= first else p.mean)
        return self._decode_state(s, c)

    def forward(
        self, x: torch.Tensor, c: torch.Tensor | None = None, *, generator: torch.Generator | None = None, k: int = 1
    ) -> ModelOutput:
        q_top, posterior = self._posteriors(x, c)
        z_top = q_top.rsample(generator, sample_shape=() if k == 1 else (k,))  # (B, L) or (k, B, L)
        qs: dict[int, DiagonalGaussian] = {}
        zs: dict[int, torch.Tensor] = {}

        def draw(level: int, p: DiagonalGaussian, s: torch.Tensor) -> torch.Tensor:  # q and p given the draw above
            qs[level] = posterior(level, p, s)
            zs[level] = qs[level].rsample(generator)
            return zs[level]

        s, ps = self._top_down(z_top, draw)
        top = len(self.down)
        qs[top], zs[top] = q_top, z_top
        px = self._decode_state(flat_draws(s, k), repeat_rows(c, k))
        layers = [StochasticLayer(n, qs[i], p, zs[i])
                  for i, (n, p) in enumerate(zip(self._names, [*ps, self.prior()], strict=True))]
        return ModelOutput(px, layers, k)

    @torch.no_grad()
    def sample(
        self, n: int, c: torch.Tensor | None = None, *, generator: torch.Generator | None = None,
        temperature: float | Sequence[float] = 1.0, mean: bool = True,
    ) -> torch.Tensor:
        """Ancestral sampling top-down, each layer's spread scaled by its temperature (bottom-up order)."""
        temps = layer_temperatures(temperature, len(self.latent_dims))
        z = self.prior().sample_n(n, generator, temps[-1])
        s, _ = self._top_down(z, lambda level, p, s: p.sample_n(1, generator, temps[level])[0])
        px = self._decode_state(s, c)
        return px.mean if mean else px.sample(generator)
