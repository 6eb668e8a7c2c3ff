"""The one evaluation loop: every datapoint is encoded once per batch of draws, and from the same
forward pass come the ELBO's terms (per layer), the posterior means (active units) and the log
importance weights of L_k. Training's validation is this loop with k = 1.

Memory stays bounded whatever k and the image size: the likelihood's parameters of one call
(draws x datapoints x numbers per datapoint) are kept near ``budget`` floats; datapoints are split
into groups that fit, and only when one datapoint's k draws do not fit are its draws taken in
equal chunks (then the datapoint is encoded once per chunk, a few thousand decoder rows each, which
makes the encoder's share negligible).

Speed: on the CPU, calls of ~4k decoder rows (12 MiB of likelihood parameters for 28x28 images) keep
every buffer in the allocator's cache; much larger calls (a 64 MiB buffer each) go back to the operating
system every time and pay page faults, which cost more than the arithmetic. A GPU takes calls ten
times larger (``GPU_BUDGET``), which keep it busy between kernel launches. ``precision`` bf16/fp16
runs the networks under autocast; the likelihood, the log-weights and the logsumexp stay float32.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..data.cache import MappedImages
from ..devices import autocast
from ..distributed import all_sum, all_sum_tensor
from ..distributions import Noise
from ..models import device_of, fixed_weights, generator_for
from ..objectives import elbo_terms, iwae_estimate
from ..pipeline import BatchPipeline
from ..progress import Progress, duration

BUDGET = 3 << 20  # floats of likelihood parameters per forward call on the CPU (12 MiB; ~4k rows of 28x28)
GPU_BUDGET = 32 << 20  # on a GPU (128 MiB): small calls would leave it waiting on kernel launches
ESTIMATE_AFTER = 60.0  # seconds: a longer evaluation first says how long it will take


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
    kl: torch.Tensor  # (N,)
    kl_per_dim: torch.Tensor | None  # (N, L) in closed form
    mean: torch.Tensor  # (N, L) posterior means E_q[z] (averaged over the draws of the layers below)

    @property
    def dim(self) -> int:
        return int(self.mean.shape[-1])

    def __add__(self, other: LayerStats) -> LayerStats:
        """Sum of two (weighted) partial results for the same datapoints."""
        per_dim = None if self.kl_per_dim is None or other.kl_per_dim is None else self.kl_per_dim + other.kl_per_dim
        return LayerStats(self.name, self.kl + other.kl, per_dim, self.mean + other.mean)

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
        """Mean ELBO, E_q[log P(X|z)] and KL over the data (NaN when there is none); with several
        stochastic layers also each layer's KL, as ``kl_<layer name>``."""
        per_layer = [ly.name for ly in self.layers] if len(self.layers) > 1 else []
        if self.n == 0:
            return {"elbo": math.nan, "rec": math.nan, "kl": math.nan, **{f"kl_{n}": math.nan for n in per_layer}}
        out = {"elbo": float(self.elbo.mean()), "rec": float(self.rec.mean()), "kl": float(self.kl.mean())}
        out.update({f"kl_{ly.name}": float(ly.kl.mean()) for ly in self.layers if ly.name in per_layer})
        return out


