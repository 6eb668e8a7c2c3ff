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

# name -> class(cfg, input_shape, cond_dim, out_features) for encoders,
#         class(cfg, in_features, cond_dim, out_shape) for decoders
ENCODERS: Registry[Callable[..., nn.Module]] = Registry("encoder")
DECODERS: Registry[Callable[..., nn.Module]] = Registry("decoder")


def build_encoder(cfg: ModelConfig, input_shape: tuple[int, int, int], cond_dim: int, out_features: int) -> nn.Module:
    return ENCODERS.get(cfg.encoder)(cfg, input_shape, cond_dim, out_features)


def build_decoder(cfg: ModelConfig, in_features: int, cond_dim: int, out_shape: tuple[int, int, int]) -> nn.Module:
    return DECODERS.get(cfg.decoder)(cfg, in_features, cond_dim, out_shape)
