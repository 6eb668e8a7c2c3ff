"""Honest evaluation on held-out data: the ELBO and its terms, the importance-sampled estimate of
log P(X) (the IWAE bound L_k, Burda et al. 2016) with its standard error, active units and the KL
per latent dimension. Numbers are nats per datapoint (sum over its dimensions, mean over data)."""

from __future__ import annotations

import copy
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..accel import Accelerator
from ..conditioning import Condition
from ..config import RunConfig, check_count, check_seed
from ..data import ImageSet
from ..data.cache import MappedImages
from ..data.python import as_image_set, run_splits
from ..data.registry import PYTHON_PREFIX
from ..devices import autocast, resolve_device
from ..distributed import DEFAULT_TIMEOUT, dist_info, peer_failures, setup_distributed
from ..distributions import LIKELIHOODS
from ..errors import ConfigError, DataError
from ..pipeline import BatchPipeline, condition_of
from ..runs import Run
from ..runs.checkpoint import atomic_write
from ..safeio import dumps_json
from .loop import evaluate_batches

LN2 = math.log(2.0)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class EvalResult:
    split: str
    n: int
    k: int
    neg_elbo: float  # -ELBO, nats per datapoint
    neg_elbo_stderr: float
    reconstruction: float  # -E_Q[log P(X|z)]
    kl: float  # sum over layers of KL(Q(z_l|.) || P(z_l|.))
    nll: float  # -L_k: importance-sampled estimate of -log P(X) (an upper bound in expectation)
    nll_stderr: float  # standard error over the data
    active_units: int  # over all layers
    latent_dim: int  # over all layers
    kl_per_dim: list[float]  # closed-form layers, bottom-up
    exact: bool  # whether -log P is a true negative log-likelihood of the data as given
    meaning: str
    bits_per_dim: float | None = None
    conditional: bool = False  # numbers are -log P(x|c): x the scored pixels, c the condition
    condition: str = ""  # the condition in words
    scored_dims: float = 0.0  # dimensions the likelihood scores per datapoint (mean; bits/dim divide by it)
    layers: list[dict[str, Any]] = field(default_factory=list)  # per stochastic layer: name, dim, kl, active units, ...
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self, notes: bool = True) -> str:
        """The numbers as aligned text; ``notes``: end with what the number means and the condition
        (the report prints those as wrapping paragraphs instead)."""
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
        if not self.layers:
            rows.append(("latent variables", "none (KL = 0 by structure)"))
        for layer in self.layers:
            name = layer["name"]
            sub = f" {name}" if len(self.layers) > 1 else ""
            if len(self.layers) > 1:
                rows.append((f"  KL layer {name}", f"{layer['kl']:.3f}" + ("" if layer["closed_form"] else " (Monte Carlo)")))
            rows.append((f"active units{sub} (Cov_x E_q[z_u] > 0.01)", f"{layer['active_units']} / {layer['dim']}"))
            per_dim = layer["kl_per_dim"]
            if per_dim:
                top = sorted(range(len(per_dim)), key=lambda i: -per_dim[i])[:8]
                rows.append((f"KL per dim{sub} (largest)", ", ".join(f"{name}[{i}]:{per_dim[i]:.2f}" for i in top)))
        w = max(len(r[0]) for r in rows)
        lines = [f"{self.split} split, nats per datapoint (± standard error over the data)"]
        if self.extra.get("checkpoint"):  # which weights these numbers are of
            lines.insert(0, f"checkpoint {self.extra['checkpoint']} (epoch {self.extra.get('epoch')}, "
                            f"step {self.extra.get('step')})")
        lines += [f"  {a.ljust(w)}  {b}" for a, b in rows]
        if not notes:
            return "\n".join(lines)
        lines.append(f"  note: {self.meaning}")
        if self.conditional:
            lines.append(f"  {self.condition}; {self.scored_dims:.0f} scored dimensions per datapoint")
        return "\n".join(lines)


