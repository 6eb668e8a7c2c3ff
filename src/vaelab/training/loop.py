"""Training by the ELBO with Adam, read top to bottom: open (or resume) the run, then for each epoch
take steps over a seeded permutation, validate, write metrics and checkpoints.

Distributed: launched under ``torchrun`` (WORLD_SIZE > 1) the model is wrapped in PyTorch's
DistributedDataParallel (nccl on CUDA, gloo on the CPU); each rank takes an interleaved shard of every
epoch's permutation, gradients are averaged by DDP, validation is sharded too, and rank 0 alone writes
the run directory and prints. A peer that dies or freezes ends the job after ``train.dist_timeout``
with one line (:func:`~.distributed.peer_failures`); SIGTERM/SIGINT stop it at the next step boundary
with a checkpoint (:mod:`.signals`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import shlex
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..config import DataConfig, DataSpec, RunConfig, TrainConfig, val_size_is_default
from ..data import DataSplits
from ..data.python import check_python_run, is_python_data, python_splits
from ..data.registry import PYTHON_PREFIX
from ..devices import resolve_device
from ..distributed import (
    all_any,
    all_sum,
    broadcast_,
    dist_info,
    launch_command,
    peer_failures,
    setup_distributed,
)
from ..errors import CheckpointError, ConfigError, Interrupted, NonFiniteError
from ..evaluation.loop import evaluate_batches
from ..models import check_model_object
from ..objectives import ELBOObjective, Objective
from ..progress import Progress
from ..runs.checkpoint import read_config
from ..runs.lock import RunLock
from ..runs.rundir import RunDir, check_run_target
from .callbacks import CallbackLike, CallbackList, CheckpointInfo, RunInfo, StepInfo, as_callback_list
from .feed import make_feed
from .schedules import SCHEDULES
from .session import OptimizerFactory, Session, make_optimizer, open_session
from .signals import StopSignals
from .step import (
    Meters,
    PendingStep,
    StepResult,
    TrainState,
    guard_nonfinite,
    read_steps,
    running_statistics,
    take_step,
)

EpochCallback = Callable[[dict[str, Any]], None]  # the older form of a callback (see .callbacks)


@dataclass
class TrainResult:
    run_dir: Path
    model: nn.Module
    config: RunConfig
    spec: DataSpec  # what the data implied (image shape, classes, condition size)
    state: TrainState
    history: list[dict[str, Any]]


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    # The data order depends only on (seed, epoch): nothing to save for it.
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def beta_at(t: TrainConfig, epoch_progress: float) -> float:
    """KL weight: linear warm-up from 0 over ``warmup_epochs``, then ``beta``."""
    if t.warmup_epochs <= 0:
        return t.beta
    return t.beta * min(1.0, epoch_progress / t.warmup_epochs)


def train(
    cfg: RunConfig,
    run_dir: str | os.PathLike[str],
    *,
    data: DataSplits | Any = None,
    resume: bool | None = None,
    overwrite: bool = False,
    callbacks: Sequence[CallbackLike] = (),
    max_steps: int | None = None,
    objective: Objective | None = None,
    optimizer: OptimizerFactory = make_optimizer,
    model: nn.Module | None = None,
) -> TrainResult:
    """Train a model by the ELBO into ``run_dir``.

    ``resume``: True continues from ``RUN/checkpoints/latest`` (error if absent); None (default)
    continues when a checkpoint exists and starts fresh otherwise; False refuses a non-empty run.
    On resume, ``cfg`` may change only the resumable settings (epochs, where the data lives, ...).
    ``overwrite``: True replaces a run already in ``run_dir`` by a fresh one (a notebook cell that
    trains from scratch each time it is run): under the run lock, vaelab's files of the old run are
    removed (config.json, metrics.jsonl, checkpoints/, eval/*.json, tb/ events; your own files and
    pictures stay) and training starts anew. A folder that holds no vaelab run is refused, as always;
    a run another process trains is refused by its lock; ``resume=True`` with it is an error.
    ``data``: instead of ``cfg.data``'s source, images from Python: arrays or tensors, ``(images,
    labels)``, a ``torch.utils.data.Dataset``, or :class:`vaelab.data.python.TrainData` with val/test
    splits (the run's ``data.name`` becomes ``python:...``; resuming needs the same data again; with
    ``data.val_size`` left unset, 10% of the training images, at most 5000, are held out for validation,
    or on resume the number the run recorded).
    ``model``: a module of your own that follows the latent contract (:class:`vaelab.models.LatentModel`:
    ``config``, ``spec``, ``latent_dims``, ``forward``, ``encode``, ``decode``, ``prior``, ``sample``),
    trained instead of the one ``cfg.model`` names, as Lightning's ``fit(module)`` takes one; the run
    records ``model.config`` as its model settings, and resuming or opening the run later takes the same
    kind of module again (``train(..., model=...)``, ``load_run(..., model=...)``). Seed torch before you
    build it for the same bits from the same seed. Registering the class (``vaelab.MODELS``) instead
    makes it a ``model.model`` name the command line can use.
    ``max_steps`` stops after that many optimizer steps in total (tests, dry runs).
    ``objective`` (default: the ELBO, or L_k with ``train.iwae_k``) and ``optimizer`` (a factory
    ``(model, cfg) -> Optimizer``, default fused Adam) may be replaced. ``callbacks``:
    :class:`~vaelab.training.callbacks.Callback` objects (``on_start``/``on_step``/``on_epoch``/
    ``on_checkpoint``/``on_end``, rank 0) or functions of each epoch's metrics row; ``train.log``
    adds a tracker (TensorBoard) of its own.
    """
    if not isinstance(overwrite, bool):
        raise ConfigError(f"overwrite must be True or False, got {overwrite!r}")
    if model is not None:  # a module of the user's own: its settings are the run's model settings
        check_model_object(model)
        cfg = cfg.replace(model=model.config)
    if overwrite and resume:
        raise ConfigError("overwrite=True starts the run afresh; it cannot also resume it (resume=True)")
    if overwrite:
        resume = False
    cbs = CallbackList([*callbacks, *_trackers(cfg)])  # a tracker that is not installed: said before any work
    run = RunDir.of(run_dir)
    check_run_target(run.root)  # a folder of other things is never written into
    if is_python_data(data):  # checked and split (or set up for streaming) before anything is written
        data, data_cfg = python_splits(data, _recorded_val_size(cfg, run, resume))
        cfg = cfg.replace(data=data_cfg)
    if data is None and resume is not False:
        check_python_run(run.latest)  # a run trained on data from Python resumes only with that data
    distributed = setup_distributed(cfg.train.dist_timeout, resolve_device(cfg.train.device))
    rank, world = dist_info()
    created = not run.root.exists()
    try:
        lock = RunLock(run.root).acquire() if rank == 0 else None
    except CheckpointError:  # a file in the way, a full disk: leave nothing behind that this call made
        if created:
            _remove_unstarted(run)
        raise
    try:
        if overwrite:
            if lock is not None:  # rank 0, holding the run lock
                run.remove()
            if distributed:  # no rank looks for the old checkpoint before it is gone
                dist.barrier()
        # A peer that dies or freezes makes a collective fail after train.dist_timeout: one line naming it.
        hint = lambda: _resume_hint(run)  # noqa: E731
        with peer_failures(cfg.train.dist_timeout, hint):
            s = open_session(cfg, run, data, resume, rank, world, optimizer, model)
        cbs.start(RunInfo(run.root, s.cfg, s.spec, s.model, s.state.step, s.state.epoch, rank, world))
        history = run.read_metrics() if rank == 0 else []
        # The signal handlers stay in place while a failure is reported (torchrun sends SIGTERM to the
        # survivors of a dead rank): the report is not cut short.
        with StopSignals(announce=rank == 0) as stop, peer_failures(cfg.train.dist_timeout, hint), s.accel.training():
            fit(s, objective or ELBOObjective.from_config(s.cfg.train), cbs, max_steps, history,
                distributed, stop)
            if distributed:
                dist.barrier()
        return TrainResult(run.root, s.model, s.cfg, s.spec, s.state, history)
    finally:
        try:
            cbs.end()
        finally:
            if lock is not None:
                lock.release()
                if created and not run.config.exists():
                    _remove_unstarted(run)


def _recorded_val_size(cfg: RunConfig, run: RunDir, resume: bool | None) -> DataConfig:
    """``cfg.data``, with ``val_size`` left unset taken from the run it resumes (so a run started
    before the default held out 10% resumes as it was trained)."""
    if not val_size_is_default(cfg.data) or resume is False or not run.latest.exists():
        return cfg.data
    try:
        recorded = read_config(run.latest).data
    except CheckpointError:  # an unreadable checkpoint is reported where the run is opened
        return cfg.data
    if not recorded.name.startswith(f"{PYTHON_PREFIX}:"):
        return cfg.data
    return dataclasses.replace(cfg.data, val_size=recorded.val_size)


def _trackers(cfg: RunConfig) -> list[CallbackLike]:
    """The tracker ``train.log`` asks for (rank 0 alone writes it)."""
    if cfg.train.log == "tensorboard":
        from .tensorboard import TensorBoardLogger

        return [TensorBoardLogger(every=cfg.train.log_every)]
    return []


def _resume_hint(run: RunDir) -> str:
    """Where the run stands and the command that continues it (for messages that end a job)."""
    if not run.latest.exists():
        return "no checkpoint was written yet; re-run the same command to start again"
    return f"the last checkpoint is {run.latest}; resume with: {launch_command(f'train --resume {shlex.quote(str(run.root))}')}"


def _interrupted(s: Session, stop: StopSignals) -> Interrupted:
    """The error that ends a run stopped by a signal (after its checkpoint was written)."""
    state = s.state
    where = (f"step {state.step} (epoch {state.epoch + 1}, batch {state.step_in_epoch})" if state.step_in_epoch
             else f"the end of epoch {state.epoch} (step {state.step})")
    why = f"by {stop.name}" if stop.requested else "because another process was signalled"
    written = "" if state.nonfinite_run == 0 else "not checkpointed (its last step was skipped as non-finite); "
    return Interrupted(f"training stopped {why} at {where}; {written}{_resume_hint(s.run)}",
                       stop.exit_code if stop.requested else 128 + signal.SIGTERM, announce=s.rank == 0)


def fit(s: Session, objective: Objective, callbacks: Sequence[CallbackLike] | CallbackList, max_steps: int | None,
        history: list[dict[str, Any]], distributed: bool, stop: StopSignals | None = None) -> None:
    """The loop: epochs of steps until ``train.epochs`` epochs are done (or ``max_steps`` steps). A signal
    recorded by ``stop`` ends it at the next step boundary with a checkpoint and :class:`Interrupted`."""
    t, state = s.cfg.train, s.state
    callbacks = as_callback_list(callbacks)
    if not callbacks.started:
        callbacks.start(RunInfo(s.run.root, s.cfg, s.spec, s.model, state.step, state.epoch, s.rank, s.world))
    stop = stop or StopSignals()
    step = _Stepper(s, objective, distributed, stop)
    while state.epoch < t.epochs:
        meters, signalled = _epoch(s, step, callbacks, max_steps)
        if state.step_in_epoch < step.steps_per_epoch:
            if signalled:
                raise _interrupted(s, stop)
            return  # stopped mid-epoch by max_steps (saved in _epoch)
        _end_epoch(s, meters, callbacks, history)
        # A signal during the epoch's last step or its validation: the epoch's checkpoint is written
        if state.epoch < t.epochs and (signalled or all_any([stop.requested], s.world)[0]):
            raise _interrupted(s, stop)
        if max_steps is not None and state.step >= max_steps:
            return


class _Stepper:
    """One training step at a position of the run (epochs, fractional): the batch from the pipeline,
    the schedule's learning rate and KL weight (pure functions of the position, so a resume is exact),
    and :func:`~.step.train_step` with the objective and gradient pass the run's accelerator chose."""

    def __init__(self, s: Session, objective: Objective, distributed: bool, stop: StopSignals) -> None:
        t = s.cfg.train
        self.s, self.stop, self.beta = s, stop, 0.0
        self.model = nn.parallel.DistributedDataParallel(s.model) if distributed else s.model
        # the training split in memory (batching is indexing), or a Dataset streamed batch by batch
        self.feed = make_feed(s.data.train, s.device, s.cfg.model.likelihood, s.data.train.source or s.data.name)
        # Every rank takes the same number of examples (the few beyond a multiple of the world size are
        # left out of that epoch's order), so all ranks take the same steps and DDP's collectives match.
        self.usable = len(self.feed) - len(self.feed) % s.world
        self.steps_per_epoch = math.ceil(self.usable // s.world / t.batch_size)
        self.schedule = SCHEDULES.get(t.schedule)
        self.objective, self.gradient_pass = s.accel.step_parts(
            s.model, s.optimizer, objective, batch_size=t.batch_size, precision=t.precision, grad_clip=t.grad_clip,
            world=s.world, scaler=s.scaler)
        # where the guard decides (on the device, or read by the host at each step) and how often the
        # host reads the steps' numbers
        self.guard = s.accel.guard(s.optimizer, s.device, t.sync_every, t.max_nonfinite, s.state.nonfinite_run)
        self.statistics = running_statistics(s.model)  # batch normalisation's: a skipped step puts them back
        self.model.train()

    def batches(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """This rank's batches of ``epoch`` from batch ``start`` on (the order depends on (seed, epoch) alone)."""
        s = self.s
        order = epoch_order(len(self.feed), s.cfg.train.seed, epoch)[: self.usable][s.rank :: s.world]
        return self.feed.epoch(order, start, s.cfg.train.batch_size)

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None, position: float) -> PendingStep:
        s, t = self.s, self.s.cfg.train
        batch = s.pipeline(x, y, s.noise, train=True)
        if s.accel.channels_last:  # the layout the model's convolutions take (vaelab.accel)
            batch = dataclasses.replace(batch, x=s.accel.layout(batch.x))
        for group in s.optimizer.param_groups:
            group["lr"] = self.schedule(t, position)
        self.beta = beta_at(t, position)
        p = take_step(self.model, s.optimizer, self.objective, batch, self.beta, generator=s.noise,
                      grad_clip=t.grad_clip, world=s.world, precision=t.precision, scaler=s.scaler,
                      gradient_pass=self.gradient_pass, skip_threshold=t.skip_threshold,
                      masked=self.guard.masked, frozen=self.guard.frozen, stop=lambda: self.stop.requested,
                      statistics=self.statistics)
        self.guard.follow(p)
        if s.ema is not None and (p.result is None or p.result.applied):  # the average follows the updates taken
            s.ema.update(s.model, p.skip)
        return p


def _epoch(s: Session, step: _Stepper, callbacks: CallbackList, max_steps: int | None) -> tuple[Meters, bool]:
    """The steps of the current epoch from where it stands; stops early at ``max_steps`` or a signal
    (with a checkpoint). Returns the epoch's meters and whether a signal stopped it.

    The steps' numbers stay on the device until the host reads them (:func:`~.step.read_steps`): every
    ``step.guard.every`` steps, before a checkpoint, at the epoch's end, at a stop, and at every step for
    callbacks that watch steps. Reading replays them in order: the meters, the count of skipped steps and
    its limit (:func:`~.step.guard_nonfinite`), the callbacks."""
    t, state, epoch, n = s.cfg.train, s.state, s.state.epoch, step.steps_per_epoch
    bar = Progress(n, f"epoch {epoch + 1}/{t.epochs}", initial=state.step_in_epoch, enabled=t.progress and s.rank == 0)
    meters, t0, signalled = Meters(state.sums), time.perf_counter(), False
    batches = step.batches(epoch, state.step_in_epoch)
    pending: list[PendingStep] = []

    def read() -> list[StepResult]:
        first = state.step - len(pending)
        results = read_steps(pending)
        pending.clear()
        for j, r in enumerate(results):
            meters.add(r)
            guard_nonfinite(state, r, t.max_nonfinite, s.last_good, s.say, at=first + j)
            if callbacks.wants_steps:  # read at every step then: this step's own numbers and settings
                callbacks.on_step(StepInfo(first + j + 1, epoch, state.step_in_epoch, step.beta,
                                           s.optimizer.param_groups[0]["lr"], r))
        return results

    for i in range(state.step_in_epoch, n):
        pending.append(step(*next(batches), epoch + i / n))
        state.step, state.step_in_epoch = state.step + 1, i + 1
        limit = max_steps is not None and state.step >= max_steps
        save = i + 1 < n and bool(t.checkpoint_every) and state.step % t.checkpoint_every == 0
        # points every process reaches at the same step: there the processes agree on a stop
        common = state.step % step.guard.every == 0 or i + 1 == n or limit or save
        alone = s.world == 1 and step.stop.requested
        results = read() if common or alone or callbacks.wants_steps else []
        if not step.guard.masked:  # read at every step: agreed by every process in the step's collective
            signalled = results[-1].stop
        elif common and s.world > 1:  # decided on the device: the processes agree at the common reads
            signalled = all_any([step.stop.requested], s.world)[0]
        elif s.world == 1:
            signalled = alone
        if i % 20 == 0 and meters.sums["n"]:
            bar.set_postfix(f"loss {meters.loss:.2f}")
        bar.update(1)
        halt = signalled or limit
        if i + 1 < n and (halt or save):
            state.sums, state.elapsed = dict(meters.sums), state.elapsed + time.perf_counter() - t0
            t0 = time.perf_counter()
            _save_mid_epoch(s, callbacks)
        if halt:
            break
    bar.close()
    state.elapsed += time.perf_counter() - t0
    state.sums = dict(meters.sums)
    return meters, signalled


def _save_mid_epoch(s: Session, callbacks: CallbackList) -> None:
    """A mid-epoch checkpoint (an epoch's end is saved after validation). None while steps are being
    skipped: the weights may already be diverging, and "the last good checkpoint" must be good.
    Resuming replays the steps since exactly."""
    if s.state.nonfinite_run == 0:
        s.save([s.run.latest])
        callbacks.on_checkpoint(CheckpointInfo((s.run.latest,), s.state.step, s.state.epoch, False))


def _end_epoch(s: Session, meters: Meters, callbacks: CallbackList, history: list[dict[str, Any]]) -> None:
    """Validation, the metrics row, the checkpoints (best before latest), the callbacks."""
    t, state = s.cfg.train, s.state
    applied = all_sum([meters.sums["n"]], s.world)[0]
    if applied == 0:
        why, higher = "non-finite loss or gradient", ""
        if t.skip_threshold is not None:
            why += f", or gradient norm >= train.skip_threshold = {t.skip_threshold:g}"
            higher = " (or a higher train.skip_threshold)"
        raise NonFiniteError(
            f"epoch {state.epoch + 1}: every step was skipped ({why}), so the epoch "
            f"trained nothing; stopping. Last good checkpoint: {s.last_good()}. Try a lower train.lr or "
            f"train.grad_clip{higher}, and check the data."
        )
    train_means = meters.means(s.world)
    # An IWAE run (train.iwae_k > 1) is validated by the bound it trains, -L_k with the same k, from the
    # same pass (and draws, seeded per batch) as its ELBO terms; ``best`` is still decided by the ELBO.
    # With train.ema the moving average is what is validated (and so what decides ``best``).
    k = max(1, t.iwae_k)
    # each process's last step left its own batch's running statistics: every rank validates with rank
    # 0's, those of the checkpoint (DistributedDataParallel gives them out only at the next forward pass)
    broadcast_(running_statistics(s.model), s.world)
    with s.eval_model() as model:
        ev = evaluate_batches(model, s.data.val.images, s.data.val.labels, s.pipeline, k=k,
                              batch_size=t.eval_batch_size, seed=t.seed, rank=s.rank, world=s.world)
    val = ev.means()
    state.epoch, state.step_in_epoch, state.sums = state.epoch + 1, 0, {}
    row = {
        "epoch": state.epoch, "step": state.step, **train_means,
        "val_elbo": val["elbo"],
        **({"val_lk": float(ev.lk.mean()) if ev.n else math.nan} if k > 1 else {}),
        "val_rec": val["rec"], "val_kl": val["kl"],
        **{f"val_{key}": v for key, v in val.items() if key.startswith("kl_")},  # per layer, with several
        "beta": beta_at(t, state.epoch), "lr": s.optimizer.param_groups[0]["lr"], "nonfinite_total": state.nonfinite_total,
        **({"skipped_total": state.skipped_total} if t.skip_threshold is not None else {}),
        "elapsed_s": round(state.elapsed, 3),
    }
    improved = math.isfinite(val["elbo"]) and val["elbo"] > state.best_val
    if improved:
        state.best_val = val["elbo"]
    if s.rank == 0:
        s.run.append_metrics(row)
        history.append(row)
        terms = f"-ELBO {-val['elbo']:.2f} (rec {-val['rec']:.2f}, KL {val['kl']:.2f})"
        if k > 1:  # train and validation both -L_k: numbers that compare
            line = f"train -L_{k} {row['train_loss']:.2f}  val -L_{k} {-row['val_lk']:.2f}, {terms}"
        elif t.beta == 1 and t.warmup_epochs <= 0 and t.free_bits <= 0:
            line = f"train -ELBO {row['train_loss']:.2f}  val {terms}"
        else:  # what the steps minimised is not the ELBO
            weighted = " and ".join(w for w, on in (("β", t.beta != 1 or t.warmup_epochs > 0),
                                                      ("free bits", t.free_bits > 0),
                                                      ("KL balancing", t.kl_balance)) if on)
            line = f"train loss ({weighted} applied) {row['train_loss']:.2f}  val {terms}"
        line += " nats" + (" (val: the EMA weights)" if t.ema > 0 else "")
        if t.skip_threshold is not None and state.skipped_total:
            line += f"; {state.skipped_total} updates skipped so far (gradient norm >= {t.skip_threshold:g})"
        s.say(f"epoch {state.epoch}: {line}")
    if state.nonfinite_run == 0:
        s.save_epoch(improved)
        callbacks.on_checkpoint(CheckpointInfo((s.run.best, s.run.latest) if improved else (s.run.latest,),
                                               state.step, state.epoch, improved))
    else:
        s.say(f"epoch {state.epoch}: not checkpointed (its last step was skipped as non-finite); "
              f"the last good checkpoint stays {s.last_good()}")
    callbacks.on_epoch(row)


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
