"""Fully connected encoder/decoder (Kingma & Welling 2014; Doersch 2016, Sec. 4.1)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ModelConfig
from .base import DECODERS, ENCODERS, hidden_activation


def mlp(sizes: list[int], activation: str, norm: str = "none") -> nn.Sequential:
    """``nn.Linear`` layers with ``activation`` between them (none after the last), each hidden layer
    normalised first when ``norm`` (``model.norm``) names a normalisation."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers += hidden_activation(b, activation, norm)
    return nn.Sequential(*layers)


@ENCODERS.register("mlp")
class MLPEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig, input_shape: tuple[int, int, int], cond_dim: int, out_features: int) -> None:
        super().__init__()
        self.net = mlp([math.prod(input_shape) + cond_dim, *cfg.hidden, out_features], cfg.activation, cfg.norm)

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        h = x.flatten(1)  # (B, C*H*W)
        if c is not None:
            h = torch.cat([h, c], dim=1)
        return self.net(h)  # (B, out_features)


@DECODERS.register("mlp")
class MLPDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig, in_features: int, cond_dim: int, out_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.out_shape = out_shape
        self.net = mlp([in_features + cond_dim, *reversed(cfg.hidden), math.prod(out_shape)], cfg.activation, cfg.norm)

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        if c is not None:
            z = torch.cat([z, c], dim=-1)
        h = self.net(z)  # (..., K*H*W)
        return h.unflatten(-1, self.out_shape)  # (..., K, H, W)
