"""Residual cells and resolution changes for hierarchical convolutional VAEs (NVAE, Vahdat & Kautz
2020; VDVAE, Child 2021), used by :mod:`vaelab.models.topdown`.

A cell is x + s * f(x), f = conv3x3(act(conv3x3(act(x)))) (pre-activation, He et al. 2016), with the
last convolution of f started at 1/sqrt(depth) of PyTorch's initialisation: a path of ``depth`` cells
then starts with activations whose variance grows by about (1 + 1/depth) per cell, e^1 in all, not
2^depth (VDVAE scales the last convolution of every block by sqrt(1/n_blocks) for the same reason).
Resolutions halve (rounded up: 28 -> 14 -> 7 -> 4) by 2x2 average pooling and are restored exactly by
nearest-neighbour upsampling to the size recorded on the way down, so images of any size work.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import ACTIVATIONS


def scale_init_(conv: nn.Conv2d, factor: float) -> nn.Conv2d:
    """Multiply a convolution's initial weights by ``factor`` (0: the branch starts switched off)."""
    with torch.no_grad():
        conv.weight.mul_(factor)
        if conv.bias is not None:
            conv.bias.mul_(factor)
    return conv


class ResidualCell(nn.Module):
    """x + conv3x3(act(conv3x3(act(x)))): channels and resolution kept; the second convolution's
    initial weights scaled by ``init_scale`` (1/sqrt(cells on the path))."""

    def __init__(self, channels: int, activation: str, init_scale: float = 1.0) -> None:
        super().__init__()
        self.body = nn.Sequential(
            ACTIVATIONS.get(activation)(),
            nn.Conv2d(channels, channels, 3, padding=1),
            ACTIVATIONS.get(activation)(),
            scale_init_(nn.Conv2d(channels, channels, 3, padding=1), init_scale),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def cells(n: int, channels: int, activation: str, depth: int) -> nn.Sequential:
    """n residual cells, each scaled for a path of ``depth`` cells in all."""
    return nn.Sequential(*(ResidualCell(channels, activation, 1 / math.sqrt(max(depth, 1))) for _ in range(n)))


class Head(nn.Module):
    """conv3x3 -> act -> conv1x1: a map's features (N, C_in, H, W) -> distribution parameters
    (N, C_out, H, W). ``init_scale`` 0 starts the output at exactly 0 (a prior at N(0, I), a posterior
    at its prior), from which gradients still reach the last convolution's weights."""

    def __init__(self, c_in: int, width: int, c_out: int, activation: str, init_scale: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(c_in, width, 3, padding=1),
            ACTIVATIONS.get(activation)(),
            scale_init_(nn.Conv2d(width, c_out, 1), init_scale),
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


def halve(size: tuple[int, int]) -> tuple[int, int]:
    """The next resolution down: each side halved, rounded up."""
    return (size[0] + 1) // 2, (size[1] + 1) // 2


def resolutions(size: tuple[int, int], scales: int) -> list[tuple[int, int]]:
    """(H, W) of each scale, the data's first: [(28, 28), (14, 14), (7, 7), (4, 4)] for 4 scales."""
    out = [size]
    for _ in range(scales - 1):
        out.append(halve(out[-1]))
    return out


class Down(nn.Module):
    """(N, C_in, H, W) -> (N, C_out, ceil(H/2), ceil(W/2)): 2x2 average pooling (a partial window at
    an odd edge averages what it covers), then a 1x1 convolution where the channel count changes."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.avg_pool2d(x, 2, ceil_mode=True))


class Up(nn.Module):
    """(N, C_in, h, w) -> (N, C_out, H, W) at the recorded size: nearest-neighbour upsampling, then a
    1x1 convolution where the channel count changes."""

    def __init__(self, c_in: int, c_out: int, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = size
        self.proj = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.interpolate(x, size=self.size, mode="nearest"))
