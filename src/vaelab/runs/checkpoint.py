"""Checkpoints: one safetensors file holding the model, the optimizer state and every RNG state,
with the run's config and the training counters as JSON in its metadata. Nothing is pickled.

Writes are atomic: the file is written under a temporary name in the same folder, flushed and
fsync'ed, then renamed over the old one, so a crash or a full disk at any moment leaves the previous
good checkpoint intact.
"""

from __future__ import annotations

import io
import json
import os
import pickletools
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from ..config import DataSpec, RunConfig
from ..errors import CheckpointError, ConfigError, NonFiniteError, VaelabError
from ..models import build_model
from ..safeio import json_loads, open_regular, read_exactly, read_regular
from .validate import check_model_tensors, compare_tensors

FORMAT = "vaelab-checkpoint-2"
OLD_FORMATS = ("vaelab-checkpoint-1",)  # read and converted on load (see :func:`upgrade_v1`)
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin")
TMP_SUFFIX = ".tmp"
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read the process umask (there is no getter)


@dataclass
class Checkpoint:
    """What a checkpoint file holds, in memory."""

    config: RunConfig
    spec: DataSpec  # what the data implied: image shape, class count, condition size
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None = None  # torch optimizer state_dict
    state: dict[str, Any] = field(default_factory=dict)  # epoch, step, best, counters, ...
    rng: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> uint8 state tensor
    ema: dict[str, torch.Tensor] | None = None  # moving average of the model's state (train.ema), same names


# ---------------------------------------------------------------- RNG state capture
def capture_global_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """torch's, numpy's and Python's global RNG states (tensors + JSON-able parts)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    tensors = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.asarray(np_state[1], dtype=np.uint32).view(np.uint8).copy()),
    }
    meta = {"numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])], "python": py_state}
    return tensors, meta


def restore_global_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any], source: str = "checkpoint") -> None:
    """Inverse of :func:`capture_global_rng`; a malformed state is a :class:`CheckpointError`, raised
    before any generator is changed."""
    from .validate import check_rng

    check_rng(tensors, meta, source)
    try:
        if "torch" in tensors:
            torch.set_rng_state(tensors["torch"])
        if "numpy" in tensors and "numpy" in meta:
            name, pos, has_gauss, gauss = meta["numpy"]
            keys = tensors["numpy"].numpy().view(np.uint32)
            np.random.set_state((name, keys, pos, has_gauss, gauss))
        if "python" in meta:
            v, st, g = meta["python"]
            random.setstate((v, tuple(st), g))
    except (RuntimeError, ValueError, TypeError, OverflowError) as e:
        raise CheckpointError(f"{source}: corrupted random number generator state ({e})") from None


# ---------------------------------------------------------------- optimizer state flattening
def _flatten_optimizer(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, Any] = {"param_groups": sd["param_groups"], "state": {}}
    for pid, st in sd["state"].items():
        entry = {}
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim/{pid}/{k}"] = v
                entry[k] = {"tensor": f"optim/{pid}/{k}"}
            else:
                entry[k] = v
        plain["state"][str(pid)] = entry
    return tensors, plain


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> dict[str, Any]:
    state = {}
    for pid, entry in plain["state"].items():
        state[int(pid)] = {
            k: (tensors[v["tensor"]] if isinstance(v, dict) and "tensor" in v else v) for k, v in entry.items()
        }
    return {"state": state, "param_groups": plain["param_groups"]}


# ---------------------------------------------------------------- save / load
def serialize(ckpt: Checkpoint) -> bytes:
    tensors: dict[str, torch.Tensor] = {f"model/{k}": v.detach().contiguous() for k, v in ckpt.model.items()}
    meta: dict[str, str] = {
        "format": FORMAT,
        "config": ckpt.config.to_json(),
        "data": json.dumps(ckpt.spec.to_dict()),
        "state": json.dumps(ckpt.state),
    }
    if ckpt.optimizer is not None:
        t, plain = _flatten_optimizer(ckpt.optimizer)
        tensors.update({k: v.contiguous() for k, v in t.items()})
        meta["optimizer"] = json.dumps(plain)
    tensors.update({f"rng/{k}": v.contiguous() for k, v in ckpt.rng.items()})
    tensors.update({f"ema/{k}": v.detach().contiguous() for k, v in (ckpt.ema or {}).items()})
    # safetensors refuses tensors that share memory; clone any alias.
    seen: set[int] = set()
    for k, v in tensors.items():
        ptr = v.data_ptr()
        if ptr in seen and v.numel():
            tensors[k] = v.clone()
        seen.add(ptr)
    return st_save(tensors, metadata=meta)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file + fsync + rename (+ fsync of the folder).

    On any OSError (disk full, permissions) the temporary file is removed, ``path`` keeps its old
    content, and a :class:`CheckpointError` names the file and the reason. A process killed mid-write
    leaves at most a ``.NAME.*.tmp`` file beside ``path`` (see :func:`remove_stale_temps`)."""
    tmp: str | None = None
    replaced = False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        replaced = True
        # Make the rename itself durable: fsync the folder that holds the new directory entry.
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException as e:
        if tmp is not None and not replaced:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        if not isinstance(e, OSError):
            raise
        if replaced:
            raise CheckpointError(
                f"could not make {path} durable: {e.strerror or e}; the new file is in place but a "
                "power loss could still lose it"
            ) from e
        raise CheckpointError(
            f"could not write {path}: {e.strerror or e}; the previous file (if any) is intact"
        ) from e


