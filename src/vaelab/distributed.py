"""torch.distributed, as launched by torchrun: PyTorch's own engine, nothing home-made.

One process per device: under torchrun with CUDA each process uses ``cuda:LOCAL_RANK`` and the nccl
backend; on the CPU, gloo. The process group has a timeout (``train.dist_timeout``), so a peer that
died or froze ends the job: the collectives raise, and :func:`peer_failures` turns that into one
:class:`~vaelab.errors.DistributedError` line naming the rank (where it can be known) and what to do,
instead of a hang or a backtrace from C++.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import time
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .errors import DistributedError

DEFAULT_TIMEOUT = 300.0  # seconds a process waits for its peers in one collective (train.dist_timeout)
GRACE = 10.0  # seconds the surviving processes take, after a failure, to find out which of them are alive


def local_rank() -> int:
    """This process's index on its machine (torchrun's LOCAL_RANK; 0 when not launched by torchrun)."""
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0


def backend_for(device: str | torch.device | None = None) -> str:
    """nccl when this process computes on CUDA (``device``; by default: when CUDA is available),
    gloo otherwise (the CPU, and MPS, which no backend serves)."""
    kind = torch.device(device).type if device is not None and str(device) != "auto" else (
        "cuda" if torch.cuda.is_available() else "cpu")
    return "nccl" if kind == "cuda" and dist.is_nccl_available() else "gloo"


def setup_distributed(timeout: float = DEFAULT_TIMEOUT, device: str | torch.device | None = None) -> bool:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); returns True if distributed.

    ``timeout``: seconds a collective waits for the other processes before it fails (PyTorch's own
    default is 30 minutes). ``device``: where this process computes (see :func:`backend_for`); with
    nccl the process takes ``cuda:LOCAL_RANK``."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = backend_for(device)
        if backend == "nccl":
            torch.cuda.set_device(local_rank())
            # A timed-out nccl collective then raises in the calling thread (caught below) instead of
            # the watchdog aborting the process with a C++ backtrace.
            os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
        except (RuntimeError, ValueError) as e:
            raise DistributedError(f"could not join the distributed job ({backend}): {_first_line(e)}") from None
    return dist.is_initialized() and dist.get_world_size() > 1


def leave_distributed(finished: bool) -> None:
    """Leave the process group before the process exits (a no-op outside torchrun). ``finished``: this
    process's work ended normally, so it first waits for the others to finish theirs. Left to Python's
    shutdown, gloo's threads were sometimes still running when the process exited, and a rank died with
    "terminate called without an active exception" (SIGABRT) after a command that had succeeded."""
    if not dist.is_initialized():
        return
    try:
        if finished:
            dist.barrier()
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _comm_device() -> torch.device:
    """Where collectives' tensors must live: this process's GPU under nccl, the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_any(flags: list[bool], world: int) -> list[bool]:
    """Element-wise: True on every rank iff the flag is True on some rank (one collective)."""
    if world <= 1:
        return list(flags)
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=_comm_device())
    dist.all_reduce(t)
    return [v > 0 for v in t.tolist()]


def all_max_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t``'s element-wise maximum over the ranks, returned where ``t`` lives. Under nccl the tensor
    stays on the GPU and nothing waits for it; under gloo it goes through the CPU."""
    out = t.to(_comm_device(), copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out.to(t.device)


def all_sum(values: list[float], world: int) -> list[float]:
    """Element-wise sum of ``values`` over the ranks (float64)."""
    if world <= 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def all_sum_tensor(t: torch.Tensor, world: int) -> torch.Tensor:
    """``t`` summed over the ranks (same shape everywhere), returned where ``t`` lives."""
    if world <= 1:
        return t
    out = t.to(_comm_device(), copy=True)
    dist.all_reduce(out)
    return out.to(t.device)


def broadcast_(tensors: Sequence[torch.Tensor], world: int) -> None:
    """Give every rank rank 0's values of ``tensors`` (in place; same shapes everywhere)."""
    if world <= 1:
        return
    for t in tensors:
        mine = t.to(_comm_device())
        dist.broadcast(mine, 0)
        if mine is not t:
            t.copy_(mine)


