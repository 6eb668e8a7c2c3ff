"""Exported models: a weights-only folder in the convention users know from Hugging Face, and
:func:`from_pretrained`, which turns it back into a model with no optimizer or training code::

    DIR/
      config.json        {"format": "vaelab-export-1", "config": RunConfig, "data": DataSpec,
                          "dtype": "fp32" | "bf16" | "fp16", "trained": {...}, "onnx": {...}}
      model.safetensors  the model's state dict (names as in ``model.state_dict()``), floats in ``dtype``
      README.md          the model card (evaluation table, how it was trained, the sample grid)
      samples.png        the card's sample grid
      encoder.onnx, decoder.onnx   with ``--onnx`` (see :mod:`vaelab.export.onnx`)

``config`` and ``data`` are the same JSON objects a checkpoint stores in its metadata
(:func:`~vaelab.runs.checkpoint.parse_config` reads both). The folder is written by
:func:`vaelab.export.export_run`; this module only reads it, so that :class:`~vaelab.runs.Run` (and
every command that takes a RUN) opens an exported folder like a run directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from torch import nn

from ..config import DataSpec, RunConfig
from ..errors import CheckpointError, ConfigError
from ..models import build_model
from ..safeio import json_loads, read_regular
from .checkpoint import nonfinite_tensors, parse_config, refuse_unsafe
from .validate import expected_tensors

EXPORT_FORMAT = "vaelab-export-1"
CONFIG_FILE, WEIGHTS_FILE, CARD_FILE, SAMPLES_FILE = "config.json", "model.safetensors", "README.md", "samples.png"
ENCODER_FILE, DECODER_FILE, PRIOR_FILE = "encoder.onnx", "decoder.onnx", "prior.npz"
#: every file an export writes: a re-export replaces exactly these (anything else in DIR is kept)
EXPORT_FILES = (CONFIG_FILE, WEIGHTS_FILE, CARD_FILE, SAMPLES_FILE, ENCODER_FILE, DECODER_FILE, PRIOR_FILE)
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_TOO_MANY = 4


@dataclass
class Pretrained:
    """What an exported folder holds, read and checked (weights as stored, in ``dtype``)."""

    root: Path
    config: RunConfig
    spec: DataSpec
    dtype: str  # how the weights are stored: fp32 | bf16 | fp16
    state: dict[str, torch.Tensor]
    trained: dict[str, Any] = field(default_factory=dict)  # epoch, step, checkpoint, ... of the run
    info: dict[str, Any] = field(default_factory=dict)  # the whole config.json

    def build(self, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32) -> nn.Module:
        """The model, weights cast to ``dtype`` (default float32 whatever the storage), in eval mode."""
        dt = _torch_dtype(dtype)
        model = build_model(self.config.model, self.spec)
        state = {k: v.to(dt) if v.is_floating_point() else v for k, v in self.state.items()}
        model.load_state_dict(state, strict=True)  # names and shapes were checked on load
        return model.to(device=device, dtype=dt).eval()


def _torch_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ConfigError(f"dtype must be one of {', '.join(DTYPES)} (or torch.float32/bfloat16/float16), got {dtype!r}")


def is_export(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder written by ``vaelab export`` (it holds model.safetensors at its
    top; a run directory keeps its weights under checkpoints/)."""
    p = Path(path)
    return p.is_dir() and ((p / WEIGHTS_FILE).exists() or (p / WEIGHTS_FILE).is_symlink())