@torch.no_grad()
def evaluate_batches(
    model: nn.Module,
    images: torch.Tensor | MappedImages,
    labels: torch.Tensor | None,
    pipeline: BatchPipeline,
    *,
    k: int = 1,
    batch_size: int = 100,
    seed: int = 0,
    progress: bool = False,
    budget: int | None = None,
    rank: int = 0,
    world: int = 1,
    precision: str = "fp32",
    passes: Pass | None = None,
) -> Evaluation:
    """Evaluate ``model`` on uint8 ``images`` (N, C, H, W) with k draws per datapoint: the ELBO's terms
    per layer (its reconstruction term averaged over the k draws), posterior means and L_k. The
    pipeline builds each batch (condition drawn once per batch). ``images`` may also be a prepared data
    set (:class:`~vaelab.data.cache.MappedImages`): each batch is then read from its file when it is
    evaluated, so memory holds one batch of images, not the split.

    Each batch draws from its own generator, seeded from (``seed``, batch index): a batch's numbers
    do not depend on the batches before it nor on the process that evaluates it. With ``world`` > 1
    (torch.distributed initialised; every rank calls this) rank r evaluates batches r, r + world, ...
    and the per-datapoint results are summed over the ranks into every rank's result, the same
    (on one device kind and thread count) as one process evaluating all of them. ``passes`` computes
    one forward pass's summaries (default :func:`summaries`, eagerly); :mod:`vaelab.accel` offers a
    faster one that takes the same draws."""
    device = device_of(model)
    amp = autocast(device, precision)  # checked before any work; entered around each forward pass
    budget = budget or (GPU_BUDGET if device.type == "cuda" else BUDGET)
    n = len(images)
    take = getattr(images, "read_range", None) or (lambda i, j: images[i:j])  # a file's rows, or memory's
    per_row, names = _probe(model, take(0, 1), labels, pipeline) if n else (0, [])
    per_row = per_row if k > 1 else 0
    draws = k if per_row == 0 else max(1, min(k, budget // per_row))  # draws per call
    draws = -(-k // -(-k // draws))  # the same number in each call: 5000 = 2500 + 2500, not 4011 + 989
    rows = max(1, budget // (draws * per_row)) if per_row else batch_size  # datapoints per call
    starts = list(range(0, n, batch_size))[rank::world]  # this process's batches
    groups: list[Evaluation] = []
    offsets: list[int] = []  # index of each group's first datapoint
    scored = 0.0
    bar = Progress(len(starts), f"evaluate (k={k}, {n} images)", enabled=progress)
    passes = passes or summaries
    with eval_mode(model), fixed_weights(model), bar:
        for done, i in enumerate(starts):
            g = batch_generator(model, seed, i // batch_size)
            b = pipeline(take(i, i + batch_size).to(device),
                         None if labels is None else labels[i : i + batch_size].to(device), g)
            for j in range(0, b.x.shape[0], rows):
                x, c = b.x[j : j + rows], None if b.c is None else b.c[j : j + rows]
                mask = None if b.mask is None or b.mask.shape[0] == 1 else b.mask[j : j + rows]  # or broadcast
                with amp:
                    groups.append(_draws(model, x, c, mask, k, draws, g, names, passes))
                offsets.append(i + j)
            scored += float(b.x[0].numel() * b.x.shape[0] if b.mask is None
                            else torch.broadcast_to(b.mask, b.x.shape).sum())
            bar.update()
            if done == 0 and bar.estimate() > ESTIMATE_AFTER:
                bar.note(f"evaluate: k={k} draws for each of {n} images will take about {duration(bar.estimate())} "
                         "(measured on the first batch); "
                         "a smaller -k or --limit is quicker")
    if world <= 1:
        return _concat(groups, k, scored)
    if not groups and n:  # no batch for this rank: learn the layers' shapes from one throwaway draw
        b = pipeline(take(0, 1).to(device), None if labels is None else labels[:1].to(device), generator_for(model, 0))
        with eval_mode(model):
            template = _concat([_draws(model, b.x, b.c, b.mask, 1, 1, generator_for(model, 0), names)], k, 0.0)
        return _sum_over_ranks(template, [], n, world)
    return _sum_over_ranks(_concat(groups, k, scored), offsets, n, world, [g.n for g in groups])


def batch_generator(model: nn.Module, seed: int, index: int) -> torch.Generator:
    """The generator of evaluation batch ``index``, on the model's device, seeded from (seed, index)
    mixed into 32 bits (the CPU generator keeps only the low 32 bits of a seed)."""
    return generator_for(model, int(np.random.SeedSequence([seed, index]).generate_state(1)[0]))


def _sum_over_ranks(local: Evaluation, offsets: list[int], n: int, world: int,
                    sizes: Sequence[int] = ()) -> Evaluation:
    """The whole data's per-datapoint results on every rank: each rank places its rows (groups of
    ``sizes`` rows starting at ``offsets``) in zeros of the full size, and one all-reduce sums them
    (adding zeros is exact)."""
    cols = [local.rec[:, None], local.lk[:, None]]
    for ly in local.layers:
        cols += [ly.kl[:, None], *([] if ly.kl_per_dim is None else [ly.kl_per_dim]), ly.mean]
    mine = torch.cat(cols, dim=1)  # (rows here, C) float64
    full = torch.zeros(n, mine.shape[1], dtype=torch.float64)
    if offsets:
        idx = torch.cat([torch.arange(o, o + m) for o, m in zip(offsets, sizes, strict=True)])
        full[idx] = mine
    full = all_sum_tensor(full, world)
    scored = all_sum([local.scored if offsets else 0.0], world)[0]
    rec, lk, at = full[:, 0], full[:, 1], 2
    layers = []
    for ly in local.layers:
        kl, at = full[:, at], at + 1
        per_dim = None
        if ly.kl_per_dim is not None:
            per_dim, at = full[:, at : at + ly.dim], at + ly.dim
        mean, at = full[:, at : at + ly.dim], at + ly.dim
        layers.append(LayerStats(ly.name, kl, per_dim, mean))
    return Evaluation(rec, lk, layers, local.k, scored)


Summaries = tuple[torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]]
#: one forward pass of m draws: (model, x, c, mask, m, noise) -> its summaries (:func:`summaries`)
Pass = Callable[[nn.Module, torch.Tensor, "torch.Tensor | None", "torch.Tensor | None", int, Noise], Summaries]


def summaries(model: nn.Module, x: torch.Tensor, c: torch.Tensor | None, mask: torch.Tensor | None, m: int,
              noise: Noise) -> Summaries:
    """One forward pass of ``m`` draws: log-weights (m, B), the reconstruction term (B,) and per layer
    (KL (B,), KL per dimension or None, posterior mean (B, L))."""
    out = model(x, c, generator=noise, k=m)
    t = elbo_terms(out, x, mask, weights=True)
    assert t.log_w is not None
    return t.log_w, t.log_px_z, [(lt.kl, lt.kl_per_dim, _posterior_mean(layer.q, layer.z))
                                 for layer, lt in zip(out.layers, t.layers, strict=True)]


def _draws(model: nn.Module, x: torch.Tensor, c: torch.Tensor | None, mask: torch.Tensor | None, k: int,
           draws: int, g: torch.Generator, names: list[str], passes: Pass = summaries) -> Evaluation:
    """k draws for a group of datapoints, ``draws`` per forward pass; only small per-datapoint
    summaries of each pass are kept (never its likelihood's parameters). L_k is the objective's own
    :func:`~vaelab.objectives.iwae_estimate` of the passes' log-weights."""
    log_w, rec, layers = [], 0.0, None
    for done in range(0, k, draws):
        m = min(draws, k - done)
        lw, log_px_z, per_layer = passes(model, x, c, mask, m, g)
        log_w.append(lw)
        rec = rec + log_px_z * (m / k)
        now = [LayerStats(name, kl * (m / k), None if per_dim is None else per_dim * (m / k), mean * (m / k))
               for name, (kl, per_dim, mean) in zip(names, per_layer, strict=True)]
        layers = now if layers is None else [a + b for a, b in zip(layers, now, strict=True)]
    return Evaluation(torch.as_tensor(rec), iwae_estimate(log_w), layers or [], k)


def _posterior_mean(q, z: torch.Tensor) -> torch.Tensor:
    """E_q[z] per datapoint (B, L), averaged over the draws of the layers below when q depends on them."""
    mean = q.mean.expand_as(z)
    return mean.mean(0) if mean.dim() > 2 else mean


def _concat(groups: list[Evaluation], k: int, scored: float) -> Evaluation:
    cpu = lambda t: t.double().cpu()  # noqa: E731
    if not groups:
        return Evaluation(torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64), [], k, scored)
    layers = []
    for li, first in enumerate(groups[0].layers):
        parts = [g.layers[li] for g in groups]
        per_dim = None if first.kl_per_dim is None else cpu(torch.cat([p.kl_per_dim for p in parts]))
        layers.append(LayerStats(first.name, cpu(torch.cat([p.kl for p in parts])), per_dim,
                                 cpu(torch.cat([p.mean for p in parts]))))
    return Evaluation(cpu(torch.cat([g.rec for g in groups])), cpu(torch.cat([g.lk for g in groups])), layers, k,
                      scored)


def _probe(model: nn.Module, images: torch.Tensor, labels: torch.Tensor | None,
           pipeline: BatchPipeline) -> tuple[int, list[str]]:
    """Numbers the likelihood holds per datapoint and draw, and the stochastic layers' names, from one
    datapoint's pass (a throwaway generator, so the evaluation's own draws do not depend on it)."""
    g, device = generator_for(model, 0), device_of(model)
    with eval_mode(model):
        b = pipeline(images[:1].to(device), None if labels is None else labels[:1].to(device), g)
        out = model(b.x, b.c, generator=g, k=1)
        return max(1, out.likelihood.numel()), [layer.name for layer in out.layers]
