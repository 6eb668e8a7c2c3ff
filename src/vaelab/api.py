"""Loading trained runs: everything is rebuilt from the checkpoint's own config."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .config import RunConfig
from .errors import CheckpointError
from .models import build_model
from .training.checkpoint import load_checkpoint, load_model_state
from .training.rundir import RunDir


@dataclass
class LoadedRun:
    model: nn.Module
    config: RunConfig
    state: dict[str, Any]
    checkpoint: Path
    run: RunDir


def load_run(path: str | os.PathLike[str], which: str = "best") -> LoadedRun:
    """Load a model from a run directory (``which`` = best | latest) or a checkpoint file, in eval mode."""
    p = Path(path)
    if p.is_dir():
        run = RunDir.of(p)
        ckpt_path = run.checkpoint(which)
    elif p.exists():
        ckpt_path, run = p, RunDir.of(p.parent.parent if p.parent.name == "checkpoints" else p.parent)
    else:
        raise CheckpointError(f"{p}: no such run directory or checkpoint file")
    ckpt = load_checkpoint(ckpt_path)
    model = build_model(ckpt.config.model)
    load_model_state(model, ckpt.model, str(ckpt_path))
    model.eval()
    return LoadedRun(model, ckpt.config, ckpt.state, ckpt_path, run)
