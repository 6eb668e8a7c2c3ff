"""What makes a training step fast, applied around :func:`~.step.train_step` without changing its maths.

Automatic (every run):
- float32 linear layers of the MLP nets take the faster of MKL and oneDNN, decided per shape by
  timing (:mod:`vaelab.nets.linear`); the decisions are saved in each checkpoint and re-used on
  resume. :func:`decide_shapes` takes them at the start of a run, for every batch shape it will see.
- denormal floats are flushed to zero while training (:func:`flush_denormal`): Adam's moment
  estimates of always-zero gradients (pixels that are black in every image) decay into the denormal
  range, where each operation on them costs ~100x; flushing them to 0 changes no result that matters
  (they are below 1e-38) and the setting is turned off again when training ends.

Opt-in (``train.compile`` / ``--compile``): the forward pass and the loss are compiled by
``torch.compile`` (:class:`CompiledObjective`); the first step takes the compile time (reported),
later runs re-use inductor's cache (:func:`vaelab.compiling.cache_dir`). Where no compiler works the run goes
on eagerly after one line saying why.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn

from .. import compiling
from ..conditioning import Batch
from ..distributions.noise import NoiseRecorder, PreDrawn
from ..nets import linear
from ..objectives import ELBOTerms, LayerKL, Objective


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


class CompiledObjective:
    """An :class:`~vaelab.objectives.Objective` whose forward pass and loss run compiled.

    Only batches of ``batch_size`` rows go through the compiled graph (``dynamic=False``): the short
    last batch of an epoch runs eagerly, so it never triggers a recompile, and the run trains on the
    same batches as an eager one. The graph takes its noise as tensors (a generator cannot enter it):
    the shapes of a full batch's draws are noted once (:meth:`_record`), and every full batch draws
    them from the generator first (the same numbers an eager step would take) and hands them in. The
    returned terms hold the per-datapoint reconstruction and the total KL (what the step reports). If compiling fails (no C++ compiler, an unsupported operation), ``say``
    reports it in one line, the random generator is put back where it was, and every later step runs
    eagerly."""

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
        device = batch.x.device
        noise = NoiseRecorder(torch.Generator(device).manual_seed(0))
        buffers = [b.detach().clone() for b in model.buffers()]
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            self.objective(model, batch, generator=noise, beta=beta)  # type: ignore[arg-type]
            for b, saved in zip(model.buffers(), buffers, strict=True):
                b.copy_(saved)
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
            self.say(f"torch.compile: the first step took {time.perf_counter() - self.started:.1f} s "
                     f"(compiling; cache {self.cache})")
        state = None if generator is None else generator.get_state()
        try:
            loss, log_px_z, kl = self.compiled(model, batch, self.noise.draw(generator), beta)
        except Exception as e:  # noqa: BLE001  (any compiler failure: fall back, said once)
            if generator is not None:
                generator.set_state(state)
            self.compiled = None
            self.say(f"torch.compile is not available here ({compiling.root_cause(e)}); training eagerly")
            return self.objective(model, batch, generator=generator, beta=beta)
        return loss, ELBOTerms(log_px_z, [LayerKL("total", 0, kl, None, True)])
