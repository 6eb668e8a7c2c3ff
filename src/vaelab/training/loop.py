"""Training by the ELBO with Adam: one short function with explicit arguments.

Exact resume: every source of randomness is either re-derived from (seed, epoch) (the data order)
or saved in the checkpoint (the noise generator used for z, binarization and conditions, and the
global torch/numpy/Python RNGs), so a run resumed from any checkpoint continues bit-identically on
CPU. Checkpoints are written atomically at each epoch's end and, optionally, every N steps.

Distributed: launched under ``torchrun`` (WORLD_SIZE > 1) the model is wrapped in PyTorch's
DistributedDataParallel over the gloo backend; each rank takes an interleaved shard of every
epoch's permutation, gradients are averaged by DDP, and rank 0 alone writes the run directory.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from ..conditioning import Condition, build_condition
from ..config import RunConfig
from ..data import DataSplits, load_data, to_float
from ..data.validate import check_model_input, check_splits
from ..errors import CheckpointError, ConfigError, NonFiniteError
from ..models import build_model
from ..objectives import elbo
from .checkpoint import (
    Checkpoint,
    atomic_write,
    capture_global_rng,
    load_checkpoint,
    load_model_state,
    remove_stale_temps,
    restore_global_rng,
    save_checkpoint,
)
from .lock import RunLock
from .rundir import RunDir

EpochCallback = Callable[[dict[str, Any]], None]


@dataclass
class TrainState:
    """Counters that a checkpoint carries besides tensors."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken (including skipped non-finite ones)
    step_in_epoch: int = 0  # batches of the current epoch already consumed
    best_val: float = -math.inf  # best validation ELBO (nats, higher is better)
    nonfinite_total: int = 0
    nonfinite_run: int = 0  # consecutive
    sums: dict[str, float] = field(default_factory=dict)  # running train sums of the current epoch
    elapsed: float = 0.0  # training seconds so far


@dataclass
class TrainResult:
    run_dir: Path
    model: nn.Module
    config: RunConfig
    state: TrainState
    history: list[dict[str, Any]]


def complete_config(cfg: RunConfig, data: DataSplits) -> RunConfig:
    """Fill in what the data determines: input shape, class count, condition size."""
    model = dataclasses.replace(cfg.model, input_shape=data.shape, num_classes=data.num_classes)
    cond = build_condition(model, data.num_classes)
    return cfg.replace(model=dataclasses.replace(model, cond_dim=cond.dim))


