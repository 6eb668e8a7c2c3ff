"""Frozen, typed configuration. A run is fully described by a :class:`RunConfig`, saved as JSON
beside every checkpoint so that ``evaluate``, ``sample`` and ``resume`` rebuild everything from it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

C = TypeVar("C")


def resumable(default: Any) -> Any:
    """A setting that may change when a run is resumed (where the data lives, how long to train, how
    much to print): it does not change the maths of the run. Every other setting is fixed for a run."""
    return field(default=default, metadata={"resumable": True})


@dataclass(frozen=True)
class DataConfig:
    """Which data, where to look for it, and how pixels are presented to the model."""

    name: str = "fashion-mnist"  # a registered data set, or "folder:PATH", "npz:PATH", ...
    data_dir: str | None = resumable(None)  # searched first; then $VAELAB_DATA, /usr/share/datasets, the cache
    download: bool = resumable(True)  # download into the cache when found nowhere
    binarize: str = "none"  # none ([0,1] intensities) | dynamic (fresh Bernoulli each pass) | fixed (once, seeded)
    val_size: int = 5000  # examples held out of train for validation (seeded)
    limit_train: int | None = None  # use only the first N training examples (quick runs)
    limit_test: int | None = None
    image_size: int | None = None  # resize/centre-crop target for image folders
    grayscale: bool = False  # convert colour images to one channel
    svhn_extra: bool = False  # svhn: append the 531k "extra" images to the training split
    seed: int = 0  # validation split and fixed binarization

    def __post_init__(self) -> None:
        if self.binarize not in ("none", "dynamic", "fixed"):
            raise ConfigError(f"data.binarize must be none, dynamic or fixed, not {self.binarize!r}")
        if self.val_size < 0:
            raise ConfigError("data.val_size must be >= 0")


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
    likelihood: str = "bernoulli"  # registry name of p(x|z)
    sigma: float = 1.0  # Gaussian likelihood: fixed sigma, or the initial value when learned
    n_mixtures: int = 5  # mixture likelihoods
    condition: str = "none"  # registry name of the condition (conditional VAE); "none": unconditional

    def __post_init__(self) -> None:
        if self.latent_dim < 1:
            raise ConfigError("model.latent_dim must be >= 1")
        if self.sigma <= 0:
            raise ConfigError("model.sigma must be > 0")


@dataclass(frozen=True)
class DataSpec:
    """What the data (and the model's condition) imply, as opposed to what the user asked for: found
    when a run starts and saved in every checkpoint, so a model is rebuilt without the data."""

    shape: tuple[int, int, int] = (1, 28, 28)  # (C, H, W) of the images
    num_classes: int | None = None  # label count of the data set (None: no labels)
    cond_dim: int = 0  # size of the condition vector c fed to the networks (0: unconditional)

    def __post_init__(self) -> None:
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
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    beta: float = 1.0  # KL weight (beta-VAE); 1 is the ELBO
    warmup_epochs: float = 0.0  # KL warm-up: beta rises linearly from 0 over this many epochs
    free_bits: float = 0.0  # nats per latent dimension below which the KL is not penalised
    iwae_k: int = 1  # draws of z per datapoint; > 1 trains the IWAE bound L_k (Burda et al. 2016)
    grad_clip: float | None = None  # clip the gradient's global norm
    max_nonfinite: int = resumable(20)  # consecutive skipped (non-finite) steps before the run stops
    seed: int = 0
    checkpoint_every: int = resumable(0)  # also checkpoint every N steps (0: at each epoch's end only)
    eval_batch_size: int = 1000
    threads: int | None = resumable(None)  # torch intra-op threads (None: torch's default)
    progress: bool = resumable(True)  # progress bars (shown when the output is a terminal)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) < (0 if name == "epochs" else 1):
                raise ConfigError(f"train.{name} has an invalid value {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError("train.lr must be > 0")
        if self.beta < 0:
            raise ConfigError("train.beta must be >= 0")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError("train.grad_clip must be > 0 (or null for no clipping)")
        if self.checkpoint_every < 0:
            raise ConfigError("train.checkpoint_every must be >= 0 (0: only at each epoch's end)")
        if self.max_nonfinite < 1:
            raise ConfigError("train.max_nonfinite must be >= 1")
        if self.free_bits < 0 or self.warmup_epochs < 0:
            raise ConfigError("train.free_bits and train.warmup_epochs must be >= 0")
        if self.iwae_k < 1:
            raise ConfigError("train.iwae_k must be >= 1")
        if self.iwae_k > 1 and (self.beta != 1.0 or self.free_bits > 0 or self.warmup_epochs > 0):
            raise ConfigError("train.iwae_k > 1 trains the IWAE bound, which has no KL weight: "
                              "leave beta = 1, free_bits = 0 and warmup_epochs = 0")


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

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


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Convert a JSON/TOML value to the annotated type ``tp`` (tuples, optionals, nested configs)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table/object, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{where}: may not be null")
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, where) for v in value)
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(a, v, where) for a, v in zip(args, value, strict=True))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


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
    try:
        text = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config: {e.strerror or e}") from None
    try:
        if p.suffix.lower() == ".json":
            out = json.loads(text)
        else:
            out = tomllib.loads(text.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: not valid {'JSON' if p.suffix == '.json' else 'TOML'}: {e}") from None
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
