"""Conditions: what a (conditional) model is given besides z. A condition turns a batch of images
and labels into (x, c, mask): the images the encoder sees, the condition vector fed to both
networks (None when unconditional), and which elements of x the likelihood scores (None: all).

The unconditional VAE is the condition ``none``; the conditional VAE (Doersch 2016, Sec. 3)

    E_{Q(z|Y,X)}[log P(Y|z,X)] - KL(Q(z|Y,X) || P(z|X)),   P(z|X) = N(0, I)

uses the others without touching the model, the objective or the training loop:

* ``label``: X is the class label, c its one-hot (B, num_classes); Y is the whole image.
* partial observations, X = the pixels under a mask and Y = the rest: ``centre-column`` (the
  tutorial's Sec. 4.2 experiment), ``left-half``, ``right-half``, ``top-half``, ``bottom-half``,
  ``random-patches`` (a fresh random mask per example and pass) and ``mask:PATH`` (a mask image,
  white = observed). The encoder sees the full image (Y and X) and c; the decoder sees z and c;
  the likelihood scores Y only (mask = 1 - observed). c is the observed pixels times the mask,
  (B, C*H*W), followed by the mask itself when it varies between examples (random patches).

Every random choice (noisy binarization, random masks) is drawn from the ``generator`` passed in,
so a condition is deterministic given the generator's state and a resumed run continues exactly.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import DataSpec
from .errors import ConfigError, DataError
from .registry import Registry


@dataclass
class Batch:
    x: torch.Tensor  # (B, C, H, W) in [0, 1]
    c: torch.Tensor | None = None  # (B, cond_dim)
    mask: torch.Tensor | None = None  # broadcastable to x; 1 where the likelihood scores x


@dataclass
class Observation:
    """A partial observation X of a batch of images."""

    values: torch.Tensor  # (B, C, H, W): the observed pixels as the model sees them, 0 elsewhere
    mask: torch.Tensor  # (B, C, H, W): 1 where observed, 0 where the model must fill in (Y)


class Condition:
    """Base class: unconditional."""

    #: whether the registered name takes an argument after a colon (``mask:PATH``)
    takes_arg: bool = False

    def __init__(self, name: str, spec: DataSpec) -> None:
        self.name = name  # as registered, with its argument (``mask:PATH``)
        self.spec = spec  # only the image shape and the class count are used
        self.num_classes = spec.num_classes

    @property
    def dim(self) -> int:
        return 0

    def describe(self) -> str:
        """What the model's likelihood is conditional on, in words ("" when unconditional)."""
        return ""

    def __call__(
        self, x: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator | None = None
    ) -> Batch:
        return Batch(x)


CONDITIONS: Registry[type[Condition]] = Registry("condition")
CONDITIONS.add("none", Condition)


def _split_name(name: str) -> tuple[str, str | None]:
    prefix, sep, arg = name.partition(":")
    return prefix, (arg if sep else None)


def build_condition(name: str, spec: DataSpec) -> Condition:
    """The condition ``name`` (``NAME`` or ``PREFIX:ARG``, e.g. ``mask:holes.png``) for data of ``spec``."""
    prefix, arg = _split_name(name)
    cls = CONDITIONS.get(prefix)
    if cls.takes_arg and not arg:
        raise ConfigError(f"condition {prefix!r} needs an argument: {prefix}:PATH")
    if arg is not None and not cls.takes_arg:
        raise ConfigError(f"condition {prefix!r} takes no argument (got {name!r})")
    return cls(name, spec)


def describe_data(shape: tuple[int, int, int], num_classes: int | None, condition: str) -> DataSpec:
    """What data of this shape and class count imply for a model with this condition (c's size)."""
    spec = DataSpec(shape=tuple(shape), num_classes=num_classes)  # type: ignore[arg-type]
    return dataclasses.replace(spec, cond_dim=build_condition(condition, spec).dim)


