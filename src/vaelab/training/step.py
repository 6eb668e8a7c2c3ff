"""One optimisation step, and the small units the loop runs around it: the running meters (with
their reduction over processes) and the guard that counts skipped steps."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from ..conditioning import Batch
from ..devices import autocast
from ..distributed import all_any, all_sum
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
) -> StepResult:
    """Minimise ``objective`` on ``batch`` by one optimizer step. A non-finite loss or gradient on any
    process skips the update everywhere (the gradients are dropped), as vdvae's step does; so does a
    gradient norm (before clipping) of at least ``skip_threshold`` (vdvae's ``skip_threshold``).
    ``precision`` bf16/fp16 runs the forward pass under autocast (float32 master weights); ``scaler``
    (fp16) scales the loss, and the gradients are unscaled before they are measured or clipped.
    ``gradient_pass`` computes the gradients (default :func:`backward_pass`; :mod:`vaelab.accel` may give
    a faster one of the same maths); the guard, the update and the report are this function's."""
    report = gradient_pass(model, optimizer, objective, batch, beta, generator=generator, grad_clip=grad_clip,
                           precision=precision, scaler=scaler)
    # One synchronisation per step: the loss, the gradient norm and the batch's sums; then one
    # collective for what every process must agree on: skip the update (non-finite somewhere; a norm
    # at the threshold)? stop after this step (``stop()``: this process was signalled, so far;
    # StepResult.stop: some process was)?
    loss_v, gnorm_v, rec_v, kl_v = report.tolist()
    finite = math.isfinite(loss_v) and math.isfinite(gnorm_v)
    large = finite and skip_threshold is not None and gnorm_v >= skip_threshold
    bad, halt, large = all_any([not finite, stop is not None and stop(), large], world)
    ok = not (bad or large)
    if ok:
        optimizer.step() if scaler is None else scaler.step(optimizer)
    else:
        optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.update()  # after an overflow the scale halves: the guard counts that step as skipped
    return StepResult(loss_v, gnorm_v, rec_v, kl_v, batch.x.shape[0], ok, halt, large and not bad)


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
                    say: Callable[[str], None]) -> None:
    """Count a skipped step; ``limit`` non-finite ones in a row stop the run, naming the last good
    checkpoint. A step skipped for its gradient norm is counted apart (``skipped_total``): it neither
    counts towards the limit nor ends a run of non-finite steps."""
    if r.applied:
        state.nonfinite_run = 0
        return
    if r.skipped:
        state.skipped_total += 1
        return
    state.nonfinite_run += 1
    state.nonfinite_total += 1
    say(f"step {state.step}: non-finite loss or gradient, update skipped ({state.nonfinite_run} in a row)")
    if state.nonfinite_run >= limit:
        raise NonFiniteError(
            f"{state.nonfinite_run} consecutive non-finite losses/gradients at step {state.step}; stopping. "
            f"Last good checkpoint: {last_good()}. Try a lower train.lr or train.grad_clip, and check the data."
        )
