"""Honest evaluation on held-out data: the ELBO and its terms, the importance-sampled estimate of
log P(X) (the IWAE bound L_k, Burda et al. 2016) with its standard error, active units and the KL
per latent dimension. Numbers are nats per datapoint (sum over its dimensions, mean over data)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..api import load_run
from ..conditioning import build_condition
from ..data import ImageSet, load_data, to_float
from ..distributions import LIKELIHOODS
from ..objectives import elbo, iwae_bound
from ..training.checkpoint import atomic_write

LN2 = math.log(2.0)


@dataclass
class EvalResult:
    split: str
    n: int
    k: int
    neg_elbo: float  # -ELBO, nats per datapoint
    neg_elbo_stderr: float
    reconstruction: float  # -E_Q[log P(X|z)]
    kl: float  # KL(Q(z|X) || P(z))
    nll: float  # -L_k: importance-sampled estimate of -log P(X) (an upper bound in expectation)
    nll_stderr: float  # standard error over the data
    active_units: int
    latent_dim: int
    kl_per_dim: list[float]
    exact: bool  # whether -log P is a true negative log-likelihood of the data as given
    meaning: str
    bits_per_dim: float | None = None
    conditional: bool = False  # numbers are -log P(x|c): x the scored pixels, c the condition
    condition: str = ""  # the condition in words
    scored_dims: float = 0.0  # dimensions the likelihood scores per datapoint (mean; bits/dim divide by it)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        # conditional: x = what the likelihood scores, c = the condition (see the note)
        px, q, p = ("P(x|c)", "Q(z|x,c)", "P(z|c)") if self.conditional else ("P(X)", "Q(z|X)", "P(z)")
        lik = "P(x|z,c)" if self.conditional else "P(X|z)"
        rows = [
            ("data points", f"{self.n}"),
            ("-ELBO", f"{self.neg_elbo:.3f} ± {self.neg_elbo_stderr:.3f}"),
            (f"  reconstruction -E_Q[log {lik}]", f"{self.reconstruction:.3f}"),
            (f"  KL({q} || {p})", f"{self.kl:.3f}"),
            (f"-log {px} ≈ -L_{self.k} (importance sampling)", f"{self.nll:.3f} ± {self.nll_stderr:.3f}"),
            ("ELBO gap (-ELBO - (-L_k))", f"{self.neg_elbo - self.nll:.3f}"),
        ]
        if self.bits_per_dim is not None:
            rows.append(("bits/dim (from -L_k)", f"{self.bits_per_dim:.4f}"))
        rows.append(("active units (Cov_x E_q[z_u] > 0.01)", f"{self.active_units} / {self.latent_dim}"))
        top = sorted(range(len(self.kl_per_dim)), key=lambda i: -self.kl_per_dim[i])[:8]
        rows.append(("KL per dim (largest)", ", ".join(f"z{i}:{self.kl_per_dim[i]:.2f}" for i in top)))
        w = max(len(r[0]) for r in rows)
        lines = [f"{self.split} split, nats per datapoint (± standard error over the data)"]
        lines += [f"  {a.ljust(w)}  {b}" for a, b in rows]
        lines.append(f"  note: {self.meaning}")
        if self.conditional:
            lines.append(f"  {self.condition}; {self.scored_dims:.0f} scored dimensions per datapoint")
        return "\n".join(lines)


@torch.no_grad()
def evaluate_model(
    model: torch.nn.Module,
    data: ImageSet,
    *,
    k: int = 5000,
    batch_size: int = 100,
    seed: int = 0,
    exact: bool = False,
    meaning: str = "",
    progress: bool = True,
    split: str = "test",
) -> EvalResult:
    """Evaluate ``model`` on uint8 ``data``: ELBO terms, -L_k with standard error, active units."""
    model.eval()
    cfg = model.cfg
    cond = build_condition(cfg, cfg.num_classes)
    g = torch.Generator().manual_seed(seed)
    n = len(data)
    elbos, recs, kls, lks, mus, kld = [], [], [], [], [], []
    scored = 0.0  # total scored dimensions (all of them, or the likelihood mask's)
    # Samples per decoder call sized so one call's output (chunk x batch x K x H x W floats, K the
    # likelihood's parameters per pixel) stays near 64 MiB, whatever the decoder and image size.
    per_row = LIKELIHOODS.get(cfg.likelihood).num_params(cfg.input_shape[0], cfg) * math.prod(cfg.input_shape[1:])
    chunk = max(1, (16 << 20) // (batch_size * per_row))
    for i in tqdm(range(0, n, batch_size), desc=f"evaluate (k={k})", disable=None if progress else True, leave=False):
        x = to_float(data.images[i : i + batch_size])
        labels = None if data.labels is None else data.labels[i : i + batch_size]
        b = cond(x, labels, g)
        t = elbo(model, b.x, b.c, mask=b.mask, generator=g)
        elbos.append(t.elbo)
        recs.append(t.log_px_z)
        kls.append(t.kl)
        kld.append(t.kl_per_dim)
        mus.append(model.encode(b.x, b.c).mu)
        lks.append(iwae_bound(model, b.x, k, b.c, mask=b.mask, generator=g, chunk=chunk))
        scored += float(b.x[0].numel() * b.x.shape[0] if b.mask is None else torch.broadcast_to(b.mask, b.x.shape).sum())
    e, lk = torch.cat(elbos).double(), torch.cat(lks).double()
    mu = torch.cat(mus).double()
    au = int((mu.var(0, unbiased=True) > 1e-2).sum()) if n > 1 else 0
    dims = scored / max(n, 1)
    nll = float(-lk.mean())
    se = lambda v: float(v.std(unbiased=True) / math.sqrt(len(v))) if len(v) > 1 else float("nan")  # noqa: E731
    return EvalResult(
        split=split,
        n=n,
        k=k,
        neg_elbo=float(-e.mean()),
        neg_elbo_stderr=se(e),
        reconstruction=float(-torch.cat(recs).double().mean()),
        kl=float(torch.cat(kls).double().mean()),
        nll=nll,
        nll_stderr=se(lk),
        active_units=au,
        latent_dim=cfg.latent_dim,
        kl_per_dim=[float(v) for v in torch.cat(kld).double().mean(0)],
        exact=exact,
        meaning=meaning,
        bits_per_dim=nll / (dims * LN2) if exact and dims > 0 else None,
        conditional=cfg.condition != "none",
        condition=cond.describe(),
        scored_dims=dims,
    )


def describe_likelihood(run_cfg) -> tuple[bool, str]:
    """Whether -log P(X) is a true NLL for this likelihood and data, and a sentence saying what it is."""
    head = LIKELIHOODS.get(run_cfg.model.likelihood)
    binary = run_cfg.data.binarize != "none"
    if head.discrete:
        return True, "discrete likelihood over 8-bit pixels: -L_k is a true NLL; bits/dim = NLL / (D ln 2)"
    if run_cfg.model.likelihood == "bernoulli" and binary:
        return True, "binarized pixels with a Bernoulli likelihood: -L_k is a true NLL of the binary data (nats)"
    return False, head.meaning


def evaluate_run(
    run_dir: str | os.PathLike[str],
    *,
    k: int = 5000,
    split: str = "test",
    limit: int | None = None,
    batch_size: int = 100,
    seed: int = 0,
    which: str = "best",
    progress: bool = True,
    data_dir: str | None = None,
    write: bool = True,
) -> EvalResult:
    """Evaluate a trained run on its test (or val) split; writes ``RUN/eval/<split>-k<k>.json``."""
    loaded = load_run(run_dir, which)
    dcfg = loaded.config.data
    if data_dir is not None:
        from dataclasses import replace

        dcfg = replace(dcfg, data_dir=data_dir)
    splits = load_data(dcfg)
    data = getattr(splits, split)
    if limit is not None:
        data = data.subset(slice(0, limit))
    exact, meaning = describe_likelihood(loaded.config)
    res = evaluate_model(
        loaded.model, data, k=k, batch_size=batch_size, seed=seed, exact=exact, meaning=meaning,
        progress=progress, split=split,
    )
    res.extra = {"checkpoint": str(loaded.checkpoint), "epoch": loaded.state.get("epoch"),
                 "step": loaded.state.get("step"), "data": dcfg.name}
    if write:
        out = Path(loaded.run.eval) / f"{split}-k{k}.json"
        atomic_write(out, json.dumps(res.to_dict(), indent=2).encode())
        res.extra["written"] = str(out)
    return res
