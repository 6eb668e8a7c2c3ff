"""The top-down residual VAE of NVAE (Vahdat & Kautz 2020) and VDVAE (Child 2021): convolutional latent
groups at several resolutions, generated top-down and inferred along the same path.

Generative model, groups z_G (the top, at the lowest resolution) down to z_1 (nearest the data):

    p(x, z) = p(z_G) prod_{l<G} p(z_l | z_>l) p(x | z),    h_G = h_0,  h_l = T_l(h_{l+1}, z_{l+1}),

where h is the top-down state, a feature map that starts as a learned constant h_0 at the lowest
resolution, takes each group's draw in (h + conv1x1(z_l), then residual cells) and is upsampled between
resolutions; p(z_l | z_>l) = N(mu_p(h_l), diag exp(logvar_p(h_l))) and p(z_G) is the model's prior
(``model.prior``: N(0, I), or a registered learned prior). The likelihood p(x | z) reads the state at
the data's resolution after the last group.

Inference shares the top-down path (NVAE Sec. 3; VDVAE Sec. 3): a bottom-up pass of residual cells
computes features e_r of x at every resolution r, and each group's posterior reads them beside the
top-down state,

    q(z | x) = q(z_G | x) prod_{l<G} q(z_l | x, z_>l),
    q(z_l | x, z_>l) = N(mu_p + d_mu, diag exp(logvar_p + d_logvar)),  (d_mu, d_logvar) = f_l(h_l, e_r(l)),

NVAE's residual parameterisation (its Eq. 2): q is written relative to p, so KL(q || p) depends on the
deltas alone, 1/2 sum [d_mu^2 / var_p + exp(d_logvar) - 1 - d_logvar], and starts at 0 (the heads'
last convolutions start at zero). Log-variances are soft-clamped to (-10, 10) (10 tanh(v / 10); NVAE
soft-clamps likewise). Every q and p is a diagonal Gaussian given the draws above, so each group's KL
is in closed form (``prior_depends_on_z`` False): ELBO = E_q[log p(x|z)] - sum_l E_q(z_>l)[KL(q_l || p_l)].

Shapes: group l holds ``latent_dim`` channels at its resolution, flattened to L_l = latent_dim * H_l *
W_l numbers (row-major (C, H, W)); the contract's layers are listed bottom-up (``layers[0]`` the group
nearest the data). With k draws per datapoint, the bottom-up features are computed once and repeated
sample-major (row i*B + b is draw i of datapoint b), and each group's q, p and z are (k, B, L_l).

An optional condition c (B, cond_dim) enters the bottom-up stem and the top-down state h_0 (a
conditional model in the CVAE's sense: q(z | x, c), p(z_l | z_>l, c), p(x | z, c); the top group's prior
stays independent of c).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..config import DataSpec, ModelConfig
from ..distributions import Distribution, build_likelihood
from ..distributions.likelihoods import LIKELIHOODS
from ..distributions.normal import DiagonalGaussian
from ..errors import ConfigError
from ..nets.base import ACTIVATIONS
from ..nets.residual import Down, Head, Up, cells, resolutions, scale_init_
from .base import (
    MODELS,
    LatentModelBase,
    ModelOutput,
    StochasticLayer,
    full_precision,
    layer_temperatures,
    repeat_rows,
)
from .priors import PRIORS

LOGVAR_BOUND = 10.0  # log-variances soft-clamped to (-10, 10): standard deviations in (e^-5, e^5)

#: chooses a group's z from its posterior (None when generating) and prior (None for the top group when
#: not asked for): (index top-down, q, p) -> (N, L_l)
Choose = Callable[[int, DiagonalGaussian | None, Distribution | None], torch.Tensor]


def soft_clamp(t: torch.Tensor, bound: float = LOGVAR_BOUND) -> torch.Tensor:
    """bound * tanh(t / bound): the identity near 0, smoothly bounded to (-bound, bound)."""
    return bound * torch.tanh(t / bound)


class LatentGroup(nn.Module):
    """One latent group z_l (``latent`` channels at the state's resolution) in the top-down path:
    p(z_l | h) and a feature added to the state from ``prior_head`` (none for the top group, whose
    prior is the model's), q(z_l | h, e) as a delta on p from ``posterior_head``, then h + conv1x1(z)
    through ``cells``."""

    def __init__(self, width: int, enc_width: int, latent: int, n_cells: int, activation: str, depth: int,
                 top: bool, mid: int) -> None:
        super().__init__()
        self.width, self.latent = width, latent
        self.prior_head = None if top else Head(width, mid, 2 * latent + width, activation)
        self.posterior_head = Head(width + enc_width, mid, 2 * latent, activation)
        self.z_in = scale_init_(nn.Conv2d(latent, width, 1), 1 / math.sqrt(depth))
        self.cells = cells(n_cells, width, activation, depth, mid)

    def prior(self, h: torch.Tensor) -> tuple[DiagonalGaussian | None, torch.Tensor | None]:
        """p(z_l | z_>l) from the state h (N, width, H, W) as (N, L_l), and the state's feature; None
        for the top group."""
        if self.prior_head is None:
            return None, None
        mu, logvar, feat = self.prior_head(h).split([self.latent, self.latent, self.width], dim=1)
        return DiagonalGaussian(full_precision(mu).flatten(1), soft_clamp(full_precision(logvar)).flatten(1)), feat

    def posterior(self, h: torch.Tensor, e: torch.Tensor, p: DiagonalGaussian | None) -> DiagonalGaussian:
        """q(z_l | x, z_>l) from the state and the bottom-up features e at this resolution: relative to
        p (NVAE's residual parameterisation), or on its own for the top group (p None)."""
        d_mu, d_logvar = full_precision(self.posterior_head(torch.cat([h, e], dim=1))).chunk(2, dim=1)
        d_mu, d_logvar = d_mu.flatten(1), d_logvar.flatten(1)  # (N, L_l)
        if p is None:
            return DiagonalGaussian(d_mu, soft_clamp(d_logvar))
        return DiagonalGaussian(p.mu + d_mu, soft_clamp(p.logvar + d_logvar))

    def absorb(self, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The state after the draw z (N, L_l): cells(h + conv1x1(z as (N, latent, H, W)))."""
        z = z.reshape(h.shape[0], self.latent, *h.shape[2:]).to(h.dtype)
        return self.cells(h + self.z_in(z))


class TopDownVAE(LatentModelBase):
    """Latent groups at the resolutions of ``cfg.hidden`` (``cfg.groups_per_scale`` per resolution, the
    data's first), ``cfg.latent_dim`` channels each, ``cfg.cells_per_group`` residual cells per group
    (``cfg.bottleneck`` of the channels wide inside).

    Parameter names: ``stem``, ``bottom_up[r]`` (resolution r's downsampling and cells), ``h_top`` (the
    top-down state's start), ``groups[g]`` (top-down order, the top group first), ``upsample[r]`` (from
    resolution r+1 to r), ``cells[r]`` (resolutions without groups), ``out`` (the likelihood's
    parameters), ``top_prior``; ``cond_stem``/``cond_top`` for a conditional model."""

    def __init__(self, cfg: ModelConfig, spec: DataSpec) -> None:
        super().__init__()
        self.config, self.spec = cfg, spec
        if not cfg.hidden:
            raise ConfigError("model topdown needs model.hidden: channels at each resolution, e.g. [32, 64]")
        if cfg.upper_latent or cfg.upper_hidden is not None:
            raise ConfigError("model.upper_latent and model.upper_hidden shape the MLP hierarchy (model vae); "
                              "the top-down model's groups are model.groups_per_scale and model.latent_dim")
        if (cfg.encoder, cfg.decoder) != ("mlp", "mlp"):  # the defaults, which it does not read either
            raise ConfigError("model topdown builds its own residual networks (model.hidden, model.cells_per_group): "
                              "leave model.encoder and model.decoder unset")
        widths = tuple(cfg.hidden)
        groups = cfg.groups_per_scale or (0,) * (len(widths) - 1) + (cfg.layers,)
        if groups[-1] < 1:
            raise ConfigError(f"model.groups_per_scale {list(groups)}: the last resolution of model.hidden holds "
                              "the top group, so its count must be >= 1 (drop the resolutions above it)")
        channels, height, width = spec.shape
        self.sizes = resolutions((height, width), len(widths))
        self.widths, self.groups_per_scale = widths, tuple(groups)
        act, n, zc = cfg.activation, cfg.cells_per_group, cfg.latent_dim
        mids = [max(1, round(w * cfg.bottleneck)) for w in widths]  # the width inside cells and heads
        total = sum(groups)

        # bottom-up: stem, then per resolution (downsampling and) n cells per group there (n for none)
        up_cells = [n * max(g, 1) for g in groups]
        self.stem = nn.Conv2d(channels, widths[0], 3, padding=1)
        self.bottom_up = nn.ModuleList(
            nn.Sequential(*([Down(widths[r - 1], widths[r])] if r else []),
                          *cells(up_cells[r], widths[r], act, sum(up_cells), mids[r]))
            for r in range(len(widths)))

        # top-down: h_top, then per resolution from the lowest (upsampling,) its groups (or n plain cells)
        depth = total * (n + 1) + sum(n for g in groups if g == 0)  # residual branches on the top-down path
        self.h_top = nn.Parameter(torch.zeros(1, widths[-1], *self.sizes[-1]))
        self.groups = nn.ModuleList()
        self._scale_of: list[int] = []  # resolution of each group, top-down
        for r in reversed(range(len(widths))):
            for _ in range(groups[r]):
                self.groups.append(LatentGroup(widths[r], widths[r], zc, n, act, depth, not self._scale_of, mids[r]))
                self._scale_of.append(r)
        self.upsample = nn.ModuleList(Up(widths[r + 1], widths[r], self.sizes[r]) for r in range(len(widths) - 1))
        self.cells = nn.ModuleList(cells(n if g == 0 else 0, widths[r], act, depth, mids[r])
                                   for r, g in enumerate(groups))
        k = LIKELIHOODS.get(cfg.likelihood).num_params(channels, cfg)
        self.out = nn.Sequential(ACTIVATIONS.get(act)(), nn.Conv2d(widths[0], k, 3, padding=1))
        self.likelihood = build_likelihood(cfg, channels)

        self.cond_stem = nn.Linear(spec.cond_dim, widths[0]) if spec.cond_dim else None
        self.cond_top = nn.Linear(spec.cond_dim, widths[-1]) if spec.cond_dim else None
        # group sizes, top-down; the contract lists them bottom-up
        self._dims = tuple(zc * self.sizes[r][0] * self.sizes[r][1] for r in self._scale_of)
        self.top_prior = PRIORS.get(cfg.prior)(cfg, spec, self._dims[0])
        self._names = ("z",) if total == 1 else tuple(f"z{i + 1}" for i in range(total))

    @property
    def latent_dims(self) -> tuple[int, ...]:
        return self._dims[::-1]

    def prior(self) -> Distribution:
        return self.top_prior(self)

    # ------------------------------------------------------------------ the two passes
    def _bottom_up(self, x: torch.Tensor, c: torch.Tensor | None) -> list[torch.Tensor]:
        """Features of x (B, C, H, W) at every resolution, the data's first: [(B, hidden[r], H_r, W_r)]."""
        h = self.stem(2 * x - 1)  # pixels in [0, 1] -> [-1, 1]
        if self.cond_stem is not None and c is not None:
            h = h + self.cond_stem(c)[:, :, None, None]
        feats = []
        for stage in self.bottom_up:
            h = stage(h)
            feats.append(h)
        return feats

    def _start(self, n: int, c: torch.Tensor | None) -> torch.Tensor:
        """The top-down state h_0 for n rows: (n, hidden[-1], H_top, W_top)."""
        h = self.h_top.expand(n, -1, -1, -1)
        if self.cond_top is not None and c is not None:
            h = h + self.cond_top(c)[:, :, None, None]
        return h

    def _top_down(
        self, n: int, feats: list[torch.Tensor] | None, c: torch.Tensor | None, choose: Choose, top_prior: bool = True
    ) -> tuple[torch.Tensor, list[tuple[DiagonalGaussian | None, Distribution | None, torch.Tensor]]]:
        """Run the top-down path on n rows: each group's prior from the state, its posterior from the state
        and ``feats`` (None: no posterior), z = choose(index, q, p), the state updated with z. Returns the
        state at the data's resolution and (q, p, z) per group, top-down. ``top_prior`` False: the top
        group's p is None (encoding and decoding do not need it, and a VampPrior costs an encoder pass)."""
        h = self._start(n, c)
        records: list[tuple[DiagonalGaussian | None, Distribution | None, torch.Tensor]] = []
        g = 0
        for r in reversed(range(len(self.widths))):
            if r < len(self.widths) - 1:
                h = self.upsample[r](h)
            for _ in range(self.groups_per_scale[r]):
                group = self.groups[g]
                p_l, feat = group.prior(h)
                q = None if feats is None else group.posterior(h, feats[r], p_l)
                p = p_l if p_l is not None else self.prior() if top_prior else None
                z = choose(g, q, p)
                h = group.absorb(h if feat is None else h + feat, z)
                records.append((q, p, z))
                g += 1
            h = self.cells[r](h)
        return h, records

    def _likelihood(self, h: torch.Tensor) -> Distribution:
        return self.likelihood(full_precision(self.out(h)))

    # ------------------------------------------------------------------ the contract
    def forward(
        self, x: torch.Tensor, c: torch.Tensor | None = None, *, generator: torch.Generator | None = None, k: int = 1
    ) -> ModelOutput:
        b = x.shape[0]
        # (k*B, ...), sample-major, where a group reads them (a resolution without groups needs none)
        feats = [repeat_rows(f, k) if g else f for f, g in zip(self._bottom_up(x, c), self.groups_per_scale,
                                                                 strict=True)]
        h, records = self._top_down(k * b, feats, repeat_rows(c, k), lambda g, q, p: q.rsample(generator))
        px = self._likelihood(h)

        def draws(t: torch.Tensor) -> torch.Tensor:  # (k*B, L) -> (k, B, L)
            return t if k == 1 else t.view(k, b, t.shape[-1])

        layers = []
        for i, (name, (q, p, z)) in enumerate(zip(self._names, reversed(records), strict=True)):
            if i < len(records) - 1:  # p(z_l | z_>l) has a row per draw; the top prior is unbatched
                p = DiagonalGaussian(draws(p.mu), draws(p.logvar))  # type: ignore[attr-defined]
            layers.append(StochasticLayer(name, DiagonalGaussian(draws(q.mu), draws(q.logvar)), p, draws(z)))
        return ModelOutput(px, layers, k)

    def encode(self, x: torch.Tensor, c: torch.Tensor | None = None) -> list[Distribution]:
        """Every group's posterior, bottom-up, each given the posterior means of the groups above."""
        _, records = self._top_down(x.shape[0], self._bottom_up(x, c), c, lambda g, q, p: q.mean, top_prior=False)
        return [q for q, _, _ in reversed(records)]

    def top_posterior(self, x: torch.Tensor, c: torch.Tensor | None = None) -> DiagonalGaussian:
        """q(z_G | x), the top group's posterior alone (what the VampPrior mixes)."""
        return self.groups[0].posterior(self._start(x.shape[0], c), self._bottom_up(x, c)[-1], None)

    def decode(self, z: torch.Tensor, c: torch.Tensor | None = None) -> Distribution:
        return self.decode_layers([z], c)

    def decode_layers(self, zs: Sequence[torch.Tensor], c: torch.Tensor | None = None) -> Distribution:
        """P(X | z_l, ..., z_G) for codes (N, L) of the top ``len(zs)`` groups, given bottom-up (the last
        z_G); the groups below take their prior's mean given everything above."""
        given = list(zs)[::-1]  # top-down

        def choose(g: int, q: DiagonalGaussian | None, p: Distribution | None) -> torch.Tensor:
            return given[g] if g < len(given) else p.mean  # type: ignore[union-attr]  (below the top)

        h, _ = self._top_down(given[0].shape[0], None, c, choose, top_prior=False)
        return self._likelihood(h)

    @torch.no_grad()
    def sample(
        self, n: int, c: torch.Tensor | None = None, *, generator: torch.Generator | None = None,
        temperature: float | Sequence[float] = 1.0, mean: bool = True,
    ) -> torch.Tensor:
        """Ancestral sampling z_G ~ p(z_G), z_l ~ p(z_l | z_>l), each group's spread scaled by its
        temperature (one number, or one per group bottom-up like ``latent_dims``); the image is the
        likelihood's mean (or a draw)."""
        temps = layer_temperatures(temperature, len(self._dims))[::-1]  # top-down

        def choose(g: int, q: DiagonalGaussian | None, p: Distribution | None) -> torch.Tensor:
            assert p is not None
            return p.sample_n(n, generator, temps[g]) if g == 0 else p.sample_n(1, generator, temps[g])[0]

        h, _ = self._top_down(n, None, c, choose)
        px = self._likelihood(h)
        return px.mean if mean else px.sample(generator)


MODELS.add("topdown", TopDownVAE)