def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    # The data order depends only on (seed, epoch): nothing to save for it.
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def setup_distributed() -> bool:
    """Initialise torch.distributed (gloo) when launched by torchrun; returns True if distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.is_initialized() and dist.get_world_size() > 1


def make_optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    t = cfg.train
    kw: dict[str, Any] = {"lr": t.lr, "betas": t.adam_betas, "eps": t.adam_eps, "weight_decay": t.weight_decay}
    # The fused kernel does the whole update in one pass over the parameters (~3x faster than
    # the default on CPU) and computes the same Adam.
    return torch.optim.Adam(model.parameters(), fused=True, **kw)


def beta_at(cfg: RunConfig, epoch_progress: float) -> float:
    """KL weight: linear warm-up from 0 over ``warmup_epochs``, then ``beta``."""
    t = cfg.train
    if t.warmup_epochs <= 0:
        return t.beta
    return t.beta * min(1.0, epoch_progress / t.warmup_epochs)


@torch.no_grad()
def evaluate_elbo(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    condition: Condition | None = None,
    batch_size: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """Mean ELBO, E_Q[log P(X|z)] and KL (nats per datapoint) over uint8 images, one z per X."""
    model.eval()
    condition = condition or build_condition(_unwrap(model).cfg, None)
    g = torch.Generator().manual_seed(seed)
    tot = {"elbo": 0.0, "rec": 0.0, "kl": 0.0}
    n = images.shape[0]
    for i in range(0, n, batch_size):
        x = to_float(images[i : i + batch_size])
        b = condition(x, None if labels is None else labels[i : i + batch_size], g)
        terms = elbo(model, b.x, b.c, mask=b.mask, generator=g)
        tot["elbo"] += terms.elbo.sum().item()
        tot["rec"] += terms.log_px_z.sum().item()
        tot["kl"] += terms.kl.sum().item()
    model.train()
    return {k: v / max(n, 1) for k, v in tot.items()}


def _grad_norm(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm of the gradients (inf/nan when any gradient is non-finite)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def _save(run: RunDir, paths: Sequence[Path], cfg: RunConfig, model: nn.Module, opt: torch.optim.Optimizer,
          state: TrainState, noise: torch.Generator) -> None:
    """Write the same checkpoint to each of ``paths`` in order (rank 0). A failed write stops
    training with an error that names the file; the files already there stay intact."""
    rng, rng_meta = capture_global_rng()
    rank, world = _dist_info()
    noise_state = noise.get_state()
    if world > 1:
        states = [torch.empty_like(noise_state) for _ in range(world)]
        dist.all_gather(states, noise_state)
    else:
        states = [noise_state]
    if rank != 0:
        return
    rng.update({f"noise/{r}": s for r, s in enumerate(states)})
    st = dataclasses.asdict(state)
    st["rng_meta"] = rng_meta
    st["world_size"] = world
    ckpt = Checkpoint(cfg, _unwrap(model).state_dict(), opt.state_dict(), st, rng)
    for path in paths:
        try:
            save_checkpoint(path, ckpt)
        except NonFiniteError as e:
            raise NonFiniteError(
                f"training stopped at step {state.step}: the parameters or optimizer state became "
                f"non-finite. {e}. Try a lower train.lr or train.grad_clip."
            ) from None
        except CheckpointError as e:
            raise CheckpointError(
                f"training stopped at step {state.step}: {e}. Fix the cause and "
                "re-run the same command to resume from the last good checkpoint."
            ) from None


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _configs_compatible(a: RunConfig, b: RunConfig) -> list[str]:
    """Differences that forbid resuming (the epoch count and progress display may change)."""
    da, db = a.to_dict(), b.to_dict()
    diffs = []
    for sec in da:
        for k in da[sec]:
            if sec == "train" and k in ("epochs", "progress", "threads", "max_nonfinite", "checkpoint_every"):
                continue
            if da[sec][k] != db.get(sec, {}).get(k):
                diffs.append(f"{sec}.{k}: run has {da[sec][k]!r}, now {db.get(sec, {}).get(k)!r}")
    return diffs


def train(
    cfg: RunConfig,
    run_dir: str | os.PathLike[str],
    *,
    data: DataSplits | None = None,
    resume: bool | None = None,
    callbacks: Sequence[EpochCallback] = (),
    max_steps: int | None = None,
) -> TrainResult:
    """Train a model by the ELBO into ``run_dir``.

    ``resume``: True continues from ``RUN/checkpoints/latest`` (error if absent); None (default)
    continues when a checkpoint exists and starts fresh otherwise; False refuses a non-empty run.
    ``max_steps`` stops after that many optimizer steps in total (tests, dry runs).
    """
    run = RunDir.of(run_dir)
    distributed = setup_distributed()
    rank, world = _dist_info()
    created = not run.root.exists()
    lock = RunLock(run.root).acquire() if rank == 0 else None
    try:
        return _train_locked(cfg, run, data, resume, callbacks, max_steps, rank, world, distributed)
    finally:
        if lock is not None:
            lock.release()
            if created and not run.config.exists():
                _remove_unstarted(run)


def _remove_unstarted(run: RunDir) -> None:
    """A run that failed before it started (bad data, bad config) leaves no folder behind: remove the
    lock file and the empty folders this call created, and nothing else."""
    try:
        run.root.joinpath(".lock").unlink(missing_ok=True)
        for d in (run.checkpoints, run.root):
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
    except OSError:
        pass


def _train_locked(cfg, run, data, resume, callbacks, max_steps, rank, world, distributed) -> TrainResult:
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    if rank == 0:
        remove_stale_temps(run.checkpoints)  # left by a process killed mid-write; we hold the lock
    ckpt: Checkpoint | None = None
    if run.latest.exists() and resume is not False:
        ckpt = load_checkpoint(run.latest)
    elif resume:
        raise CheckpointError(f"{run.root}: nothing to resume (no {run.latest})")
    elif run.latest.exists():
        raise CheckpointError(f"{run.root}: already holds a run; resume it or choose a new directory")

    data = data if data is not None else load_data((ckpt.config if ckpt else cfg).data)
    check_splits(data)
    cfg = complete_config(cfg, data)
    if ckpt is not None:
        diffs = _configs_compatible(ckpt.config, cfg)
        if diffs:
            raise ConfigError(
                f"{run.root}: cannot resume with a different configuration:\n  " + "\n  ".join(diffs)
                + "\nUse a new run directory for a new configuration."
            )
        # Keep the run's own settings; allow more epochs and other non-semantic changes.
        cfg = ckpt.config.replace(train=dataclasses.replace(ckpt.config.train, epochs=t.epochs, progress=t.progress,
                                  threads=t.threads, max_nonfinite=t.max_nonfinite,
                                  checkpoint_every=t.checkpoint_every))
        t = cfg.train

    # Seed every global RNG, not only torch's: checkpoints save all of them, and a run must not depend
    # on what the process drew before (a resumed run restores them below).
    torch.manual_seed(t.seed)
    np.random.seed(t.seed % 2**32)
    random.seed(t.seed)
    model = build_model(cfg.model)
    opt = make_optimizer(model, cfg)
    noise = torch.Generator().manual_seed(t.seed + 7919 * rank)
    state = TrainState()
    if ckpt is not None:
        load_model_state(model, ckpt.model, str(run.latest))
        try:
            if ckpt.optimizer is not None:
                opt.load_state_dict(ckpt.optimizer)
            st = dict(ckpt.state)
            rng_meta = st.pop("rng_meta", {})
            saved_world = st.pop("world_size", 1)
            state = TrainState(**st)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{run.latest}: corrupted optimizer or training state ({e!r})") from None
        if state.step_in_epoch and saved_world != world:
            raise CheckpointError(
                f"{run.latest}: taken mid-epoch with {saved_world} processes; resume with the same number"
            )
        restore_global_rng(ckpt.rng, rng_meta, str(run.latest))
        key = f"noise/{rank}"
        if key in ckpt.rng:
            noise.set_state(ckpt.rng[key])
        if rank == 0:
            run.truncate_metrics(state.step)
    elif rank == 0:
        run.root.mkdir(parents=True, exist_ok=True)
        atomic_write(run.config, cfg.to_json().encode())
        if run.metrics.exists():
            run.metrics.unlink()

    condition = build_condition(cfg.model, data.num_classes)
    train_model: nn.Module = nn.parallel.DistributedDataParallel(model) if distributed else model
    params = [p for p in model.parameters() if p.requires_grad]
    # Whole training set as float32 intensities in memory: batching is indexing.
    train_x = to_float(data.train.images)
    train_y = data.train.labels
    check_model_input(train_x, cfg.model.likelihood, data.train.source or data.name)
    n = train_x.shape[0]
    history = run.read_metrics() if rank == 0 else []
    dynamic = cfg.data.binarize == "dynamic"
    # Every rank takes the same number of examples (the few beyond a multiple of the world size are
    # left out of that epoch's order), so all ranks take the same steps and DDP's collectives match.
    usable = n - n % world
    steps_per_epoch = math.ceil(usable // world / t.batch_size)

    model.train()
    stop = False
    while state.epoch < t.epochs and not stop:
        epoch = state.epoch
        order = _epoch_order(n, t.seed, epoch)[:usable][rank::world]
        bar = tqdm(total=steps_per_epoch, initial=state.step_in_epoch, desc=f"epoch {epoch + 1}/{t.epochs}",
                   disable=None if t.progress and rank == 0 else True, leave=False, dynamic_ncols=True)
        t0 = time.perf_counter()
        sums = state.sums or {"loss": 0.0, "rec": 0.0, "kl": 0.0, "n": 0.0}
        for i in range(state.step_in_epoch, steps_per_epoch):
            idx = order[i * t.batch_size : (i + 1) * t.batch_size]
            x = train_x.index_select(0, idx)  # (B, C, H, W)
            if dynamic:
                x = torch.bernoulli(x, generator=noise)
            batch = condition(x, None if train_y is None else train_y.index_select(0, idx), noise)
            beta = beta_at(cfg, epoch + i / steps_per_epoch)
            terms = elbo(train_model, batch.x, batch.c, mask=batch.mask, generator=noise, k=t.iwae_k)
            loss = terms.loss(beta, t.free_bits)  # -ELBO (beta-weighted), or -L_k when iwae_k > 1
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = (torch.nn.utils.clip_grad_norm_(params, t.grad_clip) if t.grad_clip is not None
                     else _grad_norm(params))
            # One synchronisation per step: the loss, the gradient norm and the epoch's running sums.
            loss_v, gnorm_v, rec_v, kl_v = torch.stack(
                [loss.detach(), gnorm, terms.log_px_z.detach().sum(), terms.kl.detach().sum()]
            ).tolist()
            ok = math.isfinite(loss_v) and math.isfinite(gnorm_v)
            if world > 1:  # every rank must agree to step (a rank's loss may be non-finite alone)
                flag = torch.tensor([0.0 if ok else 1.0])
                dist.all_reduce(flag)
                ok = flag.item() == 0
            if ok:
                opt.step()
                state.nonfinite_run = 0
                b = batch.x.shape[0]
                sums["loss"] += loss_v * b
                sums["rec"] += rec_v
                sums["kl"] += kl_v
                sums["n"] += b
            else:
                opt.zero_grad(set_to_none=True)
                state.nonfinite_run += 1
                state.nonfinite_total += 1
                if rank == 0:
                    tqdm.write(f"step {state.step}: non-finite loss or gradient, update skipped "
                               f"({state.nonfinite_run} in a row)")
                if state.nonfinite_run >= t.max_nonfinite:
                    raise NonFiniteError(
                        f"{state.nonfinite_run} consecutive non-finite losses/gradients at step {state.step}; "
                        f"stopping. Last good checkpoint: "
                        f"{run.latest if run.latest.exists() else '(none yet)'}. Try a lower train.lr or "
                        "train.grad_clip, and check the data."
                    )
            state.step += 1
            state.step_in_epoch = i + 1
            if i % 20 == 0 and sums["n"]:
                bar.set_postfix(loss=f"{sums['loss'] / sums['n']:.2f}", refresh=False)
            bar.update(1)
            if max_steps is not None and state.step >= max_steps:
                stop = True
                break
            if t.checkpoint_every and state.step % t.checkpoint_every == 0 and i + 1 < steps_per_epoch:
                state.sums = dict(sums)
                state.elapsed += time.perf_counter() - t0
                t0 = time.perf_counter()
                _save(run, [run.latest], cfg, model, opt, state, noise)
        bar.close()
        state.elapsed += time.perf_counter() - t0
        state.sums = dict(sums)
        if stop and state.step_in_epoch < steps_per_epoch:
            _save(run, [run.latest], cfg, model, opt, state, noise)
            break
        # ---- end of epoch: validation, metrics, checkpoints
        if world > 1:
            tot = torch.tensor([sums["loss"], sums["rec"], sums["kl"], sums["n"]], dtype=torch.float64)
            dist.all_reduce(tot)
            sums = dict(zip(("loss", "rec", "kl", "n"), tot.tolist(), strict=True))
        val = evaluate_elbo(model, data.val.images, data.val.labels, condition, t.eval_batch_size, t.seed) \
            if len(data.val) else {"elbo": float("nan"), "rec": float("nan"), "kl": float("nan")}
        state.epoch += 1
        state.step_in_epoch = 0
        state.sums = {}
        nn_ = max(sums["n"], 1.0)
        row = {
            "epoch": state.epoch, "step": state.step,
            "train_loss": sums["loss"] / nn_, "train_rec": sums["rec"] / nn_, "train_kl": sums["kl"] / nn_,
            "val_elbo": val["elbo"], "val_rec": val["rec"], "val_kl": val["kl"],
            "beta": beta_at(cfg, state.epoch), "nonfinite_total": state.nonfinite_total,
            "elapsed_s": round(state.elapsed, 3),
        }
        improved = math.isfinite(val["elbo"]) and val["elbo"] > state.best_val
        if improved:
            state.best_val = val["elbo"]
        if rank == 0:
            run.append_metrics(row)
            history.append(row)
            tqdm.write(f"epoch {state.epoch}: train loss {row['train_loss']:.2f}  "
                       f"val -ELBO {-val['elbo']:.2f} (rec {-val['rec']:.2f}, KL {val['kl']:.2f}) nats")
        # best before latest: a crash between the two writes then resumes from the older latest and
        # redoes this epoch, rewriting best identically. Without validation data there is no best
        # (``RunDir.checkpoint("best")`` falls back to latest).
        _save(run, [run.best, run.latest] if improved else [run.latest], cfg, model, opt, state, noise)
        for cb in callbacks:
            cb(row)
    if distributed:
        dist.barrier()
    return TrainResult(run.root, model, cfg, state, history)
