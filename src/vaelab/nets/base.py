"""Encoder/decoder network registries and the shared interface.

An encoder maps x (B, C, H, W) and an optional condition c (B, cond_dim) to the posterior's
parameters (B, 2 * latent_dim) = [mu, logvar]. A decoder maps z (B, latent_dim) and c to the
likelihood's raw parameters (B, K, H, W), K = likelihood.num_params(C).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

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

# name -> class(cfg: ModelConfig, out_channels: int) for decoders, class(cfg) for encoders
ENCODERS: Registry[Callable[..., nn.Module]] = Registry("encoder")
DECODERS: Registry[Callable[..., nn.Module]] = Registry("decoder")


def build_encoder(cfg: ModelConfig) -> nn.Module:
    return ENCODERS.get(cfg.encoder)(cfg)


def build_decoder(cfg: ModelConfig, out_channels: int) -> nn.Module:
    return DECODERS.get(cfg.decoder)(cfg, out_channels)
