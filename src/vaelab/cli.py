"""The command line: a thin layer that parses into configs and calls the Python API."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from . import __version__
from .config import RunConfig, apply_overrides, load_config_file, merge
from .errors import ConfigError, Interrupted, VaelabError, VaelabWarning
from .safeio import dumps_json


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``vaelab: error: ...``, exit code 2) and no abbreviated options
    (``--ep`` is not taken for ``--epochs``)."""

    def __init__(self, *a: Any, **k: Any) -> None:
        k.setdefault("allow_abbrev", False)
        super().__init__(*a, **k)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"vaelab: error: {message} (see '{self.prog} --help')\n")


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _temperature(text: str) -> float | tuple[float, ...]:
    """--temperature: one number, or one per stochastic layer bottom-up (0.6,0.8,1)."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--temperature takes a number, or one per layer separated by commas (bottom-up), "
                          f"got {text[:40]!r}") from None
    return values[0] if len(values) == 1 else values


# flag -> (section, key, parser) for the training options most people change
_TRAIN_FLAGS: dict[str, tuple[str, str, Any]] = {
    "data": ("data", "name", str),
    "data_dir": ("data", "data_dir", str),
    "binarize": ("data", "binarize", str),
    "val_size": ("data", "val_size", int),
    "limit_train": ("data", "limit_train", int),
    "limit_test": ("data", "limit_test", int),
    "image_size": ("data", "image_size", int),
    "model": ("model", "model", str),
    "latent_dim": ("model", "latent_dim", int),
    "hidden": ("model", "hidden", _ints),
    "activation": ("model", "activation", str),
    "norm": ("model", "norm", str),
    "likelihood": ("model", "likelihood", str),
    "sigma": ("model", "sigma", float),
    "encoder": ("model", "encoder", str),
    "decoder": ("model", "decoder", str),
    "condition": ("model", "condition", str),
    "prior": ("model", "prior", str),
    "prior_components": ("model", "prior_components", int),
    "layers": ("model", "layers", int),
    "upper_latent": ("model", "upper_latent", _ints),
    "upper_hidden": ("model", "upper_hidden", _ints),
    "schedule": ("train", "schedule", str),
    "lr_min": ("train", "lr_min", float),
    "epochs": ("train", "epochs", int),
    "batch_size": ("train", "batch_size", int),
    "lr": ("train", "lr", float),
    "weight_decay": ("train", "weight_decay", float),
    "beta": ("train", "beta", float),
    "warmup_epochs": ("train", "warmup_epochs", float),
    "free_bits": ("train", "free_bits", float),
    "free_bits_per": ("train", "free_bits_per", str),
    "kl_balance": ("train", "kl_balance", str),
    "grad_clip": ("train", "grad_clip", float),
    "skip_threshold": ("train", "skip_threshold", float),
    "ema": ("train", "ema", float),
    "iwae_k": ("train", "iwae_k", int),
    "seed": ("train", "seed", int),
    "device": ("train", "device", str),
    "precision": ("train", "precision", str),
    "threads": ("train", "threads", int),
    "checkpoint_every": ("train", "checkpoint_every", int),
    "dist_timeout": ("train", "dist_timeout", float),
    "log": ("train", "log", str),
    "log_every": ("train", "log_every", int),
}


# flag -> (one-line meaning, what an unset (None) or empty default means) for ``vaelab train --help``
_TRAIN_MEANINGS: dict[str, tuple[str, str]] = {
    "data": ("the data set: a registered name or PREFIX:PATH", ""),
    "data_dir": ("the folder that holds the data set, and the only place it is read from", "$VAELAB_DATA, "
                 "/usr/share/datasets, the cache"),
    "binarize": ("pixels as [0,1] intensities (none), Bernoulli draws each pass (dynamic) or drawn once (fixed)", ""),
    "val_size": ("training examples held out for validation (seeded)", ""),
    "limit_train": ("use only the first N training examples", "all"),
    "limit_test": ("use only the first N test examples", "all"),
    "image_size": ("resize and centre-crop the images of a folder to this size", "as stored"),
    "model": ("what is trained", ""),
    "latent_dim": ("size of the latent code z (of z1 with --layers > 1)", ""),
    "hidden": ("MLP hidden widths, or conv channels per stage, comma-separated", ""),
    "activation": ("the networks' nonlinearity", ""),
    "norm": ("the normalisation of the MLPs' hidden layers (batch: Sønderby et al.'s, for ladders)", ""),
    "likelihood": ("p(x|z), the decoder's distribution over the pixels", ""),
    "sigma": ("gaussian likelihoods: the fixed sigma (the initial value when learned)", ""),
    "encoder": ("the encoder network q(z|x)", ""),
    "decoder": ("the decoder network p(x|z)", ""),
    "condition": ("what a conditional model observes (none: unconditional)", ""),
    "prior": ("the top layer's prior p(z)", ""),
    "prior_components": ("components of the mog and vamp priors", ""),
    "layers": ("stochastic layers z1..zL", ""),
    "upper_latent": ("sizes of z2..zL, comma-separated", "each half the one below"),
    "upper_hidden": ("MLP widths between stochastic layers, comma-separated",
                     "two layers as wide as the layer below"),
    "schedule": ("learning-rate schedule", ""),
    "lr_min": ("the cosine schedule's final learning rate", ""),
    "epochs": ("epochs to train (a higher number continues a finished run)", ""),
    "batch_size": ("training examples per step", ""),
    "lr": ("Adam's learning rate", ""),
    "weight_decay": ("Adam's weight decay", ""),
    "beta": ("KL weight (beta-VAE; 1 is the ELBO)", ""),
    "warmup_epochs": ("KL warm-up: beta rises linearly from 0 over this many epochs", ""),
    "free_bits": ("nats per latent dimension (or per layer, --free-bits-per group) below which the KL is not "
                  "penalised", ""),
    "free_bits_per": ("the free-bits allowance per latent dimension, or per stochastic layer (IAF eq. 15)", ""),
    "kl_balance": ("true: during the KL warm-up weigh each layer's KL by its KL per latent unit (NVAE)", ""),
    "grad_clip": ("clip the gradient's global norm at this value", "no clipping"),
    "skip_threshold": ("skip an update whose gradient norm (before clipping) is at least this (vdvae)", "no skipping"),
    "ema": ("decay of a moving average of the weights, which evaluation, sampling and export use (vdvae "
            "0.9999; 0: none)", ""),
    "iwae_k": ("draws of z per datapoint; > 1 trains and validates by the IWAE bound L_k", ""),
    "seed": ("seed of the initialisation, the data order and every draw", ""),
    "device": ("where to train (auto: a GPU when one is visible)", ""),
    "precision": ("the networks' precision (autocast; float32 master weights and reductions)", ""),
    "threads": ("torch intra-op threads", "torch's default"),
    "checkpoint_every": ("also checkpoint every N steps (0: at each epoch's end only)", ""),
    "dist_timeout": ("under torchrun: seconds a process waits for its peers", ""),
    "log": ("where training is tracked besides metrics.jsonl (tensorboard: RUN/tb/)", ""),
    "log_every": ("the tracker's per-step scalars every N steps (0: per epoch only)", ""),
}


def _train_choices() -> dict[str, list[str]]:
    """The names each train option accepts, from the registries (imported only when help is shown)."""
    from .conditioning import CONDITIONS
    from .config import FREE_BITS_PER, LOGGERS, PRECISIONS
    from .data import DATASETS, SOURCES
    from .distributions.likelihoods import LIKELIHOODS
    from .models import MODELS
    from .models.priors import PRIORS
    from .nets.base import ACTIVATIONS, DECODERS, ENCODERS, NORMS
    from .training.schedules import SCHEDULES

    return {
        "data": [*DATASETS.names(), *(f"{prefix}:PATH" for prefix in SOURCES.names())],
        "binarize": ["none", "dynamic", "fixed"],
        "model": MODELS.names(), "activation": ACTIVATIONS.names(), "norm": NORMS.names(), "likelihood": LIKELIHOODS.names(),
        "encoder": ENCODERS.names(), "decoder": DECODERS.names(), "condition": CONDITIONS.names(),
        "prior": PRIORS.names(), "schedule": SCHEDULES.names(),
        "device": ["auto", "cpu", "cuda", "cuda:N", "mps"], "precision": list(PRECISIONS), "log": list(LOGGERS),
        "free_bits_per": list(FREE_BITS_PER),
    }


def _train_flag_help(flag: str, choices: dict[str, list[str]]) -> str:
    """``meaning; one of: a | b (default: x) [section.key]`` with the default of the config dataclasses."""
    sec, key, _ = _TRAIN_FLAGS[flag]
    meaning, unset = _TRAIN_MEANINGS.get(flag, ("", ""))
    default = getattr(getattr(RunConfig(), sec), key)
    if isinstance(default, tuple):
        shown = ",".join(str(v) for v in default) or unset or "empty"
    else:
        shown = (unset or "unset") if default is None else str(default)
    names = f"; one of: {' | '.join(choices[flag])}" if flag in choices else ""
    return f"{meaning}{names} (default: {shown}) [{sec}.{key}]"


class _TrainHelp(argparse.HelpFormatter):
    """Help for ``vaelab train``: each config option's meaning, accepted names (from the registries,
    read only when the help is shown) and default (from the config dataclasses)."""

    _choices: dict[str, list[str]] | None = None

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.dest in _TRAIN_FLAGS and action.option_strings:
            if _TrainHelp._choices is None:
                _TrainHelp._choices = _train_choices()
            return _train_flag_help(action.dest, _TrainHelp._choices).replace("%", "%%")
        return super()._get_help_string(action)

    def _split_lines(self, text: str, width: int) -> list[str]:
        import textwrap

        # names such as gaussian-learned stay whole on one line (copyable)
        return textwrap.wrap(self._whitespace_matcher.sub(" ", text).strip(), width, break_on_hyphens=False)


_METAVARS = {"data_dir": "DIR", "device": "DEVICE", "kl_balance": "BOOL"}


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML or JSON file with [data], [model], [train] sections")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config value, e.g. --set train.lr=3e-4 (repeatable)")
    for flag, (sec, key, conv) in _TRAIN_FLAGS.items():
        metavar = "N,N,..." if conv is _ints else _METAVARS.get(flag, "NAME" if conv is str else flag.upper())
        # unknown names are refused by the registries with a suggestion ("did you mean"), not by argparse
        p.add_argument("--" + flag.replace("_", "-"), dest=flag, default=None, metavar=metavar, help=f"{sec}.{key}")
    p.add_argument("--no-download", action="store_true", help="never download data")
    p.add_argument("--grayscale", action="store_true", help="convert colour images to one channel (data.grayscale)")
    p.add_argument("--svhn-extra", action="store_true", help="add SVHN's extra split to train (data.svhn_extra)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the forward pass and loss (train.compile; pays off on long runs, docs/speed.md)")


def _flag_hint(e: ConfigError, args: argparse.Namespace) -> ConfigError:
    """Name the command-line option a config error comes from, when one was given."""
    msg = str(e)
    for flag, (sec, key, _) in _TRAIN_FLAGS.items():
        if getattr(args, flag, None) is not None and f"{sec}.{key}" in msg.split(":")[0].split(" ")[0]:
            return ConfigError(f"--{flag.replace('_', '-')}: {msg}")
    return e


def config_from_args(args: argparse.Namespace, base: dict[str, Any] | None = None) -> RunConfig:
    try:
        return _config_from_args(args, base)
    except ConfigError as e:
        raise _flag_hint(e, args) from None


def _config_from_args(args: argparse.Namespace, base: dict[str, Any] | None = None) -> RunConfig:
    d: dict[str, Any] = base or {}
    if getattr(args, "config", None):
        d = merge(d, load_config_file(args.config))
    for flag, (sec, key, conv) in _TRAIN_FLAGS.items():
        v = getattr(args, flag, None)
        if v is not None:
            try:
                d.setdefault(sec, {})[key] = conv(v)
            except ValueError:
                raise ConfigError(f"--{flag.replace('_', '-')}: invalid value {v[:60]!r}") from None
    if getattr(args, "no_download", False):
        d.setdefault("data", {})["download"] = False
    if getattr(args, "grayscale", False):
        d.setdefault("data", {})["grayscale"] = True
    if getattr(args, "svhn_extra", False):
        d.setdefault("data", {})["svhn_extra"] = True
    if getattr(args, "no_progress", False):
        d.setdefault("train", {})["progress"] = False
    if getattr(args, "compile", False):
        d.setdefault("train", {})["compile"] = True
    d = apply_overrides(d, getattr(args, "set", []) or [])
    return RunConfig.from_dict(d)


def _default_run(cfg: RunConfig) -> Path:
    name = cfg.data.name.replace(":", "-").replace("/", "_")
    return Path("runs") / f"{name}-{cfg.model.model}-{time.strftime('%Y%m%d-%H%M%S')}"


def cmd_train(args: argparse.Namespace) -> int:
    from .runs.checkpoint import read_config
    from .runs.rundir import RunDir
    from .training import train

    run = args.resume or args.run
    if args.max_steps is not None and args.max_steps < 1:
        raise ConfigError(f"--max-steps must be >= 1, got {args.max_steps}")
    # An existing run keeps its own settings; only what is given on this command line overrides them.
    latest = RunDir.of(run).latest if run else None
    base = read_config(latest).to_dict() if latest is not None and latest.exists() else None
    cfg = config_from_args(args, base=base)
    run_dir = Path(run) if run else _default_run(cfg)
    res = train(cfg, run_dir, resume=True if args.resume else None, max_steps=args.max_steps)
    if _rank() != 0:  # under torchrun rank 0 alone prints
        return 0
    print(f"run directory: {res.run_dir}")
    if res.history:
        last = res.history[-1]
        val = last.get("val_elbo")
        lk = last.get("val_lk")  # an IWAE run: the bound it trains, with its k
        if isinstance(val, (int, float)) and val == val:
            bound = f"-L_{res.config.train.iwae_k} {-lk:.3f}, " if isinstance(lk, (int, float)) and lk == lk else ""
            print(f"epoch {last['epoch']}: validation {bound}-ELBO {-val:.3f} nats per datapoint")
        else:
            print(f"epoch {last['epoch']}: no validation data (data.val_size = 0)")
    return 0


#: commands whose work is shared between the processes of a torchrun job (the others run on rank 0)
SHARDED = ("train", "evaluate")


def _rank() -> int:
    """This process's rank under torchrun (0 otherwise)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _which(args: argparse.Namespace) -> str:
    return args.checkpoint


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluation import evaluate_run

    res = evaluate_run(args.run, k=args.k, split=args.split, limit=args.limit, batch_size=args.batch_size,
                       seed=args.seed, which=_which(args), progress=not args.no_progress, data_dir=args.data_dir,
                       device=args.device, dist_timeout=args.dist_timeout, precision=args.precision,
                       compile=args.compile)
    if _rank() != 0:  # under torchrun the ranks share the work; rank 0 alone prints and writes
        return 0
    if args.json:
        print(dumps_json(res.to_dict(), indent=2))
    else:
        print(res.table())
        print(f"written: {res.extra.get('written')}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from .runs import Run
    from .viz import sample_run

    run = Run(args.run, _which(args), device=args.device)
    print(sample_run(run, args.out, n=args.n, seed=args.seed, temperature=_temperature(args.temperature),
                     label=args.label))
    return 0


def cmd_reconstruct(args: argparse.Namespace) -> int:
    from .viz import reconstruct_run

    print(reconstruct_run(args.run, args.out, n=args.n, which=_which(args), data_dir=args.data_dir,
                          device=args.device))
    return 0


def cmd_interpolate(args: argparse.Namespace) -> int:
    from .viz import interpolate_run

    print(interpolate_run(args.run, args.out, a=args.a, b=args.b, steps=args.steps, which=_which(args),
                          data_dir=args.data_dir, device=args.device))
    return 0


def cmd_manifold(args: argparse.Namespace) -> int:
    from .runs import Run
    from .viz import manifold_run

    try:
        dims = tuple(_ints(args.dims))
    except ValueError:
        dims = ()
    if len(dims) != 2:
        raise ConfigError(f"--dims takes two latent dimensions separated by a comma, e.g. 0,1; got {args.dims[:40]!r}")
    run = Run(args.run, _which(args), device=args.device)
    print(manifold_run(run, args.out, n=args.n, dims=(dims[0], dims[1]), label=args.label))
    return 0


def cmd_traverse(args: argparse.Namespace) -> int:
    from .viz import traverse_run

    dims = None
    if args.dims is not None:
        try:
            dims = tuple(_ints(args.dims))
        except ValueError:
            dims = ()
        if not dims:
            raise ConfigError(f"--dims takes latent dimensions separated by commas, e.g. 0,3,5; got {args.dims[:40]!r}")
    print(traverse_run(args.run, args.out, index=args.index, dims=dims, top=args.top, steps=args.steps,
                       span=args.span, which=_which(args), data_dir=args.data_dir, device=args.device,
                       layer=args.layer))
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    from .viz import encode_run

    print(encode_run(args.run, args.out, split=args.split, which=_which(args), data_dir=args.data_dir,
                     device=args.device))
    return 0


def cmd_complete(args: argparse.Namespace) -> int:
    from .viz.complete import complete_run

    res = complete_run(args.run, args.out, n=args.n, samples=args.samples, seed=args.seed, which=_which(args),
                       condition=args.condition, mask=args.mask, regressor=args.regressor, split=args.split,
                       start=args.start, data_dir=args.data_dir, device=args.device)
    print(res.path)
    print(f"  {res.condition}")
    m = res.metrics
    line = (f"  over the completed pixels: per-pixel std between completions {m['pixel_std']:.4f}, "
            f"pairwise L2 {m['pairwise_l2']:.3f}; L2 to truth: completion {m['sample_l2']:.3f}, "
            f"best of {m['samples_per_image']} {m['best_of_s_l2']:.3f}")
    if "regressor_l2" in m:
        line += f", regressor {m['regressor_l2']:.3f}"
    print(line)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .app.report import write_report

    print(write_report(args.run, args.out, which=_which(args), k=args.k, limit=args.limit,
                       evaluate=not args.no_evaluate, data_dir=args.data_dir, device=args.device))
    return 0


def cmd_explore(args: argparse.Namespace) -> int:
    from .app.explore import serve

    serve(args.run, host=args.host, port=args.port, which=_which(args), device=args.device, data_dir=args.data_dir)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_run
    from .export.onnx import require_onnx

    if args.onnx:  # before the run is read or anything is written
        require_onnx(args.onnx_exporter)
    res = export_run(args.run, args.dir, dtype=args.dtype, onnx=args.onnx, force=args.force, which=_which(args),
                     seed=args.seed, exporter=args.onnx_exporter)
    print(res.describe())
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    from .data import DATASETS, SOURCES, candidate_dirs

    for name in DATASETS:
        spec = DATASETS.get(name)
        print(f"{name:16s} {spec.description}")
        if args.verbose:
            for d in candidate_dirs(name, None):
                print(f"{'':16s}   searched: {d}")
    for prefix in SOURCES:
        print(f"{prefix + ':PATH':16s} (source)")
    from .data.cache import describe_prepared, list_prepared, prepared_root

    found = list_prepared(args.cache_dir)
    total = sum(m["bytes"] for m in found)
    from .safeio import human

    print(f"prepared (decoded once, read from disk; vaelab data prepare SPEC) in {prepared_root(args.cache_dir)}: "
          f"{len(found)}, {human(total)}")
    for m in found:
        print(f"  {describe_prepared(m)}")
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from .config import DataConfig, check_count
    from .data.cache import describe_prepared, list_prepared, prepare_spec

    if args.workers is not None:
        check_count(args.workers, "--workers", 1)
    cfg = DataConfig(name=args.spec, image_size=args.image_size, grayscale=args.grayscale, cache_dir=args.cache_dir)
    got = prepare_spec(cfg, workers=args.workers, rebuild=args.rebuild, progress=not args.no_progress)
    meta = next(m for m in list_prepared(args.cache_dir) if m["dir"] == str(got.dir))
    print(describe_prepared(meta))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .config import check_count
    from .demo import run_demo

    check_count(args.epochs, "--epochs", 1)
    check_count(args.k, "-k", 1)
    run_demo(Path(args.run), epochs=args.epochs, k=args.k, data_dir=args.data_dir, progress=not args.no_progress,
             device=args.device)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="vaelab", description="Variational autoencoders (Doersch 2016) on images.")
    p.add_argument("--version", action="version", version=f"vaelab {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train a model by the ELBO", formatter_class=_TrainHelp)
    t.add_argument("--run", "--run-dir", dest="run",
                   help="run directory (default runs/<data>-<model>-<time>); re-running resumes it. "
                        "Under torchrun write --run-dir (torchrun's own parser takes --run as its --run-path)")
    t.add_argument("--resume", metavar="RUN", help="continue RUN from its latest checkpoint")
    t.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps (dry runs)")
    _add_train_flags(t)
    t.set_defaults(func=cmd_train)

    def run_cmd(name: str, help_: str, func) -> argparse.ArgumentParser:
        s = sub.add_parser(name, help=help_)
        s.add_argument("run", help="run directory (or a checkpoint .safetensors file, or an exported folder)")
        s.add_argument("--checkpoint", default="best", help="best | latest | path to a checkpoint file")
        s.add_argument("--device", default="auto", help="auto (a GPU when one is visible) | cpu | cuda | cuda:N | mps")
        s.set_defaults(func=func)
        return s

    e = run_cmd("evaluate", "ELBO, importance-sampled NLL (L_k) with standard error, active units", cmd_evaluate)
    e.add_argument("-k", type=int, default=5000, help="importance samples per datapoint (default 5000)")
    e.add_argument("--split", default="test", choices=["test", "val"])
    e.add_argument("--limit", type=int, default=None, help="evaluate the first N examples only")
    e.add_argument("--batch-size", type=int, default=100)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")
    e.add_argument("--data-dir", default=None)
    e.add_argument("--no-progress", action="store_true")
    e.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="networks in bf16/fp16 (autocast); log-weights and logsumexp stay float32 (default fp32)")
    e.add_argument("--compile", action="store_true",
                   help="run the forward passes by torch.compile: the same draws, faster on a CPU for a large k "
                        "once compiled (compiling takes seconds; kernels cached in ~/.cache/vaelab/inductor; on a "
                        "GPU the eager passes were faster in our measurements)")
    e.add_argument("--dist-timeout", type=float, default=300.0,
                   help="under torchrun: seconds to wait for the other processes before giving up (default 300)")

    s = run_cmd("sample", "PNG grid of samples from the prior", cmd_sample)
    s.add_argument("-n", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--temperature", default="1", help="scale of each layer's spread, z ~ N(mu, T² sigma²): one number, "
                   "or one per stochastic layer bottom-up, e.g. 1,1,0.8,0.7,0.6")
    s.add_argument("--label", type=int, default=None, help="class to generate (label-conditioned models)")
    s.add_argument("--out", default=None)

    r = run_cmd("reconstruct", "PNG of test images and their reconstructions", cmd_reconstruct)
    r.add_argument("-n", type=int, default=32)
    r.add_argument("--out", default=None)
    r.add_argument("--data-dir", default=None)

    i = run_cmd("interpolate", "PNG of a linear path in z between two test images", cmd_interpolate)
    i.add_argument("--a", type=int, default=0, help="index of the first test image")
    i.add_argument("--b", type=int, default=1, help="index of the second test image")
    i.add_argument("--steps", type=int, default=10)
    i.add_argument("--out", default=None)
    i.add_argument("--data-dir", default=None)

    tv = run_cmd("traverse", "PNG of latent traversals: one latent dimension varied per row", cmd_traverse)
    tv.add_argument("--layer", default=None,
                    help="stochastic layer of a hierarchy to traverse: z1 (nearest the data), z2, ... (default: the top)")
    tv.add_argument("--index", type=int, default=0, help="test image whose posterior mean is the starting code")
    tv.add_argument("--dims", default=None, help="latent dimensions, one per row, e.g. 0,3,5 (default: the most active)")
    tv.add_argument("--top", type=int, default=8, help="how many of the most active dimensions without --dims")
    tv.add_argument("--steps", type=int, default=9, help="values per dimension")
    tv.add_argument("--span", type=float, default=3.0, help="range: the prior's mean ± SPAN standard deviations")
    tv.add_argument("--out", default=None)
    tv.add_argument("--data-dir", default=None)

    m = run_cmd("manifold", "2-D latent manifold through the inverse Gaussian CDF", cmd_manifold)
    m.add_argument("-n", type=int, default=20, help="grid size n x n")
    m.add_argument("--dims", default="0,1", help="two latent dimensions to vary")
    m.add_argument("--label", type=int, default=None)
    m.add_argument("--out", default=None)

    c = run_cmd("encode", "posterior means of a split to .npy", cmd_encode)
    c.add_argument("--split", default="test", choices=["train", "val", "test"])
    c.add_argument("--out", default=None)
    c.add_argument("--data-dir", default=None)

    cp = run_cmd("complete", "PNG: test images completed from a partial observation (CVAE, Doersch Sec. 4.2)",
                 cmd_complete)
    cp.add_argument("-n", type=int, default=8, help="test images (rows)")
    cp.add_argument("--samples", type=int, default=6, help="CVAE completions per image (columns)")
    cp.add_argument("--seed", type=int, default=0)
    ov = cp.add_mutually_exclusive_group()
    ov.add_argument("--mask", default=None, metavar="PATH", help="observe the white pixels of this mask image")
    ov.add_argument("--condition", default=None, metavar="NAME",
                    help="observe another region than the run's (left-half, centre-column, ...)")
    cp.add_argument("--regressor", default=None, metavar="RUN2", help="a regressor run to show beside the CVAE")
    cp.add_argument("--split", default="test", choices=["train", "val", "test"])
    cp.add_argument("--start", type=int, default=0, help="index of the first image")
    cp.add_argument("--out", default=None)
    cp.add_argument("--data-dir", default=None)

    rp = run_cmd("report", "RUN/report.html: config, curves, evaluation, pictures, health check in one file", cmd_report)
    rp.add_argument("-k", type=int, default=100,
                    help="importance samples when the checkpoint has no evaluation yet (default 100)")
    rp.add_argument("--limit", type=int, default=2000, help="test images to evaluate then (default 2000)")
    rp.add_argument("--no-evaluate", action="store_true", help="use a stored evaluation only")
    rp.add_argument("--out", default=None)
    rp.add_argument("--data-dir", default=None)

    ex = run_cmd("explore", "local web app: latent pad, encode a drawing, interpolate, complete", cmd_explore)
    ex.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    ex.add_argument("--port", type=int, default=8765, help="port (default 8765; 0: any free port)")
    ex.add_argument("--data-dir", default=None)

    x = run_cmd("export", "weights-only folder: config.json, model.safetensors, a model card (and ONNX)", cmd_export)
    x.add_argument("dir", help="folder to write (new, empty, or a previous export)")
    x.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="how the weights are stored")
    x.add_argument("--onnx", action="store_true", help="also write encoder.onnx and decoder.onnx")
    x.add_argument("--onnx-exporter", default="torchscript", choices=["torchscript", "dynamo"],
                   help="torch.onnx exporter (torchscript: fast; dynamo: torch.export-based, needs onnxscript)")
    x.add_argument("--force", action="store_true", help="write into a non-empty folder that is not an export")
    x.add_argument("--seed", type=int, default=0, help="seed of the model card's sample grid")

    d = sub.add_parser("datasets", help="list the data sets vaelab knows, where it looks for them, and the "
                       "prepared (decoded) ones with their sizes")
    d.add_argument("-v", "--verbose", action="store_true")
    d.add_argument("--cache-dir", default=None, help="where prepared data sets live (data.cache_dir)")
    d.set_defaults(func=cmd_datasets)

    dd = sub.add_parser("data", help="prepare image data: decode a folder or tar shards once into the cache")
    dsub = dd.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    dp = dsub.add_parser("prepare", help="decode SPEC (folder:PATH, shards:PATH) into the prepared cache now")
    dp.add_argument("spec", metavar="SPEC", help="what --data takes: folder:PATH or shards:PATH (tar shards)")
    dp.add_argument("--image-size", type=int, default=None, help="resize/centre-crop target (data.image_size, default 64)")
    dp.add_argument("--grayscale", action="store_true", help="one grey channel (data.grayscale)")
    dp.add_argument("--cache-dir", default=None, help="where prepared data sets live (data.cache_dir)")
    dp.add_argument("--workers", type=int, default=None, help="decoding processes (default: every core)")
    dp.add_argument("--rebuild", action="store_true", help="decode again even if the cache is current")
    dp.add_argument("--no-progress", action="store_true")
    dp.set_defaults(func=cmd_data_prepare)

    dm = sub.add_parser("demo", help="train on Fashion-MNIST, evaluate, write pictures (the README's main job)")
    dm.add_argument("--run", default="runs/demo")
    dm.add_argument("--epochs", type=int, default=10)
    dm.add_argument("-k", type=int, default=256, help="importance samples per test image")
    dm.add_argument("--data-dir", default=None)
    dm.add_argument("--no-progress", action="store_true")
    dm.add_argument("--device", default="auto", help="auto (a GPU when one is visible) | cpu | cuda | cuda:N | mps")
    dm.set_defaults(func=cmd_demo)
    return p


