"""The regressor baseline of Doersch (2016, Sec. 4.2): the CVAE's decoder with no latent variable,
predicting Y from X alone and trained on the same likelihood by maximising log P(Y|X).

It reuses the ELBO rather than copying it: its "posterior" Q(z|Y,X) is the prior N(0, I) itself and
its decoder ignores z (it is fed zeros in z's place, which is the same function as removing those
inputs). So KL(Q || P) = 0 exactly, every importance weight P(Y|X,z) P(z) / Q(z) equals P(Y|X),
and the ELBO, L_k and the training loss are all log P(Y|X): training, checkpoints and evaluation
are shared with every other model. ``latent_dim`` only sizes the ignored z (1 is enough).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from ..distributions import Distribution, build_likelihood
from ..distributions.likelihoods import LIKELIHOODS
from ..distributions.normal import DiagonalGaussian
from ..nets import build_decoder
from .vae import MODELS, VAE


@MODELS.register("regressor")
class Regressor(VAE):
    """P(Y|X) = likelihood(decoder(c)): the same decoder network as the (C)VAE, no z, no encoder."""

    def __init__(self, cfg: ModelConfig) -> None:
        nn.Module.__init__(self)
        self.cfg = cfg
        self.likelihood = build_likelihood(cfg)
        k = LIKELIHOODS.get(cfg.likelihood).num_params(cfg.input_shape[0], cfg)
        self.decoder = build_decoder(cfg, k)

    def encode(self, x: torch.Tensor, c: torch.Tensor | None = None) -> DiagonalGaussian:
        # Q(z|Y,X) = P(z) = N(0, I): no information about the data reaches z.
        zeros = x.new_zeros(x.shape[0], self.cfg.latent_dim)
        return DiagonalGaussian(zeros, zeros)

    def decode(self, z: torch.Tensor, c: torch.Tensor | None = None) -> Distribution:
        return self.likelihood(self.decoder(torch.zeros_like(z), c))  # z ignored: (..., K, H, W)
