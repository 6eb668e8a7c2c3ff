"""Test-time uses of a trained model: sampling from its prior, reconstruction, interpolation in the
top layer's latent space, the 2-D manifold of Kingma & Welling (2014, Fig. 4), latent traversals,
and posterior means as arrays. Each works for any model of the latent contract (:mod:`vaelab.models.base`)."""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import check_count, check_seed
from ..data import ImageSet
from ..errors import ConfigError, VaelabWarning
from ..evaluation import eval_mode
from ..models import device_of, generator_for
from ..pipeline import BatchPipeline
from ..provenance import checkpoint_part, python_call, run_provenance, tensor_part, variant_name
from ..runs import Run
from .grid import output_path, save_grid

RunLike = Run | str | os.PathLike[str]
MAX_IMAGES = 10_000  # images in one picture
MAX_STEPS = 1_000  # interpolation steps
MAX_MANIFOLD = 100  # an n x n manifold
PRIOR_DRAWS = 4096  # draws that measure a prior's spread per dimension (traversal ranges)


def _check_temperature(t: float | Sequence[float]) -> float | tuple[float, ...]:
    """One temperature, or one per stochastic layer (bottom-up; the model checks the count)."""
    values = list(t) if isinstance(t, list | tuple) else [t]
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0
                         for v in values):
        raise ConfigError(f"temperature must be a finite number >= 0 (or one per layer), got {t!r}")
    return tuple(float(v) for v in values) if isinstance(t, list | tuple) else float(t)


def _temperature_text(t: float | Sequence[float]) -> str:
    return ",".join(f"{v:g}" for v in t) if isinstance(t, list | tuple) else f"{t:g}"


def _cond(model: nn.Module, n: int, c: torch.Tensor | None) -> torch.Tensor | None:
    if model.spec.cond_dim and c is None:
        raise ConfigError("this model is conditional: give a condition (e.g. --label)")
    if c is None:
        return None
    c = c.to(device_of(model))
    return c.expand(n, -1) if c.shape[0] == 1 else c


def _top_dim(model: nn.Module, what: str) -> int:
    if not model.latent_dims:
        raise ConfigError(f"{what} needs a latent space, and this model has no latent variables")
    return model.latent_dims[-1]


