"""torch.distributed, as launched by torchrun: PyTorch's own engine, nothing home-made."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def setup_distributed() -> bool:
    """Initialise torch.distributed (gloo) when launched by torchrun; returns True if distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.is_initialized() and dist.get_world_size() > 1


def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_agree(ok: bool, world: int) -> bool:
    """True on every rank iff ``ok`` is True on every rank."""
    if world <= 1:
        return ok
    flag = torch.tensor([0.0 if ok else 1.0])
    dist.all_reduce(flag)
    return flag.item() == 0


def all_sum(values: list[float], world: int) -> list[float]:
    """Element-wise sum of ``values`` over the ranks (float64)."""
    if world <= 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def all_gather(t: torch.Tensor, world: int) -> list[torch.Tensor]:
    """Every rank's ``t`` (same shape everywhere), in rank order."""
    if world <= 1:
        return [t]
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t)
    return out


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
