"""What makes a training step fast, applied around :func:`~.step.train_step` without changing its maths.

Automatic (every run):
- float32 linear layers of the MLP nets take the faster of MKL and oneDNN, decided per shape by
  timing (:mod:`vaelab.nets.linear`); the decisions are saved in each checkpoint and re-used on
  resume. :func:`decide_shapes` takes them at the start of a run, for every batch shape it will see.
- denormal floats are flushed to zero while training (:func:`flush_denormal`): Adam's moment
  estimates of always-zero gradients (pixels that are black in every image) decay into the denormal
  range, where each operation on them costs ~100x; flushing them to 0 changes no result that matters
  (they are below 1e-38) and the setting is turned off again when training ends.

Opt-in (``train.compile`` / ``--compile``): ``torch.compile`` of the whole step but Adam's update
(:class:`FusedStep`) where that computes the same step, else of the forward pass and the loss
(:class:`CompiledObjective`). The first step takes the compile time (reported); later runs re-use
inductor's cache (:func:`vaelab.compiling.cache_dir`). Where no compiler works the run goes on eagerly
after one line saying why.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn

from .. import compiling
from ..conditioning import Batch
from ..devices import autocast
from ..distributions.noise import NoiseRecorder, PreDrawn
from ..nets import linear
from ..objectives import ELBOTerms, LayerKL, Objective
from .step import StepResult


@contextlib.contextmanager
def flush_denormal() -> Iterator[None]:
    """Denormal floats read and computed as 0 inside the block (x86 with SSE3, ARM; elsewhere a no-op);
    the process default (off) is restored on leaving it."""
    on = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if on:
            torch.set_flush_denormal(False)


def decide_shapes(model: nn.Module, batch_size: int, n_train: int, eval_batch_size: int, n_val: int,
                  k: int = 1) -> None:
    """Decide the linear layers' kernels now for every row count the run will use (full and last
    training batches, validation batches; times k draws for the decoder), so that a checkpoint taken at
    any step already holds every decision its resume needs."""
    rows = {batch_size, n_train % batch_size, eval_batch_size if n_val >= eval_batch_size else 0,
            n_val % eval_batch_size}
    for r in sorted(r for r in rows if r > 0):
        linear.prepare(model, r)
        if k > 1:
            linear.prepare(model, r * k)


@contextlib.contextmanager
def leaves_no_trace(model: nn.Module, device: torch.device) -> Iterator[None]:
    """A pass inside the block changes nothing a run keeps: the global random state (CPU, and
    ``device``'s when a GPU) and the model's buffers (a batch norm's running statistics) are put back."""
    buffers = [b.detach().clone() for b in model.buffers()]
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            yield
    finally:
        with torch.no_grad():
            for b, saved in zip(model.buffers(), buffers, strict=True):
                b.copy_(saved)


# Where dynamo cannot trace torch.autograd.grad, the fused step's products are ATen's, and it is left for
# the compiled forward pass and loss with oneDNN's products when oneDNN was measured faster for at least
# this share of the step's product FLOPs. On machine A (docs/speed.md) the fused step took 17 % less time
# a step than the compiled objective with the same products, and oneDNN's gain over a product is 15-45 %
# where it is chosen at all (its margin is 0.85): a product or two (a near tie that timing noise decides
# either way) would not pay for losing the fused step, most of them would.
ONEDNN_SHARE = 2 / 3


def _scalar(beta: float, batch: Batch) -> torch.Tensor:
    """The KL weight as a 0-d tensor: a float would be a constant of the graph, and a warm-up that
    changes it at every step would recompile at every step."""
    return torch.tensor(beta, dtype=torch.float32, device=batch.x.device)


def _sum_of_squares(g: torch.Tensor) -> torch.Tensor:
    """Σ g², summed row by row first: inductor sums a float reduction of more than 4096 elements in
    cascades (an accuracy a gradient norm does not need), which took ~4x the time of row sums and then a
    sum of the rows (the fused step on a CPU: ~0.15 ms a step less)."""
    sq = g.square()
    return (sq.reshape(g.shape[0], -1).sum(1) if g.dim() > 1 else sq).sum()


def fused_products(model: nn.Module, batch_size: int, precision: str) -> str | None:
    """Whose matrix products a fused step of this run computes: "onednn" (the linear layers' own,
    where some were decided for oneDNN and dynamo can trace ``torch.autograd.grad``), "aten", or None
    where oneDNN won at least :data:`ONEDNN_SHARE` of them and the graph could not keep them (then the
    compiled objective does). A function of the saved decisions, so a resume chooses the same."""
    share = linear.onednn_share(model, batch_size) if precision == "fp32" else 0.0  # autocast: ATen's
    if share == 0:
        return "aten"
    if compiling.traces_autograd():
        return "onednn"
    return None if share >= ONEDNN_SHARE else "aten"


class CompiledObjective:
    """An :class:`~vaelab.objectives.Objective` whose forward pass and loss run compiled.

    Only batches of ``batch_size`` rows go through the compiled graph (``dynamic=False``): the short
    last batch of an epoch runs eagerly, so it never triggers a recompile, and the run trains on the
    same batches as an eager one. The graph takes its noise as tensors (a generator cannot enter it):
    the shapes of a full batch's draws are noted once (:meth:`_record`), and every full batch draws
    them from the generator first (the same numbers an eager step would take) and hands them in. The
    returned terms hold the per-datapoint reconstruction and the total KL (what the step reports). If
    compiling fails (no C++ compiler, an unsupported operation), ``say`` reports it in one line, the
    random generator is put back where it was, and every later step runs eagerly."""

    def __init__(self, objective: Objective, batch_size: int, say: Callable[[str], None] = print,
                 backend: str | Callable | None = None) -> None:
        self.objective, self.batch_size, self.say = objective, batch_size, say
        self.cache = compiling.cache_dir()
        self.compiled: Callable | None = compiling.compiled(self._forward, backend)
        self.noise: NoiseRecorder | None = None  # the draws of one full batch (:meth:`_record`)
        self.started: float | None = None  # time of the first compiled call
        self.reported = False

    def _record(self, model: nn.Module, batch: Batch, beta: float) -> NoiseRecorder:
        """The draws one full batch takes, noted by a forward pass without gradients that changes
        nothing: its noise comes from a throwaway generator, the global random state is restored after
        it, and so are the model's buffers (a batch norm's running statistics)."""
        noise = NoiseRecorder.throwaway(batch.x.device)
        with torch.no_grad(), leaves_no_trace(model, batch.x.device):
            self.objective(model, batch, generator=noise, beta=beta)  # type: ignore[arg-type]
        return noise

    def _forward(self, model: nn.Module, batch: Batch, noise: PreDrawn, beta: float):
        loss, terms = self.objective(model, batch, generator=noise, beta=beta)  # type: ignore[arg-type]
        return loss, terms.log_px_z, terms.kl

    def __call__(self, model: nn.Module, batch: Batch, *, generator: torch.Generator | None,
                 beta: float = 1.0) -> tuple[torch.Tensor, ELBOTerms]:
        if self.compiled is None or batch.x.shape[0] != self.batch_size:
            return self.objective(model, batch, generator=generator, beta=beta)
        if self.noise is None:
            self.noise = self._record(model, batch, beta)
        if self.started is None:
            self.started = time.perf_counter()
        elif not self.reported:  # the first step (forward, backward, update) included both compiles
            self.reported = True
            self.say(f"torch.compile (the forward pass and the loss): the first step took "
                     f"{time.perf_counter() - self.started:.1f} s (compiling; cache {self.cache})")
        state = None if generator is None else generator.get_state()
        try:
            loss, log_px_z, kl = self.compiled(model, batch, self.noise.draw(generator), _scalar(beta, batch))
        except Exception as e:  # noqa: BLE001  (any compiler failure: fall back, said once)
            if generator is not None:
                generator.set_state(state)
            self.compiled = None
            self.say(f"torch.compile is not available here ({compiling.root_cause(e)}); training eagerly")
            return self.objective(model, batch, generator=generator, beta=beta)
        return loss, ELBOTerms(log_px_z, [LayerKL("total", 0, kl, None, True)])


class FusedStep:
    """The whole training step but Adam's update as one compiled graph: the forward pass, the loss, its
    gradients (``torch.func.grad_and_value`` over the model's parameters, so no autograd engine runs
    between the graph's kernels), the gradient norm and clipping; then one call of the fused Adam
    kernel on the optimizer's own state (the kernel ``torch.optim.Adam(fused=True)`` runs, without its
    per-step Python). It computes what :func:`~.step.train_step` computes, with the same non-finite
    guard (a step whose loss or gradient norm is not finite is skipped), the same Adam state (a
    checkpoint, a resume, or an eager step in between see no difference) and the same draws.

    Used by ``--compile`` where it can be (:meth:`build`): one process, Adam from
    :func:`~.session.make_optimizer` (fused, one parameter group), no fp16 loss scaling. Where some of
    the batch's float32 products were decided for oneDNN (:mod:`vaelab.nets.linear`), the graph keeps
    them (``onednn``: gradients by ``torch.autograd.grad`` traced into the graph, where this torch's
    dynamo can; elsewhere the products are ATen's, and where oneDNN won at least :data:`ONEDNN_SHARE`
    of their FLOPs, :class:`CompiledObjective` keeps oneDNN's instead).
    Like there, only full batches run compiled; the short last batch takes the eager step."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, objective: Objective, batch_size: int,
                 precision: str, grad_clip: float | None, say: Callable[[str], None] = print,
                 backend: str | Callable | None = None, onednn: bool = False) -> None:
        self.model, self.optimizer, self.objective = model, optimizer, objective
        self.batch_size, self.precision, self.grad_clip, self.say = batch_size, precision, grad_clip, say
        self.onednn = onednn  # the linear layers' own products (oneDNN where decided): gradients by autograd
        self.cache = compiling.cache_dir()
        self.compiled: Callable | None = compiling.compiled(self._grads_autograd if onednn else self._grads, backend)
        self.noise: NoiseRecorder | None = None
        self.names: list[str] = []  # the parameters that get a gradient (those an eager step updates)
        self.params: list[nn.Parameter] = []  # those parameters (the optimizer's own objects)
        self.known: set[tuple] = set()  # signatures (:meth:`_signature`) of calls that ran compiled
        self.beta: tuple[float, torch.Tensor] | None = None
        self.started: float | None = None
        self.reported = False

    @classmethod
    def build(cls, model: nn.Module, optimizer: torch.optim.Optimizer, objective: Objective, batch_size: int,
              precision: str, grad_clip: float | None, world: int, scaler: object | None,
              say: Callable[[str], None] = print) -> FusedStep | None:
        """A fused step for this run, or None where it cannot compute the same step."""
        groups = optimizer.param_groups
        if (world != 1 or scaler is not None or type(optimizer) is not torch.optim.Adam or len(groups) != 1
                or not groups[0].get("fused") or groups[0].get("amsgrad") or groups[0].get("maximize")
                or groups[0].get("decoupled_weight_decay")):
            return None
        products = fused_products(model, batch_size, precision)
        if products is None:
            return None
        return cls(model, optimizer, objective, batch_size, precision, grad_clip, say, onednn=products == "onednn")

    def takes(self, batch: Batch) -> bool:
        return self.compiled is not None and batch.x.shape[0] == self.batch_size

    def _loss(self, params: dict[str, torch.Tensor], batch: Batch, noise: PreDrawn, beta: float):
        """(loss, [Σ rec, Σ KL]) with the model's parameters replaced by ``params``."""
        with torch.nn.utils.stateless._reparametrize_module(self.model, params), \
                autocast(batch.x.device, self.precision):
            loss, terms = self.objective(self.model, batch, generator=noise, beta=beta)  # type: ignore[arg-type]
        return loss, torch.stack([terms.log_px_z.detach().sum(), terms.kl.detach().sum()])

    def _grads(self, params: list[torch.Tensor], batch: Batch, noise: PreDrawn, beta: float):
        """(gradients, after clipping; [loss, gradient norm before clipping, Σ rec, Σ KL])."""
        with linear.aten_only():
            grads, (loss, sums) = torch.func.grad_and_value(self._loss, has_aux=True)(
                dict(zip(self.names, params, strict=True)), batch, noise, beta)
        return self._finish([grads[n] for n in self.names], loss, sums)

    def _grads_autograd(self, params: list[torch.Tensor], batch: Batch, noise: PreDrawn, beta: float):
        """:meth:`_grads` with the linear layers' own products (oneDNN where it was decided faster):
        ``torch.func`` cannot differentiate their operator, so the gradients come from
        ``torch.autograd.grad``, which dynamo traces into the same one graph
        (:func:`vaelab.compiling.autograd_traced`)."""
        ps = [p.detach().requires_grad_() for p in params]
        with torch.enable_grad():
            loss, sums = self._loss(dict(zip(self.names, ps, strict=True)), batch, noise, beta)
            grads = list(torch.autograd.grad(loss, ps))
        return self._finish(grads, loss.detach(), sums)

    def _finish(self, gs: list[torch.Tensor], loss: torch.Tensor, sums: torch.Tensor):
        """The gradient norm and the clipping: (gradients, [loss, norm before clipping, Σ rec, Σ KL])."""
        norm = torch.stack([_sum_of_squares(g) for g in gs]).sum().sqrt()
        if self.grad_clip is not None:  # as torch.nn.utils.clip_grad_norm_
            scale = torch.clamp(self.grad_clip / (norm + 1e-6), max=1.0)
            gs = [g * scale for g in gs]
        return gs, torch.cat([loss.detach().reshape(1), norm.reshape(1), sums])

    def _prepare(self, batch: Batch, beta: float) -> None:
        """Note the draws of a full batch and which parameters get a gradient, by an eager forward and
        backward pass that changes nothing (throwaway noise, global random state and buffers restored,
        no gradient kept)."""
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        device = batch.x.device
        self.noise = NoiseRecorder.throwaway(device)
        with leaves_no_trace(self.model, device), autocast(device, self.precision):
            loss, _ = self.objective(self.model, batch, generator=self.noise, beta=beta)  # type: ignore[arg-type]
            grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        kept = [(n, p) for (n, p), g in zip(named, grads, strict=True) if g is not None]
        self.names, self.params = [n for n, _ in kept], [p for _, p in kept]

    def _signature(self, batch: Batch) -> tuple:
        """What the compiled graph of a call depends on that can change between calls: the shapes,
        dtypes, devices and strides of its tensors, which optional parts the batch has, the parameters'
        shapes and dtypes, and the modes (training, grad, deterministic algorithms). The rest is fixed
        for the run: the noise's shapes (noted once), the objective and the network (frozen configs), the
        precision and the clipping. A call whose signature ran compiled before skips dynamo's guards."""
        return (self.model.training, torch.is_grad_enabled(), torch.are_deterministic_algorithms_enabled(),
                *((None if t is None else (t.shape, t.dtype, t.device, t.stride()))
                  for t in (batch.x, batch.c, batch.mask)),
                *((p.shape, p.dtype, p.device) for p in self.params))

    def _beta(self, beta: float, batch: Batch) -> torch.Tensor:
        """The KL weight as a tensor, made again only when it changes (a warm-up changes it each step)."""
        if self.beta is None or self.beta[0] != beta:
            self.beta = (beta, _scalar(beta, batch))
        return self.beta[1]

    def _graph(self, ps: list[torch.Tensor], batch: Batch, noise: PreDrawn, beta: torch.Tensor):
        """The compiled call; without dynamo's guard checks when this signature ran compiled before (and
        with them after all if that fails: the compiled code may have been dropped by
        ``torch._dynamo.reset()``)."""
        signature = self._signature(batch)
        # any call may trace (after ``torch._dynamo.reset()``, even one that skips the guards); the oneDNN
        # form's gradients must then be traced too, not left to an eager autograd.grad between graphs
        traced = compiling.autograd_traced if self.onednn else contextlib.nullcontext
        if signature in self.known:
            try:
                with compiling.guards_skipped(), traced():
                    return self.compiled(ps, batch, noise, beta)  # type: ignore[misc]
            except Exception:  # noqa: BLE001  (run it again with the guards; a real error shows there)
                self.known.clear()
                noise.i = 0
        with traced():
            out = self.compiled(ps, batch, noise, beta)  # type: ignore[misc]
        self.known.add(signature)
        return out

    def __call__(self, batch: Batch, beta: float, *, generator: torch.Generator | None,
                 stop: Callable[[], bool] | None = None) -> StepResult | None:
        """One step on a full batch; None when compiling failed (said once; the caller takes the eager
        step, from the same random state)."""
        if self.noise is None:
            self._prepare(batch, beta)
        if self.started is None:
            self.started = time.perf_counter()
        ps = [p.detach() for p in self.params]
        state = None if generator is None else generator.get_state()
        try:
            grads, out = self._graph(ps, batch, self.noise.draw(generator), self._beta(beta, batch))
        except Exception as e:  # noqa: BLE001  (any compiler failure: fall back, said once)
            if generator is not None:
                generator.set_state(state)
            self.compiled = None
            self.say(f"torch.compile is not available here ({compiling.root_cause(e)}); training eagerly")
            return None
        loss_v, gnorm_v, rec_v, kl_v = out.tolist()
        ok = math.isfinite(loss_v) and math.isfinite(gnorm_v)
        if ok:
            self._adam(self.params, grads)
        if not self.reported:
            self.reported = True
            self.say(f"torch.compile (the whole step): the first step took "
                     f"{time.perf_counter() - self.started:.1f} s (compiling; cache {self.cache})")
        return StepResult(loss_v, gnorm_v, rec_v, kl_v, batch.x.shape[0], ok, stop is not None and stop())

    @torch.no_grad()
    def _adam(self, params: list[nn.Parameter], grads: list[torch.Tensor]) -> None:
        """``torch.optim.Adam(fused=True).step()`` for these parameters and gradients: the same kernel on
        the optimizer's own state (created as Adam creates it on a first step)."""
        group, state = self.optimizer.param_groups[0], self.optimizer.state
        for p in params:
            if not state[p]:
                state[p]["step"] = torch.tensor(0.0, dtype=torch.float32, device=p.device)
                state[p]["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state[p]["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        sts = [state[p] for p in params]
        steps = [s["step"] for s in sts]
        torch._foreach_add_(steps, 1)
        beta1, beta2 = group["betas"]
        torch._fused_adam_([p.detach() for p in params], grads, [s["exp_avg"] for s in sts],
                           [s["exp_avg_sq"] for s in sts], [], steps, amsgrad=False, lr=group["lr"], beta1=beta1,
                           beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"], maximize=False,
                           grad_scale=None, found_inf=None)