def evaluate_model(
    model: nn.Module,
    data: ImageSet | Any,
    *,
    condition: Condition | None = None,
    pipeline: BatchPipeline | None = None,
    k: int = 5000,
    batch_size: int = 100,
    seed: int = 0,
    exact: bool = False,
    meaning: str = "",
    progress: bool = True,
    split: str = "test",
    rank: int = 0,
    world: int = 1,
    precision: str = "fp32",
    compile: bool = False,
) -> EvalResult:
    """Evaluate ``model`` on ``data``: ELBO terms per layer, -L_k with standard error, active units.
    ``data``: an :class:`ImageSet` (uint8), or what :func:`vaelab.train` takes: images (an array or
    tensor), ``(images, labels)``, a ``torch.utils.data.Dataset`` (all of them, checked and made uint8
    as training reads them), or :class:`~vaelab.data.python.TrainData` / loaded ``DataSplits`` (their
    ``split`` split). Pixels are not binarized here; :func:`evaluate_run` applies the run's setting.
    ``condition`` (or a whole ``pipeline``): what a conditional model is given (default: the model's own).
    ``rank``/``world``: under torch.distributed every rank calls this, evaluates its share of the batches,
    and gets the whole result (see :func:`evaluate_batches`). ``precision`` bf16/fp16: the networks
    under autocast (log-weights, logsumexp and every sum stay float32). ``compile``: the forward passes
    by ``torch.compile`` (the same draws; worth it for a large k, see docs/speed.md)."""
    check_count(k, "k (importance samples per datapoint)", 1)
    check_count(batch_size, "batch_size", 1)
    check_seed(seed)
    data = as_image_set(data, split)
    if pipeline is None:
        pipeline = BatchPipeline(condition or condition_of(model))
    if pipeline.condition.dim != model.spec.cond_dim:
        raise ConfigError(f"the model takes a condition of size {model.spec.cond_dim}, the condition "
                          f"{pipeline.condition.name!r} gives {pipeline.condition.dim}")
    # a prepared data set is read batch by batch from its file (memory holds a batch, not the split)
    images = data if isinstance(data, MappedImages) else data.images
    ev = evaluate_batches(model, images, data.labels, pipeline, k=k, batch_size=batch_size, seed=seed,
                          progress=progress and rank == 0, rank=rank, world=world, precision=precision,
                          passes=Accelerator(compile=compile, say=_say).passes())
    n = ev.n
    e, lk = ev.elbo, ev.lk
    dims = ev.scored / max(n, 1)
    nll = float(-lk.mean())
    se = lambda v: float(v.std(unbiased=True) / math.sqrt(len(v))) if len(v) > 1 else float("nan")  # noqa: E731
    layers = [{
        "name": ly.name, "dim": ly.dim, "kl": float(ly.kl.mean()), "closed_form": ly.kl_per_dim is not None,
        "active_units": ly.active_units(),
        "kl_per_dim": None if ly.kl_per_dim is None else [float(v) for v in ly.kl_per_dim.mean(0)],
    } for ly in ev.layers]
    return EvalResult(
        split=split,
        n=n,
        k=k,
        neg_elbo=float(-e.mean()),
        neg_elbo_stderr=se(e),
        reconstruction=float(-ev.rec.mean()),
        kl=float(ev.kl.mean()),
        nll=nll,
        nll_stderr=se(lk),
        active_units=sum(ly["active_units"] for ly in layers),
        latent_dim=sum(ly["dim"] for ly in layers),
        kl_per_dim=[v for ly in layers for v in (ly["kl_per_dim"] or [])],
        exact=exact,
        meaning=meaning,
        bits_per_dim=nll / (dims * LN2) if exact and dims > 0 else None,
        conditional=pipeline.condition.dim > 0,
        condition=pipeline.condition.describe(),
        scored_dims=dims,
        layers=layers,
    )


def describe_likelihood(run_cfg: RunConfig) -> tuple[bool, str]:
    """Whether -log P(X) is a true NLL for this likelihood and data, and a sentence saying what it is."""
    head = LIKELIHOODS.get(run_cfg.model.likelihood)
    binary = run_cfg.data.binarize != "none"
    if head.discrete:
        return True, "discrete likelihood over 8-bit pixels: -L_k is a true NLL; bits/dim = NLL / (D ln 2)"
    if run_cfg.model.likelihood == "bernoulli" and binary:
        return True, "binarized pixels with a Bernoulli likelihood: -L_k is a true NLL of the binary data (nats)"
    if run_cfg.model.likelihood == "bernoulli":  # the case that applies, not the head's two cases
        return False, ("Bernoulli likelihood on [0,1] grey levels (pixels not binarized): -L_k is a cross-entropy "
                       "score, not a density of the 8-bit data; do not compare it with NLLs of binarized data")
    return False, head.meaning


