"""Fully connected encoder/decoder (Kingma & Welling 2014; Doersch 2016, Sec. 4.1)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ModelConfig
from .base import ACTIVATIONS, DECODERS, ENCODERS


def mlp(sizes: list[int], activation: str) -> nn.Sequential:
    """Linear layers with ``activation`` between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS.get(activation)())
    return nn.Sequential(*layers)


@ENCODERS.register("mlp")
class MLPEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = math.prod(cfg.input_shape)
        self.net = mlp([d + cfg.cond_dim, *cfg.hidden, 2 * cfg.latent_dim], cfg.activation)

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        h = x.flatten(1)  # (B, C*H*W)
        if c is not None:
            h = torch.cat([h, c], dim=1)
        return self.net(h)  # (B, 2*latent)


@DECODERS.register("mlp")
class MLPDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig, out_channels: int) -> None:
        super().__init__()
        _, hgt, wid = cfg.input_shape
        self.out_shape = (out_channels, hgt, wid)
        self.net = mlp([cfg.latent_dim + cfg.cond_dim, *reversed(cfg.hidden), out_channels * hgt * wid], cfg.activation)

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        if c is not None:
            z = torch.cat([z, c], dim=-1)
        h = self.net(z)  # (..., K*H*W)
        return h.unflatten(-1, self.out_shape)  # (..., K, H, W)
