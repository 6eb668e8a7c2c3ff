"""One optimisation step, and the small units the loop runs around it: the running meters (with
their reduction over processes) and the guard that counts skipped steps."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from ..conditioning import Batch
from ..devices import autocast
from ..distributed import all_any, all_max_tensor, all_sum
from ..errors import NonFiniteError
from ..objectives import ELBOTerms, Objective


@dataclass(frozen=True)
class StepResult:
    loss: float  # the objective's value (mean over the batch)
    grad_norm: float  # global L2 norm of the gradient (before clipping)
    rec: float  # sum over the batch of the estimate of log P(X|z)
    kl: float  # sum over the batch of sum_l KL_l
    n: int  # datapoints in the batch
    applied: bool  # whether the update was taken (loss and gradient finite on every process, norm below the threshold)
    stop: bool = False  # some process was asked to stop (SIGTERM/SIGINT): every process stops after this step
    skipped: bool = False  # finite, but not applied: the gradient norm reached train.skip_threshold


def grad_norm(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm of the gradients (inf/nan when any gradient is non-finite)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads)


def clip_factor(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """What gradients of global norm ``norm`` are multiplied by to clip them to ``max_norm``, as
    ``torch.nn.utils.clip_grad_norm_`` does: min(1, max_norm / (norm + 1e-6))."""
    return torch.clamp(max_norm / (norm + 1e-6), max=1.0)


def step_report(loss: torch.Tensor, gnorm: torch.Tensor, terms: ELBOTerms) -> torch.Tensor:
    """What a step reports, as one tensor the host reads at once: [loss, gradient norm before clipping,
    Σ over the batch of log P(X|z), Σ over the batch of Σ_l KL_l]."""
    return torch.stack([loss.detach(), gnorm.detach().reshape(()), terms.log_px_z.detach().sum(),
                        terms.kl.detach().sum()])


class GradientPass(Protocol):
    """The first part of a step: the gradients of ``objective`` on ``batch`` left in the parameters'
    ``.grad`` (clipped), and the step's report (:func:`step_report`)."""

    def __call__(self, model: nn.Module, optimizer: torch.optim.Optimizer, objective: Objective, batch: Batch,
                 beta: float, *, generator: torch.Generator | None, grad_clip: float | None, precision: str,
                 scaler: torch.amp.GradScaler | None) -> torch.Tensor: ...


def backward_pass(model: nn.Module, optimizer: torch.optim.Optimizer, objective: Objective, batch: Batch,
                  beta: float, *, generator: torch.Generator | None, grad_clip: float | None, precision: str,
                  scaler: torch.amp.GradScaler | None) -> torch.Tensor:
    """The eager :class:`GradientPass`: the forward pass under autocast (``precision``), the loss, its
    backward pass (scaled by ``scaler``, then unscaled), the gradient norm and the clipping."""
    with autocast(batch.x.device, precision):
        loss, terms = objective(model, batch, generator=generator, beta=beta)
    optimizer.zero_grad(set_to_none=True)
    (loss if scaler is None else scaler.scale(loss)).backward()
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    gnorm = torch.nn.utils.clip_grad_norm_(params, grad_clip) if grad_clip is not None else grad_norm(params)
    return step_report(loss, gnorm, terms)


@dataclass(frozen=True)
class PendingStep:
    """A step taken, its numbers not necessarily read yet. Decided on the device: its report
    (:func:`step_report`), its flags [non-finite, gradient norm at the threshold] (agreed by every
    process) and ``skip`` (1 where the update was not taken) are tensors where the model lives, read
    later by :func:`read_steps`. Decided by the host: ``result`` holds what it read and decided."""

    report: torch.Tensor
    flags: torch.Tensor | None
    skip: torch.Tensor | None  # 0-d float: 1 where the update was not taken
    n: int
    result: StepResult | None = None


def running_statistics(model: nn.Module) -> list[torch.Tensor]:
    """The buffers that a training forward pass updates: the running statistics of ``model``'s batch
    normalisations (``model.norm``). A skipped step puts them back as they were (:func:`take_step`)."""
    return [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats
            for b in m.buffers(recurse=False)]


def step_flags(report: torch.Tensor, skip_threshold: float | None) -> torch.Tensor:
    """[loss or gradient norm non-finite, gradient norm >= ``skip_threshold``] as 0/1 floats on the
    report's device (nothing read by the host)."""
    bad = ~torch.isfinite(report[:2]).all()
    large = torch.zeros_like(bad) if skip_threshold is None else report[1] >= skip_threshold
    return torch.stack([bad, large]).float()


