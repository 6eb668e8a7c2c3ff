"""The compiled training step (``--compile``), derived from the eager one, and the denormal setting.

:func:`~vaelab.training.step.train_step` is a gradient pass (:func:`~vaelab.training.step.backward_pass`)
followed by the guard, the update and the report. Compiling changes only the first part:

- :class:`FusedGradients`: the whole gradient pass as one graph: the forward pass, the loss, its
  gradients (``torch.autograd.grad`` traced into the graph, so no autograd engine runs between the
  graph's kernels), the gradient norm and the clipping; the gradients are then handed to the
  optimizer's ``.grad`` and ``train_step`` does the rest as always. Where this torch's dynamo cannot
  trace ``autograd.grad`` (:func:`~.compiler.has`), or the run is distributed or scales an fp16 loss,
  instead:
- :class:`CompiledObjective`: the forward pass and the loss compiled, the backward pass eager.

Both take only full batches (``dynamic=False``: the short last batch of an epoch runs eagerly, so it
never triggers a recompile), take their noise as tensors drawn from the run's generator in the eager
order (:mod:`.noise`), and, if compiling fails, say so in one line, put the generator back, and leave
every later step to the eager pass.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn

from ..conditioning import Batch
from ..devices import autocast
from ..objectives import ELBOTerms, LayerKL, Objective
from ..training.step import backward_pass, clip_factor, step_report
from . import compiler
from .noise import NoiseRecorder, PreDrawn


@contextlib.contextmanager
def flush_denormal() -> Iterator[None]:
    """Denormal floats read and computed as 0 inside the block (x86 with SSE3, ARM; elsewhere a no-op);
    the process default (off) is restored on leaving it. Adam's moment estimates of always-zero
    gradients (pixels black in every image) decay into the denormal range, where each operation on them
    costs ~100x; flushing them changes no result that matters (they are below 1e-38)."""
    on = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if on:
            torch.set_flush_denormal(False)


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


def _scalar(beta: float, batch: Batch) -> torch.Tensor:
    """The KL weight as a 0-d tensor: a float would be a constant of the graph, and a warm-up that
    changes it at every step would recompile at every step. Filled on the device (a tensor made from a
    Python number on a GPU is copied over, and the copy waits for the GPU)."""
    return torch.empty((), dtype=torch.float32, device=batch.x.device).fill_(beta)


def _sum_of_squares(g: torch.Tensor) -> torch.Tensor:
    """Σ g², summed row by row first: inductor sums a float reduction of more than 4096 elements in
    cascades (an accuracy a gradient norm does not need), which took ~4x the time of row sums and then a
    sum of the rows (the fused step on a CPU: ~0.15 ms a step less)."""
    sq = g.square()
    return (sq.reshape(g.shape[0], -1).sum(1) if g.dim() > 1 else sq).sum()


class _Compiled:
    """What both compiled forms share: the compiled function, the noise of a full batch, the report of
    the first step's time, and the fallback to eager on a compiler failure."""

    kind = ""

    def __init__(self, fn: Callable, batch_size: int, say: Callable[[str], None], backend,
                 graphs: bool = False) -> None:
        self.batch_size, self.say, self.fn, self.backend, self.graphs = batch_size, say, fn, backend, graphs
        self.cache = compiler.cache_dir()
        self.compiled: Callable | None = compiler.compiled(fn, backend, graphs)
        self.noise: NoiseRecorder | None = None  # the draws of one full batch
        self.started: float | None = None

    def takes(self, batch: Batch) -> bool:
        return self.compiled is not None and batch.x.shape[0] == self.batch_size

    def _timed(self) -> None:
        """Say how long the first compiled step took (the compile), on the call after it."""
        if self.started is None:
            self.started = time.perf_counter()
        elif self.started > 0:
            self.say(f"torch.compile ({self.kind}): the first step took {time.perf_counter() - self.started:.1f} s "
                     f"(compiling; cache {self.cache})")
            self.started = 0.0

    def _failed(self, e: Exception, generator: torch.Generator | None, state: torch.Tensor | None) -> bool:
        """After a failed compiled call: the generator put back, and one line. Returns whether to try
        again: a step captured in CUDA graphs falls back to the compiled step without them, that one
        to eager (the call returns False: the caller takes the eager pass)."""
        if generator is not None and state is not None:
            generator.set_state(state)
        if self.graphs:
            self.graphs = False
            self.compiled = compiler.compiled(self.fn, self.backend)
            self.say(f"CUDA graphs are not possible for this step ({compiler.root_cause(e)}); "
                     "it runs compiled without them")
            return True
        self.compiled = None
        self.say(f"torch.compile is not available here ({compiler.root_cause(e)}); training eagerly")
        return False


