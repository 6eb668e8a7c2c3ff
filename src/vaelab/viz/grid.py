"""Image grids as PNG files (grey or colour)."""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError


def grid_array(images: torch.Tensor, nrow: int | None = None, pad: int = 2, pad_value: float = 1.0) -> np.ndarray:
    """(N, C, H, W) in [0, 1] -> uint8 array (rows*H', cols*W', C) with ``pad`` pixels between cells."""
    images = images.detach().float().clamp(0, 1).cpu()
    if images.shape[1] == 2:  # grey + alpha: show the grey channel
        images = images[:, :1]
    elif images.shape[1] > 3:  # RGBA or more channels: show the first three as RGB
        images = images[:, :3]
    n, c, h, w = images.shape
    cols = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    out = torch.full((c, rows * (h + pad) + pad, cols * (w + pad) + pad), pad_value)
    for i in range(n):
        r, q = divmod(i, cols)
        out[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = images[i]
    arr = (out.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
    return arr


def output_path(out: str | os.PathLike[str], example: str = "out.png") -> Path:
    """Where an output file goes: refused, with one line, when it names a folder or lies under a file."""
    p = Path(out)
    if p.is_dir():
        raise ConfigError(f"{p}: is a directory; give a file name to write, e.g. {p / example}")
    for parent in p.parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise ConfigError(f"{p}: cannot be written: {parent} is a file, not a folder")
            break
    return p


def grid_image(images: torch.Tensor, nrow: int | None = None, scale: int = 2, pad: int = 2) -> Image.Image:
    """A grid of images (N, C, H, W) in [0, 1] as a Pillow image, upscaled ``scale`` times (nearest)."""
    arr = grid_array(images, nrow, pad)
    img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr, mode="L" if arr.shape[-1] == 1 else "RGB")
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return img


def png_bytes(images: torch.Tensor, nrow: int | None = None, scale: int = 2, pad: int = 2,
              provenance: Mapping[str, str] | None = None) -> bytes:
    """The PNG file of :func:`grid_image` as bytes (for the report and the explorer), with
    ``provenance`` in its text chunks."""
    from ..provenance import png_info

    buf = io.BytesIO()
    grid_image(images, nrow, scale, pad).save(buf, format="PNG", pnginfo=png_info(provenance))
    return buf.getvalue()


def save_grid(
    images: torch.Tensor, path: str | os.PathLike[str], nrow: int | None = None, scale: int = 2, pad: int = 2,
    provenance: Mapping[str, str] | None = None,
) -> Path:
    """Write a grid of images (N, C, H, W) in [0, 1] to a PNG (or another format Pillow knows by the
    file's suffix), upscaled ``scale`` times (nearest). The file is replaced atomically. A PNG carries
    ``provenance`` (run, checkpoint, epoch, step, seed, temperature, command: see
    :mod:`vaelab.provenance`) in its text chunks."""
    from ..provenance import png_info
    from ..runs.checkpoint import atomic_write

    p = output_path(path, "grid.png")
    fmt = Image.registered_extensions().get(p.suffix.lower()) if p.suffix else "PNG"
    if fmt is None:
        raise ConfigError(f"{p}: unknown image format {p.suffix!r}; name a .png file")
    if images.shape[0] == 0:
        raise ConfigError(f"{p}: no images to write")
    img = grid_image(images, nrow, scale, pad)
    buf = io.BytesIO()
    extra = {"pnginfo": png_info(provenance)} if fmt == "PNG" else {}
    try:
        img.save(buf, format=fmt, **extra)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"{p}: cannot write a {fmt} image ({e}); name a .png file") from None
    atomic_write(p, buf.getvalue())
    return p
