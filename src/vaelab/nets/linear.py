"""A drop-in ``nn.Linear`` whose float32 matrix products on the CPU take the fastest path the machine
offers, with the same maths (float32 inputs, float32 accumulation; only the summation order differs).

Why: in float32 ``nn.Linear`` always calls MKL's SGEMM, which on some CPUs (AMD's, where MKL takes its
AVX2 path) runs at half the speed oneDNN reaches on the same products with AVX-512. No torch setting
sends an fp32 ``nn.Linear`` to oneDNN without rounding its inputs to bf16, so this module calls
oneDNN's linear (``torch.ops.mkldnn._linear_pointwise``) itself, through a custom operator with its own
backward (dX = dY W, dW = dYᵀ X, db = Σ dY) that ``torch.compile`` treats as an opaque kernel.

Whether oneDNN is faster is measured, not assumed: the first time a shape (rows, in, out) is seen
each of its three products (forward, dX, dW) is timed both ways for a few milliseconds and the faster
one is kept for the process (:func:`decisions`). Machines differ (on some oneDNN has no advantage), and
so do shapes (small products stay with ATen). ``VAELAB_FP32_LINEAR`` overrides: ``auto`` (default),
``onednn`` (always, where available) or ``aten`` (never). A training run saves the decisions it used in
its checkpoints and a resumed run re-uses them (:func:`preset`), so a resume stays bit-identical even
when a new timing would have chosen otherwise.

Everything else (other devices, float64, bf16/fp16 autocast, a torch without oneDNN) is plain
``F.linear``.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

ENV = "VAELAB_FP32_LINEAR"
MODES = ("auto", "onednn", "aten")
FWD, DX, DW = 1, 2, 4  # bits of a shape's decision: which products run on oneDNN
MIN_FLOPS = 2e6  # products smaller than this stay with ATen (timing them is noise, and they are cheap)
TIME_ROWS = 1024
# oneDNN is chosen when it takes at most this fraction of ATen's time: a clear win (on AMD CPUs with
# AVX-512 it takes about half), not a few percent that timing noise can give either way (where the two
# are level, a narrow margin flipped decisions from one process to the next, and with them --compile's
# choice of graph, which needs ATen's products for the whole step)
MARGIN = 0.85

_decisions: dict[str, int] = {}  # "rows x in x out @ threads" -> FWD|DX|DW bits
_lock = threading.Lock()
_aten_only = False  # set inside aten_only(): every product is plain F.linear


def _onednn(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a @ bᵀ (+ bias) by oneDNN; a (N, K), b (M, K) in any strides (transposed views are free)."""
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")