def all_gather(t: torch.Tensor, world: int) -> list[torch.Tensor]:
    """Every rank's ``t`` (same shape everywhere), in rank order, where ``t`` lives."""
    if world <= 1:
        return [t]
    mine = t.to(_comm_device())
    out = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(out, mine)
    return [o.to(t.device) for o in out]


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ---------------------------------------------------------------- when a peer fails
def launch_command(args: str) -> str:
    """The command that runs ``vaelab ARGS`` the way this process was launched (to resume a job)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return f"vaelab {args}"
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if per_node >= world:
        return f"torchrun --standalone --nproc-per-node {per_node} -m vaelab {args}"
    return (f"torchrun --nnodes {world // max(per_node, 1)} --nproc-per-node {per_node} (with the same --rdzv "
            f"options, on every node) -m vaelab {args}")


def is_peer_failure(e: BaseException) -> bool:
    """Whether ``e`` is a collective that failed (timeout, closed connection), not a bug of ours."""
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    msg = str(e)
    return isinstance(e, RuntimeError) and any(
        s in msg for s in ("gloo", "Gloo", "NCCL", "nccl", "Connection closed", "Connection reset", "Timed out",
                           "timed out", "Broken pipe", "ProcessGroup"))


def _first_line(e: BaseException) -> str:
    """torch's message without the C++ source location and frames."""
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if line.startswith("[") and "] " in line:
        line = line.split("] ", 1)[1]
    return line[:200]


def _alive(rank: int, world: int, grace: float) -> list[int] | None:
    """The ranks that are still running, found through the job's store (which torchrun's agent
    holds, so it outlives any worker): each survivor writes a key and waits up to ``grace`` for the
    others'. None when the store cannot be reached either."""
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(f"vaelab/alive/{rank}", "1")
        keys = [f"vaelab/alive/{r}" for r in range(world)]
        deadline = time.monotonic() + grace
        while True:
            alive = [r for r, k in enumerate(keys) if store.check([k])]
            if len(alive) == world or time.monotonic() > deadline:
                return alive
            time.sleep(0.1)
    except Exception:  # noqa: BLE001 - the store lives in another process that may be gone too
        return None


def describe_failure(e: BaseException, rank: int, world: int, timeout: float) -> tuple[str, bool]:
    """What happened, in words naming the rank where it can be known, and whether this process is
    the one that says it (the lowest surviving rank)."""
    msg = str(e)
    timed_out = "Timed out" in msg or "timed out" in msg or "Timeout" in msg
    if world == 2:
        lost, announce = [1 - rank], True
    else:
        alive = _alive(rank, world, min(GRACE, timeout))
        lost = None if alive is None else [r for r in range(world) if r not in alive]
        announce = alive is None or not alive or rank == min(alive)
    who = (("rank " if len(lost) == 1 else "ranks ") + ", ".join(map(str, lost))) if lost else "a peer process"
    if timed_out:
        what = f"{who} did not answer within {timeout:g} s (frozen or dead; train.dist_timeout)"
    elif "closed" in msg or "reset" in msg or "Broken pipe" in msg:
        what = f"{who} stopped (its connection closed: killed or crashed)"
    else:
        what = f"lost contact with {who} ({_first_line(e)})"
    return what, announce


_peer_lost = False  # set by peer_failures: this process's job lost a peer (see peer_lost)


def peer_lost() -> bool:
    """Whether a peer's failure ended this process's part in the job (:func:`peer_failures`).

    Such a process must leave without Python's shutdown (:func:`os._exit`, after its output is
    flushed; ``vaelab``'s command line does): the collective the peer never answered can still be
    running in one of gloo's worker threads after this process's own wait gave up, and that thread
    destroys it when gloo's own timeout or the closed connection ends it. The work holds Python
    objects (its tensors' Python wrappers; during the backward pass, DistributedDataParallel's
    all-reduce also captures the contextvars the autograd engine stashes in thread-local state), so
    destroying it takes the GIL; once the interpreter is finalizing, the thread is ended there by
    ``pthread_exit`` inside a ``noexcept`` destructor and libstdc++ aborts the process with "terminate
    called without an active exception" after vaelab's line. Destroying the process group does not
    wait for that work (the DDP reducer still holds the group, whose destructor is what joins gloo's
    threads), and neither does a garbage collection."""
    return _peer_lost


@contextlib.contextmanager
def peer_failures(timeout: float, then: Callable[[], str]) -> Iterator[None]:
    """Turn a failed collective inside the block into a one-line :class:`DistributedError`:
    what happened (naming the rank), then ``then()`` (e.g. the checkpoint and the resume command).
    The process group is destroyed first, so the process can exit (gloo's would otherwise wait on
    the frozen peer when Python shuts down)."""
    try:
        yield
    except (RuntimeError, ValueError) as e:
        rank, world = dist_info()
        if world <= 1 or not is_peer_failure(e):
            raise
        what, announce = describe_failure(e, rank, world, timeout)
        global _peer_lost
        _peer_lost = True
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
        raise DistributedError(f"{what}; {then()}", announce) from None
