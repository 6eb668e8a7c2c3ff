"""An ``nn.Linear`` whose float32 matrix products on the CPU run on oneDNN where that was decided
faster, with the same maths (float32 inputs, float32 accumulation; only the summation order differs).

Why: in float32 ``nn.Linear`` always calls MKL's SGEMM, which on some CPUs (AMD's, where MKL takes its
AVX2 path) runs at half the speed oneDNN reaches on the same products with AVX-512. No torch setting
sends an fp32 ``nn.Linear`` to oneDNN without rounding its inputs to bf16, so :class:`FastLinear` calls
oneDNN's linear (``torch.ops.mkldnn._linear_pointwise``) itself, through a custom operator with its own
backward (dX = dY W, dW = dYᵀ X, db = Σ dY) that ``torch.compile`` treats as an opaque kernel.

Which products run on oneDNN is a :class:`KernelPlan`, one entry per layer shape (in, out): bits
:data:`FWD`, :data:`DX`, :data:`DW`. A plan is never taken from one process's timing: it comes from the
machine's persisted decisions (:mod:`.machine`) and is recorded in the run's config
(``train.kernels``), so every process of a run, fresh or resumed, computes with the same kernels.
Products smaller than :data:`MIN_FLOPS` stay with ATen whatever the plan (a static rule), and so does
everything else: other devices, float64, bf16/fp16 autocast, a torch without oneDNN.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

FWD, DX, DW = 1, 2, 4  # bits of a layer's entry: which of its products run on oneDNN
MIN_FLOPS = 2e6  # products smaller than this stay with ATen (cheap, and oneDNN's call costs more)
TIME_ROWS = 1024  # products are timed at most at this many rows (the speeds no longer change beyond)
# oneDNN is chosen when it takes at most this fraction of ATen's time: a clear win (on AMD CPUs with
# AVX-512 it takes about half), not a few percent that timing noise can give either way
MARGIN = 0.85
SETTINGS = ("auto", "aten", "onednn")  # train.kernels besides a recorded plan
_ENTRY = re.compile(r"(\d{1,7})x(\d{1,7})=([0-7])")


@dataclass(frozen=True)
class KernelPlan:
    """Which products of each float32 linear layer shape (in, out) run on oneDNN (bits FWD|DX|DW);
    a shape not listed is ATen's. Written as ``"784x400=7,400x20=0"`` in ``train.kernels``."""

    bits: dict[tuple[int, int], int] = field(default_factory=dict)

    def __str__(self) -> str:
        return ",".join(f"{i}x{o}={b}" for (i, o), b in sorted(self.bits.items())) or "aten"

    def __hash__(self) -> int:
        return hash(str(self))

    def of(self, n_in: int, n_out: int) -> int:
        return self.bits.get((n_in, n_out), 0)

    @classmethod
    def parse(cls, text: str, where: str = "train.kernels") -> KernelPlan:
        """A recorded plan (or ``aten``); anything else is a one-line :class:`ConfigError`."""
        if text == "aten":
            return cls()
        entries = text.split(",")
        if len(entries) > 1000 or not all(_ENTRY.fullmatch(e) for e in entries):
            raise ConfigError(f"{where}: expected auto, aten, onednn or a recorded plan like "
                              f"784x400=7,400x20=5 (in x out = oneDNN bits 0..7), got {text[:80]!r}")
        return cls({(int(m[1]), int(m[2])): int(m[3]) for m in map(_ENTRY.fullmatch, entries) if m})

    def uses_onednn(self) -> bool:
        return any(self.bits.values())


