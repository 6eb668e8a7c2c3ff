"""Compiled evaluation passes (``vaelab evaluate --compile``): the same draws as the eager pass.

:class:`CompiledPasses` is an :data:`~vaelab.evaluation.loop.Pass` that runs
:func:`~vaelab.evaluation.loop.summaries` by ``torch.compile``: one graph per kind of pass (datapoints x
draws, optional parts, autocast; an evaluation has one or two), its noise drawn from the batch's
generator in the eager order and handed in as tensors (:mod:`.noise`), so a compiled evaluation differs
from an eager one only by rounding. The likelihood's elementwise work and its sum over pixels then run
as one pass over the decoder's output. A compiler that fails is reported in one line and the
evaluation goes on eagerly.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import nn

from ..distributions import Noise
from ..evaluation.loop import Summaries, summaries
from . import compiler
from .noise import NoiseRecorder

# Each model's compiled passes, kept as long as the model lives (weakly: they do not keep it alive). A
# later evaluation of the same model re-uses its graphs: a function of its own per evaluation was traced
# by dynamo again each time (~0.5 s on a CPU, in every call of a notebook). One kind per function keeps
# each far below dynamo's limit of graphs per code object (:func:`.compiler.compiled`).
_COMPILED: weakref.WeakKeyDictionary[nn.Module, dict[tuple, Callable]] = weakref.WeakKeyDictionary()


def _compiled_pass(model: nn.Module, x: torch.Tensor, c: torch.Tensor | None, mask: torch.Tensor | None,
                   m: int) -> Callable:
    """The compiled pass of ``model`` for this kind of call, made at its first use."""
    kind = (x.device, x.dtype, tuple(x.shape), m, None if c is None else (c.dtype, tuple(c.shape)),
            None if mask is None else (mask.dtype, tuple(mask.shape)), torch.is_autocast_enabled(x.device.type),
            torch.get_autocast_dtype(x.device.type), torch.is_grad_enabled(), compiler.BACKEND)
    mine = _COMPILED.setdefault(model, {})
    if kind not in mine:
        mine[kind] = compiler.compiled(summaries)
    return mine[kind]


class CompiledPasses:
    """The forward passes of an evaluation by ``torch.compile`` (see the module's docstring)."""

    def __init__(self, say: Callable[[str], None] = print) -> None:
        self.say = say
        self.failed = False
        self.noise: dict[tuple[int, int], NoiseRecorder] = {}

    def __call__(self, model: nn.Module, x: torch.Tensor, c: torch.Tensor | None, mask: torch.Tensor | None,
                 m: int, noise: Noise) -> Summaries:
        if self.failed or not isinstance(noise, torch.Generator):
            return summaries(model, x, c, mask, m, noise)
        shape = (x.shape[0], m)
        if shape not in self.noise:  # note the draws of this shape (throwaway numbers, no gradient here)
            self.noise[shape] = NoiseRecorder.throwaway(x.device)
            summaries(model, x, c, mask, m, self.noise[shape])
        state = noise.get_state()
        try:
            return _compiled_pass(model, x, c, mask, m)(model, x, c, mask, m, self.noise[shape].draw(noise))
        except Exception as e:  # noqa: BLE001  (any compiler failure: fall back, said once)
            noise.set_state(state)
            self.failed = True
            self.say(f"torch.compile is not available here ({compiler.root_cause(e)}); evaluating eagerly")
            return summaries(model, x, c, mask, m, noise)