def _top_code(model: nn.Module, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    """The top layer's posterior mean of each x: (N, L_top)."""
    return model.encode(x, c)[-1].mean


@torch.no_grad()
def sample_images(
    model: nn.Module, n: int = 64, *, seed: int = 0, temperature: float | Sequence[float] = 1.0,
    c: torch.Tensor | None = None, mean: bool = True,
) -> torch.Tensor:
    """n images from the model's prior (std scaled by T, one T or one per layer bottom-up): (n, C, H, W) in
    [0, 1] (the likelihood's mean, or a draw)."""
    check_count(n, "n (images to sample)", 1, MAX_IMAGES)
    temperature = _check_temperature(temperature)
    g = generator_for(model, check_seed(seed))
    with eval_mode(model):
        return model.sample(n, _cond(model, n, c), generator=g, temperature=temperature, mean=mean).clamp(0, 1)


@torch.no_grad()
def reconstruct_images(model: nn.Module, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
    """Decode the top layer's posterior mean of each x: (n, C, H, W) in [0, 1]."""
    _top_dim(model, "reconstruction")
    with eval_mode(model):
        return model.decode(_top_code(model, x, c), c).mean.clamp(0, 1)


@torch.no_grad()
def interpolate_images(
    model: nn.Module, x_a: torch.Tensor, x_b: torch.Tensor, steps: int = 10, c: torch.Tensor | None = None
) -> torch.Tensor:
    """Decode points on the straight line between the (top-layer) posterior means of two images: (steps, C, H, W)."""
    _top_dim(model, "interpolation")
    check_count(steps, "steps", 1, MAX_STEPS)
    with eval_mode(model):
        za, zb = _top_code(model, torch.stack([x_a, x_b]), None if c is None else c.expand(2, -1))
        w = torch.linspace(0, 1, steps, device=za.device)[:, None]
        z = (1 - w) * za + w * zb
        return model.decode(z, None if c is None else c.expand(steps, -1)).mean.clamp(0, 1)


@torch.no_grad()
def manifold_images(
    model: nn.Module, n: int = 20, dims: tuple[int, int] = (0, 1), c: torch.Tensor | None = None,
    eps: float = 0.05,
) -> torch.Tensor:
    """Kingma & Welling (2014) Fig. 4: an n x n grid of quantiles in (eps, 1 - eps) mapped through the
    inverse Gaussian CDF onto top-layer latent dimensions ``dims`` (the others at 0), decoded: (n*n, C, H, W)."""
    L = _top_dim(model, "a manifold")
    check_count(n, "n (grid size)", 1, MAX_MANIFOLD)
    if len(dims) != 2 or max(dims) >= L or min(dims) < 0 or dims[0] == dims[1]:
        raise ConfigError(f"manifold dims {tuple(dims)}: give two different latent dimensions in 0..{L - 1}")
    q = torch.linspace(eps, 1 - eps, n, device=device_of(model))
    vals = torch.distributions.Normal(0.0, 1.0).icdf(q)
    z = torch.zeros(n * n, L, device=device_of(model))
    # rows go down dims[1] (top = high values), columns go across dims[0]
    z[:, dims[0]] = vals.repeat(n)
    z[:, dims[1]] = vals.flip(0).repeat_interleave(n)
    with eval_mode(model):
        return model.decode(z, _cond(model, n * n, c)).mean.clamp(0, 1)


@torch.no_grad()
def prior_spread(model: nn.Module, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of each top-layer dimension under the model's own prior, from
    draws (exact enough for pictures, and the same for N(0, I), a mixture or a VampPrior): (L,), (L,)."""
    with eval_mode(model):
        z = model.prior().sample_n(PRIOR_DRAWS, generator_for(model, seed))  # (D, L)
    return z.mean(0), z.std(0)


def layer_names(model: nn.Module) -> list[str]:
    """The stochastic layers' names, bottom-up, as the objective reports them ("z", or "z1".."zL")."""
    n = len(model.latent_dims)
    return ["z"] if n == 1 else [f"z{i + 1}" for i in range(n)]


def layer_index(model: nn.Module, layer: str | None, what: str = "a traversal") -> int:
    """The index (bottom-up) of the layer named ``layer`` ("z2", ...; None or "top": the top layer).
    A layer below the top needs a model that decodes from it (``decode_layers``)."""
    _top_dim(model, what)
    names = layer_names(model)
    if layer is None or layer == "top":
        return len(names) - 1
    if layer not in names:
        raise ConfigError(f"layer {layer!r}: this model's stochastic layers are {', '.join(names)} (bottom-up), "
                          "or 'top'")
    i = names.index(layer)
    if i < len(names) - 1 and not hasattr(model, "decode_layers"):
        raise ConfigError(f"layer {layer!r}: this model cannot decode from a layer below the top "
                          "(it has no decode_layers); traverse the top layer")
    return i


def _codes(model: nn.Module, x: torch.Tensor, c: torch.Tensor | None, layer: int) -> list[torch.Tensor]:
    """The posterior means of layers ``layer``..top of each x (each given the means above): [(N, L_i)]."""
    return [q.mean for q in model.encode(x, c)[layer:]]


def _decode_codes(model: nn.Module, codes: list[torch.Tensor], c: torch.Tensor | None) -> torch.Tensor:
    px = model.decode(codes[0], c) if len(codes) == 1 else model.decode_layers(codes, c)
    return px.mean


@torch.no_grad()
def traverse_images(
    model: nn.Module, x: torch.Tensor, dims: tuple[int, ...] | list[int], steps: int = 9, span: float = 3.0,
    c: torch.Tensor | None = None, layer: int | None = None, spread: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """A latent traversal: for each dimension d in ``dims`` of stochastic layer ``layer`` (index
    bottom-up; None: the top), the image x's posterior mean with z_d set to ``steps`` values evenly
    spaced over a mean ± ``span`` standard deviations (the other dimensions, and the layers above, at the
    image's posterior means; the layers below at their prior's mean), decoded. The mean and standard
    deviation are the top prior's for the top layer, and ``spread`` (from :func:`aggregate_spread`)
    for a lower one, whose prior depends on the layer above. x (1, C, H, W) or (C, H, W); returns
    (len(dims) * steps, C, H, W), a row per dimension."""
    top = len(model.latent_dims) - 1 if model.latent_dims else 0
    layer = top if layer is None else layer
    L = _top_dim(model, "a traversal") if layer == top else model.latent_dims[layer]
    check_count(steps, "steps", 2, MAX_STEPS)
    if isinstance(span, bool) or not isinstance(span, (int, float)) or not math.isfinite(span) or span <= 0:
        raise ConfigError(f"span must be a finite number > 0 (prior standard deviations), got {span!r}")
    dims = list(dims)
    if not dims or len(dims) > L or any(not 0 <= d < L for d in dims) or len(set(dims)) != len(dims):
        raise ConfigError(f"traversal dims {tuple(dims)[:12]}: give different latent dimensions in 0..{L - 1}")
    if layer != top and spread is None:
        raise ConfigError("a traversal of a layer below the top needs its spread (aggregate_spread)")
    x = x if x.dim() == 4 else x[None]
    with eval_mode(model):
        codes = _codes(model, x, c, layer)  # [(1, L_layer), ..., (1, L_top)]
        mu, sd = prior_spread(model) if layer == top else spread
        w = torch.linspace(-span, span, steps, device=codes[0].device)
        n = len(dims) * steps
        swept = codes[0][0].repeat(n, 1)  # (D*S, L)
        for row, d in enumerate(dims):
            swept[row * steps : (row + 1) * steps, d] = mu[d] + w * sd[d]
        above = [z.expand(n, -1) for z in codes[1:]]
        return _decode_codes(model, [swept, *above], None if c is None else c.expand(n, -1)).clamp(0, 1)


@torch.no_grad()
def aggregate_spread(model: nn.Module, x: torch.Tensor, c: torch.Tensor | None, layer: int) -> tuple[torch.Tensor,
                                                                                                     torch.Tensor]:
    """Mean and standard deviation of each unit of layer ``layer`` under the aggregate posterior of the
    images x (1/N sum_n q(z | x_n)): the mean of the posterior means, and by the law of total variance
    sqrt(Var_n[mean] + E_n[variance]). (L,), (L,)."""
    with eval_mode(model):
        q = model.encode(x, c)[layer]
        m = q.mean
        var = m.var(0, unbiased=False) + q.std.pow(2).expand_as(m).mean(0)  # type: ignore[attr-defined]
    return m.mean(0), var.sqrt()


@torch.no_grad()
def encode_means(model: nn.Module, data: ImageSet, pipeline: BatchPipeline, batch_size: int = 1000) -> np.ndarray:
    """Top-layer posterior means E_Q[z|X] of every image: (N, L_top) float32."""
    L = _top_dim(model, "encoding")
    g, device = generator_for(model, 0), device_of(model)
    out = []
    with eval_mode(model):
        for i in range(0, len(data), batch_size):
            labels = None if data.labels is None else data.labels[i : i + batch_size].to(device)
            b = pipeline(data.images[i : i + batch_size].to(device), labels, g)
            out.append(_top_code(model, b.x, b.c))
    return torch.cat(out).cpu().numpy().astype(np.float32) if out else np.zeros((0, L), np.float32)


# ---------------------------------------------------------------- run-level helpers (the CLI's API)
def first_test_images(run: Run, n: int):
    """The first n test images through the run's pipeline (condition drawn with seed 0)."""
    available = len(run.data("test"))
    if available == 0:
        raise ConfigError(f"{run.root}: the test split is empty")
    data = run.data("test", limit=min(n, available))
    device = device_of(run.model)
    labels = None if data.labels is None else data.labels.to(device)
    return run.pipeline(data.images.to(device), labels, generator_for(run.model, 0)), len(data)


def label_condition(run: Run, label: int | None) -> torch.Tensor | None:
    """The one-hot c (1, K) of class ``label`` for a label-conditioned run (None without a label)."""
    if label is None:
        return None
    from ..conditioning import LabelCondition
    from ..errors import VaelabError

    if isinstance(label, bool) or not isinstance(label, int):
        raise ConfigError(f"--label takes a class number, got {label!r}")
    if not isinstance(run.condition, LabelCondition):
        raise VaelabError(f"{run.root}: --label needs a label-conditioned model (model.condition={run.condition.name!r})")
    if not 0 <= label < run.condition.dim:
        raise ConfigError(f"--label {label} is out of range: this model knows classes 0..{run.condition.dim - 1}")
    return run.condition.encode_labels(torch.tensor([label]))


def _cond_part(label: int | None, c: torch.Tensor | None) -> str | None:
    """The file-name part of a picture's condition: ``label7``, a tag of c, or None (unconditional)."""
    if label is not None:
        return f"label{label}"
    return None if c is None else tensor_part("c", c)


def sample_run(run: RunLike, out: str | os.PathLike[str] | None = None, *, n: int = 64,
               seed: int = 0, temperature: float | Sequence[float] = 1.0, which: str = "best",
               c: torch.Tensor | None = None, device: str = "auto", label: int | None = None) -> Path:
    """Write a PNG grid of n samples from the prior; returns its path. The default name is
    RUN/samples.png, with a part for each setting that differs from its default
    (``samples-label7-t0.8.png``), so variants do not overwrite each other (a different n does: the
    same picture, more or fewer images). ``label``: the class of a
    label-conditioned model (or give its condition ``c`` directly)."""
    check_count(n, "n (images to sample)", 1, MAX_IMAGES)
    temperature = _check_temperature(temperature)
    out_path = output_path(out, "samples.png") if out is not None else None
    r = Run.of(run, which, device=device)
    if label is not None:
        c = label_condition(r, label)
    imgs = sample_images(r.model, n, seed=seed, temperature=temperature, c=c)
    t_text = _temperature_text(temperature)
    name = variant_name("samples", _cond_part(label, c), None if temperature == 1.0 else f"t{t_text.replace(',', '_')}",
                        None if seed == 0 else f"seed{seed}", checkpoint_part(r))
    prov = run_provenance(r, "samples from the prior", python_call("sample_run", n=n, seed=seed, temperature=temperature,
                          which=which, label=label), seed=seed,
                          temperature=temperature if isinstance(temperature, float) else f"{t_text} (per layer, bottom-up)",
                          label=label)
    return save_grid(imgs, out_path or r.root / name, provenance=prov)


def reconstruct_run(run: RunLike, out: str | os.PathLike[str] | None = None, *, n: int = 32,
                    which: str = "best", data_dir: str | None = None, device: str = "auto") -> Path:
    """Write a PNG: rows of test images alternating with their reconstructions (all the test split's
    images, with a warning, when it has fewer than n)."""
    check_count(n, "n (images to reconstruct)", 1, MAX_IMAGES)
    out_path = output_path(out, "reconstructions.png") if out is not None else None
    r = Run.of(run, which, data_dir=data_dir, device=device)
    b, m = first_test_images(r, n)
    if m < n:
        warnings.warn(f"{r.root}: the test split has {m} images; reconstructing all {m}, not {n}",
                      VaelabWarning, stacklevel=2)
    rec = reconstruct_images(r.model, b.x, b.c)
    cols = min(8, m)
    pairs = []
    for i in range(0, m, cols):
        pairs += [b.x[i : i + cols], rec[i : i + cols]]
    name = variant_name("reconstructions", checkpoint_part(r))
    prov = run_provenance(r, "test images (rows 1, 3, ...) above their reconstructions (rows 2, 4, ...)",
                          python_call("reconstruct_run", n=n, which=which), seed=0)
    return save_grid(torch.cat(pairs), out_path or r.root / name, nrow=cols, provenance=prov)


def interpolate_run(run: RunLike, out: str | os.PathLike[str] | None = None, *, a: int = 0,
                    b: int = 1, steps: int = 10, which: str = "best", data_dir: str | None = None, device: str = "auto") -> Path:
    """Write a PNG row: decoded points on the line between the posterior means of test images a and b."""
    check_count(a, "a (index of the first image)", 0)
    check_count(b, "b (index of the second image)", 0)
    check_count(steps, "steps", 1, MAX_STEPS)
    out_path = output_path(out, "interpolation.png") if out is not None else None
    r = Run.of(run, which, data_dir=data_dir, device=device)
    if r.spec.cond_dim:
        raise ConfigError("interpolate works on unconditional models")
    available = len(r.data("test"))
    if max(a, b) >= available:
        raise ConfigError(f"image {max(a, b)} requested, the test split has {available} (indices 0..{available - 1})")
    bt, m = first_test_images(r, max(a, b) + 1)
    imgs = interpolate_images(r.model, bt.x[a], bt.x[b], steps)
    row = torch.cat([bt.x[a : a + 1], imgs, bt.x[b : b + 1]])
    name = variant_name("interpolation", None if (a, b) == (0, 1) else f"a{a}-b{b}", checkpoint_part(r))
    prov = run_provenance(r, f"test image {a}, {steps} decoded points from its posterior mean to that of test "
                          f"image {b}, test image {b}", python_call("interpolate_run", a=a, b=b, steps=steps, which=which),
                          seed=0)
    return save_grid(row, out_path or r.root / name, nrow=steps + 2, provenance=prov)


def manifold_run(run: RunLike, out: str | os.PathLike[str] | None = None, *, n: int = 20,
                 dims: tuple[int, int] = (0, 1), which: str = "best", c: torch.Tensor | None = None, device: str = "auto",
                 label: int | None = None) -> Path:
    """Write the 2-D manifold PNG (Kingma & Welling Fig. 4) over latent dimensions ``dims``, with the
    padding and scale of the other grids; default name RUN/manifold.png (with parts for non-default
    settings, e.g. ``manifold-dims2_3-label7.png``)."""
    check_count(n, "n (grid size)", 1, MAX_MANIFOLD)
    out_path = output_path(out, "manifold.png") if out is not None else None
    r = Run.of(run, which, device=device)
    if label is not None:
        c = label_condition(r, label)
    imgs = manifold_images(r.model, n, dims, c=c)
    d0, d1 = dims
    name = variant_name("manifold", None if (d0, d1) == (0, 1) else f"dims{d0}_{d1}",
                        _cond_part(label, c), checkpoint_part(r))
    prov = run_provenance(r, f"latent manifold: columns vary z[{d0}], rows z[{d1}] (top = high) over Gaussian "
                          f"quantiles, other dimensions 0", python_call("manifold_run", n=n, dims=(d0, d1), which=which,
                          label=label), temperature="n/a (a fixed grid of latent points)", dims=f"{d0},{d1}", label=label)
    return save_grid(imgs, out_path or r.root / name, nrow=n, provenance=prov)


@torch.no_grad()
def most_active_dims(model: nn.Module, x: torch.Tensor, c: torch.Tensor | None = None, top: int = 8,
                     layer: int | None = None) -> tuple[int, ...]:
    """The ``top`` dimensions of layer ``layer`` (None: the top layer) whose posterior mean varies most
    over the images x (the active units a traversal shows changing something), in increasing order."""
    _top_dim(model, "a traversal")
    layer = len(model.latent_dims) - 1 if layer is None else layer
    L = model.latent_dims[layer]
    with eval_mode(model):
        spread = model.encode(x, c)[layer].mean.var(0) if x.shape[0] > 1 else torch.ones(L)
    return tuple(int(d) for d in spread.argsort(descending=True)[: min(top, L)].sort().values)


def traverse_run(run: RunLike, out: str | os.PathLike[str] | None = None, *, index: int = 0,
                 dims: tuple[int, ...] | None = None, top: int = 8, steps: int = 9, span: float = 3.0,
                 which: str = "best", data_dir: str | None = None, device: str = "auto",
                 layer: str | None = None) -> Path:
    """Write a traversal PNG for test image ``index``: one row per latent dimension (``dims``, or the
    ``top`` most active units of the layer over the first 500 test images), each row the image's
    code with that one dimension swept (:func:`traverse_images`); ``layer``: which stochastic layer of
    a hierarchy ("z1", "z2", ...; default the top); default name RUN/traversal.png (with parts for
    non-default settings, e.g. ``traversal-image3.png``, ``traversal-z2.png``)."""
    check_count(index, "index (test image)", 0)
    check_count(top, "top (dimensions to show)", 1, MAX_IMAGES)
    out_path = output_path(out, "traversal.png") if out is not None else None
    r = Run.of(run, which, data_dir=data_dir, device=device)
    li = layer_index(r.model, layer)
    top_layer = li == len(r.model.latent_dims) - 1
    available = len(r.data("test"))
    if index >= available:
        raise ConfigError(f"image {index} requested, the test split has {available} (indices 0..{available - 1})")
    b, _ = first_test_images(r, max(index + 1, min(available, 500)))
    chosen = dims is None
    dims = most_active_dims(r.model, b.x, b.c, top, li) if dims is None else tuple(dims)
    c = None if b.c is None else b.c[index : index + 1]
    spread = None if top_layer else aggregate_spread(r.model, b.x, b.c, li)
    imgs = traverse_images(r.model, b.x[index], dims, steps, span, c, layer=li, spread=spread)
    dims_text = ",".join(map(str, dims))
    lname = layer_names(r.model)[li]
    name = variant_name("traversal", None if top_layer else lname, None if index == 0 else f"image{index}",
                        None if chosen else f"dims{dims_text.replace(',', '_')}",
                        None if span == 3.0 else f"span{span:g}", checkpoint_part(r))
    over = ("the prior's mean" if top_layer else
            f"the aggregate posterior's mean of layer {lname} over the first {b.x.shape[0]} test images")
    prov = run_provenance(r, f"latent traversal of test image {index}: row i sets dimension dims[i] of layer {lname} to "
                          f"{steps} values over {over} ± {span:g} standard deviations, the others (and the layers "
                          "above) at the image's posterior mean, the layers below at their prior's mean",
                          python_call("traverse_run", index=index, dims=None if chosen else dims, top=top, steps=steps,
                                      span=span, which=which, layer=None if top_layer else lname),
                          temperature="n/a (decoded means)", dims=dims_text, layer=lname)
    return save_grid(imgs, out_path or r.root / name, nrow=steps, provenance=prov)


def encode_run(run: RunLike, out: str | os.PathLike[str] | None = None, *, split: str = "test",
               which: str = "best", data_dir: str | None = None, device: str = "auto") -> Path:
    """Write the top-layer posterior means of a split to .npy (N, L); labels, if any, to *_labels.npy."""
    from ..runs.checkpoint import atomic_write

    out_path = output_path(out, f"encoded-{split}.npy") if out is not None else None
    r = Run.of(run, which, data_dir=data_dir, device=device)
    data = r.data(split)
    z = encode_means(r.model, data, r.pipeline)
    p = out_path or r.root / f"encoded-{split}.npy"

    def save(path: Path, a: np.ndarray) -> None:  # exactly at ``path`` (np.save would add .npy), atomically
        buf = io.BytesIO()
        np.save(buf, a)
        atomic_write(path, buf.getvalue())

    save(p, z)
    if data.labels is not None:
        save(p.with_name(p.stem + "_labels.npy"), data.labels.numpy())
    return p
