"""The one evaluation loop: every datapoint is encoded once per batch of draws, and from the same
forward pass come the ELBO's terms (per layer), the posterior means (active units) and the log
importance weights of L_k. Training's validation is this loop with k = 1.

Memory stays bounded whatever k and the image size: the likelihood's parameters of one call
(draws x datapoints x numbers per datapoint) are kept near ``budget`` floats; datapoints are split
into groups that fit, and only when one datapoint's k draws do not fit are its draws taken in
chunks (then the datapoint is encoded once per chunk).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..objectives import elbo_terms
from ..pipeline import BatchPipeline

BUDGET = 16 << 20  # floats of likelihood parameters per forward call (64 MiB)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode, its previous mode restored afterwards."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


@dataclass
class LayerStats:
    name: str
    kl: torch.Tensor  # (N,) float64
    kl_per_dim: torch.Tensor | None  # (N, L) in closed form
    mean: torch.Tensor  # (N, L) posterior means E_q[z] (averaged over the draws of the layers below)

    @property
    def dim(self) -> int:
        return int(self.mean.shape[-1])

    def active_units(self, threshold: float = 1e-2) -> int:
        """Units whose posterior mean varies over the data: Cov_x(E_q[z_u]) > threshold (Burda et al. 2016)."""
        return int((self.mean.var(0, unbiased=True) > threshold).sum()) if self.mean.shape[0] > 1 else 0


@dataclass
class Evaluation:
    """Per-datapoint results of :func:`evaluate_batches` (float64, on the CPU)."""

    rec: torch.Tensor  # (N,) estimate of E_q[log P(X|z)]
    lk: torch.Tensor  # (N,) L_k
    layers: list[LayerStats]
    k: int
    scored: float = 0.0  # dimensions the likelihood scored, summed over the data
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.rec.shape[0])

    @property
    def kl(self) -> torch.Tensor:
        out = torch.zeros_like(self.rec)
        for layer in self.layers:
            out = out + layer.kl
        return out

    @property
    def elbo(self) -> torch.Tensor:
        return self.rec - self.kl

    def means(self) -> dict[str, float]:
        """Mean ELBO, E_q[log P(X|z)] and KL over the data (NaN when there is none)."""
        if self.n == 0:
            return {"elbo": math.nan, "rec": math.nan, "kl": math.nan}
        return {"elbo": float(self.elbo.mean()), "rec": float(self.rec.mean()), "kl": float(self.kl.mean())}


class _Sums:
    """Sums over the draws of one group of datapoints."""

    def __init__(self) -> None:
        self.lse: torch.Tensor | None = None  # logsumexp of log w over the draws so far
        self.rec: torch.Tensor | None = None
        self.kl: list[torch.Tensor] = []
        self.kl_dim: list[torch.Tensor | None] = []
        self.mean: list[torch.Tensor] = []
        self.names: list[str] = []

    @staticmethod
    def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
        return b if a is None else None if b is None else a + b

    def add(self, out, terms, m: int) -> None:
        lse = torch.logsumexp(terms.log_w, dim=0)
        self.lse = lse if self.lse is None else torch.logaddexp(self.lse, lse)
        self.rec = self._add(self.rec, terms.log_px_z * m)
        first = not self.names
        for i, (layer, lt) in enumerate(zip(out.layers, terms.layers, strict=True)):
            mean = layer.q.mean.expand_as(layer.z)
            mean = (mean.mean(0) if mean.dim() > 2 else mean) * m  # (B, L)
            kd = None if lt.kl_per_dim is None else lt.kl_per_dim * m
            if first:
                self.names.append(lt.name)
                self.kl.append(lt.kl * m)
                self.kl_dim.append(kd)
                self.mean.append(mean)
            else:
                self.kl[i] = self.kl[i] + lt.kl * m
                self.kl_dim[i] = self._add(self.kl_dim[i], kd)
                self.mean[i] = self.mean[i] + mean


@torch.no_grad()
def evaluate_batches(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    pipeline: BatchPipeline,
    *,
    k: int = 1,
    batch_size: int = 100,
    seed: int = 0,
    progress: bool = False,
    budget: int = BUDGET,
) -> Evaluation:
    """Evaluate ``model`` on uint8 ``images`` (N, C, H, W) with k draws per datapoint: the ELBO's terms
    per layer (its reconstruction term averaged over the k draws), posterior means and L_k. The
    pipeline builds each batch (condition drawn once per batch from the seeded generator)."""
    g = torch.Generator().manual_seed(seed)
    n = images.shape[0]
    per_row = _floats_per_datapoint(model, images, labels, pipeline) if k > 1 and n else 0
    draws = k if per_row == 0 else max(1, min(k, budget // per_row))  # draws per call
    rows = max(1, budget // max(1, draws * per_row)) if per_row else batch_size  # datapoints per call
    recs, lks, scored = [], [], 0.0
    layers: list[list] = []
    with eval_mode(model):
        for i in tqdm(range(0, n, batch_size), desc=f"evaluate (k={k})", disable=None if progress else True,
                      leave=False):
            b = pipeline(images[i : i + batch_size], None if labels is None else labels[i : i + batch_size], g)
            for j in range(0, b.x.shape[0], rows):
                x, c = b.x[j : j + rows], None if b.c is None else b.c[j : j + rows]
                mask = None if b.mask is None else b.mask[j : j + rows] if b.mask.shape[0] > 1 else b.mask
                sums = _Sums()
                for done in range(0, k, draws):
                    m = min(draws, k - done)
                    out = model(x, c, generator=g, k=m)
                    sums.add(out, elbo_terms(out, x, mask, weights=True), m)
                assert sums.lse is not None and sums.rec is not None
                lks.append((sums.lse - math.log(k)).double().cpu())
                recs.append((sums.rec / k).double().cpu())
                layers.append([(nm, kl / k, None if kd is None else kd / k, mu / k)
                               for nm, kl, kd, mu in zip(sums.names, sums.kl, sums.kl_dim, sums.mean, strict=True)])
            scored += float(b.x[0].numel() * b.x.shape[0] if b.mask is None
                            else torch.broadcast_to(b.mask, b.x.shape).sum())
    return Evaluation(_cat(recs), _cat(lks), _layer_stats(layers), k, scored)


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def _layer_stats(groups: list[list]) -> list[LayerStats]:
    if not groups:
        return []
    out = []
    for li in range(len(groups[0])):
        name = groups[0][li][0]
        kd = [g[li][2] for g in groups]
        out.append(LayerStats(
            name,
            torch.cat([g[li][1] for g in groups]).double().cpu(),
            None if any(v is None for v in kd) else torch.cat(kd).double().cpu(),  # type: ignore[arg-type]
            torch.cat([g[li][3] for g in groups]).double().cpu(),
        ))
    return out


def _floats_per_datapoint(model: nn.Module, images: torch.Tensor, labels: torch.Tensor | None,
                          pipeline: BatchPipeline) -> int:
    """Numbers the likelihood holds per datapoint and draw, measured on one datapoint (a throwaway
    generator, so the evaluation's own draws do not depend on it)."""
    g = torch.Generator().manual_seed(0)
    with eval_mode(model):
        b = pipeline(images[:1], None if labels is None else labels[:1], g)
        return max(1, model(b.x, b.c, generator=g, k=1).likelihood.numel())