def _onednn(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a @ bᵀ (+ bias) by oneDNN; a (N, K), b (M, K) in any strides (transposed views are free)."""
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")


@torch.library.custom_op("vaelab::onednn_mm_nt", mutates_args=())
def onednn_mm_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ bᵀ by oneDNN: a (N, K), b (M, K) -> (N, M)."""
    return _onednn(a, b)


@onednn_mm_nt.register_fake
def _(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.new_empty(a.shape[0], b.shape[0])


@torch.library.custom_op("vaelab::linear", mutates_args=())
def fast_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, mode: int) -> torch.Tensor:
    """y = x Wᵀ + b, x (N, in) float32: the forward by oneDNN when ``mode & FWD``, else ATen; the
    backward takes dX and dW from oneDNN when ``mode`` has DX / DW."""
    if mode & FWD:
        return _onednn(x, weight, bias)
    return F.linear(x, weight, bias)


@fast_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, mode: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


def _setup(ctx, inputs, output) -> None:
    x, weight, bias, mode = inputs
    ctx.mode, ctx.has_bias = mode, bias is not None
    ctx.save_for_backward(x, weight)


def _backward(ctx, g: torch.Tensor):
    x, weight = ctx.saved_tensors  # x (N, in), weight (out, in); g (N, out)
    dx = dw = db = None
    if ctx.needs_input_grad[0]:
        dx = onednn_mm_nt(g, weight.t()) if ctx.mode & DX else g.mm(weight)  # (N, in)
    if ctx.needs_input_grad[1]:
        dw = onednn_mm_nt(g.t(), x.t()) if ctx.mode & DW else g.t().mm(x)  # (out, in)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        db = g.sum(0)
    return dx, dw, db, None


fast_linear.register_autograd(_backward, setup_context=_setup)


class _FastLinear(torch.autograd.Function):
    """The same as :func:`fast_linear` for eager mode, where a custom operator's Python dispatch
    (~0.1 ms per call) would cost more than oneDNN saves."""

    @staticmethod
    def forward(ctx, x, weight, bias, mode):  # type: ignore[override]
        ctx.mode, ctx.has_bias = mode, bias is not None
        ctx.save_for_backward(x, weight)
        return _onednn(x, weight, bias) if mode & FWD else F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = _onednn(g, weight.t()) if ctx.mode & DX else g.mm(weight)
        if ctx.needs_input_grad[1]:
            dw = _onednn(g.t(), x.t()) if ctx.mode & DW else g.t().mm(x)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = g.sum(0)
        return dx, dw, db, None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, bits: int) -> torch.Tensor:
    """``F.linear`` with the products in ``bits`` on oneDNN where they are float32 CPU products of at
    least :data:`MIN_FLOPS`; x (..., in) -> (..., out)."""
    compiling = torch.compiler.is_compiling()
    if compiling and torch.is_autocast_enabled(x.device.type):
        # autocast's own casts, made before F.linear instead of inside it: traced that way each weight's
        # gradient leaves its product in the weight's layout; traced through autocast's cast, inductor
        # copied every large gradient twice (transposed, then back) on its way to float32 (bf16 step on
        # a CPU: ~0.5 ms of ~3.4)
        dt = torch.get_autocast_dtype(x.device.type)
        return F.linear(x.to(dt), weight.to(dt), None if bias is None else bias.to(dt))
    rows = x.numel() // max(x.shape[-1], 1) if x.dim() else 0
    if (bits == 0 or x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32
            or x.dim() < 1 or 2.0 * rows * weight.shape[0] * weight.shape[1] < MIN_FLOPS
            or torch.is_autocast_enabled("cpu") or torch.jit.is_tracing()
            or torch.onnx.is_in_onnx_export()):  # an exported graph has plain MatMuls
        return F.linear(x, weight, bias)
    x2 = x.reshape(-1, x.shape[-1]).contiguous()  # (N, in)
    y = fast_linear(x2, weight, bias, bits) if compiling else _FastLinear.apply(x2, weight, bias, bits)
    return y.view(*x.shape[:-1], weight.shape[0])


class FastLinear(nn.Linear):
    """``nn.Linear`` (the same parameters and state_dict) computed by :func:`linear` with its plan's bits."""

    bits: int = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.bits)


def swap_linears(model: nn.Module, plan: KernelPlan) -> int:
    """Compute every ``nn.Linear`` of ``model`` by :class:`FastLinear` with its shape's bits from the plan
    (the same module object, so parameters, optimizer state and hooks stay as they were; bits 0 is plain
    ``F.linear``, but for autocast's casts inside a compiled graph). Returns how many layers take oneDNN."""
    n = 0
    for m in model.modules():
        if type(m) in (nn.Linear, FastLinear):
            m.__class__ = FastLinear
            m.bits = plan.of(m.in_features, m.out_features)
            n += m.bits > 0
    return n


def linear_shapes(model: nn.Module) -> list[tuple[int, int]]:
    """The distinct (in, out) of the float32 CPU linear layers of ``model``: what a plan decides."""
    return sorted({(m.in_features, m.out_features) for m in model.modules()
                   if isinstance(m, nn.Linear) and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32})


def _ratio(a, b, reps: int = 5, round_s: float = 1e-3) -> float:
    """Seconds of ``b`` over seconds of ``a``, each the best of ``reps`` interleaved rounds of as many calls
    as take ``a`` about ``round_s`` (single calls of a fraction of a millisecond are too noisy to rank two
    kernels within 15 % of each other)."""
    ta, tb = [], []
    for f in (a, b):
        f()  # warm-up (oneDNN builds its primitive on the first call of a shape)
    t0 = time.perf_counter()
    a()
    inner = max(1, min(64, round(round_s / max(time.perf_counter() - t0, 1e-7))))
    for _ in range(reps):  # interleaved, so both see the same machine state
        for f, ts in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            for _ in range(inner):
                f()
            ts.append(time.perf_counter() - t0)
    return min(tb) / min(ta)


def measure(rows: int, n_in: int, n_out: int) -> int:
    """Time each product of a (rows, in, out) linear both ways: the bits of those oneDNN wins clearly
    (:data:`MARGIN`). Called only by :mod:`.machine`, which persists the answer for the machine."""
    rows = min(rows, TIME_ROWS)
    if 2.0 * rows * n_in * n_out < MIN_FLOPS:
        return 0
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(rows, n_in, generator=g), torch.randn(n_out, n_in, generator=g)
    b, dy = torch.randn(n_out, generator=g), torch.randn(rows, n_out, generator=g)
    with torch.no_grad():
        trials = {
            FWD: (lambda: F.linear(x, w, b), lambda: _onednn(x, w, b)),
            DX: (lambda: dy.mm(w), lambda: _onednn(dy, w.t())),
            DW: (lambda: dy.t().mm(x), lambda: _onednn(dy.t(), x.t())),
        }
        return sum(bit for bit, (aten, dnn) in trials.items() if _ratio(aten, dnn) <= MARGIN)
