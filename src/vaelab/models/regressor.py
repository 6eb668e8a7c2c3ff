"""The regressor baseline of Doersch (2016, Sec. 4.2): the CVAE's decoder with no latent variable,
predicting Y from X alone and trained on the same likelihood by maximising log P(Y|X).

It is the model with zero stochastic layers: its forward returns the likelihood and an empty list of
layers, so its KL is 0 by structure and every importance weight is P(Y|X): the ELBO, L_k and the
training loss are all log P(Y|X), with training, checkpoints and evaluation shared with every model.
"""

from __future__ import annotations

import torch

from ..config import DataSpec, ModelConfig
from ..distributions import Distribution, build_likelihood
from ..distributions.likelihoods import LIKELIHOODS
from ..errors import ConfigError
from ..nets import build_decoder
from .base import MODELS, LatentModelBase, ModelOutput, full_precision, repeat_rows
from .vae import require_condition


@MODELS.register("regressor")
class Regressor(LatentModelBase):
    """P(Y|X) = likelihood(decoder(c)): the same decoder network as the (C)VAE, no z, no encoder."""

    def __init__(self, cfg: ModelConfig, spec: DataSpec) -> None:
        require_condition(cfg)
        if cfg.prior != "standard" or cfg.layers != 1:
            raise ConfigError("model 'regressor' has no latent variables: model.prior and model.layers do not apply "
                              "(leave them at standard and 1)")
        super().__init__()
        self.config, self.spec = cfg, spec
        c = spec.shape[0]
        k = LIKELIHOODS.get(cfg.likelihood).num_params(c, cfg)
        self.likelihood = build_likelihood(cfg, c)
        self.decoder = build_decoder(cfg, 0, spec.cond_dim, (k, *spec.shape[1:]))

    @property
    def latent_dims(self) -> tuple[int, ...]:
        return ()

    def encode(self, x: torch.Tensor, c: torch.Tensor | None = None) -> list[Distribution]:
        return []

    def decode(self, z: torch.Tensor, c: torch.Tensor | None = None) -> Distribution:
        if c is None:
            raise ConfigError("the regressor predicts from its condition c: give one")
        return self.likelihood(full_precision(self.decoder(c.new_zeros(c.shape[0], 0), c)))  # (N, K, H, W)

    def prior(self) -> Distribution:
        raise ConfigError("the regressor has no latent variable, so no prior")

    def forward(
        self, x: torch.Tensor, c: torch.Tensor | None = None, *, generator: torch.Generator | None = None, k: int = 1
    ) -> ModelOutput:
        # The k "draws" are identical (there is nothing to draw); they are kept so that every model
        # hands the objective the same shapes.
        return ModelOutput(self.decode(x, repeat_rows(c, k)), [], k)

    @torch.no_grad()
    def sample(
        self, n: int, c: torch.Tensor | None = None, *, generator: torch.Generator | None = None,
        temperature: float = 1.0, mean: bool = True,
    ) -> torch.Tensor:
        px = self.decode(torch.empty(n, 0), c)
        return px.mean if mean else px.sample(generator)