def take_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    objective: Objective,
    batch: Batch,
    beta: float,
    *,
    generator: torch.Generator | None,
    grad_clip: float | None = None,
    world: int = 1,
    precision: str = "fp32",
    scaler: torch.amp.GradScaler | None = None,
    gradient_pass: GradientPass = backward_pass,
    skip_threshold: float | None = None,
    masked: bool = False,
    frozen: torch.Tensor | None = None,
    stop: Callable[[], bool] | None = None,
    statistics: Sequence[torch.Tensor] = (),
) -> PendingStep:
    """One step, decided where the model lives: the gradient pass, the guard, the update.

    A non-finite loss or gradient norm on any process skips the update everywhere, as vdvae's step
    does; so does a gradient norm (before clipping) of at least ``skip_threshold``; so does a
    ``frozen`` of 1 (a 0-d float: the run already reached its limit of non-finite steps and is only
    waiting for the host to read that). The flags are agreed by one collective on the device (world > 1).

    ``masked`` (an optimizer that takes ``found_inf``, as torch's Adam, AdamW, SGD and Adagrad do in
    the form :class:`torch.amp.GradScaler` drives): the update kernel itself skips the step when told
    to, so the host never reads anything and nothing waits for the device. Otherwise the host reads the
    report (one synchronisation; free on the CPU, where host and device are one), decides, and skips
    by a branch; its result's ``stop`` says whether some process was asked to stop (``stop()``: this
    one was), agreed in the same collective as the flags. Both take the same updates, bit for bit.

    ``statistics`` (:func:`running_statistics`): buffers the forward pass updates; a skipped step
    leaves them as they were, so a non-finite batch cannot poison batch normalisation's running means."""
    saved = [b.clone() for b in statistics]
    report = gradient_pass(model, optimizer, objective, batch, beta, generator=generator, grad_clip=grad_clip,
                           precision=precision, scaler=scaler)
    n = batch.x.shape[0]
    if masked:
        flags = step_flags(report, skip_threshold)
        if world > 1:
            flags = all_max_tensor(flags)
        skip = flags.amax()  # 1.0: skip the update
        if frozen is not None:
            skip = torch.maximum(skip, frozen)
        optimizer.found_inf = skip  # type: ignore[attr-defined]
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf  # type: ignore[attr-defined]
        pending = PendingStep(report, flags, skip, n)
        for b, old in zip(statistics, saved, strict=True):
            b.copy_(torch.where(skip > 0, old, b))
    else:  # the host reads the report (one synchronisation) and decides by a branch
        loss_v, gnorm_v, rec_v, kl_v = report.tolist()
        finite = math.isfinite(loss_v) and math.isfinite(gnorm_v)
        large = finite and skip_threshold is not None and gnorm_v >= skip_threshold
        bad, large, halt = all_any([not finite, large, stop is not None and stop()], world)
        ok = not (bad or large)
        if ok:
            optimizer.step()
        else:
            optimizer.zero_grad(set_to_none=True)
            for b, old in zip(statistics, saved, strict=True):
                b.copy_(old)
        pending = PendingStep(report, None, None, n, StepResult(loss_v, gnorm_v, rec_v, kl_v, n, ok, halt,
                                                                 large and not bad))
    if scaler is not None:
        scaler.update()  # after an overflow the scale halves: the guard counts that step as skipped
    return pending


def read_steps(steps: Sequence[PendingStep]) -> list[StepResult]:
    """The host's copy of pending steps: those decided on the device all in one transfer (the one
    synchronisation), those the host decided as it read them."""
    on_device = [p for p in steps if p.result is None]
    flat = torch.cat([torch.stack([p.report for p in on_device]).flatten().float(),
                      torch.stack([p.flags for p in on_device]).flatten().float(),  # type: ignore[misc]
                      torch.stack([p.skip for p in on_device]).float()]).tolist() if on_device else []  # type: ignore[misc]
    k, i, out = len(on_device), 0, []
    for p in steps:
        if p.result is not None:
            out.append(p.result)
            continue
        loss_v, gnorm_v, rec_v, kl_v = flat[4 * i : 4 * i + 4]
        bad, large = flat[4 * k + 2 * i] > 0, flat[4 * k + 2 * i + 1] > 0
        applied = flat[6 * k + i] == 0
        out.append(StepResult(loss_v, gnorm_v, rec_v, kl_v, p.n, applied, False, large and not bad and not applied))
        i += 1
    return out


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    objective: Objective,
    batch: Batch,
    beta: float,
    *,
    generator: torch.Generator | None,
    grad_clip: float | None = None,
    stop: Callable[[], bool] | None = None,
    world: int = 1,
    precision: str = "fp32",
    scaler: torch.amp.GradScaler | None = None,
    gradient_pass: GradientPass = backward_pass,
    skip_threshold: float | None = None,
    masked: bool = False,
) -> StepResult:
    """Minimise ``objective`` on ``batch`` by one optimizer step (:func:`take_step`) and read its numbers
    (:func:`read_steps`). A non-finite loss or gradient on any process skips the update everywhere (the
    gradients are dropped), as vdvae's step does; so does a gradient norm (before clipping) of at least
    ``skip_threshold`` (vdvae's ``skip_threshold``). ``precision`` bf16/fp16 runs the forward pass under
    autocast (float32 master weights); ``scaler`` (fp16) scales the loss, and the gradients are unscaled
    before they are measured or clipped. ``gradient_pass`` computes the gradients (default
    :func:`backward_pass`; :mod:`vaelab.accel` may give a faster one of the same maths). ``masked``
    skips inside the update kernel (:func:`take_step`; the gradients of a skipped step then stay).
    ``stop``: this process was asked to stop; StepResult.stop says whether some process was (one
    collective). The training loop calls :func:`take_step` and reads its steps every few steps instead."""
    p = take_step(model, optimizer, objective, batch, beta, generator=generator, grad_clip=grad_clip, world=world,
                  precision=precision, scaler=scaler, gradient_pass=gradient_pass, skip_threshold=skip_threshold,
                  masked=masked, stop=stop, statistics=running_statistics(model))
    (r,) = read_steps([p])
    if masked:  # the host did not take part in the decision: agree on the stop now
        r = dataclasses.replace(r, stop=all_any([stop is not None and stop()], world)[0])
    return r


