"""Completing partly observed images with a conditional VAE (Doersch 2016, Sec. 4.2, Fig. 6).

Given X (the observed pixels), a CVAE draws z ~ N(0, I) and decodes P(Y|z,X): each z gives one
specific completion, and different z give different ones. A regressor (the same network with no z,
:class:`vaelab.models.Regressor`) can only give the single prediction that scores best on average,
which for an ambiguous X is a blur of the possibilities. Completions shown and measured here are
the likelihood's means with the observed pixels pasted back in.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..conditioning import Condition, MaskCondition, override_condition
from ..config import check_count, check_seed
from ..data import to_float
from ..errors import ConfigError
from ..evaluation import eval_mode
from ..models import device_of, generator_for
from ..pipeline import condition_of
from ..provenance import checkpoint_part, python_call, run_provenance, slug, variant_name
from ..runs import Run
from .generate import MAX_IMAGES
from .grid import output_path, save_grid

#: grey level that marks unobserved pixels in the "observed" column
UNOBSERVED = 0.5


@dataclass
class Completion:
    """Completions of N images. Images are (N, C, H, W) in [0, 1] unless said otherwise."""

    observed: torch.Tensor  # the observation as the model saw it; unobserved pixels at UNOBSERVED grey
    mask: torch.Tensor  # 1 where observed (X), 0 where completed (Y)
    samples: torch.Tensor  # (N, S, C, H, W): CVAE completions, one per z ~ N(0, I)
    truth: torch.Tensor
    regressor: torch.Tensor | None = None  # the regressor's completion, if one was given

    def columns(self) -> int:
        return 2 + self.samples.shape[1] + (self.regressor is not None)

    def grid_images(self) -> torch.Tensor:
        """Row i: observed | S completions | regressor (if any) | ground truth -> (N * columns, C, H, W)."""
        parts = [self.observed[:, None], self.samples]
        if self.regressor is not None:
            parts.append(self.regressor[:, None])
        parts.append(self.truth[:, None])
        return torch.cat(parts, dim=1).flatten(0, 1)

    def metrics(self) -> dict[str, Any]:
        """Diversity and accuracy over the completed (unobserved) pixels Y, averaged over the images.

        ``pixel_std``: per-pixel standard deviation across the S completions of the same X;
        ``pairwise_l2``: mean L2 distance between two completions of the same X;
        ``sample_l2`` / ``best_of_s_l2``: L2 distance of a completion (mean / closest of S) to the truth;
        ``regressor_l2``: the regressor's L2 distance to the truth (if given)."""
        u = 1.0 - self.mask  # (N, C, H, W)
        n_u = u.flatten(1).sum(1).clamp(min=1)  # (N,)
        s = self.samples
        S = s.shape[1]
        std = s.std(1, unbiased=True) if S > 1 else torch.zeros_like(s[:, 0])
        out: dict[str, Any] = {"images": s.shape[0], "samples_per_image": S,
                               "unobserved_pixels": float(n_u.mean()),
                               "pixel_std": float(((std * u).flatten(1).sum(1) / n_u).mean())}
        if S > 1:
            d = (s[:, :, None] - s[:, None]) * u[:, None, None]  # (N, S, S, C, H, W)
            dist = d.flatten(3).norm(dim=-1)  # (N, S, S)
            iu = torch.triu_indices(S, S, 1)
            out["pairwise_l2"] = float(dist[:, iu[0], iu[1]].mean())
        else:
            out["pairwise_l2"] = 0.0
        to_truth = ((s - self.truth[:, None]) * u[:, None]).flatten(2).norm(dim=-1)  # (N, S)
        out["sample_l2"] = float(to_truth.mean())
        out["best_of_s_l2"] = float(to_truth.min(1).values.mean())
        if self.regressor is not None:
            out["regressor_l2"] = float(((self.regressor - self.truth) * u).flatten(1).norm(dim=-1).mean())
        return out


def _mask_condition(own: Condition | None, condition: MaskCondition | str | None, cond_dim: int) -> MaskCondition:
    """The partial observation to complete from: the model's ``own`` condition, or another one given
    as an object or a name (presented the way the model was trained)."""
    if own is None and not isinstance(condition, MaskCondition):
        raise ConfigError("give the model's own condition or a mask condition")
    if isinstance(condition, str):
        condition = override_condition(own, condition)
    elif condition is None:
        if not isinstance(own, MaskCondition):
            hint = " (use `vaelab sample --label K` for class-conditional samples)" if own.name == "label" else ""
            raise ConfigError(
                f"completion needs a model conditioned on a partial observation; this one's condition is "
                f"{own.name!r}{hint}"
            )
        condition = own
    if condition.dim != cond_dim:
        raise ConfigError(f"condition {condition.name!r} gives c of size {condition.dim}, the model takes {cond_dim}")
    return condition