class CompiledObjective(_Compiled):
    """An :class:`~vaelab.objectives.Objective` whose forward pass and loss run compiled. The returned
    terms hold the per-datapoint reconstruction and the total KL (what the step reports)."""

    kind = "the forward pass and the loss"

    def __init__(self, objective: Objective, batch_size: int, say: Callable[[str], None] = print,
                 backend: str | Callable | None = None) -> None:
        self.objective = objective
        super().__init__(self._forward, batch_size, say, backend)

    def _record(self, model: nn.Module, batch: Batch, beta: float) -> NoiseRecorder:
        """The draws one full batch takes, noted by a forward pass without gradients that changes
        nothing (throwaway noise, the global random state and the model's buffers restored)."""
        noise = NoiseRecorder.throwaway(batch.x.device)
        with torch.no_grad(), leaves_no_trace(model, batch.x.device):
            self.objective(model, batch, generator=noise, beta=beta)  # type: ignore[arg-type]
        return noise

    def _forward(self, model: nn.Module, batch: Batch, noise: PreDrawn, beta: torch.Tensor):
        loss, terms = self.objective(model, batch, generator=noise, beta=beta)  # type: ignore[arg-type]
        return loss, terms.log_px_z, terms.kl

    def __call__(self, model: nn.Module, batch: Batch, *, generator: torch.Generator | None,
                 beta: float = 1.0) -> tuple[torch.Tensor, ELBOTerms]:
        if not self.takes(batch):
            return self.objective(model, batch, generator=generator, beta=beta)
        if self.noise is None:
            self.noise = self._record(model, batch, beta)
        self._timed()
        state = None if generator is None else generator.get_state()
        try:
            loss, log_px_z, kl = self.compiled(model, batch, self.noise.draw(generator), _scalar(beta, batch))
        except Exception as e:  # noqa: BLE001  (any compiler failure: fall back, said once)
            self._failed(e, generator, state)
            return self(model, batch, generator=generator, beta=beta)
        return loss, ELBOTerms(log_px_z, [LayerKL("total", 0, kl, None, True)])


class _Bound(nn.Module):
    """The objective of a model as a module of its own, so that ``torch.func.functional_call`` can
    evaluate it with the parameters handed in (the graph's inputs) instead of the model's."""

    def __init__(self, model: nn.Module, objective: Objective, precision: str) -> None:
        super().__init__()
        self.model, self.objective, self.precision = model, objective, precision

    def forward(self, batch: Batch, noise: PreDrawn, beta: torch.Tensor) -> tuple[torch.Tensor, ELBOTerms]:
        with autocast(batch.x.device, self.precision):
            return self.objective(self.model, batch, generator=noise, beta=beta)  # type: ignore[arg-type]


