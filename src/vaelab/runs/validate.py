"""Checks on what a checkpoint holds, before any of it reaches torch: the model's tensors against the
shapes its config implies (worked out on the ``meta`` device, which allocates nothing, so a config
asking for a 7 GB model costs nothing to refuse), the optimizer state against the parameters, the
random number generator states and the training counters. Every problem is a
:class:`CheckpointError` that names the file and the entry.

Why before: ``Optimizer.load_state_dict`` copies buffers without comparing their shapes to the
parameters', and Adam's single-kernel update then reads and writes past the end of a buffer that is too
small (a segmentation fault, or silent heap corruption)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import torch

from ..config import DataSpec, ModelConfig
from ..errors import CheckpointError, VaelabError

_TOO_MANY = 8


def _listing(names: list[str]) -> str:
    return ", ".join(names[:_TOO_MANY]) + (" ..." if len(names) > _TOO_MANY else "")


def expected_tensors(cfg: ModelConfig, spec: DataSpec, source: str,
                     model: torch.nn.Module | None = None) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every tensor in the state dict of the model ``cfg`` and ``spec``
    describe, found by building it on the meta device (no memory is allocated for its weights), or of
    ``model``, the user's own module the checkpoint is opened with."""
    from ..models import MODELS, build_model

    if model is not None:
        return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    if isinstance(cfg.model, str) and cfg.model not in MODELS:
        raise CheckpointError(f"{source}: the run's model {cfg.model!r} is not a registered model (was it trained "
                              "from a module of your own?); open it with vaelab.load_run(path, model=YourModule(...)) "
                              "or train(..., model=YourModule(...)), or register the class (vaelab.MODELS.add)")
    try:
        with torch.device("meta"):
            model = build_model(cfg, spec)
    except VaelabError as e:
        raise CheckpointError(f"{source}: its config does not describe a model vaelab can build: {e}") from None
    except (RuntimeError, ValueError, TypeError, OverflowError, NotImplementedError) as e:
        raise CheckpointError(f"{source}: its config does not describe a buildable model "
                              f"({type(e).__name__}: {e})") from None
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def compare_tensors(expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]], state: Mapping[str, torch.Tensor],
                    source: str) -> None:
    """Refuse ``state`` unless it has exactly the expected names, shapes and dtypes (listing every difference)."""
    problems = []
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing:
        problems.append(f"missing tensors: {_listing(missing)}")
    if extra:
        problems.append(f"unexpected tensors: {_listing(extra)}")
    for k in sorted(set(expected) & set(state)):
        shape, dtype = expected[k]
        if tuple(state[k].shape) != tuple(shape):
            problems.append(f"{k}: checkpoint has shape {tuple(state[k].shape)}, config implies {tuple(shape)}")
        elif state[k].dtype != dtype:
            problems.append(f"{k}: checkpoint has dtype {state[k].dtype}, model has {dtype}")
    if problems:
        raise CheckpointError(f"{source}: checkpoint does not match its model config:\n  " + "\n  ".join(problems))


def check_model_tensors(cfg: ModelConfig, spec: DataSpec, state: Mapping[str, torch.Tensor], source: str,
                        model: torch.nn.Module | None = None) -> None:
    """The model tensors of a checkpoint against its config (or the user's ``model``), before the model is built."""
    compare_tensors(expected_tensors(cfg, spec, source, model), state, source)


# ---------------------------------------------------------------- optimizer state
def _finite_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


def _check_step(v: Any, where: str) -> None:
    if isinstance(v, torch.Tensor):
        if v.numel() != 1 or v.is_complex() or v.dtype == torch.bool:
            raise CheckpointError(f"{where}: step must be one number, got a {v.dtype} tensor of shape {tuple(v.shape)}")
        v = v.item()
    if not _finite_number(v) or v < 0 or float(v) != math.floor(float(v)):
        raise CheckpointError(f"{where}: step must be a non-negative whole number, got {v!r}")