def remove_stale_temps(folder: Path) -> list[Path]:
    """Delete temporary files that :func:`atomic_write` left in ``folder`` when its process was
    killed mid-write (only call this while holding the run lock). Returns what was removed."""
    removed = []
    if folder.is_dir():
        for p in folder.glob(f".*{TMP_SUFFIX}"):
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed


def nonfinite_tensors(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors that hold a NaN or an infinity."""
    return [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def save_checkpoint(path: str | os.PathLike[str], ckpt: Checkpoint) -> None:
    """Write ``ckpt`` to ``path`` atomically. Refuses (:class:`NonFiniteError`) to write a model or
    optimizer state holding NaN/Inf, so a diverged state never replaces a good checkpoint."""
    path = Path(path)
    bad = nonfinite_tensors(ckpt.model) + [f"ema/{k}" for k in nonfinite_tensors(ckpt.ema or {})]
    if ckpt.optimizer is not None:
        bad += [f"optimizer state {pid}/{k}" for pid, st in ckpt.optimizer["state"].items()
                for k, v in st.items() if isinstance(v, torch.Tensor) and k != "step"
                and nonfinite_tensors({k: v})]
    if bad:
        raise NonFiniteError(
            f"refusing to write {path}: non-finite values in {', '.join(bad[:6])}"
            f"{' ...' if len(bad) > 6 else ''}; the previous file (if any) is intact"
        )
    atomic_write(path, serialize(ckpt))


def looks_like_safetensors(head: bytes) -> bool:
    """A safetensors file starts with its header's length (8 bytes, little-endian) and then '{'."""
    return len(head) >= 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 1 << 31


def refuse_unsafe(path: Path, head: bytes) -> None:
    """Refuse pickle-based files (by name, or by content when they are not safetensors): loading them
    can run arbitrary code. ``head``: the file's first bytes (at least 9). Nothing is unpickled here
    or anywhere else in vaelab; this only makes the error say what the file is."""
    pickled = head[:1] == b"\x80" or head[:4] == b"PK\x03\x04"  # pickle protocol >= 2, torch's zip
    if path.suffix.lower() in PICKLE_SUFFIXES or (pickled and not looks_like_safetensors(head)):
        raise _pickle_error(path)


def _pickle_error(path: Path) -> CheckpointError:
    return CheckpointError(
        f"{path}: refusing to load a pickle/PyTorch .pt file (unpickling can execute arbitrary code). "
        "vaelab checkpoints are .safetensors files with a JSON config."
    )


FOREIGN_SCAN = 1 << 20  # bytes of a file that is not safetensors read to tell a text pickle from other files


def _is_pickle(data: bytes) -> bool:
    """Whether ``data`` parses as a whole pickle (opcodes up to STOP; read by pickletools, never run)."""
    try:
        for _ in pickletools.genops(io.BytesIO(data)):
            pass
    except Exception:  # an unknown opcode, a truncated argument, no STOP: not a pickle
        return False
    return True


def refuse_foreign(path: Path, head: bytes) -> None:
    """A file of 9 bytes or more that does not start as a safetensors file is no vaelab checkpoint at
    all (a README, a picture, ...): say so, rather than that its header is corrupted; a text
    (protocol 0/1) pickle is refused as one. ``head``: the file's first bytes (up to FOREIGN_SCAN)."""
    if len(head) < 9 or looks_like_safetensors(head):
        return
    refuse_unsafe(path, head)
    if _is_pickle(head):
        raise _pickle_error(path)
    raise CheckpointError(f"{path}: not a vaelab run or checkpoint (not a safetensors file)")


def _json_field(p: Path, meta: dict[str, str], key: str, kind: type, default: Any = None) -> Any:
    if key not in meta:
        if default is not None:
            return default
        raise CheckpointError(f"{p}: corrupted checkpoint metadata (no {key!r} entry)")
    value = json_loads(meta[key], f"{p}: corrupted {key!r} metadata", CheckpointError)
    if not isinstance(value, kind):
        raise CheckpointError(f"{p}: corrupted {key!r} metadata (expected a JSON {kind.__name__})")
    return value


def load_checkpoint(path: str | os.PathLike[str], module: nn.Module | None = None) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint` (safetensors + JSON only).

    Nothing in the file is ever unpickled or executed; every problem (pickle, truncation, corrupted
    bytes, a foreign file) is a :class:`CheckpointError` that names the file. ``module``: the user's own
    module of a run trained with ``train(..., model=...)``, against which the tensors are checked."""
    p = Path(path)
    raw = read_regular(p, CheckpointError, "checkpoint")
    refuse_unsafe(p, raw[:16])
    refuse_foreign(p, raw[:FOREIGN_SCAN])
    meta = read_metadata(p, raw)
    try:
        tensors = st_load(raw)
    except Exception as e:  # the parser of untrusted bytes: any failure means a corrupted file
        raise CheckpointError(f"{p}: truncated or corrupted safetensors data ({e})") from None
    fmt, config, spec = _config_and_spec(p, meta)
    state = _json_field(p, meta, "state", dict, {})
    model = {k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")}
    rng = {k[len("rng/") :]: v for k, v in tensors.items() if k.startswith("rng/")}
    ema = {k[len("ema/") :]: v for k, v in tensors.items() if k.startswith("ema/")} or None
    if not model:
        raise CheckpointError(f"{p}: holds no model tensors")
    optimizer = None
    if "optimizer" in meta:
        opt_plain = _json_field(p, meta, "optimizer", dict)
        try:
            optimizer = _unflatten_optimizer(tensors, opt_plain)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(f"{p}: optimizer state is incomplete or corrupted ({e!r})") from None
    ckpt = Checkpoint(config, spec, model, optimizer, state, rng, ema)
    if fmt == "vaelab-checkpoint-1":
        ckpt = upgrade_v1(ckpt, str(p))
    # The config's model is compared with the tensors in the file before anyone builds it: a config
    # edited to ask for a huge model is refused here, at no cost (see runs/validate.py).
    check_model_tensors(ckpt.config.model, ckpt.spec, ckpt.model, str(p), module)
    if ckpt.ema is not None:  # the moving average holds the same tensors as the model
        compare_tensors({k: (tuple(v.shape), v.dtype) for k, v in ckpt.model.items()}, ckpt.ema, f"{p} (ema/)")
    return ckpt


# ---------------------------------------------------------------- format 1 (vaelab 0.1)
def _spec_from_v1(p: Path, config: dict[str, Any]) -> dict[str, Any]:
    """Format 1 kept what the data implies in the model config; move it out (``config`` is edited)."""
    model = config.get("model")
    if not isinstance(model, dict):
        raise CheckpointError(f"{p}: corrupted config metadata (no model section)")
    spec = {"shape": model.pop("input_shape", [1, 28, 28]), "num_classes": model.pop("num_classes", None),
            "cond_dim": model.pop("cond_dim", 0)}
    return spec


# The first layer of each registered decoder, whose inputs are [z, c].
_DECODER_INPUT = ("decoder.net.0.weight", "decoder.fc.weight")


def upgrade_v1(ckpt: Checkpoint, source: str) -> Checkpoint:
    """Format 1's regressor fed its decoder a z of ``latent_dim`` zeros; today's has no z. The columns
    that multiplied those zeros are dropped (the same function), from the weights and from Adam's
    moments. Every other format-1 checkpoint holds the same tensors as today's."""
    if ckpt.config.model.model != "regressor":
        return ckpt
    try:
        with torch.device("meta"):  # shapes only: nothing is allocated
            model = build_model(ckpt.config.model, ckpt.spec)
    except VaelabError as e:
        raise CheckpointError(f"{source}: cannot convert this format-1 regressor checkpoint: {e}") from None
    names = [n for n, _ in model.named_parameters()]
    for key in _DECODER_INPUT:
        w = ckpt.model.get(key)
        want = dict(model.named_parameters()).get(key)
        if w is None or want is None or w.dim() != 2:
            continue
        drop = w.shape[1] - want.shape[1]
        if drop <= 0:
            continue
        ckpt.model[key] = w[:, drop:].contiguous()
        state = (ckpt.optimizer or {}).get("state", {}).get(names.index(key), {})
        for name, v in list(state.items()):
            if isinstance(v, torch.Tensor) and v.shape == w.shape:
                state[name] = v[:, drop:].contiguous()
    return ckpt


MAX_HEADER = 16 << 20  # a safetensors header larger than this is not one of ours (they are a few KiB)


def read_config(path: str | os.PathLike[str]) -> RunConfig:
    """The run config stored in a checkpoint, reading only the file's header (not its tensors)."""
    p = Path(path)
    fh, size = open_regular(p, CheckpointError, "checkpoint")
    try:
        with fh:
            head = fh.read(16)
            refuse_unsafe(p, head)
            if not looks_like_safetensors(head):
                fh.seek(0)
                refuse_foreign(p, fh.read(FOREIGN_SCAN))
            n = int.from_bytes(head[:8], "little") if len(head) >= 8 else 0
            _check_header_size(p, n, size)
            fh.seek(0)
            raw = read_exactly(fh, 8 + n, allow_short=True)
    except OSError as e:
        raise CheckpointError(f"{p}: cannot read checkpoint: {e.strerror or e}") from None
    return _config_and_spec(p, read_metadata(p, raw))[1]


def _config_and_spec(p: Path, meta: dict[str, str]) -> tuple[str, RunConfig, DataSpec]:
    """The format, the run config and the data description in a checkpoint's metadata."""
    fmt = meta.get("format")
    if fmt != FORMAT and fmt not in OLD_FORMATS:
        raise CheckpointError(f"{p}: not a vaelab checkpoint (format {fmt!r}, expected {FORMAT!r})")
    config_d = _json_field(p, meta, "config", dict)
    spec_d = _json_field(p, meta, "data", dict) if fmt == FORMAT else _spec_from_v1(p, config_d)
    return (fmt, *parse_config(p, config_d, spec_d))


def parse_config(p: Path | str, config_d: dict[str, Any], spec_d: dict[str, Any],
                 what: str = "config metadata") -> tuple[RunConfig, DataSpec]:
    """The run config and the data description from their JSON objects (as :func:`serialize` writes
    them: ``RunConfig.to_dict()`` and ``DataSpec.to_dict()``); also read by exported folders."""
    try:
        return RunConfig.from_dict(config_d), DataSpec.from_dict(spec_d)
    except ConfigError as e:
        raise CheckpointError(f"{p}: corrupted {what} ({e})") from None


def _check_header_size(p: Path, n: int, size: int) -> None:
    if n <= 0 or 8 + n > size:
        raise CheckpointError(f"{p}: truncated or corrupted safetensors header")
    if n > MAX_HEADER:
        raise CheckpointError(f"{p}: its safetensors header declares {n} bytes, more than a vaelab checkpoint's "
                              f"({MAX_HEADER >> 20} MiB at most); not reading it")


def read_metadata(path: Path, raw: bytes | None = None) -> dict[str, str]:
    """The safetensors header's ``__metadata__`` (JSON strings), checked for sanity."""
    if raw is None:
        raw = read_regular(path, CheckpointError, "checkpoint")
    if len(raw) < 8:
        raise CheckpointError(f"{path}: truncated checkpoint ({len(raw)} bytes)")
    n = int.from_bytes(raw[:8], "little")
    if n <= 0 or 8 + n > len(raw):
        hint = " (it looks like a pickle, which vaelab never loads)" if raw.rstrip()[-1:] == b"." else ""
        raise CheckpointError(f"{path}: truncated or corrupted safetensors header{hint}")
    _check_header_size(path, n, len(raw))
    header = json_loads(raw[8 : 8 + n], f"{path}: corrupted safetensors header", CheckpointError)
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupted safetensors header (not a JSON object)")
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{path}: corrupted safetensors metadata")
    return meta


def use_weights(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """The weights a trained run is used with (evaluation, sampling, pictures, export): the moving
    average when the run keeps one (``train.ema``), else the trained weights."""
    return ckpt.ema if ckpt.ema is not None else ckpt.model


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load weights after checking names and shapes, with an error that lists every difference."""
    compare_tensors({k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}, state, source)
    model.load_state_dict(state, strict=True)