def read_export_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """config.json of an exported folder, checked to be one (format, dtype); one-line errors."""
    p = Path(path) / CONFIG_FILE
    if not p.exists() and not p.is_symlink():
        raise CheckpointError(f"{p}: missing; an exported vaelab model needs {CONFIG_FILE} beside {WEIGHTS_FILE}")
    info = json_loads(read_regular(p, CheckpointError, "config"), str(p), CheckpointError)
    if not isinstance(info, dict):
        raise CheckpointError(f"{p}: not a vaelab export config (expected a JSON object)")
    if info.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{p}: not a vaelab export (format {info.get('format')!r}, expected {EXPORT_FORMAT!r})")
    if info.get("dtype") not in DTYPES:
        raise CheckpointError(f"{p}: dtype must be one of {', '.join(DTYPES)}, got {info.get('dtype')!r}")
    for key in ("config", "data"):
        if not isinstance(info.get(key), dict):
            raise CheckpointError(f"{p}: {key!r} must be a JSON object")
    if not isinstance(info.get("trained", {}), dict):
        raise CheckpointError(f"{p}: 'trained' must be a JSON object")
    return info


def _check_weights(expected: dict[str, tuple[tuple[int, ...], torch.dtype]], state: dict[str, torch.Tensor],
                   dtype: str, source: str) -> None:
    """Names, shapes and dtypes of the stored tensors against the model config.json describes, as one line."""
    want = DTYPES[dtype]
    problems = []
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing:
        problems.append(f"missing {', '.join(missing[:_TOO_MANY])}{' ...' if len(missing) > _TOO_MANY else ''}")
    if extra:
        problems.append(f"unexpected {', '.join(extra[:_TOO_MANY])}{' ...' if len(extra) > _TOO_MANY else ''}")
    for k in sorted(set(expected) & set(state)):
        shape, dt = expected[k]
        dt = want if dt.is_floating_point else dt
        if tuple(state[k].shape) != shape:
            problems.append(f"{k} has shape {tuple(state[k].shape)}, config.json implies {shape}")
        elif state[k].dtype != dt:
            problems.append(f"{k} is {state[k].dtype}, config.json says {dtype} ({dt})")
    if problems:
        more = f" (and {len(problems) - _TOO_MANY} more)" if len(problems) > _TOO_MANY else ""
        raise CheckpointError(f"{source}: does not match config.json: {'; '.join(problems[:_TOO_MANY])}{more}")
    bad = nonfinite_tensors(state)
    if bad:
        raise CheckpointError(f"{source}: non-finite values in {', '.join(bad[:_TOO_MANY])}")


def load_pretrained(path: str | os.PathLike[str]) -> Pretrained:
    """Read and check an exported folder: config.json (format, config, data description, dtype) and
    model.safetensors (never unpickled; every tensor's name, shape and dtype against the model the
    config describes, worked out on the meta device). Every problem is one :class:`CheckpointError` line."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: no such exported model folder")
    info = read_export_info(root)
    config, spec = parse_config(root / CONFIG_FILE, info["config"], info["data"], "config.json")
    wp = root / WEIGHTS_FILE
    raw = read_regular(wp, CheckpointError, "weights file")
    refuse_unsafe(wp, raw[:16])
    try:
        state = st_load(raw)
    except Exception as e:  # the parser of untrusted bytes: any failure means a corrupted file
        raise CheckpointError(f"{wp}: truncated or corrupted safetensors data ({str(e).splitlines()[0][:200]})") from None
    _check_weights(expected_tensors(config.model, spec, str(wp)), state, info["dtype"], str(wp))
    return Pretrained(root, config, spec, info["dtype"], state, dict(info.get("trained", {})), info)


def from_pretrained(path: str | os.PathLike[str], *, device: str | torch.device = "cpu",
                    dtype: torch.dtype | str = torch.float32) -> nn.Module:
    """The model of an exported folder (``vaelab export RUN DIR``), ready for ``encode``, ``decode``,
    ``sample`` and :func:`vaelab.iwae_bound`: in eval mode, on ``device`` (default the CPU; ``auto``
    takes a GPU when one is visible), weights in ``dtype`` (default float32, also for a folder
    stored in bf16/fp16). No optimizer, checkpoint or training code is involved."""
    from ..devices import resolve_device

    dev = resolve_device(device) if isinstance(device, str) else device
    return load_pretrained(path).build(dev, dtype)
