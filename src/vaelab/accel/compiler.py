"""What every use of ``torch.compile`` in vaelab shares: the backend, a persistent cache of compiled
kernels, a one-line account of why a compiler failed (training and evaluation then go on eagerly), and
the probes of the private torch features the speed code leans on (:data:`FEATURES`): each is probed,
not read off the version string, and where one is missing the trick that needs it is left out with one
line saying so (:func:`has`)."""

from __future__ import annotations

import contextlib
import os
import tempfile
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
BACKEND: str | Callable = "inductor"  # torch.compile's backend (tests put a failing one here)


def _inductor_default() -> str:
    """Inductor's own default cache (under /tmp), which it writes into the environment when it is
    imported: that value is not a user's choice."""
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        return default_cache_dir()
    except Exception:  # noqa: BLE001  (another torch version: its usual default)
        import getpass

        return os.path.join(tempfile.gettempdir(), "torchinductor_" + getpass.getuser())


def cache_dir() -> Path:
    """Inductor's cache: ``$TORCHINDUCTOR_CACHE_DIR`` when the user set it, else
    ``~/.cache/vaelab/inductor`` (``$XDG_CACHE_HOME`` respected), set for this process so compiled
    kernels survive reboots and ``/tmp`` cleaners."""
    path = os.environ.get(CACHE_ENV)
    if not path or os.path.abspath(path) == os.path.abspath(_inductor_default()):
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = os.path.join(base, "vaelab", "inductor")
        os.environ[CACHE_ENV] = path
    return Path(path)


def root_cause(e: BaseException) -> str:
    """The innermost error of a compiler failure, as ``Type: first line``."""
    seen = 0
    while seen < 10 and (getattr(e, "inner_exception", None) or e.__cause__) is not None:
        e = getattr(e, "inner_exception", None) or e.__cause__  # type: ignore[assignment]
        seen += 1
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


def _own_code(fn: Callable) -> Callable:
    """``fn`` (a function or a bound method) over a copy of its code object. Dynamo keeps compiled
    graphs per code object, at most ``recompile_limit`` (8) of them: every run compiles its own (its
    model is another object), so a process that trains or evaluates more than 8 times would silently
    run the 9th eagerly. A copy per use gives each its own entries (inductor's cache still serves the
    kernels of a graph compiled before)."""
    func = getattr(fn, "__func__", fn)
    if not isinstance(func, types.FunctionType):
        return fn
    copy = types.FunctionType(func.__code__.replace(), func.__globals__, func.__name__, func.__defaults__,
                              func.__closure__)
    copy.__kwdefaults__, copy.__qualname__ = func.__kwdefaults__, func.__qualname__
    owner = getattr(fn, "__self__", None)
    return copy if owner is None else types.MethodType(copy, owner)


def compiled(fn: Callable, backend: str | Callable | None = None, graphs: bool = False) -> Callable:
    """``torch.compile(fn)`` for fixed shapes, with vaelab's cache and backend, compiled apart from
    every other use of ``fn`` (:func:`_own_code`). ``graphs`` (CUDA, inductor): the compiled code is
    captured in CUDA graphs and replayed (inductor's ``reduce-overhead`` mode), and where capture is
    not possible the call raises instead of silently running without them
    (``triton.cudagraph_or_error``), so the caller can say so and choose."""
    import torch

    cache_dir()
    backend = backend or BACKEND
    if graphs and backend == "inductor":
        return torch.compile(_own_code(fn), dynamic=False, backend=backend,
                             options={"triton.cudagraphs": True, "triton.cudagraph_or_error": True})
    return torch.compile(_own_code(fn), dynamic=False, backend=backend)


def graph_step_begin() -> None:
    """Tell inductor's CUDA graphs that a new training step begins: the outputs of the last replay
    (overwritten by the next) are no longer read."""
    import torch

    mark = getattr(torch.compiler, "cudagraph_mark_step_begin", None)
    if mark is not None:
        mark()


@dataclass(frozen=True)
class Feature:
    """A private torch feature a speed trick needs: how to tell it is there, and what runs without it."""

    what: str  # the feature, in words
    instead: str  # what vaelab does without it
    probe: Callable[[], bool]


def _onednn_linear() -> bool:
    import torch

    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    x = torch.ones(2, 3)
    try:  # the schema may change between releases: a call tells
        y = torch.ops.mkldnn._linear_pointwise(x, torch.ones(4, 3), None, "none", [], "")
    except Exception:  # noqa: BLE001
        return False
    return tuple(y.shape) == (2, 4) and bool((y == 3).all())


def _trace_autograd() -> bool:
    import torch._dynamo.config as config

    return hasattr(config, "trace_autograd_ops")


def _skip_guards() -> bool:
    import inspect

    import torch

    try:
        from torch._dynamo.eval_frame import _stance

        return hasattr(_stance, "stance") and "skip_guard_eval_unsafe" in inspect.signature(
            torch.compiler.set_stance).parameters
    except (ImportError, AttributeError, TypeError, ValueError):
        return False


FEATURES: dict[str, Feature] = {
    "onednn_linear": Feature("oneDNN's float32 linear (torch.ops.mkldnn._linear_pointwise)",
                             "every float32 product is ATen's", _onednn_linear),
    "trace_autograd": Feature("dynamo's tracing of torch.autograd.grad (torch._dynamo.config.trace_autograd_ops)",
                              "--compile compiles the forward pass and the loss, not the whole step", _trace_autograd),
    "skip_guards": Feature("torch.compiler.set_stance(skip_guard_eval_unsafe=True)",
                           "the compiled step checks dynamo's guards at every call", _skip_guards),
}
_probed: dict[str, bool] = {}
_said: set[str] = set()


def has(name: str, say: Callable[[str], None] | None = None) -> bool:
    """Whether this torch has feature ``name`` (probed once per process). Where it has not and ``say``
    is given, one line says what runs instead (once per process and feature)."""
    if name not in _probed:
        try:
            _probed[name] = bool(FEATURES[name].probe())
        except Exception:  # noqa: BLE001  (a probe that fails: the feature is not usable here)
            _probed[name] = False
    if not _probed[name] and say is not None and name not in _said:
        import torch

        _said.add(name)
        f = FEATURES[name]
        say(f"vaelab: this torch ({torch.__version__}) lacks {f.what}; {f.instead}")
    return _probed[name]


def guards_skipped() -> contextlib.AbstractContextManager:
    """Inside the block, dynamo runs compiled code without evaluating its guards (only those that tell
    its cached graphs apart), where this torch has that (:func:`has` ``("skip_guards")``); elsewhere it
    changes nothing. Only for a caller that has itself checked everything a recompile could depend on
    (:class:`vaelab.accel.step.FusedGradients` does, per step, for a small fraction of the ~0.2 ms its
    ~800 guards take on a CPU)."""
    import torch

    if not has("skip_guards"):
        return contextlib.nullcontext()
    from torch._dynamo.eval_frame import _stance

    if _stance.stance != "default" or getattr(_stance, "backend", None) is not None:  # the user's own stance stays
        return contextlib.nullcontext()
    return torch.compiler.set_stance(skip_guard_eval_unsafe=True)


def autograd_traced() -> contextlib.AbstractContextManager:
    """Inside the block dynamo traces ``torch.autograd.grad`` into the graph (for this process's
    compiles in the block only; the option is off again after it)."""
    import torch._dynamo.config as config

    return config.patch(trace_autograd_ops=True) if has("trace_autograd") else contextlib.nullcontext()
