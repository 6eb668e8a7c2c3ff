"""Pictures that explain themselves: where a PNG came from, written into its text chunks, and file
names that keep the variants of one picture (another label, temperature, seed, checkpoint) apart.

Every PNG vaelab writes goes through :func:`vaelab.viz.grid.save_grid` (or :func:`~vaelab.viz.grid.png_bytes`), which
takes a ``provenance`` mapping and stores it as PNG tEXt/iTXt chunks: the run, the checkpoint, its
epoch and step, the seed, the temperature and the command that made it. Read them back with
``PIL.Image.open(path).text`` (or ``exiftool``, ``identify -verbose``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .runs import Run

#: the command line being run (``vaelab sample runs/x --label 7``), set by the CLI; None from Python
COMMAND: ContextVar[str | None] = ContextVar("vaelab_command", default=None)

#: the keys every picture carries, in this order
KEYS = ("picture", "run", "checkpoint", "epoch", "step", "seed", "temperature", "command")
NOT_SAMPLED = "n/a (posterior means, nothing drawn from the prior)"


def command_or(call: str) -> str:
    """The CLI's command line when there is one, else ``call`` (how the Python API was called)."""
    return COMMAND.get() or call


def python_call(func: str, **kwargs: Any) -> str:
    """``vaelab.sample_run(RUN, n=64, seed=0)``: the Python call that made a picture, for its provenance."""
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items() if v is not None)
    return f"vaelab.{func}({args})"


def run_provenance(run: Run, picture: str, call: str, *, seed: int | str | None = None,
                   temperature: float | str | None = None, **extra: Any) -> dict[str, str]:
    """The text chunks of a picture made from ``run``: run, checkpoint, epoch, step, seed,
    temperature, command (``call`` unless the CLI set :data:`COMMAND`), and ``extra`` (label, dims, ...)."""
    from . import __version__

    state = run.state
    info: dict[str, Any] = {
        "picture": picture,
        "run": run.root.resolve(),
        "checkpoint": run.checkpoint.resolve(),
        "epoch": state.get("epoch"),
        "step": state.get("step"),
        "seed": "n/a (nothing random)" if seed is None else seed,
        "temperature": NOT_SAMPLED if temperature is None else temperature,
        "command": command_or(call),
        "model": run.config.model.model,
        "data": run.config.data.name,
        **{k: v for k, v in extra.items() if v is not None},
        "Software": f"vaelab {__version__}",
    }
    return {k: str(v) for k, v in info.items()}


def read_provenance(path: Any) -> dict[str, str]:
    """The text chunks of a PNG file (what :func:`run_provenance` wrote), as a dict."""
    from PIL import Image

    with Image.open(path) as im:
        return dict(getattr(im, "text", {}) or {})


def png_info(provenance: Mapping[str, str] | None):
    """A ``PngInfo`` holding ``provenance`` (tEXt chunks; iTXt for values outside Latin-1)."""
    from PIL.PngImagePlugin import PngInfo

    meta = PngInfo()
    for k, v in (provenance or {}).items():
        meta.add_text(str(k)[:79], str(v))  # a keyword is 1..79 Latin-1 characters
    return meta


# ---------------------------------------------------------------- file names of variants
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def slug(text: str, limit: int = 40) -> str:
    """A piece of a file name: letters, digits, ".", "_", "-" only (others become "_"), at most ``limit``."""
    s = _UNSAFE.sub("_", str(text)).strip("._-")
    return s[:limit] or "x"


def variant_name(stem: str, *parts: str | None, suffix: str = ".png") -> str:
    """``samples-label7-t0.8.png``: the default file name of a picture, with a part for each setting
    that differs from its default (None parts are left out), so variants do not overwrite each other."""
    return "-".join([stem, *(p for p in parts if p)]) + suffix


def checkpoint_part(run: Run) -> str | None:
    """None for the run's best checkpoint (the default), else ``ckpt-<name>``."""
    name = run.checkpoint.stem
    return None if name == "best" else f"ckpt-{slug(name)}"


def tensor_part(prefix: str, t: Any) -> str:
    """A short stable tag of a tensor's values (a condition given as c rather than by a label)."""
    import numpy as np

    a = np.ascontiguousarray(t.detach().float().cpu().numpy())
    return f"{prefix}{hashlib.sha1(a.tobytes()).hexdigest()[:8]}"
