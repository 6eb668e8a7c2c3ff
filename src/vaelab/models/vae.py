"""The variational autoencoder of Kingma & Welling (2014) / Doersch (2016):
P(X) = ∫ P(X|z; θ) P(z) dz with an amortised posterior Q(z|X) = N(μ(X), diag σ²(X)), and its
extensions that reach the papers' numbers:

* several stochastic layers (Burda et al. 2016, Sec. 5), ``model.layers``:
  q(z1|x) q(z2|z1) ... q(z_L|z_{L-1}) and p(z_L) p(z_{L-1}|z_L) ... p(z1|z2) p(x|z1), every
  conditional a diagonal Gaussian given by an MLP (the image networks between x and z1, MLPs of
  ``upper_hidden`` widths between stochastic layers);
* a learned prior on the top layer, ``model.prior`` (:mod:`vaelab.models.priors`): N(0, I), a
  mixture of Gaussians, or the VampPrior (Tomczak & Welling 2018).

An optional condition ``c`` (B, cond_dim) is fed to the image networks (q(z1|x, c) and p(x|z1, c));
with it the same module is the conditional VAE of Sohn et al. (2015) / Doersch Sec. 3, whose prior
does not depend on c.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..config import DataSpec, ModelConfig
from ..distributions import Distribution, build_likelihood
from ..distributions.likelihoods import LIKELIHOODS
from ..distributions.normal import DiagonalGaussian
from ..errors import ConfigError
from ..nets import build_decoder, build_encoder
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


def gaussian(h: torch.Tensor) -> DiagonalGaussian:
    """A network's output (..., 2L) as N(mu, diag exp(logvar)), in float32 at the boundary: under
    bf16/fp16 autocast the networks run in low precision, the distributions (log-densities, KLs and
    their sums) in float32 (a no-op for fp32 runs)."""
    mu, logvar = full_precision(h).chunk(2, dim=-1)
    return DiagonalGaussian(mu, logvar)


class VAE(LatentModelBase):
    """Gaussian stochastic layers of sizes ``cfg.latent_dims`` under the prior ``cfg.prior``.

    Parameter names: ``encoder``/``decoder`` (x <-> z1), ``up[l]`` (q(z_{l+2}|z_{l+1})), ``down[l]``
    (p(z_{l+1}|z_{l+2})), ``top_prior`` (the prior's parameters, none for N(0, I)): a one-layer VAE
    under N(0, I) has exactly the parameters of vaelab's first VAE, whose checkpoints it loads."""

    def __init__(self, cfg: ModelConfig, spec: DataSpec) -> None:
        super().__init__()
        self.config, self.spec = cfg, spec
        dims = cfg.latent_dims
        c = spec.shape[0]
        k = LIKELIHOODS.get(cfg.likelihood).num_params(c, cfg)
        self.likelihood = build_likelihood(cfg, c)
        self.encoder = build_encoder(cfg, spec.shape, spec.cond_dim, 2 * dims[0])
        self.decoder = build_decoder(cfg, dims[0], spec.cond_dim, (k, *spec.shape[1:]))
        if len(dims) > 1:
            pairs = list(zip(dims[:-1], dims[1:], strict=True))  # (lower, upper) sizes
            widths = [(lo, lo) if cfg.upper_hidden is None else cfg.upper_hidden for lo, _ in pairs]
            self.up = nn.ModuleList(mlp([lo, *w, 2 * hi], cfg.activation, cfg.norm) for (lo, hi), w in zip(pairs, widths,
                                                                                                    strict=True))
            self.down = nn.ModuleList(mlp([hi, *w, 2 * lo], cfg.activation, cfg.norm) for (lo, hi), w in zip(pairs, widths,
                                                                                                      strict=True))
        self.top_prior = PRIORS.get(cfg.prior)(cfg, spec, dims[-1])
        self._names = ("z",) if len(dims) == 1 else tuple(f"z{i + 1}" for i in range(len(dims)))

    @property
    def latent_dims(self) -> tuple[int, ...]:
        return self.config.latent_dims

    def _up(self) -> list[nn.Module]:
        return list(self.up) if len(self.latent_dims) > 1 else []

    def _down(self) -> list[nn.Module]:
        return list(self.down) if len(self.latent_dims) > 1 else []

    def prior(self) -> Distribution:
        return self.top_prior(self)

    def posterior(self, x: torch.Tensor, c: torch.Tensor | None = None) -> DiagonalGaussian:
        """Q(z1 | X): (B, L1)."""
        return gaussian(self.encoder(x, c))

    def encode(self, x: torch.Tensor, c: torch.Tensor | None = None) -> list[Distribution]:
        qs = [self.posterior(x, c)]
        for up in self._up():  # a layer above sees the posterior mean of the one below
            qs.append(gaussian(up(qs[-1].mean)))
        return qs

    def top_posterior(self, x: torch.Tensor, c: torch.Tensor | None = None) -> DiagonalGaussian:
        """Q(z_top | X) along the posterior means of the layers below (what the VampPrior mixes)."""
        return self.encode(x, c)[-1]  # type: ignore[return-value]

    def decode(self, z: torch.Tensor, c: torch.Tensor | None = None) -> Distribution:
        return self.decode_layers([z], c)

    def decode_layers(self, zs: Sequence[torch.Tensor], c: torch.Tensor | None = None) -> Distribution:
        """P(X | z_l, ..., z_L) for codes of the top ``len(zs)`` layers (bottom-up); the layers below
        take their prior's mean. The chain is Markov: only the lowest given code matters."""
        z, start = zs[0], len(self.latent_dims) - len(zs)
        for down in reversed(self._down()[:start]):
            z = gaussian(down(z)).mean
        return self.likelihood(full_precision(self.decoder(z, c)))

    def forward(
        self, x: torch.Tensor, c: torch.Tensor | None = None, *, generator: torch.Generator | None = None, k: int = 1
    ) -> ModelOutput:
        q = self.posterior(x, c)
        z = q.rsample(generator, sample_shape=() if k == 1 else (k,))  # (B, L1) or (k, B, L1)
        qs, zs = [q], [z]
        for up in self._up():  # q(z_{l+1} | z_l): batch (B,) or (k, B) like the draw below
            qs.append(gaussian(up(zs[-1])))
            zs.append(qs[-1].rsample(generator))
        ps = [gaussian(down(z_above)) for down, z_above in zip(self._down(), zs[1:], strict=True)]
        ps.append(self.prior())  # p(z_L)
        px = self.likelihood(full_precision(self.decoder(flat_draws(zs[0], k), repeat_rows(c, k))))
        top = len(zs) - 1  # every prior below the top is p(z_l | z_{l+1}) at z_{l+1} ~ q(. | z_l): its own draw's child
        layers = [StochasticLayer(n, q, p, z, prior_depends_on_z=i < top)
                  for i, (n, q, p, z) in enumerate(zip(self._names, qs, ps, zs, strict=True))]
        return ModelOutput(px, layers, k)

    @torch.no_grad()
    def sample(
        self, n: int, c: torch.Tensor | None = None, *, generator: torch.Generator | None = None,
        temperature: float | Sequence[float] = 1.0, mean: bool = True,
    ) -> torch.Tensor:
        """Ancestral sampling: z_L ~ p(z_L), then z_l ~ p(z_l | z_{l+1}), each spread scaled by its
        layer's temperature (one number, or one per layer bottom-up); the image is the likelihood's
        mean (or a draw)."""
        temps = layer_temperatures(temperature, len(self.latent_dims))
        z = self.prior().sample_n(n, generator, temps[-1])  # (n, L_top)
        for down, t in zip(reversed(self._down()), reversed(temps[:-1]), strict=True):
            z = gaussian(down(z)).sample_n(1, generator, t)[0]
        px = self.likelihood(full_precision(self.decoder(z, c)))
        return px.mean if mean else px.sample(generator)


def require_condition(cfg: ModelConfig) -> None:
    if cfg.condition == "none":
        from ..conditioning import CONDITIONS

        known = ", ".join(n for n in CONDITIONS if n != "none")
        raise ConfigError(f"model {cfg.model!r} needs a condition (model.condition / --condition): {known} "
                          "(mask takes a path: mask:PATH)")


@MODELS.register("cvae")
class CVAE(VAE):
    """The conditional VAE (Doersch 2016, Sec. 3): the VAE above with a condition it cannot do without."""

    def __init__(self, cfg: ModelConfig, spec: DataSpec) -> None:
        require_condition(cfg)
        super().__init__(cfg, spec)


MODELS.add("vae", VAE)
