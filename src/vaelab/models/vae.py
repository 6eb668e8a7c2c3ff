"""The variational autoencoder of Kingma & Welling (2014) / Doersch (2016):
P(X) = ∫ P(X|z; θ) P(z) dz with P(z) = N(0, I) and an amortised posterior Q(z|X) = N(μ(X), diag σ²(X)).

An optional condition ``c`` (B, cond_dim) is fed to both networks; with it the same module is the
conditional VAE of Sohn et al. (2015) / Doersch Sec. 3, whose prior P(z|c) stays N(0, I).
"""

from __future__ import annotations

import torch

from ..config import DataSpec, ModelConfig
from ..distributions import Distribution, StandardNormal, build_likelihood
from ..distributions.likelihoods import LIKELIHOODS
from ..distributions.normal import DiagonalGaussian
from ..errors import ConfigError
from ..nets import build_decoder, build_encoder
from .base import (
    MODELS,
    LatentModelBase,
    ModelOutput,
    StochasticLayer,
    flat_draws,
    full_precision,
    repeat_rows,
)


class VAE(LatentModelBase):
    """One Gaussian stochastic layer z (``latent_dim``) under the prior N(0, I)."""

    def __init__(self, cfg: ModelConfig, spec: DataSpec) -> None:
        super().__init__()
        self.config, self.spec = cfg, spec
        c = spec.shape[0]
        k = LIKELIHOODS.get(cfg.likelihood).num_params(c, cfg)
        self.likelihood = build_likelihood(cfg, c)
        self.encoder = build_encoder(cfg, spec.shape, spec.cond_dim, 2 * cfg.latent_dim)
        self.decoder = build_decoder(cfg, cfg.latent_dim, spec.cond_dim, (k, *spec.shape[1:]))

    @property
    def latent_dims(self) -> tuple[int, ...]:
        return (self.config.latent_dim,)

    def prior(self) -> StandardNormal:
        return StandardNormal(self.config.latent_dim, device=self.device)

    def posterior(self, x: torch.Tensor, c: torch.Tensor | None = None) -> DiagonalGaussian:
        # float32 at the boundary: under bf16/fp16 autocast the networks run in low precision, the
        # distributions (their log-densities, KLs and sums) in float32 (a no-op for fp32 runs).
        mu, logvar = full_precision(self.encoder(x, c)).chunk(2, dim=-1)  # (B, L) each
        return DiagonalGaussian(mu, logvar)

    def encode(self, x: torch.Tensor, c: torch.Tensor | None = None) -> list[Distribution]:
        return [self.posterior(x, c)]

    def decode(self, z: torch.Tensor, c: torch.Tensor | None = None) -> Distribution:
        return self.likelihood(full_precision(self.decoder(z, c)))

    def forward(
        self, x: torch.Tensor, c: torch.Tensor | None = None, *, generator: torch.Generator | None = None, k: int = 1
    ) -> ModelOutput:
        q = self.posterior(x, c)
        z = q.rsample(generator, sample_shape=() if k == 1 else (k,))  # (B, L) or (k, B, L)
        px = self.decode(flat_draws(z, k), repeat_rows(c, k))
        return ModelOutput(px, [StochasticLayer("z", q, self.prior(), z)], k)


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