class FusedGradients(_Compiled):
    """:func:`~vaelab.training.step.backward_pass` as one compiled graph (a
    :class:`~vaelab.training.step.GradientPass`): the same loss, gradients, norm, clipping and report,
    with the parameters' gradients set from the graph's outputs. Used where it computes the same pass
    (:meth:`build`); the short last batch of an epoch takes the eager pass."""

    kind = "the whole step"

    def __init__(self, model: nn.Module, objective: Objective, batch_size: int, precision: str,
                 grad_clip: float | None, say: Callable[[str], None] = print,
                 backend: str | Callable | None = None, graphs: bool = False) -> None:
        self.bound, self.grad_clip = _Bound(model, objective, precision), grad_clip
        super().__init__(self._grads, batch_size, say, backend, graphs)
        self.names: list[str] = []  # the parameters that get a gradient (those an eager step updates)
        self.params: list[nn.Parameter] = []
        self.known: set[tuple] = set()  # signatures (:meth:`_signature`) of calls that ran compiled
        self.beta: tuple[float, torch.Tensor] | None = None

    @classmethod
    def build(cls, model: nn.Module, objective: Objective, batch_size: int, precision: str,
              grad_clip: float | None, world: int, scaler: object | None,
              say: Callable[[str], None] = print) -> FusedGradients | None:
        """A fused pass for this run, or None where it cannot compute the same pass. On a CUDA GPU the
        pass is captured in CUDA graphs (one per batch shape, replayed each step: the step's hundreds of
        kernel launches become one), falling back to the compiled pass without them with one line."""
        if world != 1 or scaler is not None or not compiler.has("trace_autograd", say):
            return None
        graphs = any(p.device.type == "cuda" for p in model.parameters())
        return cls(model, objective, batch_size, precision, grad_clip, say, graphs=graphs)

    def _grads(self, params: list[torch.Tensor], batch: Batch, noise: PreDrawn, beta: torch.Tensor):
        """(gradients after clipping, the step's report): the graph."""
        ps = [p.detach().requires_grad_() for p in params]
        with torch.enable_grad():
            loss, terms = torch.func.functional_call(self.bound, dict(zip(self.names, ps, strict=True)),
                                                     (batch, noise, beta))
            gs = list(torch.autograd.grad(loss, ps))
        norm = torch.stack([_sum_of_squares(g) for g in gs]).sum().sqrt()
        if self.grad_clip is not None:
            scale = clip_factor(norm, self.grad_clip)
            gs = [g * scale for g in gs]
        return gs, step_report(loss, norm, terms)

    def _prepare(self, batch: Batch, beta: float) -> None:
        """Note the draws of a full batch and which parameters get a gradient, by an eager forward and
        backward pass that changes nothing (throwaway noise, global random state and buffers restored,
        no gradient kept)."""
        named = [(n, p) for n, p in self.bound.named_parameters() if p.requires_grad]
        device = batch.x.device
        self.noise = NoiseRecorder.throwaway(device)
        with leaves_no_trace(self.bound.model, device):
            loss, _ = self.bound(batch, self.noise, _scalar(beta, batch))  # type: ignore[arg-type]
            grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        kept = [(n, p) for (n, p), g in zip(named, grads, strict=True) if g is not None]
        self.names, self.params = [n for n, _ in kept], [p for _, p in kept]

    def _signature(self, batch: Batch) -> tuple:
        """What the compiled graph of a call depends on that can change between calls: the shapes,
        dtypes, devices and strides of its tensors, which optional parts the batch has, the parameters'
        shapes and dtypes, and the modes (training, grad, deterministic algorithms). The rest is fixed
        for the run: the noise's shapes (noted once), the objective and the network (frozen configs), the
        precision and the clipping. A call whose signature ran compiled before skips dynamo's guards."""
        return (self.bound.model.training, torch.is_grad_enabled(), torch.are_deterministic_algorithms_enabled(),
                *((None if t is None else (t.shape, t.dtype, t.device, t.stride()))
                  for t in (batch.x, batch.c, batch.mask)),
                *((p.shape, p.dtype, p.device) for p in self.params))

    def _beta(self, beta: float, batch: Batch) -> torch.Tensor:
        """The KL weight as a tensor, made again only when it changes (a warm-up changes it each step)."""
        if self.beta is None or self.beta[0] != beta:
            self.beta = (beta, _scalar(beta, batch))
        return self.beta[1]

    def _graph(self, ps: list[torch.Tensor], batch: Batch, noise: PreDrawn, beta: torch.Tensor):
        """The compiled call, with dynamo tracing ``autograd.grad`` (any call may trace: after
        ``torch._dynamo.reset()``, even one that skips the guards); without dynamo's guard checks when
        this signature ran compiled before (and with them after all if that fails)."""
        signature = self._signature(batch)
        if signature in self.known:
            try:
                with compiler.guards_skipped(), compiler.autograd_traced():
                    return self.compiled(ps, batch, noise, beta)  # type: ignore[misc]
            except Exception:  # noqa: BLE001  (run it again with the guards; a real error shows there)
                self.known.clear()
                noise.i = 0
        with compiler.autograd_traced():
            out = self.compiled(ps, batch, noise, beta)  # type: ignore[misc]
        self.known.add(signature)
        return out

    def __call__(self, model: nn.Module, optimizer: torch.optim.Optimizer, objective: Objective, batch: Batch,
                 beta: float, *, generator: torch.Generator | None, grad_clip: float | None, precision: str,
                 scaler: torch.amp.GradScaler | None) -> torch.Tensor:
        if not self.takes(batch):
            return backward_pass(model, optimizer, objective, batch, beta, generator=generator,
                                 grad_clip=grad_clip, precision=precision, scaler=scaler)
        if self.noise is None:
            self._prepare(batch, beta)
        self._timed()
        optimizer.zero_grad(set_to_none=True)  # the last step's gradients freed before the graph allocates its own
        state = None if generator is None else generator.get_state()
        try:
            if self.graphs:  # the last replay's outputs (the gradients, just dropped) are not read again
                compiler.graph_step_begin()
            grads, report = self._graph([p.detach() for p in self.params], batch, self.noise.draw(generator),
                                        self._beta(beta, batch))
        except Exception as e:  # noqa: BLE001  (any compiler failure: fall back, said once)
            if self._failed(e, generator, state):
                self.known.clear()
                return self(model, optimizer, objective, batch, beta, generator=generator, grad_clip=grad_clip,
                            precision=precision, scaler=scaler)
            return backward_pass(model, optimizer, objective, batch, beta, generator=generator,
                                 grad_clip=grad_clip, precision=precision, scaler=scaler)
        for p, g in zip(self.params, grads, strict=True):
            p.grad = g
        # a replay overwrites its outputs: the report is read only steps later (StepGuard), so it is copied
        return report.clone() if self.graphs else report
