"""ONNX graphs of a trained model's two halves, for serving without PyTorch:

* ``encoder.onnx``: ``x`` (B, C, H, W) float32 intensities in [0, 1] (and ``c`` (B, cond_dim) for a
  conditional model) -> ``mean``, ``logvar`` (B, L_top): the posterior N(mean, diag exp(logvar)) of
  the **top** stochastic layer, the code ``decoder.onnx`` takes (the one ``vaelab encode``,
  reconstruction and interpolation use). A model with several stochastic layers also returns the
  lower layers' posteriors as ``mean_<i>``, ``logvar_<i>`` (i = 0 nearest the data), each computed
  as ``model.encode`` does (a layer given the mean of the one below).
* ``decoder.onnx``: ``z`` (B, L_top) (and ``c``) -> the likelihood's parameters (not a draw):

  ============================  ===========================================================
  bernoulli                     ``logits`` (B, C, H, W); the mean image is sigmoid(logits)
  gaussian, gaussian-learned    ``loc`` (B, C, H, W) (the mean image), ``log_sigma`` (same shape)
  discretized-logistic          ``loc``, ``log_scale`` (B, C, H, W) (log-scale clamped as in PyTorch)
  discretized-logistic-mixture  ``logits`` (B, M, H, W), ``loc``, ``log_scale``, ``coeffs`` (B, M, ., H, W)
  ============================  ===========================================================

  The regressor (no latent variable) has no encoder and its decoder takes ``c`` alone.

Every input and output has a dynamic batch axis (axis 0, named ``batch``). Drawing z from the prior
and pixels from the likelihood is left to the caller (a few lines of numpy; docs/export.md), with
``prior.npz``: the top layer's prior as a mixture of diagonal Gaussians (``weights`` (K,), ``mean``
and ``logvar`` (K, L_top); K = 1 for N(0, I), the VampPrior's components computed once from the
encoder at its pseudo-inputs), so that a learned prior is sampled as faithfully as N(0, I).
A posterior or likelihood whose distribution has no entry in :data:`ONNX_PARAMS` cannot be written,
and :class:`OnnxUnsupported` says which.
"""

from __future__ import annotations

import contextlib
import copy
import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..distributions import Distribution
from ..distributions.bernoulli import Bernoulli
from ..distributions.gaussian import Gaussian
from ..distributions.logistic import DiscretizedLogistic, DiscretizedLogisticMixture
from ..distributions.normal import DiagonalGaussian
from ..errors import ConfigError, VaelabError

EXPORTERS = ("torchscript", "dynamo")
EXPORT_BATCH = 2  # the example batch the graphs are traced with (any batch size runs them)


class OnnxUnsupported(VaelabError):
    """A part of a model that ONNX export cannot express (the message names it)."""


def require_onnx(exporter: str = "torchscript") -> None:
    """A one-line :class:`ConfigError` saying how to install what writing ONNX files needs (the
    ``onnx`` package; ``onnxscript`` too for the dynamo exporter), raised before any work."""
    import importlib

    for mod in ("onnx", *(("onnxscript",) if exporter == "dynamo" else ())):
        try:
            importlib.import_module(mod)
        except ImportError:
            raise ConfigError(f"writing ONNX files (--onnx) needs the {mod} package, which is not installed: "
                              f"pip install 'vaelab[onnx]' (or export without --onnx)") from None


def _expand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.expand_as(like)


#: distribution type -> its parameters as named tensors (each with the batch on axis 0)
ONNX_PARAMS: dict[type, Callable[[Any], dict[str, torch.Tensor]]] = {
    Bernoulli: lambda d: {"logits": d.logits},
    Gaussian: lambda d: {"loc": d.loc, "log_sigma": _expand(d.log_sigma, d.loc)},
    DiscretizedLogistic: lambda d: {"loc": d.loc, "log_scale": d.log_scale},
    DiscretizedLogisticMixture: lambda d: {"logits": d.logits, "loc": d.loc, "log_scale": d.log_scale,
                                           "coeffs": d.coeffs},
    DiagonalGaussian: lambda d: {"mean": d.mu, "logvar": _expand(d.logvar, d.mu)},
}