def _check_hyper(key: str, saved: Any, live: Any, where: str) -> None:
    """One param-group setting: the same kind of value as the live optimizer's, finite, in range."""
    if isinstance(live, bool) or live is None or isinstance(live, str):
        if saved is not None and type(saved) is not type(live) and live is not None:
            raise CheckpointError(f"{where}: {key} must be {type(live).__name__}, got {saved!r}")
        return
    if isinstance(live, numbers.Real):
        if not _finite_number(saved):
            raise CheckpointError(f"{where}: {key} must be a finite number, got {saved!r}")
        if key in ("lr", "eps", "weight_decay", "momentum", "dampening", "alpha") and saved < 0:
            raise CheckpointError(f"{where}: {key} must be >= 0, got {saved!r}")
        return
    if isinstance(live, (tuple, list)):
        if not isinstance(saved, (tuple, list)) or len(saved) != len(live):
            raise CheckpointError(f"{where}: {key} must be {len(live)} numbers, got {saved!r}")
        for s in saved:
            if not _finite_number(s):
                raise CheckpointError(f"{where}: {key} must hold finite numbers, got {saved!r}")
        if key == "betas" and not all(0 <= s < 1 for s in saved):
            raise CheckpointError(f"{where}: betas must lie in [0, 1), got {saved!r}")


def check_optimizer_state(optimizer: torch.optim.Optimizer, sd: Any, source: str) -> None:
    """Refuse an optimizer state dict that does not fit ``optimizer`` (its parameters and settings):
    the groups and their parameter ids, every group setting (finite, in range, of the right kind),
    and for every parameter's state: ``step`` a non-negative whole number, every other tensor of the
    parameter's shape and dtype and finite. Only then may it go to ``load_state_dict``."""
    where = f"{source}: optimizer state"
    if not isinstance(sd, Mapping) or not isinstance(sd.get("state"), Mapping) or not isinstance(
            sd.get("param_groups"), list):
        raise CheckpointError(f"{where} is malformed (expected 'state' and 'param_groups')")
    live_groups = optimizer.param_groups
    params = [p for g in live_groups for p in g["params"]]
    if len(sd["param_groups"]) != len(live_groups):
        raise CheckpointError(f"{where}: {len(sd['param_groups'])} parameter groups, the optimizer has {len(live_groups)}")
    next_id = 0
    for gi, (saved, live) in enumerate(zip(sd["param_groups"], live_groups, strict=True)):
        gw = f"{where}, parameter group {gi}"
        if not isinstance(saved, Mapping) or not isinstance(saved.get("params"), list):
            raise CheckpointError(f"{gw} is malformed")
        want = list(range(next_id, next_id + len(live["params"])))
        next_id += len(live["params"])
        if saved["params"] != want:
            raise CheckpointError(f"{gw}: parameter ids {saved['params'][:_TOO_MANY]} do not match the model's "
                                  f"{len(want)} parameters")
        for key, value in saved.items():
            if key != "params" and key in live:
                _check_hyper(key, value, live[key], gw)
    for pid, entry in sd["state"].items():
        if isinstance(pid, bool) or not isinstance(pid, int) or not 0 <= pid < len(params):
            raise CheckpointError(f"{where}: entry for parameter {pid!r}, the model has {len(params)} parameters")
        if not isinstance(entry, Mapping):
            raise CheckpointError(f"{where}: entry for parameter {pid} is malformed")
        p = params[pid]
        for key, v in entry.items():
            ew = f"{where}, parameter {pid} '{key}'"
            if key == "step":
                _check_step(v, ew)
            elif isinstance(v, torch.Tensor):
                if tuple(v.shape) != tuple(p.shape):
                    raise CheckpointError(f"{ew}: shape {tuple(v.shape)} does not match the parameter's {tuple(p.shape)}")
                if v.dtype != p.dtype:
                    raise CheckpointError(f"{ew}: dtype {v.dtype} does not match the parameter's {p.dtype}")
                if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                    raise CheckpointError(f"{ew}: holds NaN or infinite values")
            elif not (_finite_number(v) or isinstance(v, (bool, str)) or v is None):
                raise CheckpointError(f"{ew}: unexpected value {v!r}")


# ---------------------------------------------------------------- training counters
_COUNTERS = ("epoch", "step", "step_in_epoch", "nonfinite_total", "nonfinite_run", "skipped_total")