class StepGuard:
    """Where a run's steps are decided, and how often the host reads them.

    ``masked``: the update is skipped inside the optimizer's kernel (:func:`take_step`), so a step
    never waits for the device, and the host reads the steps' numbers every ``every`` steps. The device
    also counts the current run of consecutive non-finite steps and, from the step whose run reaches
    ``limit`` (``train.max_nonfinite``) on, freezes every update (:attr:`frozen`) until the host reads
    the steps and stops the run: the halt is exact (the weights are those of that step; no checkpoint is
    written in between), only up to ``every - 1`` steps later. Otherwise the host decides each step as it
    is taken and reads it at once (``every`` = 1)."""

    def __init__(self, masked: bool, every: int, limit: int, run: int, device: torch.device) -> None:
        self.masked, self.every, self.limit = masked, every if masked else 1, limit
        self.run = torch.tensor(float(run), device=device) if masked else None
        self.frozen = torch.zeros((), device=device) if masked else None

    def follow(self, p: PendingStep) -> None:
        """Count ``p`` into the device's run of non-finite steps (applied: 0; non-finite: + 1; skipped
        for its norm: unchanged), and freeze the updates once it reaches the limit."""
        if self.run is None or self.frozen is None:
            return
        self.run = (self.run + p.flags[0]) * p.skip
        self.frozen = torch.maximum(self.frozen, (self.run >= self.limit).float())


@dataclass
class Meters:
    """Running sums of an epoch's applied steps (saved in mid-epoch checkpoints)."""

    sums: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.sums = {"loss": 0.0, "rec": 0.0, "kl": 0.0, "n": 0.0, **self.sums}

    def add(self, r: StepResult) -> None:
        if r.applied:
            self.sums["loss"] += r.loss * r.n
            self.sums["rec"] += r.rec
            self.sums["kl"] += r.kl
            self.sums["n"] += r.n

    @property
    def loss(self) -> float:
        return self.sums["loss"] / self.sums["n"] if self.sums["n"] else math.nan

    def means(self, world: int = 1) -> dict[str, float]:
        """train_loss / train_rec / train_kl per datapoint, summed over every process."""
        keys = ("loss", "rec", "kl", "n")
        tot = dict(zip(keys, all_sum([self.sums[k] for k in keys], world), strict=True))
        n = max(tot["n"], 1.0)
        return {f"train_{k}": tot[k] / n for k in keys[:3]}


@dataclass
class TrainState:
    """Counters that a checkpoint carries besides tensors."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken (including skipped ones)
    step_in_epoch: int = 0  # batches of the current epoch already consumed
    best_val: float = -math.inf  # best validation ELBO (nats, higher is better)
    nonfinite_total: int = 0
    nonfinite_run: int = 0  # consecutive
    skipped_total: int = 0  # finite steps skipped for their gradient norm (train.skip_threshold)
    sums: dict[str, float] = field(default_factory=dict)  # running train sums of the current epoch
    elapsed: float = 0.0  # training seconds so far


def guard_nonfinite(state: TrainState, r: StepResult, limit: int, last_good: Callable[[], str],
                    say: Callable[[str], None], at: int | None = None) -> None:
    """Count a skipped step; ``limit`` non-finite ones in a row stop the run, naming the last good
    checkpoint. A step skipped for its gradient norm is counted apart (``skipped_total``): it neither
    counts towards the limit nor ends a run of non-finite steps. ``at``: the step's number (default
    ``state.step``; the loop reads its steps a few at a time)."""
    at = state.step if at is None else at
    if r.applied:
        state.nonfinite_run = 0
        return
    if r.skipped:
        state.skipped_total += 1
        return
    state.nonfinite_run += 1
    state.nonfinite_total += 1
    say(f"step {at}: non-finite loss or gradient, update skipped ({state.nonfinite_run} in a row)")
    if state.nonfinite_run >= limit:
        raise NonFiniteError(
            f"{state.nonfinite_run} consecutive non-finite losses/gradients at step {at}; stopping. "
            f"Last good checkpoint: {last_good()}. Try a lower train.lr or train.grad_clip, and check the data."
        )
