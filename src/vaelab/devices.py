"""Where a run computes: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` | ``mps``, and in what precision.

``auto`` takes a CUDA GPU when one is visible, else Apple's MPS when present, else the CPU. Under
``torchrun`` each process takes the GPU of its ``LOCAL_RANK`` (``cuda`` and ``auto`` alike).
Precision ``fp32`` is plain float32; ``bf16`` and ``fp16`` run the networks under
``torch.autocast`` with float32 master weights, and the models hand their distributions float32
parameters, so likelihoods, KLs and their sums stay in float32 (``fp16`` adds a gradient scaler).
"""

from __future__ import annotations

import contextlib
import os

import torch

from .config import DEVICE_PATTERN
from .errors import ConfigError

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _local_rank() -> int | None:
    v = os.environ.get("LOCAL_RANK")
    return int(v) if v is not None and v.isdigit() else None


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(spec: str = "auto") -> torch.device:
    """The torch device named by ``spec``; a device that is not there is a :class:`ConfigError`."""
    if not isinstance(spec, str) or not DEVICE_PATTERN.fullmatch(spec):
        raise ConfigError(f"device {spec!r}: expected auto, cpu, cuda, cuda:N or mps")
    if spec == "auto":
        if torch.cuda.is_available():
            spec = "cuda"
        elif _mps_available():
            spec = "mps"
        else:
            return torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        if not _mps_available():
            raise ConfigError("device 'mps': Apple's Metal backend is not available here; use --device cpu")
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {spec!r}: no CUDA GPU is visible to PyTorch here "
                          f"(torch {torch.__version__}, torch.cuda.is_available() is False); use --device cpu")
    count = torch.cuda.device_count()
    index = int(spec.split(":")[1]) if ":" in spec else (_local_rank() or 0)
    if index >= count:
        raise ConfigError(f"device {spec!r}: only {count} CUDA GPU(s) are visible (cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index)


def check_precision(precision: str) -> torch.dtype | None:
    """The autocast dtype of ``precision`` (None for fp32)."""
    if precision not in AUTOCAST_DTYPES:
        raise ConfigError(f"precision {precision!r}: expected one of {', '.join(AUTOCAST_DTYPES)}")
    return AUTOCAST_DTYPES[precision]


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for a bf16/fp16 run on ``device``; a no-op for fp32."""
    dtype = check_precision(precision)
    if dtype is None:
        return contextlib.nullcontext()
    if device.type == "cpu" and dtype == torch.float16:
        raise ConfigError("precision fp16 needs a GPU; on the CPU use bf16")
    return torch.autocast(device_type=device.type, dtype=dtype)


def fits_on(device: torch.device, nbytes: int, share: float = 0.5) -> bool:
    """Whether ``nbytes`` of data may live on ``device``: always on the CPU; on a GPU, within ``share``
    of its free memory (the rest is for the model, activations and the evaluation)."""
    if device.type != "cuda":
        return device.type in ("cpu", "mps")
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= share * free