def evaluate_run(
    run_dir: Run | str | os.PathLike[str],
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
    device: str = "auto",
    dist_timeout: float = DEFAULT_TIMEOUT,
    precision: str = "fp32",
    compile: bool = False,
    data: Any = None,
) -> EvalResult:
    """Evaluate a trained run on its test (or val) split; writes ``RUN/eval/<split>-k<k>.json``.

    ``data``: for a run trained on data given from Python (``vaelab.train(cfg, run, data=...)``), the
    same data again, in any form ``train`` takes (arrays, ``(images, labels)``, a Dataset,
    :class:`~vaelab.data.python.TrainData`): they are split as training split them (the run's seed and
    ``data.val_size``) and refused when their fingerprint is not the one the run recorded.

    Under torchrun the processes share the batches (each result is the same as one process's) and
    rank 0 alone prints and writes; ``dist_timeout``: seconds to wait for a peer before giving up.
    ``precision`` bf16 (fp16 on a GPU) runs the networks in low precision, the likelihood and the
    log-weights in float32; its -L_k stays within the standard error of fp32's (docs/speed.md).
    ``compile`` runs the forward passes by ``torch.compile``: the same draws, the same estimate up to
    rounding, faster for a large k once compiled."""
    check_count(k, "k (importance samples per datapoint)", 1)
    if isinstance(dist_timeout, bool) or not isinstance(dist_timeout, (int, float)) or not 0 < dist_timeout < math.inf:
        raise ConfigError(f"dist_timeout must be > 0 seconds (a finite number), got {dist_timeout!r}")
    check_count(batch_size, "batch_size", 1)
    check_seed(seed)
    if limit is not None:
        check_count(limit, "limit (examples to evaluate)", 1)
    autocast(resolve_device(device), precision)  # a precision this device lacks: said before loading
    run = _with_data(Run.of(run_dir, which, data_dir=data_dir, device=device), data)
    available = len(run.data(split))
    if available == 0:
        raise ConfigError(f"{run.root}: the {split} split is empty; nothing to evaluate")
    data = run.data(split, limit=None if limit is None else min(limit, available))
    exact, meaning = describe_likelihood(run.config)
    setup_distributed(dist_timeout, resolve_device(device))
    rank, world = dist_info()
    if progress and rank == 0:  # what was loaded, before a possibly long computation
        print(f"evaluating {run.checkpoint} (epoch {run.state.get('epoch')}) on {len(data)} {split} images; "
              f"data {run.splits.describe()}", file=sys.stderr, flush=True)
    # the kernels the run was trained with (its config's plan; auto: this machine's decisions)
    Accelerator.for_model(run.config.train.kernels, run.model, rows=run.config.train.batch_size,
                          say=_say).prepare(run.model)
    with peer_failures(dist_timeout, lambda: "nothing was written; re-run the same command"):
        res = evaluate_model(
            run.model, data, pipeline=run.pipeline, k=k, batch_size=batch_size, seed=seed, exact=exact,
            meaning=meaning, progress=progress, split=split, rank=rank, world=world, precision=precision,
            compile=compile,
        )
    res.extra = {"checkpoint": str(run.checkpoint), "epoch": run.state.get("epoch"),
                 "step": run.state.get("step"), "data": run.config.data.name, "precision": precision,
                 "compile": compile}
    if write and rank == 0:
        out = Path(run.dir.eval) / f"{split}-k{k}.json"
        atomic_write(out, dumps_json(res.to_dict(), indent=2).encode())
        res.extra["written"] = str(out)
    return res


def _with_data(run: Run, data: Any) -> Run:
    """``run`` with its splits made from ``data`` given from Python (a copy: a Run passed in keeps
    its own), or as it is; a run trained on data from Python and no data is a one-line error."""
    name = run.config.data.name
    if data is None:
        if name.startswith(f"{PYTHON_PREFIX}:"):
            raise DataError(f"{run.root}: was trained on data given from Python ({name}), which is not stored with "
                            "the run: pass the same data again, vaelab.evaluate_run(run, data=...)")
        return run
    splits = run_splits(data, run.config.data, run.state.get("data_fingerprint"), str(run.root))
    other = copy.copy(run)
    other.__dict__["splits"] = splits  # the cached property, filled
    return other
