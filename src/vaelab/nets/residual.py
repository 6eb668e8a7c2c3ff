"""Residual cells and resolution changes for hierarchical convolutional VAEs (NVAE, Vahdat & Kautz
2020; VDVAE, Child 2021), used by :mod:`vaelab.models.topdown`.

A cell is x + f(x), f = conv3x3(act(conv3x3(act(x)))) (pre-activation, He et al. 2016), or with a
bottleneck (inner width m < channels) VDVAE's block f = conv1x1(act(conv3x3(act(conv3x3(act(conv1x1(act(x)))))))),
C -> m -> m -> m -> C. The last convolution of f starts at 1/sqrt(depth) of PyTorch's initialisation: a
path of ``depth`` cells then starts with activations whose variance grows by roughly (1 + c/depth) per
cell, e^c in all, not (1 + c)^depth (VDVAE scales the last convolution of every block by
sqrt(1/n_blocks) for the same reason).
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
    """x + f(x), channels and resolution kept: f = conv3x3(act(conv3x3(act(x)))), or VDVAE's bottleneck
    block 1x1 -> 3x3 -> 3x3 -> 1x1 through ``mid`` < channels; the last convolution's initial weights
    scaled by ``init_scale`` (1/sqrt(cells on the path))."""

    def __init__(self, channels: int, activation: str, init_scale: float = 1.0, mid: int | None = None) -> None:
        super().__init__()
        mid = channels if mid is None else mid
        widths = [channels, channels, channels] if mid >= channels else [channels, mid, mid, mid, channels]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            k = 1 if mid < channels and i in (0, len(widths) - 2) else 3  # the bottleneck's 1x1 ends
            layers += [ACTIVATIONS.get(activation)(), nn.Conv2d(a, b, k, padding=k // 2)]
        scale_init_(layers[-1], init_scale)
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def cells(n: int, channels: int, activation: str, depth: int, mid: int | None = None) -> nn.Sequential:
    """n residual cells (inner width ``mid``), each scaled for a path of ``depth`` cells in all."""
    scale = 1 / math.sqrt(max(depth, 1))
    return nn.Sequential(*(ResidualCell(channels, activation, scale, mid) for _ in range(n)))


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