def params_of(d: Distribution, what: str) -> dict[str, torch.Tensor]:
    """The named parameters of ``d`` (the first registered base class of its type wins)."""
    for cls in type(d).__mro__:
        if cls in ONNX_PARAMS:
            return ONNX_PARAMS[cls](d)
    known = ", ".join(sorted(c.__name__ for c in ONNX_PARAMS))
    raise OnnxUnsupported(f"{what} is a {type(d).__name__}, which has no ONNX form (known: {known})")


@dataclass(frozen=True)
class GraphInfo:
    """One ONNX file: its name and its inputs' and outputs' names (for config.json and the card)."""

    file: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "inputs": list(self.inputs), "outputs": list(self.outputs)}


class EncoderGraph(nn.Module):
    """x (, c) -> the top layer's (mean, logvar), then the lower layers' bottom-up."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        qs = self.model.encode(x, c)
        order = [qs[-1], *qs[:-1]]
        return tuple(t for i, q in enumerate(order) for t in params_of(q, f"posterior {i}").values())


class DecoderGraph(nn.Module):
    """z (, c) -> the likelihood's parameters."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        return tuple(params_of(self.model.decode(z, c), "the likelihood").values())


class ConditionDecoderGraph(nn.Module):
    """c -> the likelihood's parameters, for a model without latent variables (the regressor)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(params_of(self.model.decode(c.new_zeros(c.shape[0], 0), c), "the likelihood").values())


def decoder_graph(model: nn.Module) -> nn.Module:
    return DecoderGraph(model) if model.latent_dims else ConditionDecoderGraph(model)


def _encoder_outputs(model: nn.Module, x: torch.Tensor, c: torch.Tensor | None) -> tuple[str, ...]:
    """Output names of the encoder graph, found by running the model once in PyTorch (where a
    posterior with no ONNX form is reported before any export starts)."""
    with torch.no_grad():
        qs = model.encode(x, c)
    names: tuple[str, ...] = tuple(params_of(qs[-1], f"the posterior of the top layer ({len(qs) - 1})"))
    for i, q in enumerate(qs[:-1]):
        names += tuple(f"{k}_{i}" for k in params_of(q, f"the posterior of layer {i}"))
    return names


def _export(graph: nn.Module, args: tuple[torch.Tensor, ...], path: Path, inputs: tuple[str, ...],
            outputs: tuple[str, ...], exporter: str) -> None:
    """``torch.onnx.export`` with a dynamic batch axis on every input and output. ``torchscript``: the
    TorchScript-based exporter (fast, quiet; deprecated by PyTorch but present in 2.13); ``dynamo``:
    the torch.export-based one (needs onnxscript; slower)."""
    kw: dict[str, Any] = {"input_names": list(inputs), "output_names": list(outputs)}
    if exporter == "dynamo":
        batch = torch.export.Dim("batch")
        kw["dynamic_shapes"] = tuple({0: batch} for _ in args)
    else:
        kw["dynamic_axes"] = {n: {0: "batch"} for n in (*inputs, *outputs)}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # the exporters' deprecation and tracer notices are not the user's
        try:  # in eval mode: the exporter puts the graph back in the mode it finds it in, model included
            torch.onnx.export(graph.eval(), args, str(path), dynamo=exporter == "dynamo", **kw)
        except VaelabError:
            raise
        except Exception as e:  # an operator ONNX cannot express, a missing onnxscript, ...
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise OnnxUnsupported(f"{path.name}: the {exporter} ONNX exporter failed ({type(e).__name__}: {first})") from None


@torch.no_grad()
def prior_arrays(model: nn.Module) -> dict[str, Any]:
    """The top layer's prior P(z_top) as a mixture of diagonal Gaussians, numpy float32:
    ``weights`` (K,), ``mean`` (K, L), ``logvar`` (K, L). N(0, I) and any diagonal Gaussian are the
    case K = 1; a prior of another kind cannot be written (:class:`OnnxUnsupported`)."""
    from ..distributions import GaussianMixture

    was = model.training
    model.eval()
    try:
        p = model.prior()
    finally:
        model.train(was)
    L = model.latent_dims[-1]
    if isinstance(p, GaussianMixture):
        w, mu, lv = p.weights, p.mu, p.logvar
    elif isinstance(p, DiagonalGaussian) and p.mu.dim() <= 1 and p.logvar.dim() <= 1:
        w, mu, lv = torch.ones(1), p.mu.expand(L)[None], p.logvar.expand(L)[None]
    else:
        raise OnnxUnsupported(f"the prior {type(p).__name__} has no mixture-of-Gaussians form to write")
    return {k: v.detach().float().cpu().numpy() for k, v in (("weights", w), ("mean", mu), ("logvar", lv))}


def export_onnx(model: nn.Module, folder: str | Path, *, exporter: str = "torchscript",
                messages: list[str] | None = None) -> dict[str, GraphInfo]:
    """Write ``encoder.onnx`` and ``decoder.onnx`` of ``model`` (float32, on the CPU) into ``folder``.
    What cannot be written is skipped, with a one-line reason appended to ``messages`` (or raised as
    :class:`OnnxUnsupported` when ``messages`` is None). Returns what was written, by role."""
    from ..runs.pretrained import DECODER_FILE, ENCODER_FILE

    if exporter not in EXPORTERS:
        raise OnnxUnsupported(f"unknown ONNX exporter {exporter!r}; known: {', '.join(EXPORTERS)}")
    require_onnx(exporter)  # a missing package is an error for every graph, not a skipped one
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(model).float().cpu().eval()  # the caller's model keeps its device, dtype and mode
    spec = model.spec
    g = torch.Generator().manual_seed(0)
    x = torch.rand((EXPORT_BATCH, *spec.shape), generator=g)
    c = torch.rand((EXPORT_BATCH, spec.cond_dim), generator=g) if spec.cond_dim else None
    cond = () if c is None else (c,)
    cin = () if c is None else ("c",)
    written: dict[str, GraphInfo] = {}

    def attempt(role: str, make: Callable[[], GraphInfo]) -> None:
        try:
            written[role] = make()
        except OnnxUnsupported as e:
            if messages is None:
                raise
            messages.append(f"{model.config.model}: no {role}.onnx: {e}")

    def encoder() -> GraphInfo:
        if not model.latent_dims:
            raise OnnxUnsupported("the model has no latent variables, so no encoder")
        outs = _encoder_outputs(model, x, c)
        _export(EncoderGraph(model), (x, *cond), folder / ENCODER_FILE, ("x", *cin), outs, exporter)
        return GraphInfo(ENCODER_FILE, ("x", *cin), outs)

    def decoder() -> GraphInfo:
        latent = bool(model.latent_dims)
        z = (torch.randn((EXPORT_BATCH, model.latent_dims[-1]), generator=g),) if latent else ()
        if not latent and c is None:
            raise OnnxUnsupported("the model has neither a latent variable nor a condition to decode")
        with torch.no_grad():
            outs = tuple(params_of(model.decode(z[0] if latent else c.new_zeros(EXPORT_BATCH, 0), c),
                                   f"the likelihood {model.config.likelihood!r}"))
        ins = ("z", *cin) if latent else ("c",)
        _export(decoder_graph(model), (*z, *cond), folder / DECODER_FILE, ins, outs, exporter)
        return GraphInfo(DECODER_FILE, ins, outs)

    attempt("encoder", encoder)
    attempt("decoder", decoder)
    return written


def reference_outputs(model: nn.Module, role: str, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """What PyTorch computes for the graph ``role`` (encoder | decoder) on ``inputs`` (named as the
    graph's inputs): the numbers an ONNX runtime must reproduce."""
    model = model.float().cpu().eval()
    with torch.no_grad():
        if role == "encoder":
            return list(EncoderGraph(model)(inputs["x"], inputs.get("c")))
        args = (inputs["z"], *([inputs["c"]] if "c" in inputs else [])) if model.latent_dims else (inputs["c"],)
        return list(decoder_graph(model)(*args))