@torch.library.custom_op("vaelab::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x Wᵀ + b by oneDNN in float32: x (N, in), W (out, in) -> (N, out)."""
    return _onednn(x, weight, bias)


@onednn_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


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


def setting() -> str:
    """``$VAELAB_FP32_LINEAR``: auto | onednn | aten (anything else: auto)."""
    v = os.environ.get(ENV, "auto").strip().lower()
    return v if v in MODES else "auto"


AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _key(rows: int, n_in: int, n_out: int) -> str:
    return f"{rows}x{n_in}x{n_out}"


def _best(a, b, reps: int = 5, round_s: float = 1e-3) -> float:
    """Seconds of ``b`` over seconds of ``a``, each the best of ``reps`` rounds of as many calls as take
    ``a`` about ``round_s`` (single calls of a fraction of a millisecond are too noisy to rank two
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


def _measure(rows: int, n_in: int, n_out: int) -> int:
    """Time each product of a (rows, in, out) linear both ways; the bits of those oneDNN wins. Beyond
    ``TIME_ROWS`` rows the products are timed at that many (the speeds no longer change), which keeps
    a decision under a few hundred milliseconds."""
    rows = min(rows, TIME_ROWS)
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(rows, n_in, generator=g), torch.randn(n_out, n_in, generator=g)
    b, dy = torch.randn(n_out, generator=g), torch.randn(rows, n_out, generator=g)
    with torch.no_grad():
        trials = {
            FWD: (lambda: F.linear(x, w, b), lambda: _onednn(x, w, b)),
            DX: (lambda: dy.mm(w), lambda: _onednn(dy, w.t())),
            DW: (lambda: dy.t().mm(x), lambda: _onednn(dy.t(), x.t())),
        }
        return sum(bit for bit, (aten, dnn) in trials.items() if _best(aten, dnn) <= MARGIN)


def decide(rows: int, n_in: int, n_out: int) -> int:
    """The products (FWD|DX|DW bits) of a float32 (rows, in, out) linear that run on oneDNN here:
    decided once per process and shape (by ``$VAELAB_FP32_LINEAR``, else by timing), or adopted from
    a checkpoint (:func:`preset`). Inside a ``torch.compile`` trace nothing is timed: a shape that
    :func:`prepare` did not decide stays with ATen."""
    key = _key(rows, n_in, n_out)
    got = _decisions.get(key)
    if got is not None or torch.compiler.is_compiling():
        return got or 0
    mode = setting()
    with _lock:
        if key not in _decisions:
            if mode == "aten" or not AVAILABLE:
                _decisions[key] = 0
            elif mode == "onednn":
                _decisions[key] = FWD | DX | DW
            elif 2.0 * rows * n_in * n_out < MIN_FLOPS:
                _decisions[key] = 0
            else:
                _decisions[key] = _measure(rows, n_in, n_out)
        return _decisions[key]


def decisions(model: nn.Module | None = None) -> dict[str, int]:
    """The decisions taken so far in this process; with ``model``, only those that send a product of
    one of its :class:`Linear` layers to oneDNN (what a run's checkpoint saves: a shape left out is
    ATen's, the default, so the saved set does not depend on what else this process has run)."""
    if model is None:
        return dict(_decisions)
    mine = {(m.in_features, m.out_features) for m in model.modules() if isinstance(m, Linear)}
    out = {}
    for key, v in _decisions.items():
        rows_in_out = key.split("@")[0].split("x")
        if v and len(rows_in_out) == 3 and (int(rows_in_out[1]), int(rows_in_out[2])) in mine:
            out[key] = v
    return out


def onednn_share(model: nn.Module, rows: int) -> float:
    """The fraction of the FLOPs of ``model``'s float32 CPU linear products at ``rows`` rows (each
    layer's forward, dX and dW, which cost the same) that the decisions taken so far send to oneDNN. A
    function of the decisions alone, which a checkpoint saves, so a resume makes the same choices from
    it. Layers elsewhere (a GPU) or in another dtype count for nothing: their products are ATen's."""
    total = won = 0
    for m in model.modules():
        if isinstance(m, Linear) and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32:
            size = m.in_features * m.out_features
            total += 3 * size
            won += _decisions.get(_key(rows, m.in_features, m.out_features), 0).bit_count() * size
    return won / total if total else 0.0


def preset(saved: Mapping[str, int], source: str = "checkpoint") -> None:
    """Adopt decisions saved by a run (so that its resume computes with the same kernels)."""
    from ..errors import CheckpointError

    if not isinstance(saved, Mapping) or not all(
        isinstance(k, str) and len(k) <= 64 and not isinstance(v, bool) and isinstance(v, int) and 0 <= v <= 7
        for k, v in saved.items()
    ) or len(saved) > 1000:
        raise CheckpointError(f"{source}: corrupted training state: gemm must map shapes to integers in 0..7")
    with _lock:
        _decisions.update(saved)


def reset() -> None:
    """Forget every decision (tests)."""
    with _lock:
        _decisions.clear()


@contextlib.contextmanager
def aten_only() -> Iterator[None]:
    """Inside the block every product is plain ``F.linear`` (what ``torch.func`` transforms can
    differentiate; the oneDNN operator has no functorch rule)."""
    global _aten_only
    before, _aten_only = _aten_only, True
    try:
        yield
    finally:
        _aten_only = before


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with float32 CPU products routed to oneDNN where that was measured faster;
    x (..., in) -> (..., out)."""
    if torch.compiler.is_compiling() and torch.is_autocast_enabled(x.device.type):
        # autocast's own casts, made before F.linear instead of inside it: traced that way each weight's
        # gradient leaves its product in the weight's layout; traced through autocast's cast, inductor
        # copied every large gradient twice (transposed, then back) on its way to float32 (bf16 step on
        # a CPU: ~0.5 ms of ~3.4)
        dt = torch.get_autocast_dtype(x.device.type)
        return F.linear(x.to(dt), weight.to(dt), None if bias is None else bias.to(dt))
    if (_aten_only or x.device.type != "cpu" or x.dtype != torch.float32
            or weight.dtype != torch.float32
            or torch.is_autocast_enabled("cpu") or x.dim() < 1
            or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()):  # an exported graph has plain MatMuls
        return F.linear(x, weight, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # (N, in)
    mode = decide(x2.shape[0], weight.shape[1], weight.shape[0])
    if mode == 0:
        return F.linear(x, weight, bias)
    x2 = x2.contiguous()
    y = fast_linear(x2, weight, bias, mode) if torch.compiler.is_compiling() else _FastLinear.apply(x2, weight, bias, mode)
    return y.view(*lead, weight.shape[0])


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state_dict) computed by :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def prepare(model: nn.Module, rows: int) -> None:
    """Take the decisions for every :class:`Linear` of ``model`` at ``rows`` rows now (before a
    ``torch.compile`` trace, which cannot time anything)."""
    for m in model.modules():
        if isinstance(m, Linear) and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32:
            decide(rows, m.in_features, m.out_features)
