"""Test-time uses of a trained VAE: sampling from the prior, reconstruction, interpolation in z,
the 2-D manifold of Kingma & Welling (2014, Fig. 4), and posterior means as arrays."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data import ImageSet, to_float
from ..errors import ConfigError
from .grid import save_grid


def _cond(model: nn.Module, n: int, c: torch.Tensor | None) -> torch.Tensor | None:
    if getattr(model.cfg, "cond_dim", 0) and c is None:
        raise ConfigError("this model is conditional: give a condition (e.g. --label)")
    return None if c is None else c.expand(n, -1) if c.shape[0] == 1 else c


@torch.no_grad()
def sample_images(
    model: nn.Module, n: int = 64, *, seed: int = 0, temperature: float = 1.0, c: torch.Tensor | None = None,
    mean: bool = True,
) -> torch.Tensor:
    """Decode n draws z ~ N(0, T² I): (n, C, H, W) in [0, 1] (the likelihood's mean, or a draw)."""
    g = torch.Generator().manual_seed(seed)
    return model.sample(n, _cond(model, n, c), generator=g, temperature=temperature, mean=mean).clamp(0, 1)


@torch.no_grad()
def reconstruct_images(model: nn.Module, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
    """Decode the posterior mean of each x: (n, C, H, W) in [0, 1]."""
    q = model.encode(x, c)
    return model.decode(q.mu, c).mean.clamp(0, 1)


@torch.no_grad()
def interpolate_images(
    model: nn.Module, x_a: torch.Tensor, x_b: torch.Tensor, steps: int = 10, c: torch.Tensor | None = None
) -> torch.Tensor:
    """Decode points on the straight line between the posterior means of two images: (steps, C, H, W)."""
    za = model.encode(x_a[None], c).mu[0]
    zb = model.encode(x_b[None], c).mu[0]
    w = torch.linspace(0, 1, steps)[:, None]
    z = (1 - w) * za + w * zb
    return model.decode(z, None if c is None else c.expand(steps, -1)).mean.clamp(0, 1)


@torch.no_grad()
def manifold_images(
    model: nn.Module, n: int = 20, dims: tuple[int, int] = (0, 1), c: torch.Tensor | None = None,
    eps: float = 0.05,
) -> torch.Tensor:
    """Kingma & Welling (2014) Fig. 4: an n x n grid of quantiles in (eps, 1 - eps) mapped through the
    inverse Gaussian CDF onto latent dimensions ``dims`` (the others at 0), decoded: (n*n, C, H, W)."""
    L = model.cfg.latent_dim
    if max(dims) >= L or min(dims) < 0 or dims[0] == dims[1]:
        raise ConfigError(f"manifold dims {dims} invalid for a {L}-dimensional latent")
    q = torch.linspace(eps, 1 - eps, n)
    vals = torch.distributions.Normal(0.0, 1.0).icdf(q)
    z = torch.zeros(n * n, L)
    # rows go down dims[1] (top = high values), columns go across dims[0]
    z[:, dims[0]] = vals.repeat(n)
    z[:, dims[1]] = vals.flip(0).repeat_interleave(n)
    return model.decode(z, None if c is None else c.expand(n * n, -1)).mean.clamp(0, 1)


@torch.no_grad()
def encode_means(model: nn.Module, data: ImageSet, batch_size: int = 1000) -> np.ndarray:
    """Posterior means E_Q[z|X] of every image: (N, latent_dim) float32."""
    from ..conditioning import build_condition

    cond = build_condition(model.cfg, model.cfg.num_classes)
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(0, len(data), batch_size):
        x = to_float(data.images[i : i + batch_size])
        b = cond(x, None if data.labels is None else data.labels[i : i + batch_size], g)
        out.append(model.encode(b.x, b.c).mu)
    return torch.cat(out).numpy().astype(np.float32) if out else np.zeros((0, model.cfg.latent_dim), np.float32)


# ---------------------------------------------------------------- run-level helpers (the CLI's API)
def _load(run: str | os.PathLike[str], which: str):
    from ..api import load_run

    return load_run(run, which)


def _test_images(loaded, n: int, split: str = "test", data_dir: str | None = None) -> ImageSet:
    from dataclasses import replace

    from ..data import load_data

    dcfg = loaded.config.data if data_dir is None else replace(loaded.config.data, data_dir=data_dir)
    data = getattr(load_data(dcfg), split)
    return data.subset(slice(0, n))


def _batch(loaded, data: ImageSet):
    from ..conditioning import build_condition

    cond = build_condition(loaded.config.model, loaded.config.model.num_classes)
    return cond(to_float(data.images), data.labels, torch.Generator().manual_seed(0))


def sample_run(run: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, *, n: int = 64,
               seed: int = 0, temperature: float = 1.0, which: str = "best", c: torch.Tensor | None = None) -> Path:
    """Write a PNG grid of n samples from the prior; returns its path (default RUN/samples.png)."""
    loaded = _load(run, which)
    imgs = sample_images(loaded.model, n, seed=seed, temperature=temperature, c=c)
    return save_grid(imgs, out or loaded.run.root / "samples.png")


def reconstruct_run(run: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, *, n: int = 32,
                    which: str = "best", data_dir: str | None = None) -> Path:
    """Write a PNG: rows of test images alternating with their reconstructions."""
    loaded = _load(run, which)
    data = _test_images(loaded, n, data_dir=data_dir)
    b = _batch(loaded, data)
    rec = reconstruct_images(loaded.model, b.x, b.c)
    cols = min(8, len(data))
    pairs = []
    for i in range(0, len(data), cols):
        pairs += [b.x[i : i + cols], rec[i : i + cols]]
    return save_grid(torch.cat(pairs), out or loaded.run.root / "reconstructions.png", nrow=cols)


def interpolate_run(run: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, *, a: int = 0,
                    b: int = 1, steps: int = 10, which: str = "best", data_dir: str | None = None) -> Path:
    """Write a PNG row: decoded points on the line between the posterior means of test images a and b."""
    loaded = _load(run, which)
    data = _test_images(loaded, max(a, b) + 1, data_dir=data_dir)
    bt = _batch(loaded, data)
    if bt.c is not None:
        raise ConfigError("interpolate works on unconditional models")
    imgs = interpolate_images(loaded.model, bt.x[a], bt.x[b], steps)
    row = torch.cat([bt.x[a : a + 1], imgs, bt.x[b : b + 1]])
    return save_grid(row, out or loaded.run.root / "interpolation.png", nrow=steps + 2)


def manifold_run(run: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, *, n: int = 20,
                 dims: tuple[int, int] = (0, 1), which: str = "best", c: torch.Tensor | None = None) -> Path:
    """Write the 2-D manifold PNG (Kingma & Welling Fig. 4) over latent dimensions ``dims``."""
    loaded = _load(run, which)
    imgs = manifold_images(loaded.model, n, dims, c=c)
    return save_grid(imgs, out or loaded.run.root / "manifold.png", nrow=n, pad=0, scale=1)


def encode_run(run: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, *, split: str = "test",
               which: str = "best", data_dir: str | None = None) -> Path:
    """Write the posterior means of a split to .npy (N, latent_dim); labels, if any, to *_labels.npy."""
    from dataclasses import replace

    from ..data import load_data

    loaded = _load(run, which)
    dcfg = loaded.config.data if data_dir is None else replace(loaded.config.data, data_dir=data_dir)
    data = getattr(load_data(dcfg), split)
    z = encode_means(loaded.model, data)
    p = Path(out or loaded.run.root / f"encoded-{split}.npy")
    p.parent.mkdir(parents=True, exist_ok=True)
    np.save(p, z)
    if data.labels is not None:
        np.save(p.with_name(p.stem + "_labels.npy"), data.labels.numpy())
    return p
