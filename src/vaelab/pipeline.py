"""The one batch pipeline: images as stored -> what a model is given.

Training, evaluation, pictures and completion all turn (images, labels) into a :class:`Batch` here:
uint8 pixels become intensities k/255 in [0, 1]; with ``binarize = "dynamic"`` a training batch is
binarized afresh (Burda et al. 2016: a new Bernoulli draw each pass; evaluation data were binarized
once, seeded, when loaded); then the condition builds (x, c, mask). Every random draw comes from the
generator passed in, so a resumed run continues exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .conditioning import Batch, Condition
from .data import to_float


@dataclass(frozen=True)
class BatchPipeline:
    condition: Condition
    binarize: str = "none"  # the data config's mode: only "dynamic" acts here (on training batches)

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor | None = None, generator: torch.Generator | None = None,
        *, train: bool = False,
    ) -> Batch:
        """``images`` (B, C, H, W), uint8 or float in [0, 1]; ``train``: a training pass (fresh binarization)."""
        x = to_float(images) if images.dtype == torch.uint8 else images
        if train and self.binarize == "dynamic":
            x = torch.bernoulli(x, generator=generator)
        return self.condition(x, labels, generator)


def condition_of(model: torch.nn.Module) -> Condition:
    """The condition ``model`` was built for (its config names it; its data spec sizes it)."""
    from .conditioning import build_condition

    return build_condition(model.config.condition, model.spec)
