"""``vaelab export RUN DIR``: a trained run as a weights-only folder (config.json, model.safetensors,
README.md model card, samples.png, and with ``onnx`` encoder.onnx / decoder.onnx); the layout and
its reader are in :mod:`vaelab.runs.pretrained`.

The folder is built under a temporary name beside DIR and renamed into place, so DIR is either the
old export or the new one, never half of each. DIR must be new, empty, or a previous export (whose
files are replaced; anything else in it, such as ``eval/``, is kept); ``force`` also allows a folder
holding other files, replacing only the files an export writes and keeping the rest.
"""

from __future__ import annotations

import copy
import io
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as st_save

from .. import __version__
from ..conditioning import LabelCondition
from ..errors import CheckpointError, ConfigError, VaelabWarning
from ..runs import Run
from ..runs.checkpoint import atomic_write
from ..runs.pretrained import (
    CARD_FILE,
    CONFIG_FILE,
    DTYPES,
    EXPORT_FILES,
    EXPORT_FORMAT,
    PRIOR_FILE,
    SAMPLES_FILE,
    WEIGHTS_FILE,
    is_export,
)
from ..safeio import dumps_json
from ..viz import sample_images, save_grid
from .card import model_card, read_evaluations
from .onnx import EXPORTERS, GraphInfo, OnnxUnsupported, export_onnx, prior_arrays

SAMPLES_PER_ROW = 8


@dataclass
class ExportResult:
    path: Path  # the exported folder
    dtype: str
    files: list[str]  # what was written, by name
    onnx: dict[str, GraphInfo] = field(default_factory=dict)  # role (encoder | decoder) -> graph
    messages: list[str] = field(default_factory=list)  # what could not be exported, one line each

    def describe(self) -> str:
        return f"exported to {self.path}: {', '.join(self.files)} ({self.dtype} weights)"


def _check_target(out: Path, force: bool) -> None:
    """Refuse, before any work, a DIR that is a file, a link, or a non-empty folder of other things."""
    if out.is_symlink():
        raise ConfigError(f"{out}: is a symbolic link; give the folder itself")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: is a file, not a folder; give a new folder to export into")
    if out.is_dir() and any(out.iterdir()) and not is_export(out) and not force:
        raise ConfigError(f"{out}: is not empty and holds no previous export; choose a new folder, or pass "
                          "--force (force=True) to write into it (files named like an export's are replaced, "
                          "others kept)")


def _install(tmp: Path, out: Path) -> None:
    """Put the finished folder ``tmp`` in place of ``out``, carrying over what in ``out`` is not an
    export's file (an ``eval/`` folder, the user's own files). Two renames in the same parent: ``out``
    is complete whenever it exists; a crash between them leaves the old folder under a hidden name
    beside it (``.NAME.*.old``)."""
    if not out.exists():
        os.rename(tmp, out)
        return
    for entry in out.iterdir():
        if entry.name not in EXPORT_FILES:
            os.rename(entry, tmp / entry.name)
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    old.rmdir()
    os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _sample_grid(model: torch.nn.Module, run: Run, path: Path, seed: int) -> tuple[bool, str]:
    """samples.png for the card: 64 draws from the prior (a row per class for a label-conditioned
    model). Models conditional on a partial observation need an image to complete: no grid."""
    with torch.no_grad():
        if not model.latent_dims:
            return False, "No sample grid: the regressor has no latent variable to sample (it predicts from c)."
        if isinstance(run.condition, LabelCondition):
            k = run.condition.dim
            labels = torch.arange(k).repeat_interleave(SAMPLES_PER_ROW)
            imgs = sample_images(model, len(labels), seed=seed, c=run.condition.encode_labels(labels))
            save_grid(imgs, path, nrow=SAMPLES_PER_ROW)
            return True, f"Each row: {SAMPLES_PER_ROW} samples of one class (0 to {k - 1}), the likelihood's mean, seed {seed}."
        if model.spec.cond_dim:
            return False, (f"No sample grid: the model is conditional on a partial observation "
                           f"(`{run.condition.name}`); see `vaelab complete`.")
        imgs = sample_images(model, SAMPLES_PER_ROW * SAMPLES_PER_ROW, seed=seed)
        save_grid(imgs, path, nrow=SAMPLES_PER_ROW)
        return True, f"{SAMPLES_PER_ROW * SAMPLES_PER_ROW} draws of z from the prior, decoded (the likelihood's mean), seed {seed}."