def _one_line_warnings(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    """vaelab's own warnings as one line on stderr (no source line); others as Python shows them."""
    if issubclass(category, VaelabWarning):
        if _rank() == 0:  # every rank loads the same data: one warning per job
            print(f"vaelab: warning: {message}", file=file or sys.stderr)
    else:
        _show_warning(message, category, filename, lineno, file, line)


_show_warning = warnings.showwarning


def main(argv: Sequence[str] | None = None) -> int:
    code = _main(argv)
    if "torch.distributed" in sys.modules:
        from .distributed import peer_lost

        if peer_lost():  # a torchrun job that lost a peer: leave without Python's shutdown (see peer_lost)
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
            os._exit(code)
    return code


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.command not in SHARDED and _rank() != 0:
        return 0  # under torchrun, commands that do not share their work run on rank 0 alone
    warnings.showwarning = _one_line_warnings
    from .provenance import COMMAND

    token = COMMAND.set(shlex.join(["vaelab", *(sys.argv[1:] if argv is None else argv)]))  # PNG provenance
    finished = False
    try:
        code = int(args.func(args) or 0)
        finished = True
        return code
    except Interrupted as e:  # SIGTERM/SIGINT during training: checkpointed, exit 143/130
        if e.announce:
            print(f"vaelab: {e}", file=sys.stderr)
        return e.exit_code
    except VaelabError as e:
        if getattr(e, "announce", True):  # a distributed failure: one line per job
            print(f"vaelab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if _rank() == 0:
            print("vaelab: interrupted (the last checkpoint is intact; re-run the same command to resume)",
                  file=sys.stderr)
        return 130
    except MemoryError:
        print("vaelab: error: out of memory (try a smaller --batch-size, model or data set)", file=sys.stderr)
        return 2
    finally:
        warnings.showwarning = _show_warning
        COMMAND.reset(token)
        _leave(finished)


def _leave(finished: bool) -> None:
    """Leave a torchrun job's process group cleanly (a peer's failure is reported in one line)."""
    if "torch.distributed" not in sys.modules:  # no job joined (and no torch import for a quick command)
        return
    from .distributed import leave_distributed

    try:
        leave_distributed(finished)
    except (RuntimeError, ValueError) as e:  # a peer died after this process finished: it says so itself
        if _rank() == 0:
            print(f"vaelab: warning: leaving the distributed job: {str(e).splitlines()[0][:200]}", file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