# ---------------------------------------------------------------- class labels
@CONDITIONS.register("label")
class LabelCondition(Condition):
    """c = one-hot of the class label (B, num_classes); the likelihood scores the whole image."""

    def __init__(self, name: str, spec: DataSpec) -> None:
        super().__init__(name, spec)
        if self.num_classes is None or self.num_classes < 1:
            raise ConfigError(
                "condition 'label' needs a data set with class labels (its class count is unknown)"
            )

    @property
    def dim(self) -> int:
        assert self.num_classes is not None
        return self.num_classes

    def describe(self) -> str:
        return f"conditional on the class label (one-hot of {self.num_classes}): -log P(X | label)"

    def encode_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Integer labels (B,) -> one-hot float32 (B, num_classes); out-of-range labels are an error."""
        labels = torch.as_tensor(labels)
        if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.dim() != 1:
            raise ConfigError(f"labels must be a 1-D integer tensor, got {labels.dtype} {tuple(labels.shape)}")
        k = self.dim
        bad = labels[(labels < 0) | (labels >= k)]
        if bad.numel():
            raise ConfigError(
                f"label {int(bad[0])} is out of range: this model knows classes 0..{k - 1}"
            )
        return torch.nn.functional.one_hot(labels.long(), k).to(torch.float32)

    def __call__(
        self, x: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator | None = None
    ) -> Batch:
        if labels is None:
            raise ConfigError("condition 'label' needs labels, and this data has none")
        return Batch(x, self.encode_labels(labels).to(x.device))


# ---------------------------------------------------------------- partial observations
class MaskCondition(Condition, ABC):
    """X = the pixels under a mask, Y = the rest (Doersch 2016, Sec. 3 and 4.2).

    Subclasses say which pixels are observed (:meth:`observed_mask`). ``noisy``: the observed pixels
    are binarized afresh on every call (on with probability = intensity), as in the tutorial's
    experiment; otherwise they are given as intensities. ``include_mask``: c also carries the mask
    (needed when the mask changes between examples, so the model can tell 'dark' from 'unseen')."""

    noisy: bool = False
    include_mask: bool = False
    region: str = ""  # the observed region, in words

    @property
    def dim(self) -> int:
        d = math.prod(self.spec.shape)
        return 2 * d if self.include_mask else d

    @abstractmethod
    def observed_mask(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        """1 where observed: (n or 1, 1, H, W) float32."""

    def describe(self) -> str:
        noise = ", binarized afresh each pass" if self.noisy else ""
        return f"conditional: -log P(Y | X), X = {self.region}{noise}; Y = the other pixels (only Y is scored)"

    def observe(self, x: torch.Tensor, generator: torch.Generator | None = None) -> Observation:
        """The partial observation of images x (B, C, H, W). Draws the mask first, then the noise."""
        if tuple(x.shape[1:]) != tuple(self.spec.shape):
            raise ConfigError(
                f"condition {self.name!r}: images of shape {tuple(x.shape[1:])}, the model's are "
                f"{tuple(self.spec.shape)}"
            )
        m = self.observed_mask(x.shape[0], generator).to(x.device).expand_as(x).contiguous()  # (B, C, H, W)
        v = torch.bernoulli(x, generator=generator) if self.noisy else x
        return Observation(v * m, m)

    def encode_observation(self, obs: Observation) -> torch.Tensor:
        """c (B, cond_dim): the observed pixels times the mask, then the mask when ``include_mask``."""
        parts = [obs.values.flatten(1)]
        if self.include_mask:
            parts.append(obs.mask.flatten(1))
        return torch.cat(parts, dim=1)

    def __call__(
        self, x: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator | None = None
    ) -> Batch:
        obs = self.observe(x, generator)
        return Batch(x, self.encode_observation(obs), 1.0 - obs.mask)


class FixedMaskCondition(MaskCondition):
    """The same observed region for every image, given by :meth:`region_mask`."""

    @abstractmethod
    def region_mask(self, h: int, w: int) -> torch.Tensor:
        """(H, W) bool, True where observed."""

    def observed_mask(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        _, h, w = self.spec.shape
        return self.region_mask(h, w).to(torch.float32)[None, None]  # (1, 1, H, W)


def _rows_cols(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.arange(h)[:, None].expand(h, w), torch.arange(w)[None, :].expand(h, w)


@CONDITIONS.register("centre-column")
class CentreColumn(FixedMaskCondition):
    """Doersch Sec. 4.2: X = the centre column, binarized afresh each pass; Y = the other pixels.

    The column index is W // 2 - 1: column 13 of 28, the index the tutorial states (0-based)."""

    noisy = True

    @property
    def column(self) -> int:
        return max(0, self.spec.shape[2] // 2 - 1)

    @property
    def region(self) -> str:  # type: ignore[override]
        return f"the centre column (column {self.column} of {self.spec.shape[2]})"

    def region_mask(self, h: int, w: int) -> torch.Tensor:
        return _rows_cols(h, w)[1] == self.column


@CONDITIONS.register("left-half")
class LeftHalf(FixedMaskCondition):
    region = "the left half (columns < W // 2)"

    def region_mask(self, h: int, w: int) -> torch.Tensor:
        return _rows_cols(h, w)[1] < w // 2


@CONDITIONS.register("right-half")
class RightHalf(FixedMaskCondition):
    region = "the right half (columns >= W // 2)"

    def region_mask(self, h: int, w: int) -> torch.Tensor:
        return _rows_cols(h, w)[1] >= w // 2


@CONDITIONS.register("top-half")
class TopHalf(FixedMaskCondition):
    region = "the top half (rows < H // 2)"

    def region_mask(self, h: int, w: int) -> torch.Tensor:
        return _rows_cols(h, w)[0] < h // 2


@CONDITIONS.register("bottom-half")
class BottomHalf(FixedMaskCondition):
    region = "the bottom half (rows >= H // 2)"

    def region_mask(self, h: int, w: int) -> torch.Tensor:
        return _rows_cols(h, w)[0] >= h // 2


@CONDITIONS.register("random-patches")
class RandomPatches(MaskCondition):
    """X = ``patches`` random squares of side min(H, W) // 4 per image (they may overlap), drawn
    afresh on every call from the generator; c carries the mask too."""

    include_mask = True
    patches = 4

    @property
    def size(self) -> int:
        return max(1, min(self.spec.shape[1:]) // 4)

    @property
    def region(self) -> str:  # type: ignore[override]
        s = self.size
        return f"{self.patches} random {s}x{s} patches per image (resampled each pass)"

    def observed_mask(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        _, h, w = self.spec.shape
        s = self.size
        dev = generator.device if generator is not None else None  # draw where the generator lives
        top = torch.randint(0, h - s + 1, (n, self.patches, 1), generator=generator, device=dev)  # (n, P, 1)
        left = torch.randint(0, w - s + 1, (n, self.patches, 1), generator=generator, device=dev)
        r, c = torch.arange(h, device=dev), torch.arange(w, device=dev)
        in_r = (r >= top) & (r < top + s)  # (n, P, H)
        in_c = (c >= left) & (c < left + s)  # (n, P, W)
        m = (in_r[..., :, None] & in_c[..., None, :]).any(1)  # (n, H, W)
        return m[:, None].to(torch.float32)


@CONDITIONS.register("mask")
class MaskFile(FixedMaskCondition):
    """``mask:PATH``: a user-supplied mask image (any format Pillow reads), white (> 127 after
    conversion to grey) = observed. It must have the model's height and width. The file is read
    when the condition is built (training, evaluation, loading a run), so keep it in place."""

    takes_arg = True

    def __init__(self, name: str, spec: DataSpec) -> None:
        super().__init__(name, spec)
        self.path = Path(_split_name(name)[1] or "")
        self._mask = self._read(self.path)

    def _read(self, path: Path) -> torch.Tensor:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("L"))
        except FileNotFoundError:
            raise DataError(f"{path}: mask image not found") from None
        except (OSError, UnidentifiedImageError) as e:
            raise DataError(f"{path}: cannot read the mask image: {e}") from None
        _, h, w = self.spec.shape
        if arr.shape != (h, w):
            raise DataError(
                f"{path}: the mask image is {arr.shape[0]}x{arr.shape[1]} (HxW) but the model's images are "
                f"{h}x{w}; give a mask of the same size"
            )
        return torch.from_numpy(arr > 127)

    @property
    def region(self) -> str:  # type: ignore[override]
        return f"the white pixels of {self.path} ({int(self._mask.sum())} of {self._mask.numel()})"

    def region_mask(self, h: int, w: int) -> torch.Tensor:
        return self._mask


def override_condition(trained: Condition, name: str) -> MaskCondition:
    """A different partial observation ``name`` for a model trained with the mask condition ``trained``:
    the region changes, how it is presented (binarized or not, mask in c or not) stays the model's, so
    c keeps the layout the networks were trained on."""
    if not isinstance(trained, MaskCondition):
        raise ConfigError(
            f"this model's condition is {trained.name!r}, not a partial observation; it cannot be given "
            f"a mask"
        )
    new = build_condition(name, trained.spec)
    if not isinstance(new, MaskCondition):
        raise ConfigError(f"condition {name!r} is not a partial observation (a mask)")
    new.noisy, new.include_mask = trained.noisy, trained.include_mask
    return new
