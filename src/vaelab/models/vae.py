"""The variational autoencoder of Kingma & Welling (2014) / Doersch (2016):
P(X) = ∫ P(X|z; θ) P(z) dz with P(z) = N(0, I) and an amortised posterior Q(z|X) = N(μ(X), diag σ²(X)).

An optional condition ``c`` (B, cond_dim) is fed to both networks; with it the same module is the
conditional VAE of Sohn et al. (2015) / Doersch Sec. 3, whose prior P(z|c) stays N(0, I).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import ModelConfig
from ..distributions import Distribution, StandardNormal, build_likelihood
from ..distributions.likelihoods import LIKELIHOODS
from ..distributions.normal import DiagonalGaussian
from ..errors import ConfigError
from ..nets import build_decoder, build_encoder
from ..registry import Registry


def repeat_rows(t: torch.Tensor | None, k: int) -> torch.Tensor | None:
    """(B, ...) -> (k*B, ...), sample-major, for k draws per row; a broadcast batch of 1 stays as is."""
    if t is None or k == 1 or t.shape[0] == 1:
        return t
    return t.expand(k, *t.shape).reshape(k * t.shape[0], *t.shape[1:])


@dataclass
class VAEOutput:
    posterior: DiagonalGaussian  # Q(z|X), batch (B,), event (latent_dim,)
    z: torch.Tensor  # (B, latent_dim) reparameterised draw, or (k, B, latent_dim) with k draws
    likelihood: Distribution  # P(X|z), batch (B,) or (k*B,), event (C, H, W)


class VAE(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.likelihood = build_likelihood(cfg)
        k = LIKELIHOODS.get(cfg.likelihood).num_params(cfg.input_shape[0], cfg)
        self.encoder = build_encoder(cfg)
        self.decoder = build_decoder(cfg, k)

    @property
    def latent_dim(self) -> int:
        return self.cfg.latent_dim

    def prior(self) -> StandardNormal:
        return StandardNormal(self.cfg.latent_dim, device=self.device)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def encode(self, x: torch.Tensor, c: torch.Tensor | None = None) -> DiagonalGaussian:
        mu, logvar = self.encoder(x, c).chunk(2, dim=-1)  # (B, L) each
        return DiagonalGaussian(mu, logvar)

    def decode(self, z: torch.Tensor, c: torch.Tensor | None = None) -> Distribution:
        return self.likelihood(self.decoder(z, c))

    def forward(
        self, x: torch.Tensor, c: torch.Tensor | None = None, generator: torch.Generator | None = None, k: int = 1
    ) -> VAEOutput:
        """Encode, draw k reparameterised z per x, decode. With k > 1, z is (k, B, L) and the likelihood
        covers the k*B rows sample-major (row i*B + b is sample i of x[b])."""
        q = self.encode(x, c)
        if k == 1:
            z = q.rsample(generator)
            return VAEOutput(q, z, self.decode(z, c))
        z = q.rsample(generator, sample_shape=(k,))  # (k, B, L)
        return VAEOutput(q, z, self.decode(z.flatten(0, 1), repeat_rows(c, k)))

    @torch.no_grad()
    def sample(
        self,
        n: int,
        c: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
        mean: bool = True,
    ) -> torch.Tensor:
        """Decode z ~ N(0, temperature² I): the likelihood's mean (default) or a draw. (n, C, H, W)."""
        z = self.prior().sample_n(n, generator, temperature)
        px = self.decode(z, c)
        return px.mean if mean else px.sample(generator)


MODELS: Registry[type[nn.Module]] = Registry("model")
MODELS.add("vae", VAE)


@MODELS.register("cvae")
class CVAE(VAE):
    """The conditional VAE (Doersch 2016, Sec. 3): the VAE above with a condition it cannot do without."""

    def __init__(self, cfg: ModelConfig) -> None:
        if cfg.condition == "none":
            from ..conditioning import CONDITIONS

            known = ", ".join(n for n in CONDITIONS if n != "none")
            raise ConfigError(f"model 'cvae' needs a condition (model.condition / --condition): {known} "
                              "(mask takes a path: mask:PATH)")
        super().__init__(cfg)


def build_model(cfg: ModelConfig) -> nn.Module:
    return MODELS.get(cfg.model)(cfg)
