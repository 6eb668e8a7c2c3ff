"""Frozen, typed configuration. A run is fully described by a :class:`RunConfig`, saved as JSON
beside every checkpoint so that ``evaluate``, ``sample`` and ``resume`` rebuild everything from it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import os
import re
import sys
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError
from .safeio import read_regular

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

C = TypeVar("C")


SEED_MAX = 2**32 - 1  # seeds are combined with epochs and ranks, and numpy takes 32 bits
MAX_THREADS = 1024
MAX_IMAGE_SIZE = 4096
MAX_LAYERS = 8
MAX_PRIOR_COMPONENTS = 100_000
MAX_GROUPS = 256  # latent groups of a top-down model (VDVAE's CIFAR-10 model has 43)
MAX_CELLS = 64


def resumable(default: Any) -> Any:
    """A setting that may change when a run is resumed (where the data lives, how long to train, how
    much to print): it does not change the maths of the run. Every other setting is fixed for a run."""
    return field(default=default, metadata={"resumable": True})


def recorded(default: Any) -> Any:
    """A setting a run resolves when it starts and records in its config (``auto`` becomes what was
    chosen): re-running it with the default keeps the recorded value, any other value must match it."""
    return field(default=default, metadata={"recorded": True})


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _normalise(obj: Any, section: str) -> None:
    """Check every field of a frozen config against its annotation (so a config built in Python is
    checked like one read from a file), converting lists to tuples and ints to floats in place."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        nv = _coerce(_hints(type(obj))[f.name], v, f"{section}.{f.name}", strict=True)
        if nv is not v:
            object.__setattr__(obj, f.name, nv)


