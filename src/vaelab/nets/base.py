"""Encoder/decoder network registries and the shared interface.

An encoder maps x (B, C, H, W) and an optional condition c (B, cond_dim) to ``out_features``
numbers per image (a Gaussian posterior's [mu, logvar]: 2 * latent size). A decoder maps a vector
(B, in_features) (a latent z; zero-sized for a model with no latent) and c to ``out_shape``
(B, K, H, W), the likelihood's raw parameters, K = likelihood.num_params(C). Sizes are given
explicitly, so a model can use the same networks between any of its layers; ``cfg`` gives the
widths (``hidden``) and the activation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from ..config import ModelConfig
from ..registry import Registry

ACTIVATIONS: Registry[Callable[[], nn.Module]] = Registry("activation")
ACTIVATIONS.add("relu", nn.ReLU)
ACTIVATIONS.add("tanh", nn.Tanh)
ACTIVATIONS.add("elu", nn.ELU)
ACTIVATIONS.add("gelu", nn.GELU)
ACTIVATIONS.add("silu", nn.SiLU)
ACTIVATIONS.add("leaky-relu", lambda: nn.LeakyReLU(0.2))
ACTIVATIONS.add("softplus", nn.Softplus)


class FeatureBatchNorm(nn.BatchNorm1d):
    """Batch normalisation (Ioffe & Szegedy 2015) of the last dimension of (..., D) features, every
    leading dimension (the batch, and the k draws of an importance-weighted pass) one population.

    Training normalises by the batch's statistics and updates the running ones; evaluation (``eval()``:
    every bound, sample and export) by the running ones, so a datapoint's score never depends on the
    other images of its batch. A training batch of one row has no spread to normalise by: it is
    normalised by the running statistics and leaves them as they are."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if self.training and flat.shape[0] < 2:
            out = F.batch_norm(flat, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        else:
            out = super().forward(flat)
        return out.view(x.shape)


# model.norm: name -> the normalisation of a hidden layer of width D (None: none, and no module, so the
# parameter names of models without one are those they always had)
NORMS: Registry[Callable[[int], nn.Module] | None] = Registry("normalisation")
NORMS.add("none", None)
NORMS.add("batch", FeatureBatchNorm)


def hidden_activation(width: int, activation: str, norm: str = "none") -> list[nn.Module]:
    """What follows a hidden linear layer of ``width`` units: its normalisation (if ``norm`` has one),
    then the activation."""
    make = NORMS.get(norm)
    return [*(() if make is None else (make(width),)), ACTIVATIONS.get(activation)()]

# name -> class(cfg, input_shape, cond_dim, out_features) for encoders,
#         class(cfg, in_features, cond_dim, out_shape) for decoders
ENCODERS: Registry[Callable[..., nn.Module]] = Registry("encoder")
DECODERS: Registry[Callable[..., nn.Module]] = Registry("decoder")


def build_encoder(cfg: ModelConfig, input_shape: tuple[int, int, int], cond_dim: int, out_features: int) -> nn.Module:
    return ENCODERS.get(cfg.encoder)(cfg, input_shape, cond_dim, out_features)


def build_decoder(cfg: ModelConfig, in_features: int, cond_dim: int, out_shape: tuple[int, int, int]) -> nn.Module:
    return DECODERS.get(cfg.decoder)(cfg, in_features, cond_dim, out_shape)