def export_run(run: Run | str | os.PathLike[str], out: str | os.PathLike[str], *, dtype: str = "fp32",
               onnx: bool = False, force: bool = False, which: str = "best", seed: int = 0,
               exporter: str = "torchscript", data_dir: str | None = None) -> ExportResult:
    """Export a run (directory, checkpoint file, or a previous export) to the folder ``out``.

    ``dtype``: how the weights are stored (fp32 | bf16 | fp16); ``from_pretrained`` casts them back to
    float32. ``onnx``: also write encoder.onnx and decoder.onnx (:mod:`vaelab.export.onnx`;
    ``exporter`` torchscript | dynamo); what cannot be written is named in a warning and in
    :attr:`ExportResult.messages`. ``force``: write into a non-empty folder that is not an export."""
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if exporter not in EXPORTERS:
        raise ConfigError(f"unknown ONNX exporter {exporter!r}; known: {', '.join(EXPORTERS)}")
    out = Path(out)
    _check_target(out, force)
    r = Run.of(run, which, data_dir=data_dir, device="cpu")
    if out.resolve() == r.root.resolve():
        raise ConfigError(f"{out}: is the run itself; export into a new folder (e.g. {out / 'export'})")
    # The weights as stored, and the model they make (float32 again): the card's samples and the ONNX
    # graphs show what a user of the folder gets, rounding to bf16/fp16 included.
    state = {k: (v.detach().cpu().to(DTYPES[dtype]) if v.is_floating_point() else v.detach().cpu()).contiguous()
             for k, v in r.model.state_dict().items()}
    model = copy.deepcopy(r.model).cpu().float().eval()
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    trained = dict(r.state) if r.dir.root.joinpath(WEIGHTS_FILE) == r.checkpoint else {
        "checkpoint": r.checkpoint.name, "epoch": r.state.get("epoch"), "step": r.state.get("step"),
        "elapsed_s": r.state.get("elapsed")}
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as e:
        raise CheckpointError(f"{out}: cannot create the export folder: {e.strerror or e}") from None
    try:
        files = [WEIGHTS_FILE]
        atomic_write(tmp / WEIGHTS_FILE, st_save(state, metadata={"format": EXPORT_FORMAT, "dtype": dtype}))
        has_grid, note = _sample_grid(model, r, tmp / SAMPLES_FILE, seed)
        if has_grid:
            files.append(SAMPLES_FILE)
        messages: list[str] = []
        graphs = export_onnx(model, tmp, exporter=exporter, messages=messages) if onnx else {}
        files += [g.file for g in graphs.values()]
        if "decoder" in graphs and model.latent_dims:  # what the decoder's z is drawn from, for numpy users
            try:
                buf = io.BytesIO()
                np.savez(buf, **prior_arrays(model))
                atomic_write(tmp / PRIOR_FILE, buf.getvalue())
                files.append(PRIOR_FILE)
            except OnnxUnsupported as e:
                messages.append(f"{model.config.model}: no {PRIOR_FILE}: {e}")
        for m in messages:
            warnings.warn(m, VaelabWarning, stacklevel=2)
        onnx_info = {role: g.to_dict() for role, g in graphs.items()}
        metrics = r.dir.read_metrics()
        card = model_card(r.config, r.spec, source=str(r.root), trained=trained, dtype=dtype,
                          evals=read_evaluations(r.dir.eval), last_metrics=metrics[-1] if metrics else None,
                          samples=SAMPLES_FILE if has_grid else None, samples_note=note, onnx=onnx_info,
                          onnx_notes=messages, version=__version__)
        atomic_write(tmp / CARD_FILE, card.encode())
        info: dict[str, Any] = {
            "format": EXPORT_FORMAT, "vaelab_version": __version__, "dtype": dtype,
            "config": r.config.to_dict(), "data": r.spec.to_dict(), "trained": trained,
        }
        if onnx_info:
            info["onnx"] = onnx_info
        atomic_write(tmp / CONFIG_FILE, (dumps_json(info, indent=2, sort_keys=True) + "\n").encode())
        files += [CARD_FILE, CONFIG_FILE]
        _install(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise CheckpointError(f"{out}: export failed: {e.strerror or e}; {out} is unchanged") from None
        raise
    return ExportResult(out, dtype, sorted(files), graphs, messages)

