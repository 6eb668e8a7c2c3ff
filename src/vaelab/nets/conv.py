"""Convolutional encoder/decoder for images of any size and channel count (DCGAN-style strided
convolutions, Radford et al. 2016), and a residual variant (He et al. 2016, pre-activation blocks).

``ModelConfig.hidden`` gives the channels of each stage; each stage halves the resolution (stride-2,
4x4 kernels), so (32, 64) takes 28x28 to 7x7 and 32x32 to 8x8, and (32, 64, 128) takes 64x64 to 8x8.
The decoder mirrors the encoder stage by stage and restores odd sizes exactly (output padding).
The condition c is concatenated to the flattened features in the encoder and to z in the decoder.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError
from .base import ACTIVATIONS, DECODERS, ENCODERS


class ResBlock(nn.Module):
    """x + conv3x3(act(conv3x3(act(x)))): pre-activation residual block, channels kept."""

    def __init__(self, channels: int, activation: str) -> None:
        super().__init__()
        self.body = nn.Sequential(
            ACTIVATIONS.get(activation)(),
            nn.Conv2d(channels, channels, 3, padding=1),
            ACTIVATIONS.get(activation)(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def stage_sizes(size: int, stages: int) -> list[int]:
    """Spatial sizes after each stride-2 stage (kernel 4, padding 1: floor(n / 2))."""
    out = [size]
    for _ in range(stages):
        out.append(out[-1] // 2)
    return out


def _check(cfg: ModelConfig, shape: tuple[int, int, int]) -> None:
    _, h, w = shape
    if not cfg.hidden:
        raise ConfigError("conv nets need model.hidden: channels per stage, e.g. (32, 64)")
    if min(h, w) < 2 ** len(cfg.hidden):
        raise ConfigError(
            f"model.hidden has {len(cfg.hidden)} stride-2 stages, too many for {h}x{w} images; use fewer"
        )


class ConvEncoder(nn.Module):
    """x (B, C, H, W) -> stages of [conv 4x4 stride 2, act, (res blocks)] -> flatten ++ c -> (B, out_features)."""

    blocks = 0  # residual blocks per stage

    def __init__(self, cfg: ModelConfig, input_shape: tuple[int, int, int], cond_dim: int, out_features: int) -> None:
        super().__init__()
        _check(cfg, input_shape)
        c_in, h, w = input_shape
        layers: list[nn.Module] = []
        for width in cfg.hidden:
            layers += [nn.Conv2d(c_in, width, 4, stride=2, padding=1), ACTIVATIONS.get(cfg.activation)()]
            layers += [ResBlock(width, cfg.activation) for _ in range(self.blocks)]
            c_in = width
        self.features = nn.Sequential(*layers)
        n = len(cfg.hidden)
        feat = cfg.hidden[-1] * stage_sizes(h, n)[-1] * stage_sizes(w, n)[-1]
        self.head = nn.Linear(feat + cond_dim, out_features)

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        h = self.features(x).flatten(1)  # (B, C' * H' * W')
        if c is not None:
            h = torch.cat([h, c], dim=1)
        return self.head(h)  # (B, out_features)


class ConvDecoder(nn.Module):
    """z ++ c -> linear -> (hidden[-1], H', W') -> stages of [(res blocks), act, transposed conv 4x4
    stride 2] up to (hidden[0], H, W) -> act -> conv 3x3 -> (B, K, H, W)."""

    blocks = 0

    def __init__(self, cfg: ModelConfig, in_features: int, cond_dim: int, out_shape: tuple[int, int, int]) -> None:
        super().__init__()
        _check(cfg, out_shape)
        out_channels, h, w = out_shape
        n = len(cfg.hidden)
        hs, ws = stage_sizes(h, n), stage_sizes(w, n)
        self.start = (cfg.hidden[-1], hs[-1], ws[-1])
        self.fc = nn.Linear(in_features + cond_dim, cfg.hidden[-1] * hs[-1] * ws[-1])
        layers: list[nn.Module] = []
        for i in reversed(range(n)):  # stage i: (hidden[i], hs[i+1]) -> (hidden[i-1] or hidden[0], hs[i])
            c_in, c_out = cfg.hidden[i], cfg.hidden[max(i - 1, 0)]
            layers += [ResBlock(c_in, cfg.activation) for _ in range(self.blocks)]
            # transposed conv gives 2n; output padding adds the odd pixel back (7 -> 14 vs 15).
            pad = (hs[i] - 2 * hs[i + 1], ws[i] - 2 * ws[i + 1])
            layers += [
                ACTIVATIONS.get(cfg.activation)(),
                nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, output_padding=pad),
            ]
        layers += [ACTIVATIONS.get(cfg.activation)(), nn.Conv2d(cfg.hidden[0], out_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        if c is not None:
            z = torch.cat([z, c], dim=-1)
        lead = z.shape[:-1]  # any leading batch dims, e.g. (k, B) importance samples
        h = self.fc(z.reshape(-1, z.shape[-1])).view(-1, *self.start)  # (N, C', H', W')
        out = self.net(h)  # (N, K, H, W)
        return out.view(*lead, *out.shape[1:])


class ResNetEncoder(ConvEncoder):
    blocks = 1


class ResNetDecoder(ConvDecoder):
    blocks = 1


ENCODERS.add("conv", ConvEncoder)
DECODERS.add("conv", ConvDecoder)
ENCODERS.add("resnet", ResNetEncoder)
DECODERS.add("resnet", ResNetDecoder)
