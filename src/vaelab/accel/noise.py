"""Noise drawn before a compiled call, handed to the model as a :class:`~vaelab.distributions.NoiseSource`.

Eagerly a draw takes its noise from a ``torch.Generator`` (or the global one). A compiled step cannot take a generator
into its graph (``torch.compile`` does not trace ``torch.randn(..., generator=g)``; it would break the
graph at every draw and fuse nothing), so it takes the noise as tensors instead: :class:`NoiseRecorder`
notes the shapes one eager call draws, :meth:`NoiseRecorder.draw` draws exactly those from the
generator, in the same order (the same numbers an eager step would use, so compiled and eager runs
consume the generator alike and a resume stays exact), and :class:`PreDrawn` hands them out inside
the compiled graph.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class PreDrawn:
    """Standard-normal tensors handed out in order, each checked against the shape asked for."""

    def __init__(self, eps: Sequence[torch.Tensor]) -> None:
        self.eps, self.i = list(eps), 0

    def randn(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if self.i >= len(self.eps) or tuple(self.eps[self.i].shape) != tuple(shape):
            raise RuntimeError(f"pre-drawn noise does not match draw {self.i} of shape {tuple(shape)}")
        t = self.eps[self.i]
        self.i += 1
        return t.to(dtype)


class NoiseRecorder:
    """Draws from ``generator`` like an eager step and notes each draw's (shape, dtype, device)."""

    def __init__(self, generator: torch.Generator | None) -> None:
        self.generator = generator
        self.shapes: list[tuple[tuple[int, ...], torch.dtype, torch.device]] = []

    def randn(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        self.shapes.append((tuple(shape), dtype, torch.device(device)))
        return torch.randn(shape, generator=self.generator, dtype=dtype, device=device)

    @classmethod
    def throwaway(cls, device: torch.device) -> NoiseRecorder:
        """A recorder whose own numbers are thrown away (a seeded generator of its own on ``device``):
        for the pass that only notes the shapes, leaving the run's generators untouched."""
        return cls(torch.Generator(device).manual_seed(0))

    def draw(self, generator: torch.Generator | None) -> PreDrawn:
        """The same draws again, from ``generator``, for a compiled call."""
        return PreDrawn([torch.randn(s, generator=generator, dtype=d, device=dev) for s, d, dev in self.shapes])

