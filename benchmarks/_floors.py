"""GEMM floors measured in the benchmark's own process: the seconds the matrix products of a workload
take alone, with each kernel the machine offers (fp32 MKL through torch.mm, fp32 oneDNN, bf16 oneDNN).
A loop cannot beat the floor of the kernel it uses; ratios to floors read the same on any machine."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

KERNELS = ("fp32 MKL", "fp32 oneDNN", "bf16 oneDNN")


def _nt(kernel: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """a @ bᵀ with ``kernel``."""
    if kernel == "fp32 oneDNN":
        return lambda a, b: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    return lambda a, b: a.mm(b.t())  # MKL in fp32; oneDNN (mkldnn_matmul) for bf16 tensors


def linear_products(rows: int, sizes: Sequence[int], backward: bool = True) -> list[tuple[int, int, int, str]]:
    """The (M, K, N, kind) products of an MLP's forward (rows x sizes) and, with ``backward``, its
    dX and dW products (no dX for the first layer). kind: "fwd" A(M,K) Wᵀ, "dx" dY(M,N) W, "dw" dYᵀ X."""
    out = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        out.append((rows, a, b, "fwd"))
        if backward:
            out.append((rows, a, b, "dw"))
            if i > 0:
                out.append((rows, a, b, "dx"))
    return out


def floor_seconds(products: Sequence[tuple[int, int, int, str]], repeats: int, kernel: str, reps: int = 3) -> float:
    """Best of ``reps`` timings of ``repeats`` rounds of ``products`` with ``kernel``."""
    dtype = torch.bfloat16 if kernel.startswith("bf16") else torch.float32
    nt = _nt(kernel)
    g = torch.Generator().manual_seed(0)
    calls = []
    for m, k, n, kind in products:
        x, w, dy = (torch.randn(*s, generator=g).to(dtype) for s in ((m, k), (n, k), (m, n)))
        if kind == "fwd":
            calls.append(lambda x=x, w=w: nt(x, w))  # (M, N)
        elif kind == "dx":
            calls.append(lambda dy=dy, w=w: nt(dy, w.t()))  # dY W: (M, K)
        else:
            calls.append(lambda dy=dy, x=x: nt(dy.t(), x.t()))  # dYᵀ X: (N, K)
    for f in calls:
        f()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(repeats):
            for f in calls:
                f()
        best = min(best, time.perf_counter() - t0)
    return best


def native_bf16() -> bool:
    """Whether oneDNN has native bf16 kernels here (AVX512-BF16/AMX); without them bf16 is emulated,
    several times slower than fp32, and --quick leaves the bf16 variants out."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