def check_train_state(st: Any, source: str) -> dict[str, Any]:
    """The counters a checkpoint carries (as saved by the training loop), checked: whole numbers
    >= 0 that agree with each other, finite sums and time, a best ELBO that is a number or -inf."""
    from ..training.step import TrainState

    if not isinstance(st, Mapping):
        raise CheckpointError(f"{source}: corrupted training state (not a JSON object)")
    known = set(TrainState.__dataclass_fields__) | {"rng_meta", "world_size", "device", "grad_scaler", "data_fingerprint",
                                                    "accel", "gemm"}  # gemm: the kernels of checkpoints before accel
    unknown = sorted(set(st) - known)
    if unknown:
        raise CheckpointError(f"{source}: corrupted training state: unknown entries {unknown}")
    out = dict(st)
    for k in _COUNTERS:
        v = out.get(k, 0)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise CheckpointError(f"{source}: corrupted training state: {k} must be a whole number >= 0, got {v!r}")
    if out.get("step_in_epoch", 0) > out.get("step", 0):
        raise CheckpointError(f"{source}: corrupted training state: step_in_epoch {out['step_in_epoch']} exceeds "
                              f"step {out.get('step', 0)}")
    if out.get("nonfinite_run", 0) > out.get("nonfinite_total", 0):
        raise CheckpointError(f"{source}: corrupted training state: nonfinite_run exceeds nonfinite_total")
    best = out.get("best_val", -math.inf)
    if not isinstance(best, numbers.Real) or isinstance(best, bool) or math.isnan(best) or best == math.inf:
        raise CheckpointError(f"{source}: corrupted training state: best_val must be a number or -inf, got {best!r}")
    elapsed = out.get("elapsed", 0.0)
    if not _finite_number(elapsed) or elapsed < 0:
        raise CheckpointError(f"{source}: corrupted training state: elapsed must be a finite number >= 0, got {elapsed!r}")
    if out.get("device", "cpu") not in ("cpu", "cuda", "mps"):
        raise CheckpointError(f"{source}: corrupted training state: device must be cpu, cuda or mps, "
                              f"got {out.get('device')!r}")
    fp = out.get("data_fingerprint", "")
    if not isinstance(fp, str) or len(fp) > 64:
        raise CheckpointError(f"{source}: corrupted training state: data_fingerprint must be a short string")
    scaler = out.get("grad_scaler", {})
    if not isinstance(scaler, Mapping) or not all(isinstance(k, str) and _finite_number(v) for k, v in scaler.items()):
        raise CheckpointError(f"{source}: corrupted training state: grad_scaler must map names to finite numbers")
    sums = out.get("sums", {})
    if not isinstance(sums, Mapping) or not all(isinstance(k, str) and _finite_number(v) for k, v in sums.items()):
        raise CheckpointError(f"{source}: corrupted training state: sums must map names to finite numbers")
    if sums.get("n", 0) < 0:
        raise CheckpointError(f"{source}: corrupted training state: sums.n must be >= 0")
    return out


# ---------------------------------------------------------------- random number generator states
def _torch_state_size() -> int:
    return int(torch.Generator().get_state().numel())


CUDA_STATE_SIZE = 16  # a CUDA (or MPS) generator's state: Philox seed and offset


def check_rng_tensor(t: Any, name: str, source: str) -> None:
    """A torch generator state: a 1-D uint8 tensor of the size torch's CPU generator uses (or, for the
    noise stream of a run on a GPU, the size of a CUDA generator's)."""
    size = _torch_state_size()
    sizes = (size, CUDA_STATE_SIZE) if name.startswith("noise/") else (size,)
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1 or t.numel() not in sizes:
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise CheckpointError(f"{source}: corrupted random number generator state rng/{name} "
                              f"(expected {size} bytes of uint8, got {got})")


def check_rng(tensors: Mapping[str, Any], meta: Any, source: str) -> None:
    """Every saved RNG state, checked before any generator is touched (so a bad one changes nothing)."""
    for name, t in tensors.items():
        if name == "torch" or name.startswith("noise/"):
            check_rng_tensor(t, name, source)
    if not isinstance(meta, Mapping):
        raise CheckpointError(f"{source}: corrupted random number generator state (rng_meta is not an object)")
    if "numpy" in tensors or "numpy" in meta:
        keys, m = tensors.get("numpy"), meta.get("numpy")
        ok = (isinstance(keys, torch.Tensor) and keys.dtype == torch.uint8 and keys.dim() == 1
              and keys.numel() == 624 * 4 and isinstance(m, list) and len(m) == 4 and m[0] == "MT19937"
              and isinstance(m[1], int) and not isinstance(m[1], bool) and 0 <= m[1] <= 624
              and m[2] in (0, 1) and _finite_number(m[3]))
        if not ok:
            raise CheckpointError(f"{source}: corrupted random number generator state (numpy)")
    if "python" in meta:
        m = meta["python"]
        ok = (isinstance(m, list) and len(m) == 3 and m[0] == 3 and isinstance(m[1], list) and len(m[1]) == 625
              and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**32 for v in m[1])
              and m[1][-1] <= 624 and (m[2] is None or _finite_number(m[2])))
        if not ok:
            raise CheckpointError(f"{source}: corrupted random number generator state (python)")