def _check(obj: Any, section: str, name: str, ok: bool, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{section}.{name} must be {rule}, got {_show(getattr(obj, name))}")


def _show(v: Any, width: int = 60) -> str:
    """``repr(v)``, shortened (a 5000-digit integer has no repr at all in Python >= 3.11)."""
    if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 64:
        return f"an integer of {v.bit_length()} bits"
    try:
        text = repr(v)
    except Exception:  # pragma: no cover
        text = f"<{type(v).__name__}>"
    return text if len(text) <= width else text[: width - 3] + "..."


def _finite(v: float | None) -> bool:
    return v is not None and math.isfinite(v)


def _check_seed(obj: Any, section: str) -> None:
    _check(obj, section, "seed", 0 <= obj.seed <= SEED_MAX, f"an integer in 0..{SEED_MAX}")


def check_seed(seed: int, name: str = "seed") -> int:
    """A seed given to a function (evaluation, sampling): an integer in 0..SEED_MAX."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise ConfigError(f"{name} must be an integer in 0..{SEED_MAX}, got {seed!r}")
    return seed


def check_count(value: int, name: str, low: int = 1, high: int | None = None) -> int:
    """A count given to a function (images, draws, batch size): an integer in low..high."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        rule = f">= {low}" if high is None else f"in {low}..{high}"
        raise ConfigError(f"{name} must be an integer {rule}, got {_show(value)}")
    return value


DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")  # what --device accepts
PRECISIONS = ("fp32", "bf16", "fp16")
LOGGERS = ("none", "tensorboard")  # train.log: where training is tracked besides metrics.jsonl
FREE_BITS_PER = ("dim", "group")  # train.free_bits_per: the free-bits allowance per latent dimension or per layer


class _DefaultValSize(int):
    """The default ``data.val_size`` (5000), told apart from a 5000 someone set: data given from
    Python (``vaelab.train(..., data=...)``) hold out 10% of their training images up to 5000
    instead, so a small data set trains without setting it. Everywhere else it is the int 5000."""

    def __repr__(self) -> str:
        return "5000"

    def __reduce__(self) -> tuple[Any, ...]:  # copies and pickles stay the default
        return (_DefaultValSize, (int(self),))


DEFAULT_VAL_SIZE = _DefaultValSize(5000)


def val_size_is_default(cfg: DataConfig) -> bool:
    """Whether ``cfg.val_size`` was left at its default (not given in Python, a file or a flag)."""
    return isinstance(cfg.val_size, _DefaultValSize)


@dataclass(frozen=True)
class DataConfig:
    """Which data, where to look for it, and how pixels are presented to the model."""

    name: str = "fashion-mnist"  # a registered data set, or "folder:PATH", "npz:PATH", ...
    data_dir: str | None = resumable(None)  # where the data set is (alone; else $VAELAB_DATA, /usr/share/datasets, the cache)
    download: bool = resumable(True)  # download into the cache when found nowhere
    binarize: str = "none"  # none ([0,1] intensities) | dynamic (fresh Bernoulli each pass) | fixed (once, seeded)
    # examples held out of train for validation (seeded); left unset, data from Python hold out 10% up to 5000
    val_size: int = DEFAULT_VAL_SIZE
    limit_train: int | None = None  # use only the first N training examples (quick runs)
    limit_test: int | None = None
    image_size: int | None = None  # resize/centre-crop target for image folders
    grayscale: bool = False  # convert colour images to one channel
    svhn_extra: bool = False  # svhn: append the 531k "extra" images to the training split
    seed: int = 0  # validation split and fixed binarization
    # folder:/shards: sources are decoded once into a prepared cache and read from disk batch by batch
    # (false: decoded into memory at every command); the same bits either way (docs/data.md)
    cache: bool = resumable(True)
    cache_dir: str | None = resumable(None)  # where prepared data sets live (default $XDG_CACHE_HOME/vaelab/prepared)

    def __post_init__(self) -> None:
        _normalise(self, "data")
        if self.binarize not in ("none", "dynamic", "fixed"):
            raise ConfigError(f"data.binarize must be none, dynamic or fixed, not {self.binarize!r}")
        _check(self, "data", "name", bool(self.name.strip()), "a data set name or PREFIX:PATH")
        _check(self, "data", "val_size", self.val_size >= 0, ">= 0")
        for name in ("limit_train", "limit_test"):
            _check(self, "data", name, getattr(self, name) is None or getattr(self, name) >= 1, ">= 1 (or null: all)")
        _check(self, "data", "image_size", self.image_size is None or 1 <= self.image_size <= MAX_IMAGE_SIZE,
               f"in 1..{MAX_IMAGE_SIZE} (or null: the default)")
        _check_seed(self, "data")


@dataclass(frozen=True)
class ModelConfig:
    """The generative model p(x|z)p(z) and the inference network q(z|x), as the user asks for them.
    What the data implies (image shape, class count, condition size) is a :class:`DataSpec`."""

    model: str = "vae"  # registry name
    latent_dim: int = 20
    encoder: str = "mlp"  # registry name of the encoder network
    decoder: str = "mlp"
    hidden: tuple[int, ...] = (400,)  # MLP widths (mirrored in the decoder) or conv channels per stage
    activation: str = "relu"
    # The normalisation of the MLPs' hidden layers (registry name): none | batch (batch normalisation
    # before each hidden activation, Sønderby et al. 2016's for the Ladder VAE; bounds, samples and
    # exports use its running statistics, so a datapoint's score never depends on its batch)
    norm: str = "none"
    likelihood: str = "bernoulli"  # registry name of p(x|z)
    sigma: float = 1.0  # Gaussian likelihood: fixed sigma, or the initial value when learned
    n_mixtures: int = 5  # mixture likelihoods
    condition: str = "none"  # registry name of the condition (conditional VAE); "none": unconditional
    # The top layer's prior P(z_top) (registry name): standard (N(0, I)) | mog (a mixture of
    # ``prior_components`` learned diagonal Gaussians) | vamp (the VampPrior of Tomczak & Welling 2018:
    # the encoder's posteriors at ``prior_components`` learned pseudo-inputs).
    prior: str = "standard"
    prior_components: int = 500
    # Stochastic layers (Burda et al. 2016, Sec. 5): q(z1|x) q(z2|z1)..., p(z_L) ... p(z1|z2) p(x|z1).
    # ``latent_dim`` is z1's size; ``upper_latent`` the sizes of z2..z_L (empty: each half the one
    # below); ``upper_hidden`` the widths of the MLPs between stochastic layers (null: two layers as
    # wide as the layer below, Burda's 100-100 between z1 = 100 and z2 = 50; empty: linear).
    layers: int = 1
    upper_latent: tuple[int, ...] = ()
    upper_hidden: tuple[int, ...] | None = None
    # The ladder VAE (model = "ladder"): with ``ladder_skip`` its generative path carries a deterministic
    # top-down state through every layer to the decoder (h_{l-1} = h_l + f([h_l, z_l]), p(z_l | h_l),
    # p(x | h_0): the skip path of the top-down VAEs of Kingma et al. 2016, NVAE and VDVAE); without it,
    # Sønderby et al.'s Markov chain p(z_l | z_{l+1}), p(x | z_1). ``ladder_posterior``: "precision"
    # (Sønderby et al.: the precision-weighted product of the bottom-up estimate and the prior) or
    # "residual" (NVAE: q = N(mu_p + dmu, sigma_p^2 exp(dlogvar)), the deltas from the state above and the
    # bottom-up features together).
    ladder_skip: bool = False
    ladder_posterior: str = "precision"
    # The top-down residual VAE (model = "topdown": NVAE, Vahdat & Kautz 2020; VDVAE, Child 2021).
    # ``hidden`` gives its channels at each resolution, the data's first, each next one half the size
    # (rounded up); ``latent_dim`` the channels of every latent group (group l holds latent_dim x H_l x W_l
    # numbers); ``groups_per_scale`` how many latent groups sit at each resolution of ``hidden`` (same
    # order; empty: ``layers`` groups at the lowest); ``cells_per_group`` the residual cells after each
    # group in the top-down path (and, per group, in the bottom-up path; 2 in NVAE's CIFAR-10 model);
    # ``bottleneck`` the width inside the cells and the groups' heads as a fraction of the channels
    # (below 1: VDVAE's 1x1-3x3-3x3-1x1 blocks, 0.25 in its models).
    groups_per_scale: tuple[int, ...] = ()
    cells_per_group: int = 2
    bottleneck: float = 1.0

    def __post_init__(self) -> None:
        _normalise(self, "model")
        _check(self, "model", "latent_dim", self.latent_dim >= 1, ">= 1")
        _check(self, "model", "hidden", all(h >= 1 for h in self.hidden), "sizes >= 1")
        _check(self, "model", "sigma", _finite(self.sigma) and self.sigma > 0, "> 0 (a finite number)")
        _check(self, "model", "n_mixtures", self.n_mixtures >= 1, ">= 1")
        _check(self, "model", "prior", bool(self.prior.strip()), "a prior's name (standard, mog, vamp)")
        _check(self, "model", "prior_components", 1 <= self.prior_components <= MAX_PRIOR_COMPONENTS,
               f"in 1..{MAX_PRIOR_COMPONENTS}")
        _check(self, "model", "layers", 1 <= self.layers <= MAX_LAYERS, f"in 1..{MAX_LAYERS}")
        _check(self, "model", "upper_latent",
               len(self.upper_latent) in (0, self.layers - 1) and all(d >= 1 for d in self.upper_latent),
               f"empty or {self.layers - 1} size(s) >= 1 (one per layer above the first)")
        _check(self, "model", "upper_hidden", self.upper_hidden is None or all(h >= 1 for h in self.upper_hidden),
               "sizes >= 1 (empty: linear; null: two layers as wide as the layer below)")
        _check(self, "model", "ladder_posterior", self.ladder_posterior in ("precision", "residual"),
               "precision or residual")
        if self.norm != "none" and self.prior == "vamp":
            raise ConfigError("model.norm=batch cannot be used with the VampPrior (model.prior=vamp): its "
                              "pseudo-inputs pass through the encoder and would share its batch statistics "
                              "with the data")
        if self.norm != "none" and (self.model == "topdown" or self.encoder != "mlp" or self.decoder != "mlp"):
            raise ConfigError("model.norm applies to MLP networks (model.encoder and model.decoder mlp); conv "
                              "networks and the top-down conv model (model = topdown) have their own layers: "
                              "leave model.norm=none with them")
        groups = self.groups_per_scale
        _check(self, "model", "groups_per_scale",
               not groups or (len(groups) == len(self.hidden) and min(groups) >= 0
                              and 1 <= sum(groups) <= MAX_GROUPS and self.layers in (1, sum(groups))),
               f"empty or one count >= 0 per entry of model.hidden, in all 1..{MAX_GROUPS} groups "
               "(and model.layers left at 1 or equal to that total)")
        _check(self, "model", "cells_per_group", 0 <= self.cells_per_group <= MAX_CELLS, f"in 0..{MAX_CELLS}")
        _check(self, "model", "bottleneck", _finite(self.bottleneck) and 0 < self.bottleneck <= 1, "in (0, 1]")

    @property
    def latent_dims(self) -> tuple[int, ...]:
        """The size of each stochastic layer, bottom-up."""
        dims = [self.latent_dim]
        for i in range(self.layers - 1):
            dims.append(self.upper_latent[i] if self.upper_latent else max(1, dims[-1] // 2))
        return tuple(dims)


@dataclass(frozen=True)
class DataSpec:
    """What the data (and the model's condition) imply, as opposed to what the user asked for: found
    when a run starts and saved in every checkpoint, so a model is rebuilt without the data."""

    shape: tuple[int, int, int] = (1, 28, 28)  # (C, H, W) of the images
    num_classes: int | None = None  # label count of the data set (None: no labels)
    cond_dim: int = 0  # size of the condition vector c fed to the networks (0: unconditional)

    def __post_init__(self) -> None:
        _normalise(self, "data spec")
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ConfigError(f"data shape must be (C, H, W) with positive sizes, got {self.shape}")
        if self.cond_dim < 0 or (self.num_classes is not None and self.num_classes < 1):
            raise ConfigError(f"invalid data description: {self}")

    def describe(self) -> str:
        classes = "no labels" if self.num_classes is None else f"{self.num_classes} classes"
        return f"images of shape {tuple(self.shape)}, {classes}, a condition of size {self.cond_dim}"

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataSpec:
        return from_dict(cls, d, "data spec")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation of the ELBO with Adam."""

    epochs: int = resumable(10)
    batch_size: int = 128
    lr: float = 1e-3
    # The learning rate over training (training/schedules.py): constant | burda (Burda et al. 2016:
    # 3^i passes at lr * 10^(-i/7)) | cosine (to lr_min over the epochs) | step (x step_gamma every step_epochs)
    schedule: str = "constant"
    lr_min: float = 0.0
    step_epochs: float = 10.0
    step_gamma: float = 0.1
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    beta: float = 1.0  # KL weight (beta-VAE); 1 is the ELBO
    warmup_epochs: float = 0.0  # KL warm-up: beta rises linearly from 0 over this many epochs
    free_bits: float = 0.0  # nats per latent dimension (free_bits_per dim) or per layer (group) not penalised
    free_bits_per: str = "dim"  # dim | group: the allowance per latent dimension, or per stochastic layer (IAF eq. 15)
    # NVAE's KL balancing during the warm-up: each layer's KL weighted by its batch-mean KL per unit of size
    kl_balance: bool = False
    iwae_k: int = 1  # draws of z per datapoint; > 1 trains the IWAE bound L_k (Burda et al. 2016)
    grad_clip: float | None = None  # clip the gradient's global norm
    skip_threshold: float | None = None  # skip an update whose gradient norm (before clipping) is at least this (vdvae)
    ema: float = 0.0  # decay of an exponential moving average of the weights, used for evaluation (vdvae 0.9999); 0: off
    max_nonfinite: int = resumable(20)  # consecutive skipped (non-finite) steps before the run stops
    # on a GPU, the host reads the steps' numbers (losses, skips) every N steps, not at each (docs/speed.md)
    sync_every: int = resumable(16)
    # on a GPU, let cuDNN time its convolution algorithms and pick the fastest: faster conv nets, but a
    # run is then not bit-identical to the same command again (docs/reliability.md)
    cudnn_benchmark: bool = resumable(False)
    seed: int = 0
    device: str = resumable("auto")  # auto | cpu | cuda | cuda:N | mps (auto: a GPU when one is visible)
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast, float32 master weights and reductions)
    compile: bool = resumable(False)  # torch.compile the forward pass and loss (pays off on long runs; docs/speed.md)
    # which float32 linear products run on oneDNN: auto (this machine's persisted decisions, recorded here
    # as the plan taken), aten, onednn, or a recorded plan such as 784x400=7,400x20=0 (docs/reliability.md)
    kernels: str = recorded("auto")
    checkpoint_every: int = resumable(0)  # also checkpoint every N steps (0: at each epoch's end only)
    eval_batch_size: int = 1000
    threads: int | None = resumable(None)  # torch intra-op threads (None: torch's default)
    progress: bool = resumable(True)  # progress bars (shown when the output is a terminal)
    dist_timeout: float = resumable(300.0)  # seconds a process waits for its peers (torchrun) before the job stops
    log: str = resumable("none")  # none | tensorboard (RUN/tb/; pip install 'vaelab[tensorboard]')
    log_every: int = resumable(100)  # the tracker's per-step scalars and sample grids every N steps (0: per epoch only)

    def __post_init__(self) -> None:
        _normalise(self, "train")
        c = functools.partial(_check, self, "train")
        c("epochs", self.epochs >= 0, ">= 0")
        c("batch_size", self.batch_size >= 1, ">= 1")
        c("eval_batch_size", self.eval_batch_size >= 1, ">= 1")
        c("lr", _finite(self.lr) and self.lr > 0, "> 0 (a finite number)")
        c("schedule", bool(self.schedule.strip()), "a schedule's name (constant, burda, cosine, step)")
        c("lr_min", _finite(self.lr_min) and 0 <= self.lr_min <= self.lr, "in [0, lr] (a finite number)")
        c("step_epochs", _finite(self.step_epochs) and self.step_epochs > 0, "> 0 (a finite number)")
        c("step_gamma", _finite(self.step_gamma) and 0 < self.step_gamma <= 1, "in (0, 1] (a finite number)")
        c("weight_decay", _finite(self.weight_decay) and self.weight_decay >= 0, ">= 0 (a finite number)")
        c("adam_betas", all(_finite(b) and 0 <= b < 1 for b in self.adam_betas), "two numbers in [0, 1)")
        c("adam_eps", _finite(self.adam_eps) and self.adam_eps >= 0, ">= 0 (a finite number)")
        c("beta", _finite(self.beta) and self.beta >= 0, ">= 0 (a finite number)")
        c("warmup_epochs", _finite(self.warmup_epochs) and self.warmup_epochs >= 0, ">= 0 (a finite number)")
        c("free_bits", _finite(self.free_bits) and self.free_bits >= 0, ">= 0 (a finite number)")
        c("grad_clip", self.grad_clip is None or (_finite(self.grad_clip) and self.grad_clip > 0),
          "> 0 (a finite number), or null for no clipping")
        c("free_bits_per", self.free_bits_per in FREE_BITS_PER, " or ".join(FREE_BITS_PER))
        c("skip_threshold", self.skip_threshold is None or (_finite(self.skip_threshold) and self.skip_threshold > 0),
          "> 0 (a finite number), or null for no skipping")
        c("ema", _finite(self.ema) and 0 <= self.ema < 1, "in [0, 1) (0: no moving average)")
        c("checkpoint_every", self.checkpoint_every >= 0, ">= 0 (0: only at each epoch's end)")
        c("max_nonfinite", self.max_nonfinite >= 1, ">= 1")
        c("sync_every", 1 <= self.sync_every <= 10_000, "in 1..10000")
        c("dist_timeout", _finite(self.dist_timeout) and self.dist_timeout > 0, "> 0 seconds (a finite number)")
        c("iwae_k", self.iwae_k >= 1, ">= 1")
        c("threads", self.threads is None or 1 <= self.threads <= MAX_THREADS, f"in 1..{MAX_THREADS} (or null)")
        _check_seed(self, "train")
        c("device", isinstance(self.device, str) and DEVICE_PATTERN.fullmatch(self.device) is not None,
          "auto, cpu, cuda, cuda:N or mps")
        c("precision", self.precision in PRECISIONS, "fp32, bf16 or fp16")
        c("log", self.log in LOGGERS, " or ".join(LOGGERS))
        c("log_every", self.log_every >= 0, ">= 0 (0: per epoch only)")
        if self.iwae_k > 1 and (self.beta != 1.0 or self.free_bits > 0 or self.warmup_epochs > 0):
            raise ConfigError("train.iwae_k > 1 trains the IWAE bound, which has no KL weight: "
                              "leave beta = 1, free_bits = 0 and warmup_epochs = 0")
        if self.kl_balance and (self.warmup_epochs <= 0 or self.iwae_k > 1):
            raise ConfigError("train.kl_balance weighs the layers' KLs during the KL warm-up: it needs "
                              "train.warmup_epochs > 0 (and the ELBO, train.iwae_k = 1)")


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.model.norm != "none" and self.train.ema > 0:
            raise ConfigError("train.ema cannot be used with model.norm=batch: the running statistics of "
                              "batch normalisation are gathered with the raw weights, not with their average, "
                              "which would be evaluated with them; set train.ema=0 or model.norm=none")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        return from_dict(cls, d)

    def replace(self, **sections: Any) -> RunConfig:
        return dataclasses.replace(self, **sections)

    def resume_with(self, requested: RunConfig) -> RunConfig:
        """This (saved) config with the resumable settings of ``requested``; a difference in any other
        setting is a :class:`ConfigError` that lists them."""
        diffs, sections = [], {}
        for sec in dataclasses.fields(self):
            mine, theirs = getattr(self, sec.name), getattr(requested, sec.name)
            changes = {}
            for f in dataclasses.fields(mine):
                a, b = getattr(mine, f.name), getattr(theirs, f.name)
                if f.metadata.get("resumable"):
                    changes[f.name] = b
                elif f.metadata.get("recorded") and b == f.default:
                    changes[f.name] = a
                elif a != b:
                    diffs.append(f"{sec.name}.{f.name}: run has {to_dict(a)!r}, now {to_dict(b)!r}")
            sections[sec.name] = dataclasses.replace(mine, **changes)
        if diffs:
            raise ConfigError("cannot resume with a different configuration:\n  " + "\n  ".join(diffs)
                              + "\nUse a new run directory for a new configuration.")
        return RunConfig(**sections)


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [to_dict(v) for v in obj]
    return obj


def _coerce(tp: Any, value: Any, where: str, strict: bool = False) -> Any:
    """Convert a JSON/TOML/command-line value to the annotated type ``tp`` (tuples, optionals, nested
    configs), by the converter for the annotation's kind (:func:`_converter`).
    ``strict``: a value given in Python (no strings for numbers or booleans; configs as they are)."""
    return _converter(tp)(tp, value, where, strict)


def _converter(tp: Any) -> Callable[[Any, Any, str, bool], Any]:
    """The converter for an annotation's kind: a config, a union, a tuple, a scalar, or anything else
    (taken as it is)."""
    if dataclasses.is_dataclass(tp):
        return _to_config
    kind = _KINDS.get(typing.get_origin(tp))
    if kind is not None:
        return kind
    return _to_scalar if tp in _SCALARS else _as_is


def _as_is(tp: Any, value: Any, where: str, strict: bool) -> Any:
    return value


def _to_config(tp: Any, value: Any, where: str, strict: bool) -> Any:
    """A nested config: from Python, an instance as it is; from a file, a table of its settings."""
    if strict:
        if not isinstance(value, tp):
            raise ConfigError(f"{where}: expected a {tp.__name__}, got {_show(value)}")
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a table/object, got {_show(value)}")
    return from_dict(tp, value, where)


def _to_union(tp: Any, value: Any, where: str, strict: bool) -> Any:
    """``X | Y | None``: null where None is allowed, else the first member that takes the value (the
    first member's error when none does)."""
    members = [a for a in typing.get_args(tp) if a is not type(None)]
    if value is None:
        if len(members) < len(typing.get_args(tp)):
            return None
        raise ConfigError(f"{where}: may not be null")
    errors = []
    for a in members:
        try:
            return _coerce(a, value, where, strict)
        except ConfigError as e:
            errors.append(str(e))
    raise ConfigError(errors[0])


def _to_tuple(tp: Any, value: Any, where: str, strict: bool) -> Any:
    """``tuple[X, ...]`` (any length) or ``tuple[X, Y]`` (that many values): the same tuple object
    when every value is already of its type, else a new tuple."""
    args = typing.get_args(tp)
    items = _items(value, where, strict)
    if len(args) == 2 and args[1] is Ellipsis:
        args = (args[0],) * len(items)
    elif len(args) != len(items):
        raise ConfigError(f"{where}: expected {len(args)} values, got {len(items)}")
    out = tuple(_coerce(a, v, where, strict) for a, v in zip(args, items, strict=True))
    return value if isinstance(value, tuple) and all(a is b for a, b in zip(out, value, strict=True)) else out


def _items(value: Any, where: str, strict: bool) -> Sequence[Any]:
    """The values of a list or tuple; not strict, also those of text ``"200,200"`` (as ``--hidden``
    takes them, so ``--set model.hidden=200,200`` works) and a lone number (a list of one)."""
    if isinstance(value, (list, tuple)):
        return value
    if not strict and isinstance(value, str):
        return [v for v in value.split(",") if v.strip()]
    if not strict and isinstance(value, numbers.Real) and not isinstance(value, bool):
        return [value]
    raise ConfigError(f"{where}: expected a list, got {_show(value)}")


class _Scalar(typing.NamedTuple):
    """How a scalar annotation takes values: ``kind``, the Python values it takes (converted to the
    annotated type); not strict, also ``loose`` values read by ``parse`` (a ValueError: not taken)."""

    what: str  # what the error says is expected
    kind: type | tuple[type, ...]
    loose: type | tuple[type, ...]
    parse: Callable[[Any], Any]


def _parse_bool(text: str) -> bool:
    word = text.lower()
    if word not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(text)
    return word in ("true", "1", "yes")


def _parse_int(value: str | float) -> int:
    """Text, or a whole float (``3.0`` in a JSON file)."""
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(value)
    return int(value)


_SCALARS = {
    bool: _Scalar("true/false", bool, str, _parse_bool),
    int: _Scalar("an integer", numbers.Integral, (str, float), _parse_int),  # numpy integers too
    float: _Scalar("a number", numbers.Real, str, float),  # numpy floats and integers too
    str: _Scalar("a string", str, (), str),
}


def _to_scalar(tp: type, value: Any, where: str, strict: bool) -> Any:
    """bool, int, float or str (see :data:`_SCALARS`); a bool is never a number."""
    s = _SCALARS[tp]
    if isinstance(value, s.kind) and (tp is bool or not isinstance(value, bool)):
        return value if isinstance(value, tp) else _convert(tp, value, where)
    if not strict and isinstance(value, s.loose):
        try:
            return s.parse(value)
        except ValueError:
            pass
    raise ConfigError(f"{where}: expected {s.what}, got {_show(value)}")


def _convert(tp: type, value: Any, where: str) -> Any:
    try:
        return tp(value)
    except OverflowError:
        raise ConfigError(f"{where}: {_show(value)} is too large a number") from None


_KINDS: dict[Any, Callable[[Any, Any, str, bool], Any]] = {
    typing.Union: _to_union, types.UnionType: _to_union, tuple: _to_tuple,
}


def from_dict(cls: type[C], d: dict[str, Any], where: str = "config") -> C:
    """Build a (nested) frozen config from a plain dict; unknown keys are an error."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(d) - names
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(names)}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}") for k, v in d.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a TOML or JSON config file into a plain dict (sections data/model/train)."""
    p = Path(path)
    text = read_regular(p, ConfigError, "config")
    kind = "JSON" if p.suffix.lower() == ".json" else "TOML"
    try:
        out = json.loads(text) if kind == "JSON" else tomllib.loads(text.decode("utf-8"))
    except RecursionError:
        raise ConfigError(f"{p}: not valid {kind}: nested too deeply to be read") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: not valid {kind}: {e}") from None
    if not isinstance(out, dict):
        raise ConfigError(f"{p}: top level must be a table/object")
    not_tables = sorted(k for k, v in out.items() if not isinstance(v, dict))
    if not_tables:
        raise ConfigError(f"{p}: {', '.join(not_tables)} must be table(s) of settings ([data], [model], [train])")
    return out


def apply_overrides(base: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (value parsed as JSON when possible, else a string)."""
    out = json.loads(json.dumps(base))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2:
            raise ConfigError(f"override {item!r}: key must be section.key (e.g. train.lr=3e-4)")
        try:
            value = json.loads(raw)
        except RecursionError:
            raise ConfigError(f"override {_show(item)}: value nested too deeply") from None
        except ValueError:
            value = raw
        out.setdefault(parts[0], {})[parts[1]] = value
    return out


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(base))
    for sec, vals in update.items():
        if isinstance(vals, dict):
            out.setdefault(sec, {}).update(vals)
        else:
            out[sec] = vals
    return out