@torch.no_grad()
def complete_images(
    model: nn.Module,
    x: torch.Tensor,
    *,
    samples: int = 6,
    seed: int = 0,
    condition: MaskCondition | str | None = None,
    regressor: nn.Module | None = None,
    temperature: float = 1.0,
) -> Completion:
    """Complete images x (N, C, H, W) in [0, 1] from their partial observation.

    ``condition``: the model's own (default), another mask condition or its name (``left-half``,
    ``mask:PATH``; presented the way the model was trained). The observation is drawn once per
    image (seeded), and the CVAE and the regressor both see that same observation."""
    own = None if isinstance(condition, MaskCondition) else condition_of(model)
    cond = _mask_condition(own, condition, model.spec.cond_dim)
    g = generator_for(model, seed)
    x = x.to(device_of(model))
    obs = cond.observe(x, g)
    c = cond.encode_observation(obs)  # (N, cond_dim)
    m = obs.mask
    n = x.shape[0]
    c_rep = c.repeat_interleave(samples, 0)  # (N*S, cond_dim), image-major
    with eval_mode(model):
        mean = model.sample(n * samples, c_rep, generator=g, temperature=temperature, mean=True).clamp(0, 1)
    mean = mean.unflatten(0, (n, samples))  # (N, S, C, H, W)
    filled = m[:, None] * obs.values[:, None] + (1 - m[:, None]) * mean
    reg = None
    if regressor is not None:
        if regressor.spec.cond_dim != c.shape[1]:
            raise ConfigError(f"the regressor takes c of size {regressor.spec.cond_dim}, the CVAE's condition "
                              f"gives {c.shape[1]}: train both with the same condition")
        with eval_mode(regressor):
            pred = regressor.sample(n, c, generator=g, mean=True).clamp(0, 1)
        reg = m * obs.values + (1 - m) * pred
    observed = m * obs.values + (1 - m) * UNOBSERVED
    return Completion(observed, m, filled, x, reg)


@dataclass
class CompletionResult:
    path: Path
    completion: Completion
    metrics: dict[str, Any] = field(default_factory=dict)
    condition: str = ""


def complete_run(
    run: Run | str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    n: int = 8,
    samples: int = 6,
    seed: int = 0,
    which: str = "best",
    condition: str | None = None,
    mask: str | os.PathLike[str] | None = None,
    regressor: str | os.PathLike[str] | None = None,
    split: str = "test",
    start: int = 0,
    data_dir: str | None = None,
    device: str = "auto",
) -> CompletionResult:
    """Write a PNG grid of completions of n images of a split (rows: observed | ``samples`` CVAE
    completions | the regressor run's completion, if given | ground truth); default RUN/completions.png
    (with a part for each setting that differs from its default, e.g. ``completions-left-half.png``).

    ``condition`` / ``mask`` (a mask image path): complete from another partial observation than the
    run's own. Returns the path and the diversity/accuracy :meth:`Completion.metrics`."""
    check_count(n, "n (images to complete)", 1, MAX_IMAGES)
    check_count(samples, "samples (completions per image)", 1, MAX_IMAGES)
    check_count(n * samples, "n x samples (images in the picture)", 1, MAX_IMAGES)
    check_count(start, "start (index of the first image)", 0)
    check_seed(seed)
    out_path = output_path(out, "completions.png") if out is not None else None
    if condition is not None and mask is not None:
        raise ConfigError("give either a condition or a mask file, not both")
    if mask is not None:
        condition = f"mask:{mask}"
    r = Run.of(run, which, data_dir=data_dir, device=device)
    reg_model = None
    if regressor is not None:
        reg = Run.of(regressor, which, device=str(r.device))
        if reg.spec.shape != r.spec.shape:
            raise ConfigError(f"{regressor}: images of shape {reg.spec.shape}, the CVAE's are {r.spec.shape}")
        if reg.condition.name != r.condition.name:
            raise ConfigError(f"{regressor}: trained with condition {reg.condition.name!r}, the CVAE "
                              f"with {r.condition.name!r}; compare models trained on the same X")
        reg_model = reg.model
    x = to_float(r.data(split, limit=n, start=start).images)
    cond = _mask_condition(r.condition, condition, r.spec.cond_dim)
    comp = complete_images(r.model, x, samples=samples, seed=seed, condition=cond, regressor=reg_model)
    name = variant_name(
        "completions", None if condition is None else condition_part(condition),
        None if regressor is None else f"vs-{slug(Path(regressor).name)}", None if split == "test" else split,
        None if start == 0 else f"from{start}", None if seed == 0 else f"seed{seed}", checkpoint_part(r))
    cols = "observed | CVAE completions" + (" | regressor" if reg_model is not None else "") + " | ground truth"
    prov = run_provenance(r, f"completions of {split} images {start}..{start + n - 1}; columns: {cols}",
                          python_call("complete_run", n=n, samples=samples, seed=seed, which=which, condition=condition,
                                      regressor=None if regressor is None else str(regressor), split=split, start=start),
                          seed=seed, temperature=1.0, condition=cond.describe())
    path = save_grid(comp.grid_images(), out_path or r.root / name, nrow=comp.columns(), provenance=prov)
    return CompletionResult(path, comp, comp.metrics(), cond.describe())


def condition_part(condition: str) -> str:
    """The part of a default file name that names a condition given by name: ``left-half``, or
    ``mask-holes`` for ``mask:some/dir/holes.png`` (the mask file's stem: its own extension is not
    repeated before the picture's ``.png``)."""
    kind, sep, path = condition.partition(":")
    if sep and kind == "mask":
        return f"mask-{slug(Path(path).stem)}"
    return slug(condition)


@torch.no_grad()
def completion_metrics(
    model: nn.Module,
    images: torch.Tensor,
    *,
    samples: int = 10,
    seed: int = 0,
    batch_size: int = 100,
    regressor: nn.Module | None = None,
) -> dict[str, Any]:
    """:meth:`Completion.metrics` over many uint8 images (N, C, H, W), in batches, averaged."""
    tot: dict[str, float] = {}
    n = images.shape[0]
    for i in range(0, n, batch_size):
        x = to_float(images[i : i + batch_size])
        met = complete_images(model, x, samples=samples, seed=seed + i, regressor=regressor).metrics()
        for k, v in met.items():
            if isinstance(v, float):
                tot[k] = tot.get(k, 0.0) + v * x.shape[0]
    out: dict[str, Any] = {k: v / max(n, 1) for k, v in tot.items()}
    out.update(images=n, samples_per_image=samples)
    return out
